"""onnxruntime's dynamic quantization as integer arithmetic: u8 x s8 matmuls, int32 sums.

``quantize_dynamic`` writes each quantized MatMul as ``DynamicQuantizeLinear(x)`` (u8, a
per-tensor scale and zero point from the tensor's min/max, computed at run time) ->
``MatMulInteger(x_q, W_q, x_zp, W_zp)`` -> ``Cast`` -> ``Mul(x_scale * W_scale)``. TVM 0.27's
converters compute DynamicQuantizeLinear as onnxruntime does (scale = (max(x, 0) -
min(x, 0)) / 255, zero point = round-half-even of clip(-min / scale, 0, 255), x / scale
rounded half to even: bit-identical on the tests' models), but

- MatMulInteger becomes ``matmul(int32(x_q) - x_zp, int32(W_q) - W_zp, out_dtype=int32)``:
  an int32 x int32 product, which no 8-bit dot-product instruction (VNNI ``vpdpbusd``) can
  run, and four times the bytes of the weight;
- an all-zero tensor (a ReLU that zeroed everything) gets scale 0 and a NaN zero point,
  where onnxruntime takes scale 1 (its ``GetQuantizationParameter``: ``max == min ? 1``).

:func:`dynamic_to_integer` rewrites both. Each integer matmul whose weight (after the
import's constant folding: ``W_q - W_zp`` as int32) fits int8 becomes
``matmul(x_q: uint8, W: int8, out_dtype=int32) - x_zp * colsum(W)``, exact in int32 (the
zero point of the weight is folded into ``W``, which for onnxruntime's symmetric int8
weights is 0, and for its uint8 weights centred on 128 is -128); the float epilogue (cast,
scale multiply, bias) stays as onnxruntime computes it. Each dynamic scale
``range / 255`` becomes ``range == 0 ? 1 : range / 255``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._qdq import op_name, rewrite_calls


@dataclass
class DynamicReport:
    """Which int32 matmuls became u8 x s8, which stayed (with why), what stays float."""

    integer: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    float_matmuls: list[str] = field(default_factory=list)
    scales_guarded: int = 0

    def summary(self) -> str:
        return (f"{len(self.integer)} of {len(self.integer) + len(self.kept)} dynamically "
                f"quantized matmuls run as u8 x s8 -> int32; {len(self.float_matmuls)} "
                "matmul(s) stay float32")

    def as_dict(self) -> dict:
        return {"integer_matmuls": list(self.integer), "kept_int32": list(self.kept),
                "float_matmuls": list(self.float_matmuls),
                "scales_guarded": self.scales_guarded}


def _shape(expr) -> list[int]:
    return [int(s) for s in expr.ty.shape]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _bound(mutator, expr):
    """The value a variable is bound to (the expression itself otherwise)."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        value = mutator.lookup_binding(expr)
        return expr if value is None else value
    return expr


def _is_const(expr) -> bool:
    from tvm import ir

    return isinstance(expr, ir.Constant)


def _is_scalar_const(expr, value: float) -> bool:
    return (_is_const(expr) and expr.value.numpy().size == 1
            and float(expr.value.numpy().reshape(())) == value)


def _shifted_uint8(mutator, expr):
    """``(x_q, zero point)`` for ``int32(x_q: uint8) - int32(zp: uint8 scalar)``, else None."""
    value = _bound(mutator, expr)
    if op_name(value) != "relax.subtract":
        return None
    lhs, zero_point = _bound(mutator, value.args[0]), value.args[1]
    if (op_name(lhs) != "relax.astype" or _dtype(lhs.args[0]) != "uint8"
            or _dtype(zero_point) != "int32" or _shape(zero_point) not in ([], [1])):
        return None
    return lhs.args[0], zero_point


def _fold(mutator, expr, depth: int = 0) -> np.ndarray | None:
    """The value of a constant expression made of the ops TVM's MatMulInteger converter
    emits around a weight (``astype``, ``subtract``, ``expand_dims``, ``reshape``); None
    when it is not constant. (FoldConstant leaves ``astype`` of a scalar constant.)"""
    if _is_const(expr):
        return expr.value.numpy()
    value = _bound(mutator, expr)
    name = op_name(value)
    if depth > 16 or name not in ("relax.astype", "relax.subtract", "relax.expand_dims",
                                  "relax.reshape"):
        return None
    first = _fold(mutator, value.args[0], depth + 1)
    if first is None:
        return None
    if name == "relax.astype":
        return first.astype(str(value.attrs.dtype))
    if name == "relax.subtract":
        second = _fold(mutator, value.args[1], depth + 1)
        return None if second is None else np.subtract(first, second, dtype=first.dtype)
    return first.reshape(_shape(value))  # expand_dims and reshape: the result's shape


