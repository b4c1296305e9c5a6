"""Codec of the block-wise (per-group) weight-only integer formats: INT4 and INT8 codes with a
scale (and optionally a zero point) per group of ``block_size`` input channels.

Two layouts meet here:

- **onnxruntime's** ``com.microsoft.MatMulNBits`` (what the quantize stage writes and
  onnxruntime runs): codes ``uint8 [N, n_blocks, block_size * bits / 8]``, row ``n`` is output
  channel ``n``, code ``k`` of a block sits in byte ``k * bits // 8``, low nibble first;
  scales ``[N * n_blocks]`` (or ``[N, n_blocks]``); zero points, when present, ``uint8``
  packed the same way along the blocks (``[N, ceil(n_blocks * bits / 8)]``); without them the
  zero point is ``2 ** (bits - 1)``.
- **the kernel's** (what ``model.so`` stores): transposed so that consecutive output channels
  are consecutive bytes, which is what a vectorised dequantize-matmul loads: codes
  ``uint8 [ceil(K * bits / 8), N]`` (row ``k // 2`` holds input channels ``k`` (low nibble)
  and ``k + 1`` (high nibble) for INT4), scales ``[n_blocks, N]`` in ``scale_dtype``, zero
  points ``uint8 [ceil(n_blocks * bits / 8), N]`` packed like the codes.

Both dequantize to ``W[k, n] = (code[k, n] - zero[k // block_size, n]) * scale[k //
block_size, n]`` for ``k < K``; the repacking changes no value (tests check it exhaustively
against onnxruntime). Pure numpy: the import pass and the tests use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import UnsupportedModelError

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class BlockwiseWeight:
    """One weight in the kernel's layout (see the module docstring)."""

    k: int  # input channels (the reduction)
    n: int  # output channels
    bits: int
    block_size: int
    codes: np.ndarray  # uint8 [ceil(K * bits / 8), N]
    scales: np.ndarray  # [n_blocks, N], float16 or float32
    zeros: np.ndarray | None  # uint8 [ceil(n_blocks * bits / 8), N]; None: 2 ** (bits - 1)

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def stored_bytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.zeros) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        """Bits stored per parameter, scales and zero points included."""
        return 8.0 * self.stored_bytes / (self.k * self.n)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(f"{bits}-bit block-wise weights are not supported; "
                                    f"supported: {', '.join(map(str, SUPPORTED_BITS))} bits")


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along axis 0 (two INT4 per byte, low nibble first)."""
    _check_bits(bits)
    values = np.asarray(values, dtype=np.uint8)
    if bits == 8:
        return values.copy()
    if values.shape[0] % 2:
        values = np.concatenate([values, np.zeros((1, *values.shape[1:]), np.uint8)])
    if np.any(values > 15):
        raise ValueError("INT4 values must be in [0, 15]")
    return (values[0::2] | (values[1::2] << 4)).astype(np.uint8)


def unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: the first ``count`` values along axis 0."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[:count].copy()
    out = np.empty((packed.shape[0] * 2, *packed.shape[1:]), np.uint8)
    out[0::2] = packed & 15
    out[1::2] = packed >> 4
    return out[:count]


def from_matmul_nbits(b_quant: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                      k: int, n: int, bits: int, block_size: int,
                      scale_dtype: str = "float16") -> BlockwiseWeight:
    """Repack a ``MatMulNBits`` node's constants into the kernel's layout.

    ``scale_dtype="float16"`` stores the scales in half precision, which is exact only when
    each scale is a float16 value (the quantize stage rounds them so; see
    :func:`round_scales_to_float16`); otherwise it raises, rather than change the numbers
    onnxruntime computes with. ``"float32"`` always works.
    """
    _check_bits(bits)
    if block_size < 16 or block_size & (block_size - 1):
        raise UnsupportedModelError(f"MatMulNBits block_size {block_size}: onnxruntime "
                                    "requires a power of two >= 16")
    n_blocks = -(-k // block_size)
    blob = block_size * bits // 8
    b_quant = np.asarray(b_quant, dtype=np.uint8).reshape(n, n_blocks, blob)
    # codes [N, n_blocks * block_size] in input-channel order, then [K, N]
    codes = unpack_rows(b_quant.reshape(n, n_blocks * blob).T, bits, n_blocks * block_size)[:k]
    scales = _stored_scales(np.asarray(scales).reshape(n, n_blocks).T, scale_dtype)
    zeros = None
    if zero_points is not None:
        zp_bytes = -(-n_blocks * bits // 8)
        zp = np.asarray(zero_points, dtype=np.uint8).reshape(n, zp_bytes)
        zeros = pack_rows(unpack_rows(zp.T, bits, n_blocks), bits)
    return BlockwiseWeight(k=k, n=n, bits=bits, block_size=block_size,
                           codes=pack_rows(codes, bits), scales=scales, zeros=zeros)


def from_blocked_dequantize(codes: np.ndarray, scales: np.ndarray,
                            zero_points: np.ndarray | None, block_size: int,
                            scale_dtype: str = "float16") -> BlockwiseWeight:
    """Repack the constants of a block-wise ``DequantizeLinear`` (opset 21, ``axis=0``):
    codes ``[K, N]`` (int4, uint4, int8 or uint8), scales and zero points ``[n_blocks, N]``.

    Signed codes are stored offset by ``2 ** (bits - 1)`` (unsigned), and so are their zero
    points, which leaves every difference ``code - zero`` unchanged.
    """
    codes = np.asarray(codes)
    kind = str(codes.dtype)
    bits = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8}.get(kind)
    if bits is None:
        raise UnsupportedModelError(f"block-wise DequantizeLinear of {kind} codes; supported: "
                                    "int4, uint4, int8, uint8")
    offset = (1 << (bits - 1)) if kind.startswith("int") else 0
    k, n = codes.shape
    n_blocks = -(-k // block_size)
    unsigned = (codes.astype(np.int16) + offset).astype(np.uint8)
    zeros = (np.zeros((n_blocks, n), np.int16) if zero_points is None
             else np.asarray(zero_points).astype(np.int16).reshape(n_blocks, n)) + offset
    scales = _stored_scales(np.asarray(scales).reshape(n_blocks, n), scale_dtype)
    default = np.full_like(zeros, 1 << (bits - 1))
    return BlockwiseWeight(
        k=k, n=n, bits=bits, block_size=block_size, codes=pack_rows(unsigned, bits),
        scales=scales,
        # the kernel's default zero point is 2 ** (bits - 1): store none when all are that
        zeros=None if np.array_equal(zeros, default) else pack_rows(zeros.astype(np.uint8),
                                                                      bits))


def _stored_scales(scales: np.ndarray, scale_dtype: str) -> np.ndarray:
    """The scales as the kernel stores them: ``"float16"`` (exact only for float16 values:
    anything else raises rather than change the weights onnxruntime computes with),
    ``"float32"``, or ``"auto"`` (float16 when exact, else float32)."""
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    half = scales.astype(np.float16)
    exact = np.array_equal(half.astype(np.float32), scales)
    if scale_dtype == "auto":
        scale_dtype = "float16" if exact else "float32"
    if scale_dtype == "float32":
        return scales
    if scale_dtype != "float16":
        raise ValueError(f"scale_dtype {scale_dtype!r}: float16, float32 or auto")
    if not exact:
        raise UnsupportedModelError(
            "the block-wise scales are not float16 values, so storing them in half precision "
            "would change the weights; quantize with the pipeline's recipe (it rounds scales "
            "to float16) or store float32 scales")
    return half


def dequantize(weight: BlockwiseWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight that ``weight`` stands for (the reference)."""
    codes = unpack_rows(weight.codes, weight.bits, weight.k).astype(np.float32)
    rows = np.arange(weight.k) // weight.block_size
    if weight.zeros is None:
        zeros = np.float32(2 ** (weight.bits - 1))
    else:
        zeros = unpack_rows(weight.zeros, weight.bits, weight.n_blocks).astype(np.float32)[rows]
    return (codes - zeros) * weight.scales.astype(np.float32)[rows]


