"""Target lowering: the named Relax pipeline both the tune and the build stage run.

Tuning and compilation must see the very same fused kernels, or tuning records (matched
by workload structural hash) would not apply; so both call :func:`lower_for_target`.
Target-specific layout choices sit at the top: :data:`CPU_FP32_LAYOUTS`.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.core.spec import CPU_FP32_LAYOUTS

log = logging.getLogger(__name__)

# Phase 2: the layout of fp32 convolutions on x86 CPUs. Plain NCHW runs at about half the
# speed of the other two (FACTS.md). "NHWC" (channels-last, weights HWIO) legalizes with the
# stock rules; "NCHW16c" (blocked, onnxruntime's fp32 layout) goes through PackFloat32NCHWc.
# Which is faster is measured per model by scripts/layout_search.py (README, Benchmarks);
# a spec's `layout` or `doit ... layout=` overrides the default. GPU targets keep NCHW:
# DLight schedules it as it is. int8 on a VNNI CPU is always packed (PackInt8ForVNNI).
# A layout that fails on a model falls back (NHWC-winograd -> NHWC -> NCHW16c -> NCHW), said
# in the compile report; ops whose TVM layout rule is broken stay NCHW inside an NHWC model
# (passes/layout_prep.py).
# NHWC with Winograd for the wide 3x3 convs (NHWC itself where a model has none). Measured
# (Zen 4, 2 threads, against NHWC's direct convs, schedules from the committed logs):
# ResNet-50 2-3% faster in the model; the onnx zoo's VGG19 re-seeded, never tuned, 201 ms
# against 408 (onnxruntime 221 / 188 in the same runs); README, Benchmarks.
DEFAULT_CPU_FP32_LAYOUT = "NHWC-winograd"  # one of CPU_FP32_LAYOUTS


def graph_cleanup():
    """Phase 1 (target independent): fewer, simpler kernels before anything is tuned.

    BatchNorm folds into the preceding conv's weights and bias; the rest of inference-mode
    decomposition and constant folding follow, so weights arrive precomputed.
    """
    from tvm import relax, transform

    return transform.Sequential([
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
    ], name="graph_cleanup")


def _convert_nhwc(mod, report: dict):
    """NHWC/HWIO convs through TVM's ConvertLayout, after :mod:`.passes.layout_prep` has
    rewritten (Dropout, n-ary Sum/Mean/Max/Min) or fenced off (their ops stay NCHW, converted
    at their edges) what TVM 0.27's layout rules crash on."""
    from tvm import relax

    from pipeline.compiler.passes.layout_prep import prepare_for_layout

    mod, prep = prepare_for_layout(mod)
    report["layout_prep"] = prep.as_dict()
    return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)


def _convert_nhwc_winograd(mod, report: dict):
    """NHWC, then the 3x3 stride-1 convs as Winograd F(m, 3) (:mod:`.passes.winograd`):
    their weights, constants again after folding the layout conversion, are transformed."""
    from tvm import relax

    from pipeline.compiler.passes.winograd import WinogradReport, has_candidates, winograd_conv2d

    mod = _convert_nhwc(mod, report)
    if not has_candidates(mod):  # a transformer, a small convnet: NHWC as it is
        report["winograd"] = WinogradReport().as_dict()
        return mod
    mod = relax.transform.FoldConstant()(mod)
    mod, done = winograd_conv2d(mod)
    report["winograd"] = done.as_dict()
    return mod


def _pack_nchw16c(mod, report: dict):
    from pipeline.compiler.passes.pack_nchwc import PackFloat32NCHWc

    return PackFloat32NCHWc()(mod)


def _keep_layout(mod, report: dict):
    return mod


def _cpu_float32_layout(target, layout: str):
    # The chosen layout first, then the fallbacks, in order: NCHW16c is the project's own
    # pass (it packs only the convs and ops it knows, converting at their edges), NCHW is
    # the model as imported (always builds, at about half the speed: FACTS.md).
    # NHWC-winograd falls back to plain NHWC first.
    packed = [("NCHW16c", _pack_nchw16c), ("NCHW", _keep_layout)]
    nhwc = [("NHWC", _convert_nhwc), *packed]
    return {"NHWC": nhwc, "NHWC-winograd": [("NHWC-winograd", _convert_nhwc_winograd), *nhwc],
            "NCHW16c": packed}[layout or DEFAULT_CPU_FP32_LAYOUT]


def _cpu_float16_layout(target, layout: str):
    # float16 convs go channels-last like float32 ones (ConvertLayout is dtype-agnostic);
    # PackFloat32NCHWc packs float32 convs only, so the fallback is the imported NCHW.
    return [("NHWC", _convert_nhwc), ("NCHW", _keep_layout)]


