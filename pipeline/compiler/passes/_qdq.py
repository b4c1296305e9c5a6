"""Shared helpers of the QDQ passes: matching fake-quant chains, constant folding, requantize."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

QMIN_QMAX = {"uint8": (0, 255), "int8": (-128, 127)}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class NoMatch(Exception):
    """A rewrite rule does not apply; the message says why (it goes into the report)."""


class NotThisRule(NoMatch):
    """The op is not of the form a rule handles at all (another rule may take it)."""


def first_of(*rules):
    """A rule trying ``rules`` in order; the reason reported is the most specific one."""

    def rule(ctx, qcall, producer, out, relu):
        errors: list[NoMatch] = []
        for candidate in rules:
            try:
                return candidate(ctx, qcall, producer, out, relu)
            except NoMatch as err:
                errors.append(err)
        specific = [e for e in errors if not isinstance(e, NotThisRule)]
        raise (specific or errors)[0]

    return rule


@dataclass
class IntegerReport:
    """Which quantized ops a pass turned into integer arithmetic, and why the others were not.

    A *quantized op* is one between a dequantize and a quantize of the fake-quantized graph:
    its result feeds an ``R.quantize`` and it reads a dequantized tensor (directly, or under
    a constant bias add). What onnxruntime quantizes is counted so: its QDQ node units.

    An op whose result is quantized but whose inputs are all float (a LayerNorm, Softmax or
    Transpose whose output a quantized MatMul reads) is a *float op*: onnxruntime runs it in
    float too, and the quantize after it is the consumer's input quantization. Those are
    listed apart, not counted as quantized ops left in fake-quant form. The input
    quantization of the network (``R.quantize`` of a function parameter) is not an op.
    """

    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched)

    def summary(self) -> str:
        """One line, e.g. ``"7 of 8 quantized ops run as integer"``."""
        line = f"{len(self.matched)} of {self.total} quantized ops run as integer"
        if self.float_ops:
            line += (f" ({len(self.float_ops)} float ops quantize their outputs for "
                     "quantized consumers; float in onnxruntime too)")
        return line

    def merge(self, other: IntegerReport) -> IntegerReport:
        """Both reports together (for passes run one after another on disjoint ops)."""
        return IntegerReport(self.matched + other.matched, self.unmatched + other.unmatched,
                             self.float_ops + other.float_ops)


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization parameters of an activation."""

    scale: np.float32
    zero_point: int
    dtype: str  # "uint8" or "int8"

    @property
    def qmin(self) -> int:
        return QMIN_QMAX[self.dtype][0]

    @property
    def qmax(self) -> int:
        return QMIN_QMAX[self.dtype][1]


@dataclass(frozen=True)
class QWeight:
    """A constant weight as integers: ``float = (values - zero_point) * scale`` along ``axis``.

    ``scale`` and ``zero_point`` hold one entry per index of ``axis`` (per-tensor weights
    are broadcast), so consumers can treat both cases alike.
    """

    values: np.ndarray  # int8
    scale: np.ndarray  # float32, shape (values.shape[axis],)
    zero_point: np.ndarray  # int32, same shape
    axis: int
    per_channel: bool


