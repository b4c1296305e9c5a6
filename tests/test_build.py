"""Stage compile: model.so runs and matches onnxruntime; untuned kernels are named; bytes
are reproducible; the CUDA target cross-compiles for sm_89 without a GPU."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from oracle import assert_close_fp32, ort_run

from models import tiny_convnet
from pipeline.core.targets import get_target, target_config
from pipeline.stages import compile_model as build
from pipeline.stages import import_model as importer


@pytest.fixture(scope="module")
def module_json(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("imp")
    onnx.save(tiny_convnet(), str(tmp / "m.onnx"))
    importer.run(tmp / "m.onnx", importer.ImportConfig((("x", (1, 3, 8, 8), "float32"),)),
                 tmp)
    return tmp / "module.json"


def _compile(module_json: Path, out: Path, target="cpu", database=None) -> dict:
    out.mkdir(parents=True)
    build.run(module_json, database,
              build.CompileConfig(target_config(get_target(target))), out)
    return json.loads((out / "compile_report.json").read_text())


def test_cpu_model_runs_and_reports_untuned(module_json, tmp_path):
    import tvm
    from tvm import relax

    from pipeline.runtime.vm import model_weights

    report = _compile(module_json, tmp_path / "c")
    assert report["tuned"] == [] and any(k.startswith("fused_conv2d") for k in report["untuned"])
    io = json.loads((tmp_path / "c" / "io.json").read_text())
    assert io["inputs"] == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert io["outputs"][0]["shape"] == [1, 10]
    assert io["params"]["count"] > 0  # the weights are in model.params, after the inputs
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "c" / "model.so")),
                              tvm.cpu())
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x),
                     *model_weights(tmp_path / "c" / "model.so", tvm.cpu())).numpy()
    assert_close_fp32(got, ort_run(module_json.parent / "m.onnx", {"x": x}))


def test_export_is_byte_reproducible(module_json, tmp_path):
    _compile(module_json, tmp_path / "a")
    _compile(module_json, tmp_path / "b")
    assert (tmp_path / "a" / "model.so").read_bytes() == (tmp_path / "b" / "model.so").read_bytes()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_rtx4090_cross_compiles_for_sm_89(module_json, tmp_path):
    report = _compile(module_json, tmp_path / "g", target="rtx4090")
    assert report["untuned_scheduler"] == "dlight"
    assert '"arch":"sm_89"' in report["target"]
    assert (tmp_path / "g" / "model.so").stat().st_size > 0


def test_a_model_without_weights_still_gets_an_empty_params_file(tmp_path):
    """Every stage output exists whatever the model (doit's file_dep): a graph with no
    initializer compiles to a model.so and a model.params holding no tensor."""
    from onnx import TensorProto, helper

    from pipeline.runtime.params import load_params

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    importer.run(tmp_path / "m.onnx", importer.ImportConfig((("x", (2, 3), "float32"),)),
                 tmp_path)
    _compile(tmp_path / "module.json", tmp_path / "c")
    io = json.loads((tmp_path / "c" / "io.json").read_text())
    assert io["params"]["count"] == 0
    assert load_params(tmp_path / "c" / "model.params") == []
