"""8-bit float-like weight formats (``fp8_e4m3``, ``posit8``): one code per weight, a float32
scale per output channel (or one per tensor), decoded inside the matmul kernel.

``W[k, n] = decode(code[k, n]) * scale[n]`` (``scale[0]`` per tensor). ``decode`` is the
format's codec (:mod:`pipeline.schemes.fp8`, :mod:`pipeline.schemes.posit`); the kernel
layout is the ONNX one, codes ``uint8 [K, N]`` (consecutive output channels are consecutive
bytes, what a vectorised kernel loads), scales ``float32 [N]`` or ``[1]``.

Scales: fp8 maps each channel's max |w| to 448, the format's max (its relative precision is
the same over its whole normal range, so the widest range costs nothing). posit8 maps max |w|
to 4 (:data:`FORMATS`): posits are most precise near 1 (4 fraction bits in [1/4, 4)) and
coarse far from it, so the bulk of the weights should sit near 1, not near maxpos. On seeded
Gaussian weights (4096 x 256, per channel) the SQNR is 37.5 dB at 4, 37.3 at 2, 35.9 at 1,
34.3 at 8, 20.2 at 256 and 8.6 at maxpos 4096; fp8 E4M3 at 448 gives 31.5 dB.

The ONNX forms (what the quantize stage writes, so onnxruntime runs the very same weights):

- fp8_e4m3: ``DequantizeLinear(codes float8e4m3fn [K, N], scale [N], axis=1) -> MatMul``
  (float8 needs opset >= 19 and IR version >= 9: :func:`ensure_opset` writes opset 21 and
  IR 9 or 10; onnxruntime 1.31's CPU EP runs it at every optimisation level, checked by
  ``tests/test_codes8.py``);
- posit8: ONNX has no posit type: ``Cast(codes uint8 [K, N] -> int32) -> Gather(table
  float32 [256], codes) -> Mul(scale [N]) -> MatMul``, the table being the codec's exact
  decode. The frontend takes any such 256-entry table (``decode`` "posit8" when it is the
  posit<8, 1> table, else "table8").

:func:`quantize_matmul_weight` writes either form for ONE named MatMul of a model: the
quantize recipe calls it for every MatMul, a mixed-precision scheme can call it per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import ConfigError, UnsupportedModelError
from pipeline.schemes import fp8, posit


@dataclass(frozen=True)
class Format:
    """One 8-bit weight format: its codec and where a channel's max |w| goes."""

    name: str
    encode: object  # float32 array -> uint8 codes
    table: np.ndarray  # float32 [256]: decode of every code
    scale_target: float  # max |w| of a channel (or tensor) maps to this value
    onnx_form: str


FORMATS: dict[str, Format] = {
    "fp8_e4m3": Format("fp8_e4m3", fp8.encode, fp8.TABLE, fp8.MAX,
                       "DequantizeLinear(float8e4m3fn, per-axis scale) -> MatMul"),
    "posit8": Format("posit8", posit.encode, posit.table(1), 4.0,
                     "Cast(uint8->int32) -> Gather(table[256]) -> Mul(scale) -> MatMul"),
}
# the lowest default-domain opset whose DequantizeLinear takes float8 codes
FP8_MIN_OPSET = 19


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown 8-bit weight format {name!r}; known: "
                          f"{', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class CodeWeight:
    """One weight in the kernel's layout: a sibling of
    :class:`~pipeline.schemes.blockwise.BlockwiseWeight` whose ``decode`` is a format's
    (BlockwiseWeight's is ``"int"``)."""

    k: int
    n: int
    decode: str  # "fp8_e4m3" | "posit8" | "table8" (any other 256-entry table)
    codes: np.ndarray  # uint8 [K, N]
    scales: np.ndarray  # float32 [N] (per output channel) or [1] (per tensor)
    # float32 [256] for "table8"; None for fp8_e4m3 and posit8 (decoded by integer ops)
    table: np.ndarray | None = None
    bits: int = 8

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[0] != 1 or self.n == 1

    @property
    def stored_bytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.table) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / (self.k * self.n)

    def describe(self) -> dict:
        return {"decode": self.decode, "bits": 8,
                "scales": "per output channel" if self.per_channel else "per tensor",
                "scale_dtype": str(self.scales.dtype)}