def _int8_columns(b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(w8, offset)`` with ``b == w8 + offset`` (per column), ``w8`` int8: any weight
    minus its zero point spans at most 256 values per column (uint8 or int8 codes). None if
    a column spans more."""
    lo, hi = b.min(axis=0), b.max(axis=0)
    if np.any(hi - lo > 255):
        return None
    offset = np.clip(0, hi - 127, lo + 128)  # 0 where the column already fits int8
    return (b - offset).astype(np.int8), offset.astype(np.int64)


def _integer_matmul(mutator, call, report: DynamicReport):
    """``matmul(int32 x int32 -> int32)`` of a dynamically quantized activation and a
    constant weight -> ``matmul(u8 x s8 -> int32)`` plus exact int32 corrections; None to
    keep it.

    With ``B = W_q - W_zp`` (constant, [K, N]) split as ``w8 + offset`` (int8 codes, an
    integer per column), ``(x_q - x_zp) @ B = x_q @ w8 + rowsum(x_q) * offset -
    x_zp * colsum(B)``. onnxruntime's int8 weights are symmetric (zero point 0): offset 0,
    the row sums are not computed.
    """
    from tvm import relax

    args = call.args
    if (str(call.attrs.out_dtype) != "int32" or _dtype(args[0]) != "int32"
            or _dtype(args[1]) != "int32"):
        return None
    label = f"matmul {_shape(args[0])} x {_shape(args[1])}"
    activation = _shifted_uint8(mutator, args[0])
    if activation is None:
        report.kept.append(f"{label}: the activation is not uint8 minus a zero point")
        return None
    b = _fold(mutator, args[1])
    if b is None or b.ndim != 2:
        report.kept.append(f"{label}: the weight is not a 2-D constant")
        return None
    split = _int8_columns(b.astype(np.int64))
    if split is None:
        report.kept.append(f"{label}: a weight column spans more than 256 values")
        return None
    w8, offset = split
    colsum = b.astype(np.int64).sum(axis=0)
    # every partial sum is bounded by K * 255 * 256: int32 holds it for K <= 32895
    if b.shape[0] * 255 * 256 > 2**31 - 1:
        report.kept.append(f"{label}: K = {b.shape[0]} could overflow an int32 sum")
        return None
    x_q, zero_point = activation
    bb = mutator.builder_
    acc = bb.emit(relax.op.matmul(x_q, relax.const(w8, "int8"), out_dtype="int32"))
    if np.any(offset):
        rows = bb.emit(relax.op.sum(relax.op.astype(x_q, "int32"), axis=[-1], keepdims=True))
        acc = bb.emit(relax.op.add(acc, relax.op.multiply(
            rows, relax.const(offset.astype(np.int32), "int32"))))
    correction = bb.emit(relax.op.multiply(zero_point,
                                           relax.const(colsum.astype(np.int32), "int32")))
    report.integer.append(f"{label} (uint8 x int8 -> int32"
                          + (", per-column weight offsets)" if np.any(offset) else ")"))
    return relax.op.subtract(acc, correction)


def _guarded_scale(mutator, call, report: DynamicReport):
    """``range / 255`` of a DynamicQuantizeLinear (range = max(x, 0) - min(x, 0)) ->
    ``range == 0 ? 1 : range / 255``, as onnxruntime; None for any other divide."""
    from tvm import relax

    if (not _is_scalar_const(call.args[1], 255.0) or _dtype(call) != "float32"
            or _shape(call) != []):
        return None
    spread = _bound(mutator, call.args[0])
    if op_name(spread) != "relax.subtract":
        return None
    top, bottom = (_bound(mutator, a) for a in spread.args)
    if op_name(top) != "relax.maximum" or op_name(bottom) != "relax.minimum":
        return None
    report.scales_guarded += 1
    bb = mutator.builder_
    zero = relax.const(0.0, "float32")
    is_zero = bb.emit(relax.op.equal(call.args[0], zero))
    scale = bb.emit(call)
    return relax.op.where(is_zero, relax.const(1.0, "float32"), scale)


def dynamic_to_integer(mod):
    """Rewrite a module imported from a ``quantize_dynamic`` model (see the module
    docstring); returns ``(mod, DynamicReport)``. Constants are folded first, so it takes
    a module straight from ``from_onnx`` as well as one after the import's cleanup."""
    from tvm import relax

    mod = relax.transform.FoldConstant()(mod)
    report = DynamicReport()

    def rewrite(mutator, call):
        name = op_name(call)
        if name == "relax.matmul":
            if str(call.attrs.out_dtype) == "int32":
                return _integer_matmul(mutator, call, report)
            if _dtype(call).startswith("float"):
                report.float_matmuls.append(f"matmul {_shape(call.args[0])} x "
                                            f"{_shape(call.args[1])} ({_dtype(call)})")
            return None
        if name == "relax.divide":
            return _guarded_scale(mutator, call, report)
        return None

    return rewrite_calls(mod, rewrite), report
