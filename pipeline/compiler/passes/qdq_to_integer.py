"""QDQToInteger: fake-quantized conv2d/matmul (dequantize -> float op -> quantize) to integer."""

from __future__ import annotations

import numpy as np

from ._qdq import (
    INT32_MAX,
    IntegerReport,
    NoMatch,
    NotThisRule,
    QParams,
    activation_qparams,
    check_int32,
    emit_centered,
    emit_requantize,
    emit_zero_point_pad,
    first_of,
    op_name,
    rewrite_quantized_ops,
    shape_of,
    tensorize_activation_qparams,
    weight_qparams,
)

__all__ = ["IntegerReport", "QDQToInteger", "quantize_to_integer", "integer_rules"]


def _split_bias(ctx, producer, core_op: str):
    """(core call, bias values or None) for ``core``, ``add(core, c)`` or ``add(c, core)``."""
    if op_name(producer) == core_op:
        return producer, None
    if op_name(producer) == "relax.add":
        for core, other in (producer.args, producer.args[::-1]):
            core_value = ctx.bindings.value(core)
            if op_name(core_value) == core_op:
                bias = ctx.bindings.const(other)
                if bias is None:
                    raise NotThisRule(f"{core_op.split('.')[-1]} + a non-constant")
                return core_value, bias
    raise NotThisRule(f"not a {core_op.split('.')[-1]}")


def _float_compute(call) -> None:
    out_dtype = call.attrs.out_dtype
    if out_dtype is not None and str(out_dtype) not in ("", "void", "float32"):
        raise NoMatch(f"float op has out_dtype {out_dtype}")


def _quantized_bias(bias: np.ndarray | None, acc_scale: np.ndarray, shapes: set, what: str):
    """The bias as int32 in accumulator units: round(bias / (sx * sw)), as onnxruntime stores it."""
    n = acc_scale.shape[0]
    if bias is None:
        return np.zeros(n, np.int64)
    if tuple(bias.shape) not in shapes:
        raise NoMatch(f"{what} bias of shape {list(bias.shape)} is not one value per channel")
    return np.rint(bias.reshape(-1).astype(np.float64) / acc_scale.astype(np.float64)
                   ).astype(np.int64)


def _requant_multiplier(x: QParams, w_scale: np.ndarray, out: QParams) -> np.ndarray:
    # float32 arithmetic in onnxruntime's order: (x_scale * w_scale) / y_scale
    return (np.float32(x.scale) * w_scale.astype(np.float32)) / np.float32(out.scale)


