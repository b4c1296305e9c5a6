"""Target lowering: the named Relax pipeline both the tune and the build stage run.

Tuning and compilation must see the very same fused kernels, or tuning records (matched
by workload structural hash) would not apply; so both call :func:`lower_for_target`.
Target-specific choices sit in one table, :data:`LAYOUTS`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Phase 2 layout choices, per (target kind, compute dtype). Measured on this machine class
# (FACTS.md): plain NCHW fp32 convolutions run at about half the speed of NHWC/HWIO, which
# the stock legalization handles. GPU targets keep NCHW: DLight schedules them as they are.
LAYOUTS: dict[tuple[str, str], dict[str, list[str]]] = {
    ("llvm", "float32"): {"relax.nn.conv2d": ["NHWC", "HWIO"]},
}


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


def lower_for_target(mod, target, compute_dtype: str = "float32"):
    """Phases 2-3: layout for the target, then legalize and fuse into TIR kernels."""
    from tvm import relax, transform
    from tvm.target import codegen

    from .passes.pack_int8_vnni import PackInt8ForVNNI

    layout = LAYOUTS.get((target.kind.name, compute_dtype))
    # int8 on an x86 CPU with VNNI: integer regions go to NCHW16c with prepacked weights so
    # MetaSchedule can tensorize with vpdpbusd (FACTS.md: 0.17 ms packed vs 1.97 ms NCHW).
    pack_vnni = (compute_dtype == "int8" and target.kind.name == "llvm"
                 and codegen.target_has_features("avx512vnni", target))
    seq = transform.Sequential([
        # Phase 2: layout (converted once at the network's edges, weights folded at compile time)
        PackInt8ForVNNI() if pack_vnni else transform.Sequential([]),
        relax.transform.ConvertLayout(layout) if layout else transform.Sequential([]),
        # Phase 3: legalize to TIR, fold the weight transforms, fuse into kernels
        relax.transform.LegalizeOps(),
        relax.transform.FoldConstant(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ], name="lower_for_target")
    with target:
        return seq(mod)