def _pack_int8_vnni(mod, report: dict):
    from pipeline.compiler.passes.pack_int8_vnni import PackInt8ForVNNI, PackInt8MatmulForVNNI

    convs, matmuls = PackInt8ForVNNI(), PackInt8MatmulForVNNI()
    mod = matmuls(convs(mod))
    report["vnni_packed"] = {**convs.last_stats, **matmuls.last_stats}
    return mod


def _cpu_int8_layout(target, layout: str):
    # int8 on an x86 CPU with VNNI: integer regions go to NCHW16c with prepacked weights so
    # MetaSchedule can tensorize with vpdpbusd (FACTS.md: 0.17 ms packed vs 1.97 ms NCHW);
    # matmuls with constant weights get their weights in vpdpbusd blocks likewise.
    # No fallback: a VNNI artifact that silently computed in NCHW would be 10x slower.
    from tvm.target import codegen

    if codegen.target_has_features("avx512vnni", target):
        return [("NCHW16c (int8, VNNI)", _pack_int8_vnni)]
    return [("NCHW", _keep_layout)]


def _cpu_mixed_layout(target, layout: str):
    # a mixed model's int8 convs (integer regions) are packed for VNNI and its float32
    # convs in NCHW16c, each packer leaving the other's convs alone; without VNNI the int8
    # convs stay NCHW, as the int8 rule does
    int8_rule = _cpu_int8_layout(target, layout)[0][1]
    fp32_rules = _cpu_float32_layout(target, "NCHW16c")

    def packed(mod, report):
        return fp32_rules[0][1](int8_rule(mod, report), report)

    return [("NCHW16c (int8 VNNI + float32)", packed), *fp32_rules[1:]]


def _tensor_core_forms(mod, report: dict):
    from pipeline.compiler.passes.cuda_tensor_cores import tensor_core_forms

    mod, stats = tensor_core_forms(mod)
    report["tensor_core_forms"] = stats
    return mod


def _cuda_tensor_core_layout(target, layout: str):
    # int8 and float16 on CUDA: convs as im2col matmuls and u8 activations as s8, the form
    # DLight's tensor-core (WMMA) rules take (compiler.cuda_schedules); the imported NCHW
    # graph (CUDA cores) if that fails
    return [("NCHW, convs as im2col matmuls (tensor cores)", _tensor_core_forms),
            ("NCHW", _keep_layout)]


def _fp8_tensor_cores(mod, report: dict, target=None):
    from pipeline.compiler.passes.fp8_tensor_cores import fp8_tensor_core_matmuls

    mod, stats = fp8_tensor_core_matmuls(mod, target)
    report["fp8_tensor_cores"] = stats
    return mod


def _cuda_float32_layout(target, layout: str):
    # float32 models keep NCHW (TVM has no TF32 tensor-core intrinsic); the fp8_e4m3
    # scheme's decode-matmuls (float32 compute dtype too) go to the FP8 tensor cores where
    # the GPU has them (sm_89, sm_90) and the shape tiles: a no-op for any other model
    from pipeline.compiler.fp8_mma import FP8_MMA_ARCHS

    if str(target.attrs.get("arch", "")) not in FP8_MMA_ARCHS:
        return [("NCHW", _keep_layout)]
    return [("NCHW", lambda mod, report: _fp8_tensor_cores(mod, report, target)),
            ("NCHW (fp8_e4m3 matmuls left on the decode kernel)", _keep_layout)]


# Phase 2 per (target kind, compute dtype): the layout rule, a function(target, layout) ->
# [(layout name, function(mod, report) -> mod), ...]: the layout wanted, then its fallbacks.
# Missing entries keep the imported layout (DLight schedules NCHW as it is).
LAYOUT_RULES = {
    ("llvm", "float32"): _cpu_float32_layout,
    ("llvm", "int8"): _cpu_int8_layout,
    ("llvm", "float16"): _cpu_float16_layout,
    ("llvm", "mixed"): _cpu_mixed_layout,
    ("cuda", "float32"): _cuda_float32_layout,
    ("cuda", "int8"): _cuda_tensor_core_layout,
    ("cuda", "float16"): _cuda_tensor_core_layout,
}


# Phase 2b: on CPUs, exp/erf/tanh/softmax of float32 tensors become TOPI's polynomial
# approximations (relative error ~3e-7). LLVM lowers the exact ones to a libm call per
# element, which does not vectorize: a BERT's GELU (erf over 128 x 1536) took 3.2 ms that
# way against 0.06 ms (one thread, Zen 4), and its softmax likewise. onnxruntime's MLAS
# approximates these functions too; the fp32 gates (1e-4 relative) leave room for 3e-7.
FAST_MATH_OPS = ("relax.exp", "relax.erf", "relax.tanh", "relax.nn.softmax")


