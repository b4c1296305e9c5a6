"""IntegerRegion: residual add, multiply, pooling, reshapes kept quantized, as onnxruntime does."""

from __future__ import annotations

import numpy as np

from ._qdq import (
    IntegerReport,
    NoMatch,
    NotThisRule,
    QParams,
    activation_qparams,
    emit_centered,
    emit_lower_bound,
    emit_requantize,
    emit_round_after_zero_point,
    op_name,
    recover_affine_8bit,
    rewrite_quantized_ops,
    shape_of,
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
    float64 and rounded to float32 once, as the hardware does. On CPUs with FMA the
    lowering runs them as float32 FMAs instead (``lowering._float32_fma``: same values,
    2.5x faster).
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


def _mul_operand(ctx, expr, what: str):
    """A QLinearMul operand as ``(emit, scale)``; ``emit()`` gives ``x - zero point`` as
    int32: the codes of an activation, or of a constant (still under its dequantize, or
    folded to floats and recovered). Nothing is emitted until both operands matched."""
    from tvm import relax

    try:
        x_q, xp = activation_qparams(ctx.bindings, expr, what)
    except NoMatch:
        pass
    else:
        return (lambda: emit_centered(ctx, x_q, xp)), xp.scale
    value = ctx.bindings.value(expr)
    if op_name(value) == "relax.dequantize":
        q, scale, zp = (ctx.bindings.const(a) for a in value.args)
        if q is None or scale is None or zp is None or scale.size != 1 or zp.size != 1:
            raise NoMatch(f"{what} is not a per-tensor quantized constant")
        recovered = (q.astype(np.int32) - int(zp.reshape(())), np.float32(scale.reshape(())))
    else:
        floats = ctx.bindings.const(expr)
        recovered = None if floats is None else recover_affine_8bit(floats)
        if recovered is None:
            raise NoMatch(f"{what} is neither a quantized activation nor a constant that is "
                          "exactly 8-bit codes x one scale")
    codes, scale = recovered
    return (lambda: relax.const(codes, "int32")), scale


def _multiply(ctx, qcall, producer, out: QParams, relu: bool):
    """onnxruntime's QLinearMul as its x86 (SSE2) kernel computes it, to the last bit.

    ``y = round(float32(float32((a - za) * (b - zb)) * (sa * sb / sy)) + zy)``, saturated:
    the int32 product of the codes, one float32 multiply by the float32 ratio, the zero
    point added *before* rounding (QuantizeLinear's ``round(.) + zy`` flips exact ties when
    it is odd). The multiply goes through float64 (exact there) and rounds once to
    float32, so it is not contracted into an FMA with the add. DenseNet's BatchNorm-scale
    Muls (activation x a per-channel uint8 constant) were off by a step on a few elements
    (123 of 21 million), which its 120 layers amplify to two at the output.
    """
    from tvm.relax import op

    if relu:
        raise NoMatch("multiply followed by a separate relu")
    emit_a, sa = _mul_operand(ctx, producer.args[0], "mul lhs")
    emit_b, sb = _mul_operand(ctx, producer.args[1], "mul rhs")
    ratio = np.float32(np.float32(sa * sb) / np.float32(out.scale))
    y = ctx.emit(op.astype(ctx.emit(op.multiply(emit_a(), emit_b())), "float64"))
    y = ctx.emit(op.astype(ctx.emit(op.multiply(y, tensor_const(ratio, "float64"))), "float32"))
    return emit_round_after_zero_point(ctx, y, out), "multiply"


def _global_average(ctx, qcall, producer, out: QParams, relu: bool):
    """onnxruntime's QLinearGlobalAveragePool: int32 sum, one requantize by sx / (sy * HW)."""
    x_q, xp = activation_qparams(ctx.bindings, producer.args[0], "mean input")
    shape = [int(s) for s in x_q.ty.shape]
    axes = sorted(int(a) % len(shape) for a in (producer.attrs.axis or range(len(shape))))
    if len(shape) != 4 or axes != [2, 3]:
        raise NoMatch(f"mean over axes {axes} of a {len(shape)}-D tensor "
                      "(only global average pooling, axes [2, 3], is integer)")
    return _emit_global_average(ctx, x_q, xp, out, relu, bool(producer.attrs.keepdims))


def _emit_global_average(ctx, x_q, xp: QParams, out: QParams, relu: bool, keepdims: bool):
    from tvm.relax import op

    _, _, h, w = shape_of(x_q)
    count = h * w
    acc = ctx.emit(op.astype(ctx.remap(x_q), "int32"))
    acc = ctx.emit(op.sum(acc, axis=[2, 3], keepdims=keepdims))
    if xp.zero_point:
        acc = ctx.emit(op.subtract(acc, tensor_const(xp.zero_point * count, "int32")))
    mult = np.float32(xp.scale) / (np.float32(out.scale) * np.float32(count))
    result = emit_requantize(ctx.bb, acc, np.asarray(mult), out,
                             lower=out.zero_point if relu else None)
    return result, f"global average pool (int32 sum of {count})"


def _window_counts(size: int, out_size: int, kernel: int, stride: int, pad: int) -> np.ndarray:
    """Input elements inside each pooling window along one axis, as onnxruntime counts
    them for ``count_include_pad=0``: the window clipped to the unpadded input."""
    start = np.arange(out_size) * stride - pad
    return np.minimum(start + kernel, size) - np.maximum(start, 0)


def _average_pool(ctx, qcall, producer, out: QParams, relu: bool):
    """onnxruntime's QLinearAveragePool (``DequantizeLinear -> AveragePool ->
    QuantizeLinear`` fused), to the last bit.

    onnxruntime dequantizes to float32 (``x_scale * (x - x_zero_point)``), sums each
    window in float32 row by row, divides by the element count, and quantizes with
    ``nearbyint(y / y_scale + y_zero_point)``: the zero point is added *before* rounding,
    unlike QuantizeLinear's ``round(y / y_scale) + y_zero_point``. An average of k*k
    values of one scale often lands exactly on half a step, so the two disagree on up to
    a fifth of a tensor whenever the zero point is odd (DenseNet's 2x2 transitions: 3 to
    21 % of their outputs one step off). A window covering the whole input with no
    padding is, in onnxruntime, QLinearGlobalAveragePool's integer arithmetic instead.

    The window sum is emitted as one strided slice per kernel position, added in
    onnxruntime's order (a reduction could be reordered by a schedule, and float32 sums
    depend on the order); the dequantize multiplies in float64 and rounds once to
    float32, which equals a float32 multiply and cannot be contracted into an FMA with
    the sum that follows.
    """
    from tvm.relax import op

    attrs = producer.attrs
    layouts = (str(attrs.layout), str(attrs.out_layout))
    if layouts != ("NCHW", "NCHW"):
        raise NoMatch(f"average pool layouts {layouts} (expects NCHW, before any layout pass)")
    if relu:
        raise NoMatch("average pool followed by a separate relu")
    if bool(attrs.ceil_mode) or any(int(d) != 1 for d in attrs.dilation):
        raise NoMatch("average pool with ceil_mode or dilation")
    x_q, xp = activation_qparams(ctx.bindings, producer.args[0], "average pool input")
    _, _, h, w = shape_of(x_q)
    _, _, ho, wo = shape_of(qcall)
    kh, kw = (int(k) for k in attrs.pool_size)
    sh, sw = (int(s) for s in attrs.strides)
    top, left, bottom, right = (int(p) for p in attrs.padding)
    if (kh, kw) == (h, w) and not any((top, left, bottom, right)):
        return _emit_global_average(ctx, x_q, xp, out, relu=False, keepdims=True)
    if (ho - 1) * sh + kh > h + top + bottom or (wo - 1) * sw + kw > w + left + right:
        raise NoMatch("average pool windows reach past the padded input")

    x = emit_centered(ctx, x_q, xp)
    x = ctx.emit(op.multiply(ctx.emit(op.astype(x, "float64")),
                             tensor_const(xp.scale, "float64")))
    x = ctx.emit(op.astype(x, "float32"))
    if any((top, left, bottom, right)):
        # zeros: onnxruntime skips padded elements, and adding +0.0 changes no sum
        x = ctx.emit(op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=0.0))
    acc = None
    for dh in range(kh):
        for dw in range(kw):
            window = ctx.emit(op.strided_slice(
                x, axes=[2, 3], begin=[dh, dw], end=[dh + (ho - 1) * sh + 1,
                                                     dw + (wo - 1) * sw + 1],
                strides=[sh, sw]))
            acc = window if acc is None else ctx.emit(op.add(acc, window))
    if bool(attrs.count_include_pad) or not any((top, left, bottom, right)):
        count = tensor_const(kh * kw, "float32")
    else:
        counts = np.outer(_window_counts(h, ho, kh, sh, top), _window_counts(w, wo, kw, sw, left))
        count = tensor_const(counts.reshape(1, 1, ho, wo), "float32")
    y = ctx.emit(op.divide(acc, count))
    y = ctx.emit(op.divide(y, tensor_const(out.scale, "float32")))
    return (emit_round_after_zero_point(ctx, y, out),
            f"average pool {kh}x{kw} (onnxruntime's float arithmetic)")


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
    rules["relax.nn.avg_pool2d"] = _average_pool
    rules["relax.multiply"] = _multiply
    rules["relax.dequantize"] = _requantize
    return rules


def IntegerRegion():  # noqa: N802  (a pass factory, named like TVM's)
    """Module pass: keep residual adds, multiplies, pooling and reshapes between quantized
    tensors quantized (each as onnxruntime's fused kernel computes it).

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
