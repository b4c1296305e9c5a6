"""Block-wise weights through the import: MatMulNBits and blocked DequantizeLinear become
fused dequantize-matmul kernels (pipeline.frontend.blockwise_weights,
pipeline.compiler.passes.weight_only), compiled by TVM and compared with onnxruntime."""

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from models import tiny_mlp_rows
from pipeline.core.errors import UnsupportedModelError
from pipeline.frontend import blockwise_weights
from pipeline.stages.import_model import ImportConfig, import_onnx

INPUTS = (("x", (1, 3, 96), "float32"),)


def _quantized(tmp_path: Path, bits=4, block=32, symmetric=True, fmt=QuantFormat.QOperator,
               opset=17) -> Path:
    model = tiny_mlp_rows()
    if opset != 17:
        model.opset_import[0].version = opset
        model.ir_version = 10
    q = MatMulNBitsQuantizer(copy.deepcopy(model), bits=bits, block_size=block,
                             is_symmetric=symmetric, quant_format=fmt)
    q.process()
    path = tmp_path / "q.onnx"
    onnx.save(q.model.model, str(path))
    return path


def _tvm_vs_ort(path: Path, report: dict | None = None):
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import graph_cleanup

    mod = graph_cleanup()(import_onnx(path, ImportConfig(inputs=INPUTS), report))
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    x = np.random.default_rng(5).standard_normal((1, 3, 96)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    from pipeline.runtime.ort_reference import session_options

    # onnxruntime's own MatMulNBits kernels, the reference validate uses
    ref = ort.InferenceSession(str(path), session_options(quantized=True),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return mod, got, ref


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 32, False),
                                                  (4, 128, False), (8, 128, True)])
def test_matmul_nbits_imports_and_matches_onnxruntime(tmp_path, bits, block, symmetric):
    report: dict = {}
    mod, got, ref = _tvm_vs_ort(_quantized(tmp_path, bits, block, symmetric), report)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
    layers = report["blockwise_layers"]
    assert [(x["k"], x["n"], x["bits"], x["block_size"]) for x in layers] == \
        [(96, 64, bits, block), (64, 48, bits, block)]
    assert all(x["zero_points"] is (not symmetric) for x in layers)
    # the weights are packed codes inside the kernel's call, no parameter stands in any more
    assert [p.name for p in mod["main"].params] == ["x"]
    assert "dequant_matmul" in mod.script()
    consts = [c for c in _constants(mod) if c.dtype == "uint8"]
    assert sum(c.numpy().nbytes for c in consts) >= (96 * 64 + 64 * 48) * bits // 8


def _constants(mod):
    import tvm
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(
        mod["main"].body, lambda e: found.append(e.value) if isinstance(e, tvm.ir.GenericConst)
        else None)
    return found


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_dequantize_linear_imports_and_matches_onnxruntime(tmp_path, symmetric):
    report: dict = {}
    path = _quantized(tmp_path, 4, 32, symmetric, QuantFormat.QDQ, opset=21)
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node)
    _, got, ref = _tvm_vs_ort(path, report)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert len(report["blockwise_layers"]) == 2


def test_matmul_nbits_with_bias_input(tmp_path):
    path = _quantized(tmp_path)
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    bias = np.linspace(-1, 1, 64).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(bias, "extra_bias"))
    while len(node.input) < 5:
        node.input.append("")
    node.input.append("extra_bias")
    onnx.save(model, str(path))
    _, got, ref = _tvm_vs_ort(path)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_g_idx_and_non_constant_weights_are_refused_by_name(tmp_path):
    model = onnx.load(str(_quantized(tmp_path)))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    while len(node.input) < 4:
        node.input.append("")
    node.input.append("gidx")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(96, np.int32), "gidx"))
    with pytest.raises(UnsupportedModelError, match=rf"{node.name}: g_idx"):
        blockwise_weights.extract(model)
    model = onnx.load(str(_quantized(tmp_path)))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    model.graph.input.append(helper.make_tensor_value_info("codes_in", TensorProto.UINT8,
                                                           [64, 3, 16]))
    node.input[1] = "codes_in"
    with pytest.raises(UnsupportedModelError, match="must be constants"):
        blockwise_weights.extract(model)
