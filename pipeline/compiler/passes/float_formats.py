"""Float formats below float32 in the Relax IR: float32 accumulation for float16 matmuls and
convolutions, and bfloat16 weights kept as bfloat16 constants.

``accumulate_in_float32``: TVM's import of a float16 model multiplies and *sums* in float16
(``out_dtype`` None); onnxruntime's CPU kernels, like GPU tensor cores, accumulate in float32.
Each float16 ``matmul``/``conv2d`` gets ``out_dtype="float32"`` and a cast back to float16:
float16 storage and element-wise math, float32 sums.

``keep_bfloat16_weights``: TVM's ONNX importer evaluates ``Cast(bf16 initializer)`` at
import time, and ``FoldConstant`` (import cleanup, and again after legalization) would fold
any cast of a constant: the weights would reach ``model.so`` as float32. This pass finds
each ``matmul``/``conv2d`` (and embedding ``take``) whose weight is a float32 constant
holding bfloat16 values only
(low 16 bits zero: the decoded weights of the ``bfloat16_weights`` recipe), stores the weight
as a bfloat16 constant, and moves the decode (a 16-bit shift, exact: checked against
``ml_dtypes`` for all 65536 codes) into a fused primitive function with the consumer (and
the bias add and ReLU after it). A call whose other operand is an activation is out of
FoldConstant's reach, so the constant stays bfloat16, and ``FuseTIR`` makes one kernel that
decodes the weight as it multiplies. Compute stays float32. Convolutions handled this way
keep their imported NCHW layout (the layout pass does not enter fused functions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._qdq import mutate_relax_functions, op_name, rewrite_calls

WEIGHT_OPS = ("relax.matmul", "relax.nn.conv2d")
# which argument of an op is the weight the bf16 pass keeps in bfloat16: the weight operand
# of matmul and conv2d, the table of an embedding lookup (ONNX Gather -> take)
BF16_WEIGHT_ARG = {"relax.matmul": 1, "relax.nn.conv2d": 1, "relax.take": 0}


@dataclass
class FloatFormatReport:
    """What a float-format pass rewrote, and what it left alone (with why)."""

    rewritten: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rewritten": list(self.rewritten), "kept": list(self.kept)}


def _label(call) -> str:
    shape = [int(s) for s in call.ty.shape] if hasattr(call.ty, "shape") else []
    return f"{op_name(call).removeprefix('relax.')} -> {shape}"


def _with_out_dtype(call, dtype: str):
    """The same op call with another ``out_dtype`` (matmul and conv2d both carry one)."""
    from tvm import relax

    if op_name(call) == "relax.matmul":
        return relax.op.matmul(call.args[0], call.args[1], out_dtype=dtype)
    a = call.attrs
    return relax.op.nn.conv2d(call.args[0], call.args[1], strides=a.strides, padding=a.padding,
                              dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
                              kernel_layout=a.kernel_layout, out_layout=a.out_layout,
                              out_dtype=dtype)


def accumulate_in_float32(mod):
    """float16 matmul/conv2d -> float32 accumulation, float16 result; returns
    ``(mod, FloatFormatReport)``."""
    from tvm import relax

    report = FloatFormatReport()

    def rewrite(mutator, call):
        if op_name(call) not in WEIGHT_OPS:
            return None
        dtypes = {str(a.ty.dtype) for a in call.args[:2]}
        out = str(call.attrs.out_dtype or "")  # None, or void: the input dtype
        if dtypes != {"float16"} or out not in ("", "None", "void", "float16"):
            if "float16" in dtypes:
                report.kept.append(f"{_label(call)}: inputs {sorted(dtypes)}, out {out}")
            return None
        report.rewritten.append(_label(call))
        wide = mutator.builder_.normalize(_with_out_dtype(call, "float32"))
        return relax.op.astype(wide, "float16")

    return rewrite_calls(mod, rewrite), report


def _decode_patterns():
    """(name, pattern) for FuseOpsByPattern, longest first: the weight's decode, its
    matmul/conv2d and the bias add and ReLU that follow, in one fused function."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    patterns = []
    decode = is_op("relax.astype")(is_const())
    for op in WEIGHT_OPS:
        kind = op.rsplit(".", 1)[-1]
        core = is_op(op)(wildcard(), decode)
        add = is_op("relax.add")(core, wildcard())
        patterns += [(f"bf16_{kind}_add_relu", is_op("relax.nn.relu")(add)),
                     (f"bf16_{kind}_add", add), (f"bf16_{kind}", core)]
    # an embedding lookup decodes only the rows it gathers
    return patterns + [("bf16_take", is_op("relax.take")(decode, wildcard()))]


