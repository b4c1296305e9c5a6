"""PackInt8ForVNNI: integer conv regions in NCHW16c with VNNI-packed weights, for x86."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._qdq import Bindings, match_zero_point_pad, mutate_relax_functions, op_name, shape_of

__all__ = ["PackInt8ForVNNI", "pack_conv_weight", "OC_BLOCK"]

OC_BLOCK = 16  # output channels per vpdpbusd (16 int32 lanes of a zmm register)
IC_GROUP = 4  # input channels summed by one vpdpbusd lane (4 bytes)

# Ops computed lane by lane: on a packed tensor they run unchanged (constants per channel
# are repacked alongside), so the requantize epilogue of a conv stays packed and fuses.
_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum",
                "relax.minimum", "relax.round", "relax.clip", "relax.astype", "relax.nn.relu")


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


def _ic_block(channels: int) -> int:
    """Input channels per packed block; channels are padded up to a multiple of it."""
    return next((b for b in (16, 8, 4) if channels % b == 0), IC_GROUP)


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


@dataclass
class _Packed:
    """A tensor of the original function available in NCHW[block]c form."""

    var: object  # the 5-D var in the new function
    block: int
    channels: int


def _packable_conv(bindings: Bindings, call) -> bool:
    if op_name(call) != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
            "NCHW", "OIHW", "NCHW") or int(attrs.groups) != 1:
        return False
    if str(attrs.out_dtype) != "int32" or str(call.args[0].ty.dtype) != "uint8":
        return False  # VNNI multiplies u8 x s8
    weight = bindings.const(call.args[1])
    if weight is None or weight.dtype != np.int8:
        return False
    return weight.shape[0] % OC_BLOCK == 0


def _users(func) -> dict:
    from tvm import relax

    users: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                users.setdefault(var, []).append(binding.value)
    for var in relax.analysis.free_vars(func.body.body):
        users.setdefault(var, []).append(None)  # the function's result
    return users


def _pack_region(mod, stats: dict):
    from tvm import relax
    from tvm.relax import op

    @relax.expr_functor.mutator
    class _Packer(relax.PyExprMutator):
        def run(self, func):
            self.bindings = Bindings(func)
            self.users = _users(func)
            self.packed: dict = {}  # original var -> its packed form (the var is not emitted)
            self.entries: dict = {}  # (original var, block) -> packed copy of an emitted var
            self.materialized: set = set()
            return self.visit_expr(func)

        # ---- region edges -------------------------------------------------------------
        def pack(self, var, block: int):
            """The 5-D form of an original 4-D var, converting at the region's edge."""
            have = self.packed.get(var)
            if have is not None and have.block == block:
                return have.var
            if (var, block) in self.entries:  # a tensor read by several packed convs
                return self.entries[(var, block)]
            self.materialize(var)
            # channels short of a whole block (an RGB input) are padded; their weights are 0
            out = self.builder_.emit(op.layout_transform(
                self.visit_expr(var), lambda n, c, h, w: (n, c // block, h, w, c % block),
                pad_value=0 if shape_of(var)[1] % block else None))
            stats["layout_transforms"] += 1
            self.entries[(var, block)] = out
            return out

        def materialize(self, var) -> None:
            have = self.packed.get(var)
            if have is None or var in self.materialized:
                return
            block = have.block
            out = self.builder_.emit(op.layout_transform(
                have.var, lambda n, c, h, w, cb: (n, c * block + cb, h, w)))
            stats["layout_transforms"] += 1
            self.materialized.add(var)
            self.set_var_remap(var, out)

        def visit_var_binding_(self, binding):
            if isinstance(binding.var, relax.DataflowVar):
                if self.folded_pad(binding.var):
                    return  # the convs reading it pad inside their own kernel
                packed = self.try_pack(binding.var, self.bindings.value(binding.value))
                if packed is not None:
                    self.packed[binding.var] = packed
                    return
            for var in relax.analysis.free_vars(binding.value):
                self.materialize(var)
            super().visit_var_binding_(binding)

        def folded_pad(self, var) -> bool:
            """Whether ``var`` is a zero-point pad read only by convs that will be packed."""
            if match_zero_point_pad(self.bindings, var) is None:
                return False
            users = self.users.get(var, [None])
            return all(u is not None and _packable_conv(self.bindings, u)
                       and not any(int(p) for p in u.attrs.padding) for u in users)

        # ---- packed ops ---------------------------------------------------------------
        def try_pack(self, var, value):
            name = op_name(value)
            if name == "relax.nn.conv2d" and _packable_conv(self.bindings, value):
                return self.pack_conv(value)
            args = [a for a in getattr(value, "args", []) if a in self.packed]
            if not args:
                return None
            src = self.packed[args[0]]
            if name in _ELEMENTWISE:
                return self.pack_elementwise(value, src)
            if name == "relax.nn.max_pool2d" and str(value.attrs.layout) == "NCHW":
                layout = f"NCHW{src.block}c"
                a = value.attrs
                out = self.builder_.emit(op.nn.max_pool2d(
                    src.var, a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode,
                    a.count_include_pad, layout, layout))
                return _Packed(out, src.block, src.channels)
            if name == "relax.sum" and value.attrs.axis is not None and sorted(
                    int(x) for x in value.attrs.axis) == [2, 3] and value.attrs.keepdims:
                out = self.builder_.emit(op.sum(src.var, axis=[2, 3], keepdims=True))
                return _Packed(out, src.block, src.channels)
            return None

        def pack_elementwise(self, value, src: _Packed):
            out_shape = shape_of(value)
            if len(out_shape) != 4 or out_shape[1] != src.channels:
                return None
            args = []
            for arg in value.args:
                if arg in self.packed:
                    have = self.packed[arg]
                    if have.block != src.block or shape_of(arg) != out_shape:
                        return None
                    args.append(have.var)
                    continue
                if not isinstance(arg.ty, relax.TensorType):
                    args.append(arg)  # clip's bounds (PrimValue)
                    continue
                const = self.bindings.const(arg)
                if const is None:
                    if shape_of(arg) != out_shape:
                        return None
                    args.append(self.pack(arg, src.block))  # the other operand's edge
                    continue
                if const.size == 1:
                    args.append(self.visit_expr(arg))
                elif const.shape == (1, src.channels, 1, 1):
                    blocks = const.reshape(1, src.channels // src.block, src.block, 1, 1)
                    args.append(relax.const(np.ascontiguousarray(
                        blocks.transpose(0, 1, 3, 4, 2))))
                else:
                    return None
            out = self.builder_.emit(relax.Call(value.op, args, value.attrs))
            return _Packed(out, src.block, src.channels)

        def pack_conv(self, conv):
            attrs = conv.attrs
            weight = self.bindings.const(conv.args[1])
            out_c, in_c = weight.shape[:2]
            padding = [int(p) for p in attrs.padding]
            data = conv.args[0]
            zp_pad = match_zero_point_pad(self.bindings, data) if self.folded_pad(data) else None
            if zp_pad is not None:
                data, padding = zp_pad.source, list(zp_pad.padding)
            block = _ic_block(in_c)
            padded_c = -(-in_c // block) * block
            if padded_c != in_c:
                weight = np.pad(weight, [(0, 0), (0, padded_c - in_c), (0, 0), (0, 0)])
            data5 = self.pack(data, block)
            kernel = relax.const(pack_conv_weight(weight, block))
            conv_args = ([int(s) for s in attrs.strides], padding,
                         [int(d) for d in attrs.dilation])
            if zp_pad is None:
                out = self.builder_.call_te(_conv_te, data5, kernel, *conv_args,
                                            primfunc_name_hint="conv2d_NCHWc_int8")
            else:
                out = self.builder_.call_te(_zero_point_padded_conv_te, data5, kernel,
                                            zp_pad.zero_point, *conv_args,
                                            primfunc_name_hint="conv2d_NCHWc_int8")
            out = self.builder_.emit(out)
            stats["convs"] += 1
            return _Packed(out, OC_BLOCK, out_c)

    return mutate_relax_functions(_Packer(mod), mod)


def PackInt8ForVNNI():  # noqa: N802  (a pass factory, named like TVM's)
    """Module pass: integer conv regions in packed NCHW16c layout for VNNI tensorization.

    Run after :func:`.qdq_to_integer.QDQToInteger` and before legalization, for x86 targets
    with AVX512-VNNI only. Each u8 x s8 -> int32 ``R.nn.conv2d`` (16k output channels,
    groups=1; input channels padded to a multiple of 4 with zero weights) becomes a
    ``topi.nn.conv2d_NCHWc_int8`` kernel on NCHW16c activations with weights prepacked
    here to ``[O/16, I/ic, kh, kw, ic/4, 16, 4]`` (Relax cannot legalize a packed conv2d
    itself); a zero-point pad before it moves into that kernel. Its requantize epilogue,
    residual adds, max pooling and global sums stay packed, and the layout is converted
    only where a tensor enters or leaves that region. The number of convs packed and of
    layout conversions emitted is kept on the pass object as ``last_stats``.
    """
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="PackInt8ForVNNI")
    class _PackInt8ForVNNI:
        def __init__(self):
            self.last_stats: dict | None = None

        def transform_module(self, mod, ctx):
            self.last_stats = {"convs": 0, "layout_transforms": 0}
            return _pack_region(mod, self.last_stats)

    return _PackInt8ForVNNI()