def _fast_math(mod, report: dict):
    """The float32 ops of :data:`FAST_MATH_OPS` as their TOPI fast versions."""
    from tvm import topi

    from pipeline.compiler.passes._qdq import rewrite_calls

    fast = {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf,
            "relax.tanh": topi.fast_tanh}
    counts: dict[str, int] = {}

    def rewrite(mutator, call):
        name = getattr(call.op, "name", None)
        if name not in FAST_MATH_OPS or str(call.args[0].ty.dtype) != "float32":
            return None
        counts[name] = counts.get(name, 0) + 1
        if name == "relax.nn.softmax":
            return mutator.builder_.call_te(topi.nn.fast_softmax, call.args[0],
                                            int(call.attrs.axis))
        return mutator.builder_.call_te(fast[name], call.args[0])

    mod = rewrite_calls(mod, rewrite)
    report["fast_math"] = {k.removeprefix("relax."): v for k, v in sorted(counts.items())}
    return mod


# Phase 2c: on CPUs with FMA, the residual add's two fused multiply-adds (IntegerRegion
# emits them in float64: a u8 code times a float32 ratio is exact there, and one rounding
# to float32 gives what the FMA gives) become float32 FMAs (``tirx.fma``: LLVM's fmuladd,
# one vfmadd on a CPU that has FMA). Same values (exhaustively tested against onnxruntime's
# QLinearAdd), half the vector width of float64 and no conversions: an epilogue over a
# 56x56x256 activation took 206 us in float64 and 82 us in float32 (2 threads, Zen 4), and
# ResNet-50 int8 runs 16 such epilogues. Emitted after the layout passes (which know only
# Relax ops), as one elementwise kernel that fuses into the conv before it like any other.
def _float32_fma(mod, report: dict):
    """IntegerRegion's float64 multiply-adds ``float32(float64(x) * r + a)`` as float32
    ``fma(float32(x), r, a)`` (``r`` a float32 value; ``a`` a float32 value or tensor of
    ``x``'s shape)."""
    from tvm import ir, relax, te
    from tvm.tirx.op import fma

    from pipeline.compiler.passes._qdq import op_name, rewrite_calls, shape_of

    def bound(mutator, expr):
        """The value bound to ``expr`` if it is a variable (None if unbound), else ``expr``."""
        return mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def as_float32(mutator, expr):
        """``expr`` (float64, of a float32 value) as float32, or None."""
        expr = bound(mutator, expr)
        if isinstance(expr, ir.Constant):
            value = expr.value.numpy()
            narrow = value.astype(np.float32)
            if value.size == 1 and np.array_equal(narrow.astype(np.float64), value):
                return relax.const(narrow, "float32")
            return None
        if op_name(expr) == "relax.astype" and str(expr.args[0].ty.dtype) == "float32":
            return expr.args[0]
        return None

    def fma_te(x, ratio, addend):
        scalar = tuple(int(d) for d in addend.shape) == (1,)

        def body(*i):
            return fma(x(*i).astype("float32"), ratio[0], addend[0] if scalar else addend(*i))

        return te.compute(x.shape, body, name="fma")

    def fma2_te(x, ratio, y, ratio_y, addend_y):
        def body(*i):
            inner = fma(y(*i).astype("float32"), ratio_y[0], addend_y[0])
            return fma(x(*i).astype("float32"), ratio[0], inner)

        return te.compute(x.shape, body, name="fma2")

    single: set[str] = set()  # the kernels of the single FMAs emitted so far
    count = 0

    def made_here(mutator, expr):
        """The arguments ``(x, ratio, addend)`` of a single float32 FMA kernel this pass
        emitted for ``expr``, with a scalar addend; or None."""
        call = bound(mutator, expr)
        if op_name(call) != "relax.call_tir" or call.args[0].name_hint not in single:
            return None
        args = tuple(call.args[1].fields)
        return args if tuple(shape_of(args[2])) == (1,) else None

    def rewrite(mutator, call):
        nonlocal count
        if op_name(call) != "relax.astype" or str(call.attrs.dtype) != "float32":
            return None
        total = mutator.lookup_binding(call.args[0])
        if op_name(total) != "relax.add" or str(total.ty.dtype) != "float64":
            return None
        product = mutator.lookup_binding(total.args[0])
        if op_name(product) != "relax.multiply":
            return None
        widened = mutator.lookup_binding(product.args[0])
        if op_name(widened) != "relax.astype":
            return None
        x = widened.args[0]
        ratio, addend = as_float32(mutator, product.args[1]), as_float32(mutator, total.args[1])
        if ratio is None or addend is None or tuple(shape_of(ratio)) != (1,):
            return None
        if tuple(shape_of(addend)) not in ((1,), tuple(shape_of(x))):
            return None
        count += 1
        # QLinearAdd's second FMA takes the first's result: both in one kernel, so the
        # other operand reaches it as its u8 codes (fused into the conv that produced it,
        # the first FMA would write a float32 tensor four times the size instead)
        inner = made_here(mutator, addend)
        if inner is not None and tuple(shape_of(inner[0])) == tuple(shape_of(x)):
            return mutator.builder_.call_te(fma2_te, x, ratio, *inner,
                                            primfunc_name_hint="fma2")
        call = mutator.builder_.call_te(fma_te, x, ratio, addend, primfunc_name_hint="fma")
        single.add(call.args[0].name_hint)
        return call

    mod = rewrite_calls(mod, rewrite)
    report["float32_fma"] = count
    return mod


