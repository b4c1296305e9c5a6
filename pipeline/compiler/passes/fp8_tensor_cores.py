"""``fp8_e4m3`` matmuls on the FP8 tensor cores of sm_89/sm_90 (W8A8).

The ``fp8_e4m3`` scheme binds each MatMul weight to the fused decode-matmul kernel
(:func:`pipeline.compiler.dequant_matmul.code_prim_func`, float32 activations). On a CUDA
target with FP8 tensor cores this pass replaces each such call whose shape tiles
(:func:`pipeline.compiler.fp8_mma.check_shape`; one-row matmuls, which tensor cores do not
help, keep the decode kernel) by

    s = max(|x|) / 448 (one per-tensor scale per call, computed on the device)
    y = fp8_mma(x, s, 1 / s, codes^T, w_scale)

the kernel of :mod:`pipeline.compiler.fp8_mma`: activations quantized to E4M3 in the
kernel, the same weight codes (transposed at compile time, bits untouched), float32
accumulation. That is W8A8 arithmetic, not the float32-activation arithmetic of the CPU
artifact: what it costs in accuracy is measured on llvm by running this very rewrite with
``conversions="bits"`` (``tests/test_fp8_mma.py``).
"""

from __future__ import annotations

import numpy as np

from pipeline.compiler import dequant_matmul, fp8_mma

# a scale of 0 (an all-zero input) would make 1/s infinite and 0 * inf NaN
_MIN_AMAX = 2.0 ** -100


def _fp8_decode_call(mod, call):
    """(x, codes [k, n], scales) of a call_tir to an fp8 decode-matmul kernel, else None."""
    from tvm import relax, s_tir, tirx

    from ._qdq import fold_constant

    if not isinstance(call, relax.Call) or getattr(call.op, "name", None) != "relax.call_tir":
        return None
    gvar = call.args[0]
    func = mod[gvar] if gvar in mod.functions else None
    if not isinstance(func, tirx.PrimFunc) or not dequant_matmul.has_kernel(func):
        return None
    sch = s_tir.Schedule(func)
    block = sch.get(sch.get_sblock(dequant_matmul.BLOCK))
    if str(block.annotations.get("dequant_decode", "")) != "fp8_e4m3":
        return None
    args = list(call.args[1].fields)
    if len(args) != 3:
        return None
    codes, scales = fold_constant(args[1]), fold_constant(args[2])
    if codes is None or scales is None:
        return None
    return args[0], codes, scales


def fp8_tensor_core_matmuls(mod, target, conversions: str = "cuda") -> tuple[object, dict]:
    """The pass (see the module docstring). ``conversions="bits"`` makes the same rewrite
    with the llvm-runnable form of the kernel (unscheduled), to measure its numerics on a
    CPU. Returns ``(mod, stats)``: matmuls rewritten, and those kept with why."""
    from tvm import relax
    from tvm.relax import op

    from ._qdq import rewrite_calls, shape_of

    stats: dict = {"matmuls": 0, "kept": []}
    kernels: dict[tuple[int, int, int], object] = {}
    source = mod

    def kernel(m: int, n: int, k: int, builder):
        if (m, n, k) not in kernels:
            func = fp8_mma.prim_func(m, n, k, conversions)
            if conversions == "cuda":
                # scheduled here, tensorized: DLight skips it, and kOpaque (8) keeps the
                # lowering from fusing other ops into it (FuseTIR would undo the schedule)
                func = fp8_mma.schedule_cuda(func, target).with_attr("op_pattern", 8)
            kernels[(m, n, k)] = builder.add_func(func.without_attr("global_symbol"),
                                                  "fp8_mma")
        return kernels[(m, n, k)]

    def rewrite(mutator, call):
        found = _fp8_decode_call(source, call)
        if found is None:
            return None
        x, codes, scales = found
        shape = shape_of(x)
        k, n = codes.shape
        m = int(np.prod(shape[:-1]))
        try:
            fp8_mma.check_shape(m, n, k)
        except ValueError as why:
            stats["kept"].append(str(why))
            return None
        bb = mutator.builder_
        x2 = bb.emit(op.reshape(x, [m, k]))
        amax = bb.emit(op.maximum(op.max(op.abs(x2)),
                                  relax.const(np.float32(_MIN_AMAX))))
        scale = bb.emit(op.reshape(op.divide(amax, relax.const(np.float32(448.0))), [1]))
        inv = bb.emit(op.divide(relax.const(np.ones(1, np.float32)), scale))
        w_scale = np.broadcast_to(np.asarray(scales, np.float32).reshape(-1), (n,))
        y = bb.emit(relax.call_tir(
            kernel(m, n, k, bb),
            [x2, scale, inv, relax.const(np.ascontiguousarray(codes.T)),
             relax.const(np.ascontiguousarray(w_scale))],
            relax.TensorType([m, n], "float32")))
        stats["matmuls"] += 1
        return op.reshape(y, [*shape[:-1], n])

    return rewrite_calls(mod, rewrite), stats