def _conv2d(ctx, qcall, producer, out: QParams, relu: bool):
    from tvm import relax
    from tvm.relax import op

    conv, bias = _split_bias(ctx, producer, "relax.nn.conv2d")
    attrs = conv.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        raise NoMatch(f"layouts {layouts} (expects NCHW/OIHW, before any layout pass)")
    _float_compute(conv)
    x_q, xp = activation_qparams(ctx.bindings, conv.args[0], "conv input")
    w = weight_qparams(ctx.bindings, conv.args[1], axis=0)
    if np.any(w.zero_point != 0):
        raise NoMatch("weights have a nonzero zero point (quantize weights symmetric, QInt8)")
    n_out = w.values.shape[0]
    acc_scale = np.float32(xp.scale) * w.scale
    bias_q = _quantized_bias(bias, acc_scale, {(n_out,), (1, n_out, 1, 1), (n_out, 1, 1)},
                             "conv")
    # (x - zx) * w summed = x * w - zx * sum(w): the zx term is a per-channel constant,
    # exact as long as padded pixels hold zx too (pad explicitly below when zx != 0).
    wsum = w.values.astype(np.int64).reshape(n_out, -1).sum(axis=1)
    corr = check_int32(bias_q - xp.zero_point * wsum, "conv bias/zero-point correction")
    mult = _requant_multiplier(xp, w.scale, out)

    data = ctx.remap(x_q)
    padding = [int(p) for p in attrs.padding]
    if xp.zero_point != 0 and any(padding):
        data = emit_zero_point_pad(ctx.bb, data, padding, xp.zero_point, xp.dtype)
        padding = [0, 0, 0, 0]
    acc = ctx.emit(op.nn.conv2d(
        data, relax.const(w.values), strides=attrs.strides, padding=padding,
        dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32"))
    if np.any(corr):
        acc = ctx.emit(op.add(acc, relax.const(corr.reshape(1, n_out, 1, 1))))
    result = emit_requantize(ctx.bb, acc, mult.reshape(1, n_out, 1, 1), out,
                             lower=out.zero_point if relu else None)
    return result, _describe("conv2d", w.per_channel, bias is not None, relu)


def _describe(name: str, per_channel: bool, bias: bool, relu: bool) -> str:
    notes = ["per-channel" if per_channel else "per-tensor"]
    notes += ["bias"] if bias else []
    notes += ["relu absorbed"] if relu else []
    return f"{name} ({', '.join(notes)})"


def _matmul(ctx, qcall, producer, out: QParams, relu: bool):
    from tvm import relax
    from tvm.relax import op

    mm, bias = _split_bias(ctx, producer, "relax.matmul")
    _float_compute(mm)
    x_q, xp = activation_qparams(ctx.bindings, mm.args[0], "matmul input")
    w = weight_qparams(ctx.bindings, mm.args[1], axis=-1)
    if w.values.ndim != 2:
        raise NoMatch(f"matmul weight is {w.values.ndim}-D, only 2-D [K, N] is supported")
    if np.any(w.zero_point != 0):
        raise NoMatch("weights have a nonzero zero point (quantize weights symmetric, QInt8)")
    n_out = w.values.shape[1]
    acc_scale = np.float32(xp.scale) * w.scale
    bias_q = _quantized_bias(bias, acc_scale, {(n_out,), (1, n_out)}, "matmul")
    wsum = w.values.astype(np.int64).sum(axis=0)
    corr = check_int32(bias_q - xp.zero_point * wsum, "matmul bias/zero-point correction")
    mult = _requant_multiplier(xp, w.scale, out)

    acc = ctx.emit(op.matmul(ctx.remap(x_q), relax.const(w.values), out_dtype="int32"))
    if np.any(corr):
        acc = ctx.emit(op.add(acc, relax.const(corr)))
    result = emit_requantize(ctx.bb, acc, mult, out, lower=out.zero_point if relu else None)
    return result, _describe("matmul", w.per_channel, bias is not None, relu)


# float32 holds every integer below 2**24 exactly: a sum of K products of two centred 8-bit
# values (|q - zp| <= 255) is exact in float32 when K * 255**2 stays below that.
_FLOAT32_EXACT = 2**24


def _activation_matmul(ctx, qcall, producer, out: QParams, relu: bool):
    """A matmul of two quantized activations (attention's Q x K^T and P x V), as
    onnxruntime's QLinearMatMul computes it: ``sum_k (a - za)(b - zb)`` exactly, then
    requantized with the float32 multiplier ``(sa * sb) / sy``.

    x86 has no u8 x u8 dot product; where the sum is exact in float32 (K * 255**2 < 2**24:
    K <= 258, every attention of a model with up to 258 tokens), the centred integers are
    multiplied and summed in float32, which runs as a tuned float kernel and gives the
    same integer; longer sums accumulate in int32."""
    from tvm.relax import op

    if op_name(producer) != "relax.matmul":
        raise NotThisRule("not a matmul")
    _float_compute(producer)
    a_q, ap = activation_qparams(ctx.bindings, producer.args[0], "matmul left input")
    b_q, bp = activation_qparams(ctx.bindings, producer.args[1], "matmul right input")
    k = int(shape_of(producer.args[0])[-1])
    bound = k * 255 * 255
    if bound > INT32_MAX:
        raise NoMatch(f"matmul of two activations with K={k} could overflow int32")
    dtype = "float32" if bound < _FLOAT32_EXACT else "int32"
    acc = ctx.emit(op.matmul(emit_centered(ctx, a_q, ap, dtype),
                             emit_centered(ctx, b_q, bp, dtype), out_dtype=dtype))
    mult = _requant_multiplier(ap, np.float32(bp.scale), out)
    result = emit_requantize(ctx.bb, acc, mult, out, lower=out.zero_point if relu else None)
    how = "exact integer sums in float32" if dtype == "float32" else "int32"
    return result, (f"matmul of two activations (per-tensor, {how})"
                    + (", relu absorbed" if relu else ""))


def integer_rules(region: bool = True) -> dict:
    """The rewrite rules by producing op: conv2d/matmul, plus the integer-region ops.

    Parameters
    ----------
    region : bool
        Also keep residual adds, multiplies, pooling and reshapes in the integer domain
        (:mod:`.integer_region`).
    """
    rules = {
        "relax.nn.conv2d": _conv2d,
        "relax.matmul": first_of(_matmul, _activation_matmul),
        "relax.add": first_of(_conv2d, _matmul),
    }
    if region:
        from .integer_region import region_rules

        for name, rule in region_rules().items():
            rules[name] = first_of(rules[name], rule) if name in rules else rule
    return rules


def quantize_to_integer(mod, region: bool = True):
    """Rewrite the fake-quantized ops of ``mod`` into integer arithmetic.

    Parameters
    ----------
    mod : tvm.IRModule
        A module imported by ``from_onnx`` from a QDQ model (before or after FoldConstant;
        before any layout conversion).
    region : bool
        Also keep residual adds, multiplies, pooling and reshapes in the integer domain.

    Returns
    -------
    tuple[tvm.IRModule, IntegerReport]
        The rewritten module (every op not matched stays in correct fake-quantized form)
        and the report of what was and was not rewritten, with reasons.
    """
    report = IntegerReport()
    mod = rewrite_quantized_ops(mod, integer_rules(region), report)
    return tensorize_activation_qparams(mod), report


def QDQToInteger(region: bool = True):  # noqa: N802  (a pass factory, named like TVM's)
    """The module pass form of :func:`quantize_to_integer`.

    The report of the last run is kept on the pass object as ``last_report``.

    Parameters
    ----------
    region : bool
        Also keep residual adds, multiplies, pooling and reshapes in the integer domain.
    """
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="QDQToInteger")
    class _QDQToInteger:
        def __init__(self):
            self.last_report: IntegerReport | None = None

        def transform_module(self, mod, ctx):
            mod, self.last_report = quantize_to_integer(mod, region)
            return mod

    return _QDQToInteger()