def op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call to that op, else None."""
    from tvm import ir

    if isinstance(expr, ir.Call) and isinstance(expr.op, ir.Op):
        return str(expr.op.name)
    return None


def shape_of(expr) -> tuple[int, ...]:
    return tuple(int(s) for s in expr.ty.shape)


def dtype_of(expr) -> str:
    return str(expr.ty.dtype)


class Bindings:
    """The value bound to each variable of a function, to look through variables."""

    def __init__(self, func) -> None:
        from tvm import relax

        self.values: dict = {}
        self.folded: dict = {}  # expr -> fold_constant's result: each value is folded once
        self.params = set(func.params)
        body = func.body
        if isinstance(body, relax.SeqExpr):
            for block in body.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        self.values[binding.var] = binding.value

    def value(self, expr):
        """Follow variable-to-variable aliases to the defining expression (or the var)."""
        from tvm import relax

        seen = 0
        while isinstance(expr, relax.Var) and expr in self.values and seen < 64:
            expr = self.values[expr]
            seen += 1
        return expr

    def call(self, expr, name: str):
        """The call to op ``name`` that defines ``expr``, or raise NoMatch."""
        value = self.value(expr)
        if op_name(value) != name:
            raise NoMatch(f"expected {name.split('.')[-1]}, found {describe(value)}")
        return value

    def const(self, expr) -> np.ndarray | None:
        """Numeric value of a constant expression (constants, dequantize, reshape, ...)."""
        return fold_constant(self.value(expr), self)

    def is_param(self, expr) -> bool:
        return self.value(expr) in self.params


def describe(expr) -> str:
    name = op_name(expr)
    if name is not None:
        return name.removeprefix("relax.")
    return type(expr).__name__


# The ops fold_constant evaluates: what sits between a weight constant and its consumer.
FOLDABLE_OPS = ("relax.dequantize", "relax.reshape", "relax.permute_dims", "relax.astype")


def fold_constant(expr, bindings: Bindings | None = None) -> np.ndarray | None:
    """Evaluate the few constant-only expressions that carry quantized weights, in numpy.

    This follows the exact float32 arithmetic of Relax's legalization (dequantize is
    ``float32(q - zp) * float32(scale)``), so integers recovered from the result are exact.

    Linear in the graph: it descends only through :data:`FOLDABLE_OPS` (a weight's chain is
    a few ops deep; an activation's first non-foldable op ends the walk at once), and with
    ``bindings`` each value is folded once. Walking every op above an attention MatMul, as
    an earlier version did, took minutes per layer of a BERT.
    """
    from tvm import ir, relax

    # memoised per bound variable (the keys Bindings already uses), not per expression
    var = expr if bindings is not None and isinstance(expr, relax.Var) else None
    if var is not None and var in bindings.folded:
        cached = bindings.folded[var]
        return None if cached is None else cached.copy()  # callers may write to theirs
    if bindings is not None:
        expr = bindings.value(expr)
    if isinstance(expr, ir.Constant):
        return expr.value.numpy()
    name = op_name(expr)
    if name not in FOLDABLE_OPS:
        return None
    result = _fold_call(name, expr, bindings)
    if var is not None:
        bindings.folded[var] = None if result is None else result.copy()
    return result


def _fold_call(name: str, expr, bindings: Bindings | None) -> np.ndarray | None:
    from tvm import relax

    args = [fold_constant(a, bindings) if not isinstance(a, relax.ShapeExpr) else a
            for a in expr.args]
    if any(a is None for a in args):
        return None
    if name == "relax.dequantize":
        q, scale, zp = args
        axis = int(expr.attrs.axis) % q.ndim
        bshape = [1] * q.ndim
        if scale.size > 1:
            bshape[axis] = scale.size
        sub = (q.astype(np.int32) - zp.astype(np.int32).reshape(bshape if zp.size > 1 else ()))
        return sub.astype(np.float32) * scale.astype(np.float32).reshape(
            bshape if scale.size > 1 else ())
    if name == "relax.reshape":
        return args[0].reshape([int(s) for s in args[1].values])
    if name == "relax.permute_dims":
        axes = None if expr.attrs.axes is None else [int(a) for a in expr.attrs.axes]
        return np.transpose(args[0], axes)
    if name == "relax.astype":
        return args[0].astype(str(expr.attrs.dtype))
    return None


def activation_qparams(bindings: Bindings, expr, what: str) -> tuple[object, QParams]:
    """For ``expr = dequantize(x_q, scale, zp)`` with per-tensor params: (x_q, params)."""
    call = bindings.call(expr, "relax.dequantize")
    return call.args[0], _scalar_qparams(bindings, call, dtype_of(call.args[0]), what)


def output_qparams(bindings: Bindings, quantize_call) -> QParams:
    """Per-tensor params of an ``R.quantize`` call."""
    return _scalar_qparams(bindings, quantize_call, str(quantize_call.attrs.out_dtype),
                           "output")


def _scalar_qparams(bindings: Bindings, call, dtype: str, what: str) -> QParams:
    if dtype not in QMIN_QMAX:
        raise NoMatch(f"{what} is {dtype}, only uint8/int8 are supported")
    scale = bindings.const(call.args[1])
    zp = bindings.const(call.args[2])
    if scale is None or zp is None:
        raise NoMatch(f"{what} quantization parameters are not constants")
    if scale.size != 1 or zp.size != 1:
        raise NoMatch(f"{what} is quantized per channel; only per-tensor activations are "
                      "supported")
    return QParams(np.float32(scale.reshape(())), int(zp.reshape(())), dtype)


def weight_qparams(bindings: Bindings, expr, axis: int) -> QWeight:
    """A constant weight as integers, per channel along ``axis`` (or per tensor).

    The weight is either still ``dequantize(const int8, scale, zp)`` (possibly under
    ``permute_dims``/``reshape``), or a float constant that FoldConstant made of one. In the
    second case the int8 values and scales are recovered and accepted only if they
    reproduce every float bit for bit, so the integer form computes exactly what the
    fake-quantized graph computes.
    """
    value = bindings.value(expr)
    name = op_name(value)
    if name == "relax.permute_dims":
        inner = weight_qparams_any_axis(bindings, value.args[0])
        axes = (list(range(inner.values.ndim))[::-1] if value.attrs.axes is None
                else [int(a) for a in value.attrs.axes])
        moved = QWeight(np.transpose(inner.values, axes), inner.scale, inner.zero_point,
                        axes.index(inner.axis), inner.per_channel)
        return _check_axis(moved, axis)
    if name == "relax.dequantize":
        q = bindings.const(value.args[0])
        scale = bindings.const(value.args[1])
        zp = bindings.const(value.args[2])
        if q is None or scale is None or zp is None:
            raise NoMatch("weight is not a constant")
        if q.dtype != np.int8:
            raise NoMatch(f"weight is {q.dtype}, only int8 weights are supported")
        w_axis = int(value.attrs.axis) % q.ndim
        n = q.shape[w_axis]
        per_channel = scale.size > 1
        return _check_axis(QWeight(
            q, np.broadcast_to(scale.astype(np.float32).reshape(-1), (n,)).copy(),
            np.broadcast_to(zp.astype(np.int32).reshape(-1), (n,)).copy(), w_axis,
            per_channel), axis)
    floats = fold_constant(value, bindings)
    if floats is None:
        raise NoMatch(f"weight is not a constant ({describe(value)})")
    if floats.dtype != np.float32:
        raise NoMatch(f"weight is {floats.dtype}, expected float32")
    recovered = recover_symmetric_int8(floats, axis)
    if recovered is None:
        raise NoMatch("weight is a float constant that is not exactly int8 x scale "
                      "(run the pass before FoldConstant to keep its dequantize)")
    return recovered


def weight_qparams_any_axis(bindings: Bindings, expr) -> QWeight:
    value = bindings.value(expr)
    if op_name(value) == "relax.dequantize":
        return weight_qparams(bindings, expr, int(value.attrs.axis))
    floats = fold_constant(value, bindings)
    if floats is None:
        raise NoMatch("weight is not a constant")
    recovered = recover_symmetric_int8(floats, 0)
    if recovered is None:
        raise NoMatch("weight is a float constant that is not exactly int8 x scale")
    return recovered


def _check_axis(w: QWeight, axis: int) -> QWeight:
    axis %= w.values.ndim
    if w.axis == axis:
        return w
    if not w.per_channel:
        n = w.values.shape[axis]
        return QWeight(w.values, np.full(n, w.scale[0], np.float32),
                       np.full(n, w.zero_point[0], np.int32), axis, False)
    raise NoMatch(f"weight is quantized per channel along axis {w.axis}, "
                  f"not along the output channels (axis {axis})")


# Scales ORT's symmetric int8 quantization can produce: absmax / qmax for the usual
# ranges (full [-127, 127], [-128, 127], and reduce_range's 7 bits).
_QMAX_CANDIDATES = (127.0, 127.5, 128.0, 63.0, 63.5, 64.0)


def recover_symmetric_int8(w: np.ndarray, axis: int) -> QWeight | None:
    """Find int8 ``q`` and scales ``s`` with ``float32(q * s) == w`` exactly, or None.

    Tries one scale for the whole tensor first, then one per slice along ``axis``.
    """
    axis %= w.ndim
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    whole = _recover_rows(rows.reshape(1, -1))
    per_channel = False
    if whole is None:
        per_row = _recover_rows(rows)
        if per_row is None:
            return None
        q_rows, scales = per_row
        per_channel = True
    else:
        q_rows = whole[0].reshape(rows.shape)
        scales = np.full(rows.shape[0], whole[1][0], np.float32)
    moved_shape = (w.shape[axis],) + tuple(np.delete(np.array(w.shape), axis))
    q = np.moveaxis(q_rows.reshape(moved_shape), 0, axis).astype(np.int8)
    return QWeight(q, scales.astype(np.float32), np.zeros(len(scales), np.int32), axis,
                   per_channel)


def _recover_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    q_out = np.zeros(rows.shape, np.int32)
    scales = np.ones(rows.shape[0], np.float32)
    for i, row in enumerate(rows):
        amax = float(np.max(np.abs(row))) if row.size else 0.0
        if amax == 0.0:
            continue  # an all-zero channel: any scale reproduces it
        found = False
        for qmax in _QMAX_CANDIDATES:
            base = np.float32(amax / qmax)
            for steps in (0, 1, -1, 2, -2):
                s = base
                for _ in range(abs(steps)):
                    s = np.nextafter(s, np.float32(np.inf if steps > 0 else -np.inf))
                q = np.rint(row.astype(np.float64) / float(s))
                if np.abs(q).max() > 128 or q.min() < -128 or q.max() > 127:
                    continue
                if np.array_equal((q.astype(np.float32) * s).astype(np.float32), row):
                    q_out[i], scales[i], found = q.astype(np.int32), s, True
                    break
            if found:
                break
        if not found:
            return None
    return q_out, scales


def recover_affine_8bit(v: np.ndarray) -> tuple[np.ndarray, np.float32] | None:
    """``(q - zero_point, scale)`` with ``float32(q - zero_point) * scale == v`` exactly, for
    a constant that onnxruntime quantized per tensor to uint8/int8 with a zero point
    (activation-type constants: a BatchNorm's scale or bias as a Mul/Add operand) and
    FoldConstant turned back into floats; None unless exactly one scale reproduces every
    value (the integer arithmetic needs the codes and the scale, not their product).

    onnxruntime's scale is ``(max(v, 0) - min(v, 0)) / 255``, the extremes at codes 0 and
    255; the rounding of the codes at the extremes is searched too.
    """
    v = np.asarray(v, np.float32)
    if v.size == 0:
        return None
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    if hi == lo:
        return None
    found: dict = {}
    for span in (255, 254, 256, 253, 257):
        base = np.float32((hi - lo) / span)
        for steps in range(-3, 4):
            s = base
            for _ in range(abs(steps)):
                s = np.nextafter(s, np.float32(np.inf if steps > 0 else -np.inf))
            k = np.rint(v.astype(np.float64) / float(s))
            if k.max() - min(k.min(), 0) > 255 or k.min() < -255:
                continue
            if np.array_equal((k.astype(np.float32) * s).astype(np.float32), v):
                found[float(s)] = k.astype(np.int32)
    if len(found) != 1:
        return None
    (scale, k), = found.items()
    return k, np.float32(scale)


def tensor_const(value, dtype: str):
    """A constant the kernels receive as a buffer, never as an immediate.

    Legalization turns 0-d constants (and clip bounds) into TIR immediates, which puts each
    layer's requantize scales and zero points into its workload hash: ResNet-50 then has one
    tuning task per residual block instead of one per shape, and recalibrating the model
    (same shapes, new scales) would invalidate its tuning logs. A shape-(1,) constant
    broadcasts the same and stays a kernel parameter.
    """
    from tvm import relax

    arr = np.asarray(value, dtype=dtype)
    # relax.const would narrow a float64 array to float32 unless told the dtype
    return relax.const(arr.reshape(1) if arr.ndim == 0 else arr, dtype)


def emit_lower_bound(bb, x, lo: float, qmin: int, dtype: str = "float32"):
    """``max(x, lo)`` as a tensor operation when ``lo`` is above the type's minimum.

    An absorbed ReLU clips at the output zero point, which differs per layer; as a clip
    attribute it would become an immediate (see :func:`tensor_const`).
    """
    from tvm.relax import op

    return bb.emit(op.maximum(x, tensor_const(lo, dtype))) if lo > qmin else x


def emit_centered(ctx, q, params: QParams, dtype: str = "int32"):
    """``dtype(q) - zero_point``, emitted: the exact integer an 8-bit activation ``q`` (an
    expression of the original function) stands for; the cast alone where the zero point
    is 0."""
    from tvm.relax import op

    wide = ctx.emit(op.astype(ctx.remap(q), dtype))
    if params.zero_point == 0:
        return wide
    return ctx.emit(op.subtract(wide, tensor_const(params.zero_point, dtype)))


def emit_round_after_zero_point(ctx, y, out: QParams):
    """``saturate(nearbyint(y + zy))`` cast to ``out.dtype`` (returned unemitted): how
    onnxruntime's fused QLinear kernels (Mul, AveragePool) quantize a float32 ``y`` already
    divided by the output scale. The zero point is added *before* rounding, unlike
    QuantizeLinear's ``round(y) + zy``: with an odd zero point the two differ on every
    exact half step."""
    from tvm.relax import op

    if out.zero_point:
        y = ctx.emit(op.add(y, tensor_const(out.zero_point, "float32")))
    y = ctx.emit(op.round(y))
    y = ctx.emit(op.clip(y, float(out.qmin), float(out.qmax)))
    return op.astype(y, out.dtype)


def emit_requantize(bb, acc, multiplier: np.ndarray, out: QParams, lower: int | None = None):
    """``clip(round(float32(acc) * multiplier) + zp, lower, qmax)`` cast to ``out.dtype``.

    Emits the steps and returns the final cast unemitted (rules return it to be bound to
    the var of the ``R.quantize`` it replaces).

    This is onnxruntime's requantization (MlasRequantizeOutput): the int32 accumulator
    scaled in float32, rounded half to even, shifted by the zero point and saturated.
    ``lower`` raises the lower clip bound (a ReLU absorbed as ``clip(.., zp)``).
    """
    from tvm.relax import op

    lo = out.qmin if lower is None else max(out.qmin, lower)
    x = bb.emit(op.astype(acc, "float32"))
    x = bb.emit(op.multiply(x, tensor_const(multiplier, "float32")))
    x = bb.emit(op.round(x))
    if out.zero_point:
        x = bb.emit(op.add(x, tensor_const(out.zero_point, "float32")))
    x = emit_lower_bound(bb, x, lo, out.qmin)
    x = bb.emit(op.clip(x, float(out.qmin), float(out.qmax)))
    return op.astype(x, out.dtype)


def emit_zero_point_pad(bb, data, padding: list[int], zero_point: int, dtype: str):
    """Pad H and W of NCHW ``data`` with ``zero_point``, the value a real 0 quantizes to.

    Written as ``where(inside, pad(data, 0), zp)`` with ``zp`` a shape-(1,) tensor: a pad
    value is an attribute, which would make it a TIR immediate and put the input's zero
    point into the first conv's workload (see :func:`tensor_const`). ``inside`` depends on
    shapes only. :func:`match_zero_point_pad` recognises the pattern.
    """
    from tvm import relax
    from tvm.relax import op

    top, left, bottom, right = padding
    _, _, h, w = shape_of(data)
    padded = bb.emit(op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=0.0))
    return bb.emit(op.where(relax.const(_inside_mask(h, w, padding)), padded,
                            tensor_const(zero_point, dtype)))


def _inside_mask(h: int, w: int, padding: list[int]) -> np.ndarray:
    top, left, bottom, right = padding
    inside = np.zeros((1, 1, h + top + bottom, w + left + right), bool)
    inside[:, :, top:top + h, left:left + w] = True
    return inside


@dataclass(frozen=True)
class ZeroPointPad:
    """A match of :func:`emit_zero_point_pad`: ``source`` padded with ``zero_point``."""

    source: object  # the unpadded NCHW expression
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    zero_point: object  # the shape-(1,) constant expression


def match_zero_point_pad(bindings: Bindings, expr) -> ZeroPointPad | None:
    """The :class:`ZeroPointPad` that defines ``expr``, or None."""
    from tvm import ir

    where = bindings.value(expr)
    if op_name(where) != "relax.where":
        return None
    cond, padded, zp = (bindings.value(a) for a in where.args)
    if op_name(padded) != "relax.nn.pad" or str(padded.attrs.pad_mode) != "constant":
        return None
    widths = [int(p) for p in padded.attrs.pad_width]
    if len(widths) != 8 or any(widths[:4]) or float(padded.attrs.pad_value) != 0.0:
        return None
    padding = (widths[4], widths[6], widths[5], widths[7])
    if not (isinstance(cond, ir.Constant) and isinstance(zp, ir.Constant)
            and tuple(zp.value.shape) == (1,)):
        return None
    _, _, h, w = shape_of(padded.args[0])
    if not np.array_equal(cond.value.numpy(), _inside_mask(h, w, list(padding))):
        return None
    return ZeroPointPad(padded.args[0], padding, zp)


def tensorize_activation_qparams(mod):
    """Give every remaining activation quantize/dequantize its scale and zero point as
    shape-(1,) tensors instead of 0-d constants.

    What the integer passes leave in quantize/dequantize form is the network's edge (the
    input quantize, the output dequantize) and any op no rule matched. Legalization would
    turn their 0-d parameters into immediates (see :func:`tensor_const`); as (1,) tensors
    they legalize to the same arithmetic read from buffers, so recalibrating the model
    changes no workload. Weights (constant data) keep theirs: they fold away.
    """
    from tvm import ir
    from tvm.relax import op

    def tensorize(_, call):
        if op_name(call) not in ("relax.quantize", "relax.dequantize"):
            return None
        data, scale, zp = call.args
        if (isinstance(data, ir.Constant) or not all(
                isinstance(a, ir.Constant) and a.value.numpy().ndim == 0
                for a in (scale, zp))):
            return None
        make = op.quantize if op_name(call) == "relax.quantize" else op.dequantize
        scale, zp = (tensor_const(a.value.numpy(), str(a.value.dtype)) for a in (scale, zp))
        return make(data, scale, zp, int(call.attrs.axis), str(call.attrs.out_dtype))

    return rewrite_calls(mod, tensorize)


def check_int32(values: np.ndarray, what: str) -> np.ndarray:
    if values.size and (values.min() < INT32_MIN or values.max() > INT32_MAX):
        raise NoMatch(f"{what} does not fit int32")
    return values.astype(np.int32)


@dataclass
class RuleContext:
    """What a rewrite rule gets: the builder, the original bindings and the remapping."""

    bb: object  # relax.BlockBuilder of the mutator
    bindings: Bindings
    remap: object  # callable: original expr -> expr in the new function

    def emit(self, expr):
        return self.bb.emit(expr)


def unwrap_relu(bindings: Bindings, expr) -> tuple[object, bool]:
    """(the value under a ReLU, True) if ``expr`` is ``relu(x)``, else (the value, False)."""
    value = bindings.value(expr)
    if op_name(value) == "relax.nn.relu":
        return bindings.value(value.args[0]), True
    return value, False


def rewrite_quantized_ops(mod, rules: dict, report: IntegerReport):
    """Apply ``rules`` to every ``R.quantize`` of every Relax function in ``mod``.

    ``rules`` maps the op name that produces the quantized value (after looking through
    a ReLU) to ``rule(ctx, quantize_call, producer_call, out_qparams, relu)``, which emits
    the integer form's steps and returns ``(final expression, description for the
    report)``; the final expression is bound to the quantize's own var. A rule
    raises :class:`NoMatch` before emitting anything when it does not apply; the op then
    stays in fake-quantized form and the reason goes into ``report``.
    """
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.bindings: Bindings | None = None

        def run(self, func):
            self.bindings = Bindings(func)
            return self.visit_expr(func)

        def visit_var_binding_(self, binding):
            value = binding.value
            if op_name(value) == "relax.quantize" and not self.bindings.is_param(value.args[0]):
                new = self._try(binding.var, value)
                if isinstance(new, relax.Var) and isinstance(binding.var, relax.DataflowVar):
                    self.set_var_remap(binding.var, new)  # an identity: no binding needed
                    return
                if new is not None:
                    # the same var keeps its name; it holds the same uint8/int8 tensor
                    self.builder_.emit_normalized(
                        relax.VarBinding(binding.var, self.builder_.normalize(new)))
                    return
            super().visit_var_binding_(binding)

        def _try(self, var, qcall):
            producer, relu = unwrap_relu(self.bindings, qcall.args[0])
            name = op_name(producer) or describe(producer)
            label = f"{name.removeprefix('relax.')} -> {var.name} {list(shape_of(var))}"
            rule = rules.get(name)
            if rule is None:
                self._left(label, producer, "no integer rule for this op")
                return None
            ctx = RuleContext(self.builder_, self.bindings, self.visit_expr)
            try:
                out = output_qparams(self.bindings, qcall)
                result, note = rule(ctx, qcall, producer, out, relu)
            except NoMatch as err:
                self._left(label, producer, str(err))
                return None
            report.matched.append(f"{note} -> {var.name} {list(shape_of(var))}")
            return result

        def _left(self, label: str, producer, why: str) -> None:
            if reads_dequantized(self.bindings, producer):
                report.unmatched.append(f"{label}: {why}")
            else:
                report.float_ops.append(f"{label}: float inputs")

    return mutate_relax_functions(_Rewriter(mod), mod)


def reads_dequantized(bindings: Bindings, producer) -> bool:
    """Whether ``producer`` reads a dequantized activation: directly, or as the core op
    under an add of a constant (a bias). See :class:`IntegerReport`."""
    from tvm import relax

    args = [a for a in getattr(producer, "args", []) if isinstance(a, relax.Expr)]
    for arg in args:
        value = bindings.value(arg)
        if op_name(value) == "relax.dequantize" and bindings.const(value) is None:
            return True
    if op_name(producer) == "relax.add" and len(args) == 2:
        for core, other in (args, args[::-1]):
            if bindings.const(other) is not None:
                return reads_dequantized(bindings, bindings.value(core))
    return False


def rewrite_calls(mod, rewrite):
    """Call ``rewrite(mutator, call)`` on every call of every Relax function of ``mod``, its
    arguments already rewritten; it returns the replacement, or None to keep the call. The
    mutator gives access to its ``builder_`` and ``lookup_binding``. Returns the new module."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def run(self, func):
            return self.visit_expr(func)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            new = rewrite(self, call)
            return call if new is None else new

    return mutate_relax_functions(_Rewrite(mod), mod)


def mutate_relax_functions(mutator, mod):
    """Run a ``relax.PyExprMutator`` over every Relax function of ``mod`` (dead bindings
    removed) and return the module its builder holds."""
    from tvm import relax

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            new_func = relax.analysis.remove_all_unused(mutator.run(func))
            mutator.builder_.update_func(gvar, new_func)
    return mutator.builder_.get()