def _legalize_and_fuse():
    """Phase 3: legalize to TIR, fold the weight transforms, fuse into kernels."""
    from tvm import relax, transform

    return transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.FoldConstant(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ], name="lower_for_target")


def _reason(error: Exception) -> str:
    """One line naming the failure: the exception type and its message's last line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:400]


def _widen_float16(mod, report: dict):
    """On a CPU without float16 arithmetic: float32 compute on the float16 weights (widened
    once, at load), so the model lowers, tunes and runs as a float32 one
    (:func:`.passes.float_formats.widen_float16` says why and when not). Returns
    ``(mod, compute_dtype)``; ``report["float16_widened"]`` says what it did."""
    from pipeline.compiler.passes.float_formats import widen_float16

    mod, done = widen_float16(mod)
    report["float16_widened"] = done.as_dict()
    return mod, ("float32" if done.rewritten else "float16")


def lower_for_target(mod, target, compute_dtype: str = "float32", layout: str = "",
                     report: dict | None = None):
    """Phases 2-3: layout for the target, then legalize and fuse into TIR kernels.

    ``layout`` picks the fp32 conv layout on CPUs (one of :data:`CPU_FP32_LAYOUTS`; empty:
    :data:`DEFAULT_CPU_FP32_LAYOUT`); other targets and int8 ignore it. A layout that fails
    on this model (an operator whose layout rule TVM cannot apply) falls back to the next
    of its rule (NHWC -> NCHW16c -> NCHW), with a warning; the decision depends only on the
    module, so the tune and compile stages lower identically.

    ``report``, if given, is filled with ``layout`` (the one used), ``layout_requested``,
    ``layout_fallback`` (None, or why the requested one failed and what replaced it, as
    printed), for NHWC ``layout_prep`` (what was rewritten or kept unconverted) and, for
    int8 with VNNI, ``vnni_packed`` (convs and matmuls packed, layout conversions); on CPUs
    ``fast_math`` (the ops approximated, see :data:`FAST_MATH_OPS`); for float16 on a CPU
    without float16 arithmetic ``float16_widened`` (see :func:`_widen_float16`).
    """
    from tvm.target import codegen

    if layout and layout not in CPU_FP32_LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {', '.join(CPU_FP32_LAYOUTS)}")
    report = report if report is not None else {}
    if compute_dtype == "float16" and target.kind.name == "llvm" and \
            not codegen.target_has_features("avx512fp16", target):
        mod, compute_dtype = _widen_float16(mod, report)
    rule = LAYOUT_RULES.get((target.kind.name, compute_dtype))
    choices = rule(target, layout) if rule else [("NCHW", _keep_layout)]
    failures: list[str] = []
    for i, (name, convert) in enumerate(choices):
        fields: dict = {}
        try:
            with target:
                # Phase 2: layout (converted at the edges of its regions; weights folded
                # at compile time), then Phase 3
                converted = convert(mod, fields)
                if target.kind.name == "llvm":
                    converted = _fast_math(converted, fields)
                    if codegen.target_has_features("fma", target):
                        converted = _float32_fma(converted, fields)
                lowered = _legalize_and_fuse()(converted)
        except Exception as error:  # noqa: BLE001  (TVM raises its own error types)
            if i == len(choices) - 1:
                raise
            failures.append(f"{name} failed ({_reason(error)})")
            log.debug("layout %s failed", name, exc_info=True)
            continue
        fallback = None
        if failures:
            fallback = f"{'; '.join(failures)}; lowered in {name} instead"
            print(f"lower: WARNING {fallback}", flush=True)
        report.update({"layout": name, "layout_requested": choices[0][0],
                       "layout_fallback": fallback, **fields})
        return lowered
    raise AssertionError("unreachable: the last layout choice raises")
