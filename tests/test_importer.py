"""Stage import: static-shape Relax module, BatchNorm folded, unsupported ops named."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from oracle import assert_close_fp32, ort_run

from models import tiny_convnet
from pipeline.core.errors import UnsupportedModelError
from pipeline.stages import import_model as importer

CFG = importer.ImportConfig(inputs=(("x", (1, 3, 8, 8), "float32"),))


def _import(tmp_path: Path, model) -> Path:
    onnx.save(model, str(tmp_path / "m.onnx"))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    importer.run(tmp_path / "m.onnx", CFG, out)
    return out / "module.json"


def test_batchnorm_folded_and_numerics_kept(tmp_path):
    import tvm
    from tvm import relax

    from pipeline.compiler.workloads import load_module

    module_json = _import(tmp_path, tiny_convnet(with_bn=True))
    mod = load_module(module_json)  # the IR, its weights (module.params) bound back
    text = mod.script()
    assert "batch_norm" not in text and "R.nn.conv2d" in text
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert_close_fp32(got, ort_run(tmp_path / "m.onnx", {"x": x}))


def test_module_bytes_are_deterministic(tmp_path):
    a = _import(tmp_path / "a", tiny_convnet()) if (tmp_path / "a").mkdir() is None else None
    b = _import(tmp_path / "b", tiny_convnet()) if (tmp_path / "b").mkdir() is None else None
    assert a.read_bytes() == b.read_bytes()


def test_unsupported_ops_all_named_with_nodes(tmp_path):
    nodes = [helper.make_node("FancyOp", ["x"], ["a"], name="first_fancy"),
             helper.make_node("FancyOp", ["a"], ["b"], name="second_fancy"),
             helper.make_node("QLinearConv", ["b"], ["y"], name="qconv")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError) as e:
        _import(tmp_path, model)
    msg = str(e.value)
    assert "2 operator type(s)" in msg
    assert "FancyOp (nodes: first_fancy, second_fancy)" in msg
    assert "QLinearConv (nodes: qconv)" in msg
    assert "QOperator-format" in msg
