"""IntegerRegion: residual add, pooling and reshapes on quantized tensors kept in integers."""

from __future__ import annotations

import numpy as np

from ._qdq import (
    IntegerReport,
    NoMatch,
    NotThisRule,
    QParams,
    activation_qparams,
    emit_lower_bound,
    emit_requantize,
    op_name,
    rewrite_quantized_ops,
    tensor_const,
)

__all__ = ["IntegerRegion", "region_rules"]

# Ops that only move or select elements: on a quantized tensor with the same scale and
# zero point in and out (what onnxruntime's quantizer gives them), they commute with
# dequantize, so onnxruntime drops their Q/DQ pair and so do we.
_MOVE_OPS = ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
             "relax.flatten", "relax.nn.max_pool2d")


def _same_params(x: QParams, out: QParams, what: str) -> None:
    if (x.scale, x.zero_point, x.dtype) != (out.scale, out.zero_point, out.dtype):
        raise NoMatch(f"{what} changes quantization parameters "
                      f"({x.scale}, {x.zero_point}) -> ({out.scale}, {out.zero_point})")


def _move(ctx, qcall, producer, out: QParams, relu: bool):
    from tvm import relax

    name = op_name(producer).removeprefix("relax.")
    if relu:
        raise NoMatch(f"{name} followed by a separate relu")
    x_q, xp = activation_qparams(ctx.bindings, producer.args[0], f"{name} input")
    _same_params(xp, out, name)
    args = [ctx.remap(x_q)] + [ctx.remap(a) for a in producer.args[1:]]
    return relax.Call(producer.op, args, producer.attrs), name


def _fma32(a, b, c) -> np.float32:
    """float32 fused multiply-add (one rounding), exact through float64 for these operands."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _residual_add(ctx, qcall, producer, out: QParams, relu: bool):
    """onnxruntime's QLinearAdd as its x86 (AVX2) kernel computes it, to the last bit.

    ``y = round(fma(a, sa/sy, fma(b, sb/sy, zy - (sa/sy * za + sb/sy * zb))))``, saturated:
    the zero points are folded into one float32 constant before rounding, and each FMA
    rounds once. float32 multiply-then-add would round twice and, on ties, differ by one
    step; a deep network then amplifies such steps, so the FMAs are computed exactly in
    float64 and rounded to float32 once, as the hardware does.
    """
    from tvm.relax import op

    try:
        a_q, ap = activation_qparams(ctx.bindings, producer.args[0], "add lhs")
        b_q, bp = activation_qparams(ctx.bindings, producer.args[1], "add rhs")
    except NoMatch as err:
        raise NotThisRule(f"add of non-quantized operands: {err}") from None
    ratio_a = np.float32(ap.scale) / np.float32(out.scale)
    ratio_b = np.float32(bp.scale) / np.float32(out.scale)
    # compilers contract `ratio_a * za + ratio_b * zb` into one FMA
    zero_terms = _fma32(ratio_a, ap.zero_point, np.float32(ratio_b * np.float32(bp.zero_point)))
    fixed = np.float32(np.float32(out.zero_point) - zero_terms)

    def fma(x_q, ratio, addend):
        x = ctx.emit(op.astype(ctx.remap(x_q), "float64"))
        x = ctx.emit(op.multiply(x, tensor_const(ratio, "float64")))
        x = ctx.emit(op.add(x, addend))
        return ctx.emit(op.astype(x, "float32"))

    partial = fma(b_q, ratio_b, tensor_const(fixed, "float64"))
    total = fma(a_q, ratio_a, ctx.emit(op.astype(partial, "float64")))
    total = ctx.emit(op.round(total))
    lo = max(out.qmin, out.zero_point) if relu else out.qmin
    total = emit_lower_bound(ctx.bb, total, lo, out.qmin)
    total = ctx.emit(op.clip(total, float(out.qmin), float(out.qmax)))
    return op.astype(total, out.dtype), "add" + (" (relu absorbed)" if relu else "")


def _global_average(ctx, qcall, producer, out: QParams, relu: bool):
    """onnxruntime's QLinearGlobalAveragePool: int32 sum, one requantize by sx / (sy * HW)."""
    from tvm.relax import op

    x_q, xp = activation_qparams(ctx.bindings, producer.args[0], "mean input")
    shape = [int(s) for s in x_q.ty.shape]
    axes = sorted(int(a) % len(shape) for a in (producer.attrs.axis or range(len(shape))))
    if len(shape) != 4 or axes != [2, 3]:
        raise NoMatch(f"mean over axes {axes} of a {len(shape)}-D tensor "
                      "(only global average pooling, axes [2, 3], is integer)")
    count = shape[2] * shape[3]
    acc = ctx.emit(op.astype(ctx.remap(x_q), "int32"))
    acc = ctx.emit(op.sum(acc, axis=[2, 3], keepdims=bool(producer.attrs.keepdims)))
    if xp.zero_point:
        acc = ctx.emit(op.subtract(acc, tensor_const(xp.zero_point * count, "int32")))
    mult = np.float32(xp.scale) / (np.float32(out.scale) * np.float32(count))
    result = emit_requantize(ctx.bb, acc, np.asarray(mult), out,
                             lower=out.zero_point if relu else None)
    return result, f"global average pool (int32 sum of {count})"


def _requantize(ctx, qcall, producer, out: QParams, relu: bool):
    """``quantize(dequantize(x))``: nothing if the parameters agree, else one requantize."""
    from tvm.relax import op

    x_q, xp = activation_qparams(ctx.bindings, producer, "requantize input")
    if not relu and (xp.scale, xp.zero_point, xp.dtype) == (out.scale, out.zero_point,
                                                            out.dtype):
        return ctx.remap(x_q), "quantize(dequantize) identity removed"
    acc = ctx.emit(op.astype(ctx.remap(x_q), "int32"))
    if xp.zero_point:
        acc = ctx.emit(op.subtract(acc, tensor_const(xp.zero_point, "int32")))
    mult = np.float32(xp.scale) / np.float32(out.scale)
    return emit_requantize(ctx.bb, acc, np.asarray(mult), out,
                           lower=out.zero_point if relu else None), "requantize"


def region_rules() -> dict:
    """The integer-region rewrite rules by producing op name."""
    rules = {name: _move for name in _MOVE_OPS}
    rules["relax.add"] = _residual_add
    rules["relax.mean"] = _global_average
    rules["relax.dequantize"] = _requantize
    return rules


def IntegerRegion():  # noqa: N802  (a pass factory, named like TVM's)
    """Module pass: keep residual adds, pooling and reshapes between quantized tensors integer.

    Usually run as part of :func:`.qdq_to_integer.QDQToInteger` (its ``region=True``);
    alone it leaves conv2d/matmul in fake-quantized form. The report of the last run is
    kept on the pass object as ``last_report``.
    """
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="IntegerRegion")
    class _IntegerRegion:
        def __init__(self):
            self.last_report: IntegerReport | None = None

        def transform_module(self, mod, ctx):
            self.last_report = IntegerReport()
            return rewrite_quantized_ops(mod, region_rules(), self.last_report)

    return _IntegerRegion()
