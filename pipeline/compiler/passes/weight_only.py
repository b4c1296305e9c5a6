"""Block-wise weight-only formats in Relax: ``matmul(x, W)`` -> fused dequantize-matmul.

The second half of :mod:`pipeline.frontend.blockwise_weights`: each weight stand-in parameter
``W`` that the importer made for a MatMulNBits node is consumed by one ``R.matmul(x, W)``;
that call becomes ``call_tir(dequant_matmul, [x, codes, scales(, zeros)])`` with the packed
constants, and the stand-in leaves the function's signature.
"""

from __future__ import annotations

from pipeline.core.errors import UnsupportedModelError


def bind_blockwise_weights(mod, weights: dict):
    """Replace every stand-in matmul of ``mod`` (see the module docstring).

    ``weights`` maps stand-in names to :class:`~pipeline.schemes.blockwise.BlockwiseWeight`
    or :class:`~pipeline.schemes.codes8.CodeWeight` (fp8_e4m3, posit8: per-channel scales,
    the format's decode in the kernel; a "table8" weight's table travels as one more constant).
    Raises :class:`UnsupportedModelError` when a stand-in is used other than as the right-hand
    side of one float32 matmul (the importer would then have materialised something else).
    """
    import numpy as np
    import tvm
    from tvm import relax

    from pipeline.compiler import dequant_matmul
    from pipeline.compiler.passes._qdq import rewrite_calls
    from pipeline.schemes.codes8 import CodeWeight

    if not weights:
        return mod
    matmul_op = tvm.ir.Op.get("relax.matmul")
    replaced: list[str] = []

    def rewrite(mutator, call):
        if call.op != matmul_op or len(call.args) != 2:
            return None
        x, w = call.args
        if not isinstance(w, relax.Var) or w.name not in weights:
            return None
        weight = weights[w.name]
        shape = [int(d) for d in x.ty.shape]
        if x.ty.dtype != "float32" or shape[-1] != weight.k:
            raise UnsupportedModelError(
                f"block-wise weight {w.name}: expected a float32 [..., {weight.k}] "
                f"activation, got {x.ty.dtype} {shape}")
        if isinstance(weight, CodeWeight):  # fp8_e4m3, posit8: a decode per code
            func = dequant_matmul.code_prim_func(tuple(shape[:-1]), weight.k, weight.n,
                                                 weight.decode, weight.per_channel)
            arrays = (weight.codes, weight.scales, weight.table)
        else:
            func = dequant_matmul.prim_func(tuple(shape[:-1]), weight.k, weight.n,
                                            weight.bits, weight.block_size,
                                            str(weight.scales.dtype), weight.zeros is not None)
            arrays = (weight.codes, weight.scales, weight.zeros)
        gvar = mutator.builder_.add_func(func, "dequant_matmul")
        consts = [relax.const(np.ascontiguousarray(a)) for a in arrays if a is not None]
        replaced.append(w.name)
        return relax.call_tir(gvar, [x, *consts],
                              relax.TensorType([*shape[:-1], weight.n], "float32"))

    mod = rewrite_calls(mod, rewrite)
    unused = sorted(set(weights) - set(replaced))
    if unused or len(replaced) != len(set(replaced)):
        raise UnsupportedModelError(
            "block-wise weights not consumed by exactly one matmul each: "
            f"{', '.join(unused) or ', '.join(sorted(replaced))}")
    return _drop_params(mod, set(weights))


def _drop_params(mod, names: set[str]):
    """``mod`` with the named parameters removed from every Relax function's signature
    (``num_input``, which the importer set, counts them no more)."""
    from tvm import relax

    from pipeline.compiler.params import NUM_INPUT, num_inputs

    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        keep = [p for p in func.params if p.name not in names]
        if len(keep) == len(func.params):
            continue
        new = relax.Function(keep, func.body, func.ret_ty, func.is_pure, func.attrs, func.span)
        mod[gvar] = new.with_attr(NUM_INPUT, num_inputs(func) - (len(func.params) - len(keep)))
    return mod
