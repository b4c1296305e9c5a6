"""Target lowering: the named Relax pipeline both the tune and the build stage run.

Tuning and compilation must see the very same fused kernels, or tuning records (matched
by workload structural hash) would not apply; so both call :func:`lower_for_target`.
Target-specific layout choices sit at the top: :data:`CPU_FP32_LAYOUTS`.
"""

from __future__ import annotations

import logging

from pipeline.core.spec import CPU_FP32_LAYOUTS

log = logging.getLogger(__name__)

# Phase 2: the layout of fp32 convolutions on x86 CPUs. Plain NCHW runs at about half the
# speed of the other two (FACTS.md). "NHWC" (channels-last, weights HWIO) legalizes with the
# stock rules; "NCHW16c" (blocked, onnxruntime's fp32 layout) goes through PackFloat32NCHWc.
# Which is faster is measured per model by scripts/layout_search.py (README, Benchmarks);
# a spec's `layout` or `doit ... layout=` overrides the default. GPU targets keep NCHW:
# DLight schedules it as it is. int8 on a VNNI CPU is always packed (PackInt8ForVNNI).
DEFAULT_CPU_FP32_LAYOUT = "NHWC"  # one of CPU_FP32_LAYOUTS


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


def _cpu_float32_layout(target, layout: str):
    from tvm import relax

    from pipeline.compiler.passes.pack_nchwc import PackFloat32NCHWc

    if (layout or DEFAULT_CPU_FP32_LAYOUT) == "NHWC":
        return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})
    return PackFloat32NCHWc()


def _cpu_int8_layout(target, layout: str):
    # int8 on an x86 CPU with VNNI: integer regions go to NCHW16c with prepacked weights so
    # MetaSchedule can tensorize with vpdpbusd (FACTS.md: 0.17 ms packed vs 1.97 ms NCHW).
    from tvm import transform
    from tvm.target import codegen

    from pipeline.compiler.passes.pack_int8_vnni import PackInt8ForVNNI

    if codegen.target_has_features("avx512vnni", target):
        return PackInt8ForVNNI()
    return transform.Sequential([])


# Phase 2 per (target kind, compute dtype): the layout pass. Missing entries keep the
# imported layout (GPU targets keep NCHW: DLight schedules it as it is).
LAYOUT_RULES = {
    ("llvm", "float32"): _cpu_float32_layout,
    ("llvm", "int8"): _cpu_int8_layout,
}


def lower_for_target(mod, target, compute_dtype: str = "float32", layout: str = ""):
    """Phases 2-3: layout for the target, then legalize and fuse into TIR kernels.

    ``layout`` picks the fp32 conv layout on CPUs (one of :data:`CPU_FP32_LAYOUTS`; empty:
    :data:`DEFAULT_CPU_FP32_LAYOUT`); other targets and int8 ignore it.
    """
    from tvm import relax, transform

    if layout and layout not in CPU_FP32_LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {', '.join(CPU_FP32_LAYOUTS)}")
    rule = LAYOUT_RULES.get((target.kind.name, compute_dtype))
    layout_pass = rule(target, layout) if rule else transform.Sequential([])
    seq = transform.Sequential([
        # Phase 2: layout (converted once at the network's edges, weights folded at compile time)
        layout_pass,
        # Phase 3: legalize to TIR, fold the weight transforms, fuse into kernels
        relax.transform.LegalizeOps(),
        relax.transform.FoldConstant(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ], name="lower_for_target")
    with target:
        return seq(mod)
