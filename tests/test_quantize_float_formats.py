"""Stage quantize, float recipes: float16 conversion and bfloat16 weights, run by onnxruntime."""

from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from float_models import tiny_mlp
from onnx import TensorProto, numpy_helper

from models import tiny_convnet
from pipeline.stages import quantize

CONV_IN = (("x", (1, 3, 8, 8), "float32"),)
MLP_IN = (("x", (1, 128), "float32"),)


def _run(model: onnx.ModelProto, recipe: str, tmp: Path, inputs=CONV_IN) -> tuple[Path, dict]:
    fp32, out = tmp / "fp32.onnx", tmp / recipe
    onnx.save(model, str(fp32))
    out.mkdir()
    config = quantize.QuantizeConfig(method="minmax", samples=1, seed=0, data_dir="",
                                     activation_type="uint8", weight_type="int8",
                                     per_channel=True, inputs=inputs)
    report = quantize.run(fp32, replace(config, recipe=recipe), out)
    return out / "model.onnx", report


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_float16_converts_every_weight_and_keeps_float32_io(tmp_path):
    path, report = _run(tiny_convnet(), "float16", tmp_path)
    model = onnx.load(str(path))
    types = [i.data_type for i in model.graph.initializer]
    # BatchNorm folded into the conv in float32 first (onnxruntime's pre-processing): 3
    # weights + 3 biases, every one float16
    assert types == [TensorProto.FLOAT16] * 6, types
    assert "BatchNormalization" not in report["op_counts"]
    assert report["initializers"] == {"FLOAT16": 6} and report["float32_ops"] == []
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] \
        == [TensorProto.FLOAT, TensorProto.FLOAT]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    fp16, fp32 = _ort(path, x), _ort(tmp_path / "fp32.onnx", x)
    assert fp16.dtype == np.float32
    assert 0 < np.abs(fp16 - fp32).max() < 1e-2 * max(1.0, np.abs(fp32).max())


def test_bfloat16_rounds_exactly_the_matmul_gemm_conv_weights(tmp_path):
    fp32_model = tiny_mlp()
    path, report = _run(fp32_model, "bfloat16_weights", tmp_path, MLP_IN)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    bf16 = sorted(n for n, i in inits.items() if i.data_type == TensorProto.BFLOAT16)
    assert bf16 == ["fc.w.bf16", "w0.bf16", "w1.bf16", "w2.bf16"]
    assert report["bfloat16_weights"] == 4 and report["initializers"]["FLOAT"] == 4  # biases
    original = {i.name: numpy_helper.to_array(i) for i in fp32_model.graph.initializer}
    for name in bf16:
        stored = np.frombuffer(inits[name].raw_data, np.uint16).reshape(inits[name].dims)
        ref = original[name.removesuffix(".bf16")].astype(ml_dtypes.bfloat16).view(np.uint16)
        assert np.array_equal(stored, ref), name  # round to nearest even, as ml_dtypes
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert sorted(n.output[0] for n in casts) == ["fc.w", "w0", "w1", "w2"]
    # onnxruntime computes with exactly the rounded weights
    x = np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)
    h = x.astype(np.float64)
    for i in range(3):
        w = original[f"w{i}"].astype(ml_dtypes.bfloat16).astype(np.float64)
        h = np.maximum(h @ w + original[f"b{i}"], 0)
    ref = h @ original["fc.w"].astype(ml_dtypes.bfloat16).astype(np.float64).T + \
        original["fc.b"]
    got = _ort(path, x)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    fp32 = _ort(tmp_path / "fp32.onnx", x)
    assert np.abs(got - fp32).max() > 1e-4  # it did round something
    assert _cosine(got, fp32) > 0.999


@pytest.mark.parametrize("recipe", ["float16", "bfloat16_weights"])
def test_same_model_same_bytes(tmp_path, recipe):
    paths = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        paths.append(_run(tiny_convnet(), recipe, tmp_path / run)[0])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_float16_of_an_int64_mask_cast_loads_in_onnxruntime(tmp_path):
    """A mask cast from int64 to float (every BERT's pooling): onnxconverter-common declares
    its output float16 but keeps ``to=FLOAT``; the recipe makes the Cast agree."""
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT, name="mask_cast"),
         helper.make_node("Mul", ["x", "mf"], ["y"], name="mul")], "mask",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("m", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path, report = _run(model, "float16", tmp_path, (("x", (1, 4), "float32"),
                                                     ("m", (1, 4), "int64")))
    assert report["casts_retargeted"] == ["mask_cast"]
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x, "m": np.array([[1, 0, 1, 0]], np.int64)})[0]
    assert np.array_equal(y, [[1.0, 0.0, 3.0, 0.0]])


@pytest.mark.parametrize("recipe, bits", [("float16", 0), ("bfloat16_weights", 0),
                                          ("matmul_nbits", 4), ("weight_codes8", 0),
                                          ("dynamic_int8", 0)])
def test_a_source_with_external_data_is_quantized_to_external_data(tmp_path, recipe, bits):
    """A model past protobuf's 2 GiB limit reaches quantize with external data: each recipe
    writes ``model.onnx`` + ``model.onnx.data`` (the data's sha256 inside), and the model is
    the one the same recipe makes from the inline source."""
    from pipeline.frontend import onnx_normalize

    def quantized(folder: Path, external: bool) -> Path:
        folder.mkdir()
        source, out = folder / "model.onnx", folder / "out"
        onnx_normalize.save_model(tiny_mlp(gemm_last=False), source, external)
        out.mkdir()
        config = quantize.QuantizeConfig(method="minmax", samples=1, seed=0, data_dir="",
                                         activation_type="uint8", weight_type="int8",
                                         per_channel=True, inputs=MLP_IN, recipe=recipe,
                                         bits=bits, block_size=32 if bits else 0,
                                         weight_format="posit8")
        report = quantize.run(source, config, out)
        assert report["external_data"] is external
        return out / "model.onnx"

    ext, inline = quantized(tmp_path / "ext", True), quantized(tmp_path / "inline", False)
    assert sorted(p.name for p in ext.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    stored = onnx.load(str(ext), load_external_data=False)
    assert onnx_normalize.has_external_data(stored)
    assert onnx_normalize.DATA_DIGEST_KEY in {p.key for p in stored.metadata_props}
    graphs = [onnx_normalize.load_inline(ext).graph, onnx.load(str(inline)).graph]
    for graph in graphs:  # onnxconverter-common notes a conversion in some tensors' doc
        for tensor in graph.initializer:
            tensor.ClearField("doc_string")
    assert graphs[0] == graphs[1]
    x = np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)
    np.testing.assert_array_equal(_ort(ext, x), _ort(inline, x))
