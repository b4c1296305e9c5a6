"""Stage source: generators, local files, opset upgrade, bad files and mismatched inputs."""

import hashlib
from pathlib import Path

import onnx
import pytest

from models import tiny_convnet
from pipeline.core.errors import ConfigError, CorruptInputError
from pipeline.stages import source

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
