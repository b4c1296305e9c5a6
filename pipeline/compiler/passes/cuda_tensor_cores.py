"""CUDA tensor-core forms of the int8 and float16 convolutions and matmuls.

The tensor-core schedules the CUDA targets use (DLight's ``MatmulTensorization`` for float16,
``MatmulInt8Tensorization`` for int8, both WMMA) take matmuls only, and int8 only as
signed x signed. This pass gives them that form, before legalization:

- **convolutions as matmuls**: a ``conv2d`` (NCHW/OIHW, groups 1, constant weights)
  becomes an im2col gather ``cols[n, c*kh*kw, oh*ow]`` and a matmul-shaped kernel
  ``Y[n, o, y, x] = sum W[o, c*kh*kw] * cols[n, c*kh*kw, y*ow + x]`` that writes NCHW
  itself (no reshape after it: the epilogue can fuse). The gather costs one pass over a
  kh*kw times larger matrix in GPU memory (1.8 MB for ResNet-50's largest int8 3x3 layer).
- **signed int8 activations**: the project's integer ops are u8 activations x s8 weights
  (what VNNI multiplies); the tensor cores' WMMA/MMA s8 intrinsics multiply s8 x s8. With
  ``x_s8 = x_u8 - 128`` the sum is ``x_u8 . w = x_s8 . w + 128 * sum(w)``: the second term is
  a per-output-channel int32 constant, exact. Padding pixels of a convolution are 0 in u8,
  so the gather pads with -128.

Numerically the same integers as the original graph (int32 sums are exact in any order);
float16 sums change order only. The tests check both on llvm.
"""

from __future__ import annotations

import numpy as np

from ._qdq import fold_constant, op_name, shape_of

SHIFT = 128  # u8 -> s8: x - 128


def _im2col_te(data, kh: int, kw: int, strides, padding, dilation, shift: bool):
    """``cols[n, (c, r, s), (oh, ow)] = X[n, c, oh*sh + r*dh - pt, ow*sw + s*dw - pl]``
    (0 outside: the conv's zero padding; -128 once shifted to s8)."""
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in data.shape)
    sh, sw = strides
    dh, dw = dilation
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1

    def value(b, ck, p):
        ci, r, s = ck // (kh * kw), (ck % (kh * kw)) // kw, ck % kw
        y = (p // ow) * sh + r * dh - pt
        x = (p % ow) * sw + s * dw - pl
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        v = data[b, ci, tirx.if_then_else(inside, y, 0), tirx.if_then_else(inside, x, 0)]
        if shift:
            v = (v.astype("int32") - SHIFT).astype("int8")
            pad = tirx.const(-SHIFT, "int8")
        else:
            pad = tirx.const(0, data.dtype)
        return tirx.if_then_else(inside, v, pad)

    return te.compute((n, c * kh * kw, oh * ow), value, name="im2col")


def _shift_te(data):
    from tvm import te

    return te.compute(data.shape, lambda *i: (data[i].astype("int32") - SHIFT).astype("int8"),
                      name="to_signed_int8")


def _conv(mutator, call, stats: dict):
    from tvm import relax
    from tvm.relax import op

    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW") or int(attrs.groups) != 1:
        stats["kept"].append(f"conv2d {layouts} groups={int(attrs.groups)}")
        return None
    data_dtype = str(call.args[0].ty.dtype)
    weight = fold_constant(call.args[1])
    out_dtype = str(call.ty.dtype)
    int8 = data_dtype in ("uint8", "int8") and out_dtype == "int32"
    if weight is None or not (int8 and weight.dtype == np.int8) and not (
            data_dtype == "float16" and weight.dtype == np.float16):
        return None
    shift = data_dtype == "uint8"
    o, _, kh, kw = weight.shape
    bb = mutator.builder_
    cols = bb.emit(bb.call_te(
        _im2col_te, call.args[0], kh, kw, [int(s) for s in attrs.strides],
        [int(p) for p in attrs.padding], [int(d) for d in attrs.dilation], shift,
        primfunc_name_hint="im2col"))
    w2d = weight.reshape(o, -1)
    # the matmul writes NCHW itself: a reshape after it would stop the lowering from fusing
    # the requantize (or cast) epilogue into the tensor-core kernel
    acc = bb.emit(bb.call_te(_matmul_nchw_te, relax.const(w2d), cols, shape_of(call)[2:],
                             out_dtype, primfunc_name_hint="conv_matmul"))
    stats["convs"] += 1
    if not shift:
        return acc
    corr = (SHIFT * w2d.astype(np.int64).sum(axis=1)).astype(np.int32).reshape(1, o, 1, 1)
    return op.add(acc, relax.const(corr))


def _matmul_nchw_te(weight, cols, out_hw, out_dtype: str):
    """``Y[n, o, y, x] = sum_ck W[o, ck] * cols[n, ck, y * OW + x]``."""
    from tvm import te

    n, ck, _ = (int(d) for d in cols.shape)
    o = int(weight.shape[0])
    oh, ow = out_hw
    r = te.reduce_axis((0, ck), name="ck")
    return te.compute((n, o, oh, ow), lambda b, c, y, x: te.sum(
        weight[c, r].astype(out_dtype) * cols[b, r, y * ow + x].astype(out_dtype), axis=r),
        name="conv_matmul")


def _matmul(mutator, call, stats: dict):
    from tvm import relax
    from tvm.relax import op

    if str(call.attrs.out_dtype) != "int32" or str(call.args[0].ty.dtype) != "uint8":
        return None
    weight = fold_constant(call.args[1])
    if weight is None or weight.dtype != np.int8 or weight.ndim != 2:
        return None
    bb = mutator.builder_
    signed = bb.emit(bb.call_te(_shift_te, call.args[0], primfunc_name_hint="to_signed_int8"))
    acc = bb.emit(op.matmul(signed, relax.const(weight), out_dtype="int32"))
    stats["matmuls"] += 1
    corr = (SHIFT * weight.astype(np.int64).sum(axis=0)).astype(np.int32)
    return op.add(acc, relax.const(corr))


def tensor_core_forms(mod) -> tuple[object, dict]:
    """The pass: convolutions as im2col matmuls (int8 and float16), u8 x s8 matmuls as
    s8 x s8 + a constant. Returns ``(mod, stats)``: convs and matmuls rewritten, convs kept
    (with why)."""
    from ._qdq import rewrite_calls

    stats: dict = {"convs": 0, "matmuls": 0, "kept": []}

    def rewrite(mutator, call):
        name = op_name(call)
        if name == "relax.nn.conv2d":
            return _conv(mutator, call, stats)
        if name == "relax.matmul":
            return _matmul(mutator, call, stats)
        return None

    return rewrite_calls(mod, rewrite), stats
