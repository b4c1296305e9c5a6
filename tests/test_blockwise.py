"""The block-wise weight-only codec (pipeline.schemes.blockwise) against onnxruntime."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from pipeline.core.errors import UnsupportedModelError
from pipeline.schemes import blockwise as bw


def _matmul_model(k: int, n: int, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """y [k, n] = x [k, k] @ W: fed the identity, onnxruntime returns the weight it uses."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    return model


def _ort_weight(model: onnx.ModelProto, k: int) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]


def _quantize(model, bits, block, symmetric, fmt=QuantFormat.QOperator):
    q = MatMulNBitsQuantizer(copy.deepcopy(model), bits=bits, block_size=block,
                             is_symmetric=symmetric, quant_format=fmt)
    q.process()
    return q.model.model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 33])
def test_pack_unpack_round_trip(bits, rows):
    rng = np.random.default_rng(rows)
    values = rng.integers(0, 1 << bits, size=(rows, 5), dtype=np.uint8)
    packed = bw.pack_rows(values, bits)
    assert packed.shape == (-(-rows * bits // 8), 5)
    assert np.array_equal(bw.unpack_rows(packed, bits, rows), values)


def test_every_int4_pair_packs_into_its_byte():
    pairs = np.array([(lo, hi) for lo in range(16) for hi in range(16)], np.uint8).T
    packed = bw.pack_rows(pairs, 4)
    assert sorted(packed.ravel().tolist()) == list(range(256))
    assert np.array_equal(bw.unpack_rows(packed, 4, 2), pairs)


def test_int4_values_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        bw.pack_rows(np.array([[16]], np.uint8), 4)


@pytest.mark.parametrize("k,n,block,symmetric,bits", [
    (96, 40, 32, True, 4), (96, 40, 32, False, 4),
    (100, 24, 32, False, 4),   # K not a multiple of the group: the last group is padded
    (97, 8, 16, True, 4),      # odd K: half a byte of padding too
    (200, 16, 128, False, 4),  # two groups of 128, the last 72 wide
    (64, 8, 32, False, 8), (300, 16, 128, True, 8)])
def test_matmul_nbits_repack_is_exactly_what_onnxruntime_computes(k, n, block, symmetric,
                                                                  bits):
    q = _quantize(_matmul_model(k, n), bits, block, symmetric)
    node = next(x for x in q.graph.node if x.op_type == "MatMulNBits")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    assert (zp is None) == symmetric
    weight = bw.from_matmul_nbits(inits[node.input[1]], inits[node.input[2]], zp, k, n, bits,
                                  block, scale_dtype="float32")
    assert weight.codes.shape == (-(-k * bits // 8), n)
    assert np.array_equal(bw.dequantize(weight), _ort_weight(q, k))


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_dequantize_repack_matches_onnxruntime(symmetric):
    k, n = 96, 40
    q = _quantize(_matmul_model(k, n, opset=21), 4, 32, symmetric, QuantFormat.QDQ)
    dq = next(x for x in q.graph.node if x.op_type == "DequantizeLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    codes = inits[dq.input[0]]
    assert str(codes.dtype) == ("int4" if symmetric else "uint4")
    zero = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
    weight = bw.from_blocked_dequantize(codes, inits[dq.input[1]], zero, 32, "float32")
    # onnxruntime fuses DQ -> MatMul into MatMulNBits: equal to fp32 rounding
    np.testing.assert_allclose(bw.dequantize(weight), _ort_weight(q, k), rtol=0, atol=1e-6)
    assert (weight.zeros is None) == symmetric  # signed zero points 0 are the default 8


def test_float16_scales_are_refused_when_they_would_change_the_weights():
    q = _quantize(_matmul_model(64, 16), 4, 32, True)
    node = next(x for x in q.graph.node if x.op_type == "MatMulNBits")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    scales = inits[node.input[2]]
    with pytest.raises(UnsupportedModelError, match="float16"):
        bw.from_matmul_nbits(inits[node.input[1]], scales, None, 64, 16, 4, 32, "float16")
    rounded = bw.round_scales_to_float16(scales)
    weight = bw.from_matmul_nbits(inits[node.input[1]], rounded, None, 64, 16, 4, 32, "float16")
    assert weight.scales.dtype == np.float16
    assert np.array_equal(weight.scales.astype(np.float32).ravel(),
                          rounded.reshape(16, 2).T.ravel())


def test_scale_rounding_never_reaches_zero_or_infinity():
    rounded = bw.round_scales_to_float16(np.array([1e-9, -1e-9, 1e6, 0.1], np.float32))
    assert np.all(rounded[:2] != 0) and np.all(np.isfinite(rounded))
    assert np.array_equal(rounded.astype(np.float16).astype(np.float32), rounded)


@pytest.mark.parametrize("symmetric,expected", [(True, 4.5), (False, 4.625)])
def test_bits_per_weight_of_w4g32_counts_scales_and_zero_points(symmetric, expected):
    k = n = 256
    zeros = None if symmetric else np.zeros((k // 32 // 2, n), np.uint8)
    weight = bw.BlockwiseWeight(k, n, 4, 32, np.zeros((k // 2, n), np.uint8),
                                np.ones((k // 32, n), np.float16), zeros)
    assert weight.bits_per_weight == pytest.approx(expected)


def test_unsupported_bit_width_and_block_size_are_named():
    with pytest.raises(UnsupportedModelError, match="3-bit"):
        bw.pack_rows(np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(UnsupportedModelError, match="block_size 24"):
        bw.from_matmul_nbits(np.zeros((2, 1, 12), np.uint8), np.ones(2, np.float32), None,
                             24, 2, 4, 24)
