"""Stage source: generators, local files, opset upgrade, normalisation, bad files and inputs."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_onnx_normalize import IR3_INPUTS, X, Y, ir3_export, x_feed

from models import tiny_convnet
from pipeline.core.errors import ConfigError, CorruptInputError
from pipeline.core.hashing import sha256_file
from pipeline.stages import quantize, source

INPUTS = (("x", (1, 3, 8, 8), "float32"),)
REPO = Path(__file__).resolve().parent.parent


def _cfg(path="", generator="", inputs=INPUTS):
    """(config, the file it names) for source.run."""
    config = source.SourceConfig(model="tiny", seed=0, inputs=inputs,
                                 kind="generator" if generator else "file")
    return config, Path(generator or path)


def test_local_file_is_checked_and_copied(tmp_path):
    onnx.save(tiny_convnet(), str(tmp_path / "in.onnx"))
    (tmp_path / "out").mkdir()
    info = source.run(*_cfg(tmp_path / "in.onnx"), tmp_path / "out")
    assert "Conv" in info["op_types"] and info["upgraded_from"] is None
    onnx.checker.check_model(onnx.load(str(tmp_path / "out" / "model.onnx")))


def test_old_opset_is_upgraded(tmp_path):
    onnx.save(tiny_convnet(opset=9), str(tmp_path / "old.onnx"))
    (tmp_path / "out").mkdir()
    info = source.run(*_cfg(tmp_path / "old.onnx"), tmp_path / "out")
    assert info["upgraded_from"] == 9
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert model.opset_import[0].version == source.MIN_OPSET


def test_truncated_file_gets_a_clear_error(tmp_path):
    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"))
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInputError, match="corrupt or truncated; re-export"):
        source.run(*_cfg(tmp_path / "m.onnx"), tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        source.run(*_cfg(tmp_path / "nope.onnx"), tmp_path)


def test_inputs_must_match_the_model(tmp_path):
    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError) as e:
        source.run(*_cfg(tmp_path / "m.onnx", inputs=(("x", (1, 3, 9, 9), "float32"),
                                                     ("z", (1,), "float32"))), tmp_path / "out")
    assert "spec shape (1, 3, 9, 9) does not fit" in str(e.value)
    assert "input 'z' is not a graph input" in str(e.value)


def test_resnet50_generator_is_deterministic_and_faithful(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "models"))
    import resnet50_gen

    model = resnet50_gen.build(seed=0)
    params = sum(int(onnx.numpy_helper.to_array(i).size) for i in model.graph.initializer
                 if not i.name.endswith((".bn.mean", ".bn.var")))
    assert params == 25_557_032  # torchvision resnet50's parameter count
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 53 and ops.count("BatchNormalization") == 53
    assert ops.count("Add") == 16 and "MaxPool" in ops and "Gemm" in ops
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    assert digest == hashlib.sha256(resnet50_gen.build(seed=0).SerializeToString()).hexdigest()
    assert digest != hashlib.sha256(resnet50_gen.build(seed=1).SerializeToString()).hexdigest()


def test_ir3_export_is_normalised_and_reported(tmp_path):
    onnx.save(ir3_export(), str(tmp_path / "in.onnx"))
    (tmp_path / "out").mkdir()
    info = source.run(*_cfg(tmp_path / "in.onnx", inputs=IR3_INPUTS), tmp_path / "out")
    assert info["upgraded_from"] == 9 and info["opset"] == source.MIN_OPSET
    norm = info["normalisation"]
    assert norm["summary"].startswith("dropped 9 initializer inputs; ir_version 3 -> 7; "
                                      "opset 9 -> 13; folded/removed ")
    assert norm["removed_ops"]["ConstantOfShape"] == 4
    assert "ConstantOfShape" not in info["op_types"]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert model.ir_version >= 7
    assert [i.name for i in model.graph.input] == [X]
    assert [o.name for o in model.graph.output] == [Y]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]


def test_stage_output_is_byte_identical_on_rerun(tmp_path):
    onnx.save(ir3_export(), str(tmp_path / "in.onnx"))
    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        source.run(*_cfg(tmp_path / "in.onnx", inputs=IR3_INPUTS), tmp_path / run)
        digests.append(hashlib.sha256((tmp_path / run / "model.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_quantize_static_works_on_the_normalised_output(tmp_path):
    """The raw export fails in quantize_static ("Required inputs (['scale__SHAPE']) are
    missing from input feed"); the stage's output quantizes and runs."""
    onnx.save(ir3_export(), str(tmp_path / "in.onnx"))
    (tmp_path / "src").mkdir()
    (tmp_path / "q").mkdir()
    source.run(*_cfg(tmp_path / "in.onnx", inputs=IR3_INPUTS), tmp_path / "src")
    config = quantize.QuantizeConfig(method="minmax", samples=4, seed=0, data_dir="",
                                     activation_type="uint8", weight_type="int8",
                                     per_channel=True, inputs=IR3_INPUTS)
    info = quantize.run(tmp_path / "src" / "model.onnx", config, tmp_path / "q")
    assert info["op_counts"]["QuantizeLinear"] > 0
    session = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {X: x_feed()})
    assert y.shape == (1, 5) and np.isfinite(y).all()