def keep_bfloat16_weights(mod):
    """bfloat16-valued float32 weights -> bfloat16 constants decoded inside the consumer's
    kernel; returns ``(mod, FloatFormatReport)``."""
    import ml_dtypes
    import tvm
    from tvm import ir, relax

    from pipeline.schemes.bfloat16 import is_bfloat16_exact

    report = FloatFormatReport()

    def rewrite(mutator, call):
        index = BF16_WEIGHT_ARG.get(op_name(call))
        if index is None:
            return None
        weight = call.args[index]
        if not isinstance(weight, ir.Constant):
            return None
        values = weight.value.numpy()
        if not is_bfloat16_exact(values):
            report.kept.append(f"{_label(call)}: weight {values.dtype} is not bfloat16-valued")
            return None
        stored = relax.const(tvm.runtime.tensor(values.astype(ml_dtypes.bfloat16)))
        decoded = mutator.builder_.normalize(relax.op.astype(stored, "float32"))
        layout = " (stays in its imported layout)" if op_name(call) == "relax.nn.conv2d" else ""
        report.rewritten.append(f"{_label(call)}: weight {list(values.shape)} bfloat16{layout}")
        args = list(call.args)
        args[index] = decoded
        return relax.Call(call.op, args, call.attrs)

    mod = rewrite_calls(mod, rewrite)
    # Each decode goes into a fused function with its consumer, the bfloat16 constant a
    # parameter (bind_constants=False): the call has an activation argument, so no later
    # FoldConstant can turn the weight back into float32, and FuseTIR makes one kernel.
    mod = relax.transform.FuseOpsByPattern(_decode_patterns(), bind_constants=False,
                                           annotate_codegen=False)(mod)
    return mod, report


# A constant-weight matmul whose activation has fewer rows than this streams its weight
# (batch-1 decoding, a one-row classifier): reading float16 bytes is what makes float16 fast
# there (README, Number formats: 0.16-0.19 ms against 0.38-0.6 ms in float32). A model whose
# float16 weights are mostly streamed so keeps float16 storage in its kernels; one that
# streams a small part (ResNet-50's classifier: 2 M of 25.5 M weights) is widened.
STREAMING_ROWS = 16


def _dtype(value) -> str:
    """The dtype of a Relax expression (its type) or of a constant's tensor, as a string;
    "" when it has none (a tuple, a shape, a scalar literal)."""
    return str(getattr(getattr(value, "ty", value), "dtype", ""))


def _elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _streaming_weights(mod) -> tuple[list[str], int, int]:
    """(labels, elements) of the float16 constant weights of matmuls with fewer than
    :data:`STREAMING_ROWS` rows, and the elements of all float16 constants."""
    from tvm import ir, relax

    found: list[str] = []
    counts = {"streamed": 0, "all": 0}
    seen: set = set()

    def visit(expr):
        if isinstance(expr, ir.Constant) and _dtype(expr.value) == "float16" and expr not in seen:
            seen.add(expr)
            counts["all"] += _elements(expr.value.shape)
        if op_name(expr) != "relax.matmul" or not isinstance(expr.args[1], ir.Constant):
            return
        x = expr.args[0].ty
        weight = expr.args[1].value
        if _dtype(weight) != "float16" or getattr(x, "shape", None) is None:
            return
        rows = 1
        for d in list(x.shape)[:-1]:
            try:
                rows *= int(d)
            except TypeError:  # a symbolic dimension (a dynamic batch): not streaming
                rows *= STREAMING_ROWS
        if rows < STREAMING_ROWS:
            found.append(f"{_label(expr)} ({rows} row(s))")
            counts["streamed"] += _elements(weight.shape)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found, counts["streamed"], counts["all"]


