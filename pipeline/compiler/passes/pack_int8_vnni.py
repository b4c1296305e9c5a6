"""VNNI packing for x86: integer conv regions in NCHW16c (PackInt8ForVNNI) and integer
matmuls (PackInt8MatmulForVNNI), each with its int8 weights prepacked in ``vpdpbusd`` blocks
so that MetaSchedule tensorizes the kernel with the VNNI intrinsic."""

from __future__ import annotations

import numpy as np

from ._qdq import Bindings, fold_constant, op_name, shape_of
from .pack_nchwc import OC_BLOCK, ConvPacking, packing_pass

__all__ = ["PackInt8ForVNNI", "PackInt8MatmulForVNNI", "pack_conv_weight",
           "pack_matmul_weight", "OC_BLOCK"]

IC_GROUP = 4  # input channels summed by one vpdpbusd lane (4 bytes)


def pack_conv_weight(w: np.ndarray, ic_block: int) -> np.ndarray:
    """OIHW int8 weights as ``[O/16, I/ic_block, kh, kw, ic_block/4, 16, 4]``.

    The innermost 16 x 4 block is what one ``vpdpbusd`` multiplies: 16 output channels
    times 4 consecutive input channels, contiguous.

    Parameters
    ----------
    w : numpy.ndarray
        Weights in OIHW layout, O a multiple of 16 and I of ``ic_block``.
    ic_block : int
        Input channels per block of the packed activation (a multiple of 4).
    """
    o, i, kh, kw = w.shape
    blocks = w.reshape(o // OC_BLOCK, OC_BLOCK, i // ic_block, ic_block // IC_GROUP, IC_GROUP,
                       kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 2, 5, 6, 3, 1, 4))


def _conv_te(data, kernel, strides, padding, dilation):
    from tvm import topi

    return topi.nn.conv2d_NCHWc_int8(data, kernel, strides, padding, dilation, "NCHWc",
                                     "NCHWc", out_dtype="int32")


def _zero_point_padded_conv_te(data, kernel, zero_point, strides, padding, dilation):
    """The conv over ``data`` padded with ``zero_point[0]`` inside the same kernel.

    Padded pixels must hold the input zero point, not 0 (see qdq_to_integer); reading it
    from a (1,) buffer keeps its value out of the workload (see ``_qdq.tensor_const``).
    """
    from tvm import te, tirx

    top, left, bottom, right = padding
    n, c, h, w, cb = data.shape

    def fill(i, ci, y, x, b):
        inside = tirx.all(y >= top, y < top + h, x >= left, x < left + w)
        return tirx.if_then_else(inside, data[i, ci, y - top, x - left, b], zero_point[0])

    padded = te.compute((n, c, h + top + bottom, w + left + right, cb), fill, name="data_pad")
    return _conv_te(padded, kernel, strides, [0, 0, 0, 0], dilation)


class Int8VNNI(ConvPacking):
    """u8 x s8 -> int32 convs as ``topi.nn.conv2d_NCHWc_int8`` (tensorizable with vpdpbusd)."""

    kernel_name = "conv2d_NCHWc_int8"

    def accepts(self, bindings: Bindings, call) -> bool:
        if str(call.attrs.out_dtype) != "int32" or str(call.args[0].ty.dtype) != "uint8":
            return False  # VNNI multiplies u8 x s8
        weight = bindings.const(call.args[1])
        return weight is not None and weight.dtype == np.int8

    def emit_conv(self, bb, data5, weight, strides, padding, dilation, zero_point_pad):
        from tvm import relax

        kernel = relax.const(pack_conv_weight(weight, int(shape_of(data5)[-1])))
        if zero_point_pad is None:
            return bb.call_te(_conv_te, data5, kernel, strides, padding, dilation,
                              primfunc_name_hint=self.kernel_name)
        return bb.call_te(_zero_point_padded_conv_te, data5, kernel,
                          zero_point_pad.zero_point, strides, padding, dilation,
                          primfunc_name_hint=self.kernel_name)


def PackInt8ForVNNI():  # noqa: N802  (a pass factory, named like TVM's)
    """Module pass: integer conv regions in packed NCHW16c layout for VNNI tensorization.

    Run after :func:`.qdq_to_integer.QDQToInteger` and before legalization, for x86 targets
    with AVX512-VNNI only. Each u8 x s8 -> int32 ``R.nn.conv2d`` (16k output channels,
    groups=1; input channels padded to a multiple of 4 with zero weights) becomes a
    ``topi.nn.conv2d_NCHWc_int8`` kernel on NCHW16c activations with weights prepacked
    here to ``[O/16, I/ic, kh, kw, ic/4, 16, 4]`` (Relax cannot legalize a packed conv2d
    itself); a zero-point pad before it moves into that kernel. Its requantize epilogue,
    residual adds, max pooling and global sums stay packed, and the layout is converted
    only where a tensor enters or leaves that region (:mod:`.pack_nchwc`). The number of
    convs packed and of layout conversions emitted is kept on the pass object as
    ``last_stats``.
    """
    return packing_pass(Int8VNNI(), "PackInt8ForVNNI")


