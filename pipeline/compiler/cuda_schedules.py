"""Tensor-core schedules for CUDA kernels without a tuning record (DLight rules).

DLight's ``gpu.Matmul`` tries its WMMA tensor-core rules only when every matmul dimension
is above 64 and the operands are float16 (or int8 x int8); ResNet-50's 64-channel layers and
7x7 layers miss that gate and run on CUDA cores. :class:`TensorCoreMatmul` runs first and
applies DLight's ``MatmulTensorization`` (float16 x float16 -> float16/float32) or
``MatmulInt8Tensorization`` (s8 x s8 -> int32) to every matmul-like kernel whose rows and
columns are at least :data:`MIN_ROWS_COLS` and reduction at least :data:`MIN_K`; those rules
pad each dimension to their tile (128 x 128 x 16 / 32), so a 49-row layer wastes most of its
tile (a tensor-core kernel all the same; **not measured**: no GPU has run them). One-row
matmuls (batch-1 classifier heads) stay on ``GEMV``, where tensor cores do not help.

int8 convolutions and u8 activations reach these rules through
:mod:`pipeline.compiler.passes.cuda_tensor_cores` (im2col matmuls, s8 activations).
"""

from __future__ import annotations

MIN_ROWS_COLS = 16  # one tensor-core fragment edge
MIN_K = 16
TENSOR_CORE_SCOPES = ("wmma.matrix_a", "wmma.accumulator", "m16n8k")  # in a scheduled kernel


def _matmul_extents(func) -> tuple[str, str, int, int, int] | None:
    """(in dtype, out dtype, rows, cols, k) of a PrimFunc's single matmul-like reduction."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
    except Exception:  # noqa: BLE001 - not a kernel the analysis understands
        return None
    if not reductions:
        return None
    block = sch.get(reductions[0])
    maps = get_index_map(block)
    if maps is None or len(block.reads) < 2:
        return None
    extents = maps[0].map_shape([iv.dom.extent for iv in block.iter_vars])
    try:
        _, rows, cols, k = (int(e) for e in extents)
    except TypeError:  # a symbolic extent: not in this project's static models
        return None
    return (str(block.reads[0].source.dtype), str(block.writes[0].source.dtype), rows, cols, k)


def tensor_core_rule():
    """A DLight rule object: the tensor-core schedule of a matmul-like kernel, or None."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from tvm.s_tir.dlight.gpu.matmul import MatmulInt8Tensorization, MatmulTensorization

    class TensorCoreMatmul(GPUScheduleRule):
        def apply(self, func, target, tunable):  # noqa: D102
            if not self.is_target_available(target):
                return None
            found = _matmul_extents(func)
            if found is None:
                return None
            in_dtype, out_dtype, rows, cols, k = found
            if min(rows, cols) < MIN_ROWS_COLS or k < MIN_K:
                return None
            if in_dtype == "int8" and out_dtype == "int32":
                sch = MatmulInt8Tensorization().apply(func, target, tunable)
                return None if sch is None else _without_software_pipeline(sch)
            if in_dtype == "float16" and out_dtype in ("float16", "float32"):
                return MatmulTensorization().apply(func, target, tunable)
            return None

    return TensorCoreMatmul()


def _without_software_pipeline(sch):
    """The schedule with its software-pipeline annotations removed. DLight's int8 WMMA
    schedule pipelines its K loops, and TVM 0.27's InjectSoftwarePipeline then fails on its
    fragments ("GetWmmaFragmentSize: Check failed"): every int8 tensor-core kernel failed to
    compile. Unpipelined, it compiles to ``wmma.mma.sync ... s32.s8.s8.s32``."""
    from tvm.s_tir.dlight.analysis import get_root_block

    def blocks(parent):
        for child in sch.get_child_blocks(parent):
            yield child
            yield from blocks(child)

    for block in list(blocks(get_root_block(sch))):
        for loop in sch.get_loops(block):
            for key in ("software_pipeline_order", "software_pipeline_stage"):
                if key in sch.get(loop).annotations:
                    sch.unannotate(loop, key)
    return sch


def uses_tensor_cores(func) -> bool:
    """Whether a scheduled PrimFunc computes with tensor-core fragments (WMMA or MMA)."""
    text = func.script()
    return any(scope in text for scope in TENSOR_CORE_SCOPES)