def widen_float16(mod):
    """A float16 model as float32 compute on float16-valued weights; returns
    ``(mod, FloatFormatReport)``, ``mod`` unchanged when it cannot or should not be widened
    (``report.kept`` says why).

    For CPUs without float16 arithmetic, where LLVM converts every float16 op to float32 and
    back: the float16 scheme's convs and matmuls accumulate in float32 already, so widening
    the weights once (at load: model.params keeps them as float16, see
    :mod:`pipeline.runtime.params`) and dropping the casts computes what onnxruntime's CPU EP
    computes on the same model (it upcasts the weights at load and cancels the cast pairs),
    at float32 speed, and every kernel is a float32 model's kernel: the float32 tuning
    records apply. A model whose weights are mostly streamed by one-row matmuls
    (:data:`STREAMING_ROWS`) is left as it is: there, reading half the bytes is the speed.
    """
    import tvm
    from tvm import relax

    report = FloatFormatReport()
    streaming, streamed, total = _streaming_weights(mod)
    if streamed * 2 > total:
        report.kept.append(f"{streamed} of {total} float16 weights are streamed by one-row "
                           f"matmuls ({'; '.join(streaming[:3])}): float16 storage kept")
        return mod, report
    wide: dict = {}
    dropped: list = []
    islands: list = []

    @relax.expr_functor.mutator
    class _Widen(relax.PyExprMutator):
        def run(self, func):
            return self.visit_expr(func)

        # (TVM 0.27's name for relax.Constant's visitor) every float16 constant becomes a
        # float32 one, before the calls using it are re-normalized
        def visit_generic_const_(self, op):
            if _dtype(op.value) != "float16":
                return op
            if op not in wide:  # a constant used twice (tied weights) stays one
                wide[op] = relax.const(tvm.runtime.tensor(op.value.numpy().astype("float32")))
            return wide[op]

        def visit_call_(self, call):
            if op_name(call) == "relax.astype" and str(call.attrs.dtype) == "float16":
                x = self.visit_expr(call.args[0])
                if _dtype(x) == "float32":
                    dropped.append(call)
                    return x
                return relax.op.astype(x, "float32")
            if op_name(call) == "relax.call_tir":
                return self._float16_island(call)
            call = super().visit_call_(call)
            if op_name(call) == "relax.astype":  # float32 -> float32 after widening
                x = call.args[0]
                if _dtype(x) == str(call.attrs.dtype):
                    dropped.append(call)
                    return x
            return call

        def _float16_island(self, call):
            """A TIR kernel the importer wrote (its PrimFunc computes in float16: ONNX Max,
            say) keeps float16 inside, cast at its edges."""
            old_args = list(call.args[1].fields)
            new_args = []
            for old, new in zip(old_args, [self.visit_expr(a) for a in old_args], strict=True):
                if _dtype(old) == "float16" and _dtype(new) == "float32":
                    new = self.builder_.normalize(relax.op.astype(new, "float16"))
                new_args.append(new)
            out = self.builder_.normalize(relax.Call(
                call.op, [call.args[0], relax.Tuple(new_args), *call.args[2:]], call.attrs,
                call.ty_args))
            if _dtype(out) != "float16":
                if "float16" in str(out.ty):
                    raise TypeError(f"a TIR call returns float16 in a tuple: {out.ty}")
                return out
            islands.append(call)
            return relax.op.astype(out, "float32")

    try:
        widened = mutate_relax_functions(_Widen(mod), mod)
    except Exception as error:  # noqa: BLE001  (an op with a float16 attribute, say)
        why = str(error).strip().splitlines()[0] if str(error).strip() else ""
        report.kept.append(f"widening failed, kept as float16: {type(error).__name__}: "
                           f"{why[:300]}")
        return mod, report
    report.rewritten += [f"{len(wide)} float16 constant(s) widened to float32",
                         f"{len(dropped)} cast(s) dropped"]
    if islands:
        report.kept.append(f"{len(islands)} TIR kernel(s) of the importer compute in float16, "
                           "cast at their edges")
    return relax.transform.CanonicalizeBindings()(widened), report