# ---- matmul ---------------------------------------------------------------------------------
def pack_matmul_weight(w: np.ndarray) -> np.ndarray:
    """``[K, N]`` int8 weights as ``[N/16, K/4, 16, 4]``: each innermost 16 x 4 block is what
    one ``vpdpbusd`` multiplies (16 output columns times 4 consecutive inputs), contiguous."""
    k, n = w.shape
    blocks = w.reshape(k // IC_GROUP, IC_GROUP, n // OC_BLOCK, OC_BLOCK)
    return np.ascontiguousarray(blocks.transpose(2, 0, 3, 1))


def _matmul_vnni_te(data, packed):
    """``out[..., n] = sum_k int32(data[..., k]) * int32(W[k, n])`` read from the packed
    weights. MetaSchedule's VNNI rule splits ``n`` by 16 and ``k`` by 4 and tensorizes the
    16 x 4 block; the output keeps the matmul's own shape, so the requantize epilogue
    fuses into the kernel (a reshape after it would end the fusion)."""
    from tvm import te

    *batch, _ = data.shape
    col_blocks, k_groups, _, _ = packed.shape
    k_outer = te.reduce_axis((0, k_groups), name="k_outer")
    k_inner = te.reduce_axis((0, IC_GROUP), name="k_inner")

    def dot(*index):
        *rows, n = index
        return te.sum(data[(*rows, k_outer * IC_GROUP + k_inner)].astype("int32")
                      * packed[n // OC_BLOCK, k_outer, n % OC_BLOCK, k_inner].astype("int32"),
                      axis=[k_outer, k_inner])

    return te.compute((*batch, col_blocks * OC_BLOCK), dot, name="matmul_vnni")


def _vnni_matmul_weight(call) -> np.ndarray | None:
    """The ``[K, N]`` int8 weight of a u8 x s8 -> int32 matmul VNNI can run, else None."""
    if op_name(call) != "relax.matmul" or str(call.attrs.out_dtype) != "int32":
        return None
    if str(call.args[0].ty.dtype) != "uint8":
        return None
    weight = fold_constant(call.args[1])  # QDQToInteger passes it as a constant
    if weight is None or weight.dtype != np.int8 or weight.ndim != 2:
        return None
    k, _ = weight.shape
    if k % IC_GROUP or shape_of(call.args[0])[-1] != k:
        return None
    return weight


def PackInt8MatmulForVNNI():  # noqa: N802  (a pass factory, named like TVM's)
    """Module pass: each u8 x s8 -> int32 ``R.matmul`` with a constant ``[K, N]`` weight
    (K a multiple of 4) becomes a ``matmul_vnni`` kernel on weights prepacked to
    ``[N/16, K/4, 16, 4]`` (the requantize epilogue still fuses into it; where N is not a
    multiple of 16, the weights get zero columns and a slice before the epilogue). Run after
    :func:`.qdq_to_integer.QDQToInteger` (or the dynamic quantization's pass), for x86
    targets with AVX512-VNNI only. The number of matmuls packed is kept on the pass object
    as ``last_stats``."""
    import tvm
    from tvm import relax

    from ._qdq import rewrite_calls

    @tvm.transform.module_pass(opt_level=0, name="PackInt8MatmulForVNNI")
    class _Pass:
        def __init__(self):
            self.last_stats: dict | None = None

        def transform_module(self, mod, ctx):
            stats = self.last_stats = {"matmuls": 0}

            def rewrite(mutator, call):
                weight = _vnni_matmul_weight(call)
                if weight is None:
                    return None
                stats["matmuls"] += 1
                n = weight.shape[1]
                # N not a multiple of 16 (a 1000-class head): zero columns up to the next
                # block, and the extra outputs sliced off. Left unpacked, ResNet-50's head
                # ran as scalar code (0.28 ms, 2% of the VNNI peak).
                padded = np.pad(weight, ((0, 0), (0, -n % OC_BLOCK)))
                packed = mutator.builder_.call_te(_matmul_vnni_te, call.args[0],
                                                  relax.const(pack_matmul_weight(padded)),
                                                  primfunc_name_hint="matmul_vnni")
                if padded.shape[1] == n:
                    return packed
                last = len(shape_of(call.args[0])) - 1
                return relax.op.strided_slice(mutator.builder_.emit(packed), axes=[last],
                                              begin=[0], end=[n])

            return rewrite_calls(mod, rewrite)

    return _Pass()
