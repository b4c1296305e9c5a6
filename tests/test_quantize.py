"""Stage quantize: QDQ output, u8 x s8 per channel, deterministic bytes, bad calibration data."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import tiny_convnet
from pipeline.core.errors import ConfigError
from pipeline.stages import quantize

INPUTS = (("x", (1, 3, 8, 8), "float32"),)


def _cfg(**kw):
    base = dict(method="minmax", samples=4, seed=0, data_dir="", activation_type="uint8",
                weight_type="int8", per_channel=True, inputs=INPUTS)
    base.update(kw)
    return quantize.QuantizeConfig(**base)


@pytest.fixture
def fp32(tmp_path) -> Path:
    path = tmp_path / "fp32.onnx"
    onnx.save(tiny_convnet(), str(path))
    return path


def _run(fp32, out: Path, **kw) -> Path:
    out.mkdir()
    quantize.run(fp32, _cfg(**kw), out)
    return out / "model.onnx"


def test_qdq_u8_s8_per_channel(fp32, tmp_path):
    model = onnx.load(str(_run(fp32, tmp_path / "q")))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops
    inits = {i.name: i for i in model.graph.initializer}
    weight_q = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT8 and
                len(i.dims) == 4]
    assert len(weight_q) == 2, "both conv weights stored as s8"
    zero_points = [i for n, i in inits.items() if "zero_point" in n and
                   i.data_type == onnx.TensorProto.UINT8]
    assert zero_points, "activations quantized to u8"
    dq_scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in {w.name for w in weight_q}]
    assert [tuple(s.dims) for s in dq_scales] == [(8,), (8,)], "per-channel weight scales"


def test_same_inputs_same_bytes(fp32, tmp_path):
    a = _run(fp32, tmp_path / "a").read_bytes()
    b = _run(fp32, tmp_path / "b").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    c = _run(fp32, tmp_path / "c", seed=7).read_bytes()
    assert a != c  # other calibration data, other scales


def test_calibration_from_npy_folder(fp32, tmp_path):
    data = tmp_path / "calib"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        np.save(data / f"{i}.npy", rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    out = _run(fp32, tmp_path / "q", data_dir=str(data))
    assert out.exists()


def test_bad_calibration_data(fp32, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _run(fp32, tmp_path / "q1", data_dir=str(tmp_path / "missing"))
    data = tmp_path / "calib"
    data.mkdir()
    np.save(data / "0.npy", np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ConfigError, match=r"expected float32 \[1, 3, 8, 8\]"):
        _run(fp32, tmp_path / "q2", data_dir=str(data))


def test_a_selection_that_quantizes_nothing_is_an_error(tmp_path):
    """op_types that the model has none of, or excluded nodes it does not have, would make
    onnxruntime silently quantize nothing (or everything): both are refused by name."""
    model = tmp_path / "m.onnx"
    onnx.save(tiny_convnet(), str(model))
    out = tmp_path / "q"
    out.mkdir()
    for changes, needle in (({"op_types": ("LSTM", "GRU")}, "nothing would be quantized"),
                            ({"exclude_nodes": ("nope",)}, "no node named 'nope'")):
        with pytest.raises(ConfigError, match=needle):
            quantize.run(model, _cfg(samples=1, **changes), out)
    quantize.run(model, _cfg(samples=1, op_types=("Conv", "MatMul")), out)  # Conv: ok
    assert (out / "model.onnx").exists()


def _masked_attention_scores(path: Path) -> None:
    """x[1,16] -> MatMul -> + (1 - float(mask)) * -3.4e38 -> Softmax -> MatMul: a
    transformer's mask arithmetic (mask: int64 0/1), whose tensors span float32's range."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}")
         for i in range(2)]
    consts = [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("one", 1.0), ("lowest", -3.4e38))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["s"]),
             helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "maskf"], ["inv"]),
             helper.make_node("Mul", ["inv", "lowest"], ["bias"]),
             helper.make_node("Add", ["s", "bias"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "w1"], ["y"])]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                          helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [*w, *consts])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))


def test_histogram_calibration_on_a_mask_says_what_to_do(tmp_path):
    """entropy calibration of every op bins the mask's -3.4e38 and fails in onnxruntime:
    a ConfigError names the method and the fixes; quantizing only the MatMuls works."""
    model, out = tmp_path / "m.onnx", tmp_path / "q"
    _masked_attention_scores(model)
    out.mkdir()
    cfg = {"samples": 2, "method": "entropy", "ranges": {"mask": (0, 1)},
           "inputs": (("x", (1, 16), "float32"), ("mask", (1, 16), "int64"))}
    with pytest.raises(ConfigError, match=r"calibration method 'entropy'.*op_types"):
        quantize.run(model, _cfg(**cfg), out)
    quantize.run(model, _cfg(op_types=("MatMul",), **cfg), out)
    assert (out / "model.onnx").exists()
