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

from ._qdq import op_name, rewrite_calls

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