def dequantize(weight: CodeWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight that ``weight`` stands for (the reference)."""
    table = {"fp8_e4m3": fp8.TABLE, "posit8": posit.table(1)}.get(weight.decode, weight.table)
    return table[weight.codes] * weight.scales.astype(np.float32)


def quantize_weight(w: np.ndarray, fmt: str, per_channel: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``uint8 [K, N]`` and float32 scales (``[N]``, or ``[1]`` per tensor) of a
    float32 ``[K, N]`` weight. An all-zero channel gets scale 1 (its codes are 0)."""
    f = get_format(fmt)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedModelError(f"{fmt}: weights must be 2-D [K, N], got {w.shape}")
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max().reshape(1)
    scales = np.where(amax > 0, amax / np.float32(f.scale_target), 1).astype(np.float32)
    codes = f.encode(w / scales)
    return codes, scales


def weight_from_onnx(decode: str, codes: np.ndarray, scales: np.ndarray,
                     table: np.ndarray | None = None) -> CodeWeight:
    """A :class:`CodeWeight` from an ONNX form's constants (codes ``[K, N]`` as uint8 bit
    patterns, scales scalar, ``[1]`` or ``[N]``)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    k, n = codes.shape
    scales = np.ascontiguousarray(np.asarray(scales, dtype=np.float32).reshape(-1))
    if scales.shape[0] not in (1, n):
        raise UnsupportedModelError(f"{decode}: {scales.shape[0]} scales for {n} output "
                                    "channels (one per channel or one per tensor)")
    if decode == "fp8_e4m3":
        if np.any((codes & 0x7F) == fp8.NAN_CODE):
            # the kernel's bit decode reads 0x7F as 480; our encoder never writes NaN codes
            raise UnsupportedModelError("fp8 weight holds NaN codes (0x7F/0xFF)")
        return CodeWeight(k, n, decode, codes, scales)
    table = np.ascontiguousarray(table, dtype=np.float32).reshape(-1)
    if table.shape != (256,):
        raise UnsupportedModelError(f"a decode table of {table.shape} entries (256 needed)")
    if np.array_equal(table, posit.table(1), equal_nan=True):
        if np.any(codes == posit.NAR_CODE):
            # the kernel decodes posit8 with integer ops, exact on every code but NaR
            raise UnsupportedModelError("posit8 weight holds NaR codes (0x80)")
        return CodeWeight(k, n, "posit8", codes, scales)
    return CodeWeight(k, n, "table8", codes, scales, table)


def ensure_opset(model, fmt: str) -> int:
    """Raise ``model``'s default-domain opset (in place, with onnx's version converter) to
    what ``fmt``'s ONNX form needs; returns the opset. fp8 needs 19 (we go to 21, the opset
    onnxruntime 1.31 was checked with, and IR version 10); posit8 needs nothing."""
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if get_format(fmt).name == "fp8_e4m3" and opset < FP8_MIN_OPSET:
        converted = version_converter.convert_version(model, 21)
        model.CopyFrom(converted)
        opset = 21
    if get_format(fmt).name == "fp8_e4m3":
        model.ir_version = max(min(model.ir_version, 10), 9)  # float8 needs IR 9
    return opset


def quantize_matmul_weight(model, node_name: str, fmt: str, per_channel: bool = True) -> dict:
    """Quantize the constant weight of the MatMul named ``node_name`` into ``fmt``'s ONNX
    form (module docstring), in place. The float weight initializer is dropped when nothing
    else uses it. For fp8 call :func:`ensure_opset` first (once per model).

    Returns what was done: node, K, N, format, the new initializer names. Raises
    :class:`UnsupportedModelError` naming the node when its weight is not a constant 2-D
    float32 initializer.
    """
    from onnx import TensorProto, helper, numpy_helper

    f = get_format(fmt)
    graph = model.graph
    node = next((n for n in graph.node if n.name == node_name), None)
    if node is None or node.op_type != "MatMul":
        raise UnsupportedModelError(f"no MatMul named {node_name!r}")
    inits = {i.name: i for i in graph.initializer}
    w_name = node.input[1]
    init = inits.get(w_name)
    if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
        raise UnsupportedModelError(f"{node_name}: its weight {w_name!r} is not a constant "
                                    "2-D float32 initializer")
    codes, scales = quantize_weight(numpy_helper.to_array(init), fmt, per_channel)
    base = f"{node_name}.{fmt}"
    scale_init = numpy_helper.from_array(scales if per_channel else scales.reshape(()),
                                         f"{base}.scale")
    weight_out = f"{base}.weight"
    if f.name == "fp8_e4m3":
        code_init = helper.make_tensor(f"{base}.codes", TensorProto.FLOAT8E4M3FN,
                                       codes.shape, codes.tobytes(), raw=True)
        new_inits = [code_init, scale_init]
        new_nodes = [helper.make_node("DequantizeLinear", [code_init.name, scale_init.name],
                                      [weight_out], axis=1, name=f"{base}.dequantize")]
    else:
        code_init = numpy_helper.from_array(codes, f"{base}.codes")
        table_init = numpy_helper.from_array(f.table.copy(), f"{base}.table")
        new_inits = [code_init, table_init, scale_init]
        new_nodes = [
            helper.make_node("Cast", [code_init.name], [f"{base}.index"],
                             to=TensorProto.INT32, name=f"{base}.index"),
            helper.make_node("Gather", [table_init.name, f"{base}.index"], [f"{base}.value"],
                             axis=0, name=f"{base}.decode"),
            helper.make_node("Mul", [f"{base}.value", scale_init.name], [weight_out],
                             name=f"{base}.scale")]
    graph.initializer.extend(new_inits)
    position = list(graph.node).index(node)
    for offset, new in enumerate(new_nodes):  # before the MatMul: the graph stays sorted
        graph.node.insert(position + offset, new)
    node.input[1] = weight_out
    if not any(w_name in n.input for n in graph.node) and \
            w_name not in {o.name for o in graph.output}:
        graph.initializer.remove(init)
    return {"node": node_name, "k": int(codes.shape[0]), "n": int(codes.shape[1]),
            "format": f.name, "per_channel": per_channel,
            "initializers": [i.name for i in new_inits]}