def round_scales_to_float16(scales: np.ndarray) -> np.ndarray:
    """Scales rounded to the nearest float16 value, kept as float32 (never to zero or inf)."""
    scales = np.asarray(scales, dtype=np.float32)
    half = scales.astype(np.float16)
    tiny = np.float16(np.finfo(np.float16).smallest_subnormal)
    half = np.where((half == 0) & (scales != 0), np.copysign(tiny, scales), half)
    return np.clip(half.astype(np.float32), -65504.0, 65504.0)


def quantize_blockwise(model, bits: int, block_size: int, symmetric: bool,
                       nodes: Sequence[str] | None = None, exclude: Sequence[str] = (),
                       accuracy_level: int = 0):
    """onnxruntime's ``MatMulNBitsQuantizer`` on the MatMuls named in ``nodes`` (None: all
    but ``exclude``), scales rounded to float16 values (what the artifact stores: onnxruntime
    must compute with the very same weights; each weight moves by at most 2**-11 of its
    quantization step). Returns the new model (``model`` itself is changed too)."""
    import logging

    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    if nodes is not None:
        # onnxruntime 1.31 ignores nodes_to_include with its default algorithm: exclude the rest
        exclude = [n.name for n in model.graph.node
                   if n.op_type == "MatMul" and n.name not in set(nodes)]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric,
                                     accuracy_level=accuracy_level or None,
                                     nodes_to_exclude=list(exclude))
    quantizer.process()
    model = quantizer.model.model
    scales = {n.input[2] for n in model.graph.node if n.op_type == "MatMulNBits"}
    for init in model.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(
                round_scales_to_float16(numpy_helper.to_array(init)), init.name))
    return model