def test_an_undeclared_input_is_named_with_what_to_do(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offset"], ["y"])], "two_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("spare", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError) as e:
        source.run(*_cfg(tmp_path / "m.onnx"), tmp_path / "out")
    message = str(e.value)
    assert "graph inputs not declared in the spec: offset, spare (not used by any node)" in message
    assert "give each an [[inputs]] entry" in message and "initializer" in message


def test_a_model_with_external_data_is_read_and_written_with_external_data(tmp_path):
    from pipeline.frontend.onnx_normalize import DATA_DIGEST_KEY, load_inline

    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.data", size_threshold=0)
    for out in (tmp_path / "out", tmp_path / "again"):
        out.mkdir()
        info = source.run(*_cfg(tmp_path / "m.onnx"), out)
        assert info["external_data"] is True
        assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    # written with its weights outside, the data file's sha256 in the proto, reproducibly
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    stored = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert all(len(t.raw_data) < 64 for t in stored.graph.initializer)
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size >= 1024
    digest = {p.key: p.value for p in stored.metadata_props}[DATA_DIGEST_KEY]
    assert digest == sha256_file(tmp_path / "out" / "model.onnx.data")
    # the same network and weights as given
    out = load_inline(tmp_path / "out" / "model.onnx")
    assert out.SerializeToString() == tiny_convnet().SerializeToString()
    # other weights, same shapes: model.onnx's own bytes change (doit and recipes hash it)
    onnx.save(tiny_convnet(seed=1), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.data", size_threshold=0)
    (tmp_path / "other").mkdir()
    source.run(*_cfg(tmp_path / "m.onnx"), tmp_path / "other")
    assert (tmp_path / "other" / "model.onnx").read_bytes() != \
        (tmp_path / "out" / "model.onnx").read_bytes()


def test_a_model_over_the_external_data_threshold_is_written_with_external_data(
        tmp_path, monkeypatch):
    """What a model past 2 GiB goes through (folding via files, external data out), with
    the threshold lowered to the tiny model's size."""
    from pipeline.frontend import onnx_normalize

    monkeypatch.setattr(onnx_normalize, "EXTERNAL_DATA_ABOVE", 100)
    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    info = source.run(*_cfg(tmp_path / "m.onnx"), tmp_path / "out")
    assert info["external_data"] is True and info["tensor_bytes"] > 100
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size > 0
    out = onnx_normalize.load_inline(tmp_path / "out" / "model.onnx")
    assert out.SerializeToString() == tiny_convnet().SerializeToString()
    # given with external data, past the threshold: its weights stay in files until folded
    # (onnxruntime reads them from a scratch copy); the same result
    (tmp_path / "ext").mkdir()
    onnx.save(tiny_convnet(), str(tmp_path / "ext" / "m.onnx"), save_as_external_data=True,
              location="w.bin", size_threshold=0)
    (tmp_path / "out2").mkdir()
    source.run(*_cfg(tmp_path / "ext" / "m.onnx"), tmp_path / "out2")
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "out2" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["m.onnx", "w.bin"]


def test_missing_external_data_gets_a_clear_error(tmp_path):
    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    with pytest.raises(CorruptInputError, match="cannot read the external data .* next to it"):
        source.run(*_cfg(tmp_path / "m.onnx"), tmp_path)


def test_the_big_decoder_generator_in_its_tiny_shape(tmp_path):
    """models/big_decoder's generator (ONNX external data out, one copy of the weights)
    in its test shape: the source stage keeps the external data, and the network computes
    what the generated file does."""
    decoder_gen = REPO / "models" / "big_decoder" / "models" / "decoder_gen.py"
    wrapper = tmp_path / "tiny_decoder.py"
    wrapper.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('decoder_gen', {str(decoder_gen)!r})\n"
        "gen = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(gen)\n"
        "def generate(out_path, seed):\n"
        "    gen.export(out_path, seed, 'tiny')\n")
    (tmp_path / "out").mkdir()
    info = source.run(*_cfg(generator=wrapper, inputs=(("input_ids", (1, 4), "int64"),)),
                      tmp_path / "out")
    assert info["external_data"] is True
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size > 10_000
    exec_globals: dict = {}
    exec(wrapper.read_text(), exec_globals)
    exec_globals["generate"](tmp_path / "given.onnx", 0)
    ids = np.array([[3, 1, 4, 1]], np.int64)
    want = ort.InferenceSession(str(tmp_path / "given.onnx")).run(None, {"input_ids": ids})
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(
        None, {"input_ids": ids})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
