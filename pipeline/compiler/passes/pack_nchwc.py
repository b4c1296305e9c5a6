"""Packed NCHW[x]c regions: convolutions and what follows them in a blocked channel layout.

x86 convolution kernels want channels innermost in blocks of 16 (a zmm register of fp32 or
int32 lanes): activations ``[N, C/16, H, W, 16]``, weights prepacked at compile time. Relax
cannot legalize a packed ``R.nn.conv2d`` itself (FACTS.md), and ``ConvertLayout`` converts
back to NCHW before elementwise ops, so :func:`pack_nchwc` does it in one walk: each conv a
:class:`ConvPacking` rule accepts becomes a packed TOPI kernel, the ops after it (bias,
requantize, ReLU, residual add, max pooling, global pooling) stay packed, and the layout is
converted only where a tensor enters or leaves the region.

Two rules use it: int8 for VNNI (:mod:`.pack_int8_vnni`) and fp32
(:func:`PackFloat32NCHWc`, the layout onnxruntime's MLAS uses for fp32 convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._qdq import Bindings, match_zero_point_pad, mutate_relax_functions, op_name, shape_of

__all__ = ["ConvPacking", "Float32NCHWc", "PackFloat32NCHWc", "OC_BLOCK", "pack_nchwc"]

OC_BLOCK = 16  # output channels per block: 16 lanes of a zmm register

# Ops computed lane by lane: on a packed tensor they run unchanged (constants per channel
# are repacked alongside), so a conv's epilogue stays packed and fuses.
_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum",
                "relax.minimum", "relax.round", "relax.clip", "relax.astype", "relax.nn.relu")


class ConvPacking:
    """What differs between packed conv kinds: which convs, block sizes, weights, kernel."""

    kernel_name = "conv2d_NCHWc"

    def accepts(self, bindings: Bindings, call) -> bool:
        """Whether this rule packs ``call`` (an ``R.nn.conv2d``)."""
        raise NotImplementedError

    def input_block(self, channels: int) -> int:
        """Input channels per block; channels are zero-padded up to a multiple of it."""
        return next((b for b in (16, 8, 4) if channels % b == 0), 4)

    def emit_conv(self, bb, data5, weight: np.ndarray, strides, padding, dilation,
                  zero_point_pad):
        """Emit the packed conv on ``data5`` with OIHW ``weight`` (input channels padded)."""
        raise NotImplementedError


@dataclass
class _Packed:
    """A tensor of the original function available in NCHW[block]c form."""

    var: object  # the 5-D var in the new function
    block: int
    channels: int


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


def _is_spatial_reduce(value) -> bool:
    """``sum``/``mean`` over H and W keeping dims (global pooling)."""
    return (op_name(value) in ("relax.sum", "relax.mean") and value.attrs.axis is not None
            and sorted(int(x) for x in value.attrs.axis) == [2, 3]
            and bool(value.attrs.keepdims))


def pack_nchwc(mod, rule: ConvPacking, stats: dict):
    """Pack every conv ``rule`` accepts, and the region around it, in every Relax function.

    ``stats`` counts ``convs`` packed and ``layout_transforms`` emitted.
    """
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
            return all(u is not None and self.packable(u)
                       and not any(int(p) for p in u.attrs.padding) for u in users)

        def packable(self, call) -> bool:
            if op_name(call) != "relax.nn.conv2d":
                return False
            attrs = call.attrs
            if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
                    "NCHW", "OIHW", "NCHW") or int(attrs.groups) != 1:
                return False
            weight = self.bindings.const(call.args[1])
            return (weight is not None and weight.shape[0] % OC_BLOCK == 0
                    and rule.accepts(self.bindings, call))

        # ---- packed ops ---------------------------------------------------------------
        def try_pack(self, var, value):
            name = op_name(value)
            if name == "relax.nn.conv2d" and self.packable(value):
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
            if _is_spatial_reduce(value):
                reduce = op.sum if name == "relax.sum" else op.mean
                out = self.builder_.emit(reduce(src.var, axis=[2, 3], keepdims=True))
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
            block = rule.input_block(in_c)
            padded_c = -(-in_c // block) * block
            if padded_c != in_c:
                weight = np.pad(weight, [(0, 0), (0, padded_c - in_c), (0, 0), (0, 0)])
            out = rule.emit_conv(self.builder_, self.pack(data, block), weight,
                                 [int(s) for s in attrs.strides], padding,
                                 [int(d) for d in attrs.dilation], zp_pad)
            stats["convs"] += 1
            return _Packed(self.builder_.emit(out), OC_BLOCK, out_c)

    return mutate_relax_functions(_Packer(mod), mod)


def packing_pass(rule: ConvPacking, name: str):
    """A module pass running :func:`pack_nchwc` with ``rule``; ``last_stats`` keeps the
    counts of its last run."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=name)
    class _PackingPass:
        def __init__(self):
            self.last_stats: dict | None = None

        def transform_module(self, mod, ctx):
            self.last_stats = {"convs": 0, "layout_transforms": 0}
            return pack_nchwc(mod, rule, self.last_stats)

    return _PackingPass()


# ---- fp32 ---------------------------------------------------------------------------------
def pack_float_weight(w: np.ndarray, ic_block: int) -> np.ndarray:
    """OIHW fp32 weights as ``[O/16, I/ic_block, kh, kw, ic_block, 16]`` (TOPI's
    ``OIHW{ic}i16o``): 16 output channels innermost, one FMA row of a zmm register."""
    o, i, kh, kw = w.shape
    blocks = w.reshape(o // OC_BLOCK, OC_BLOCK, i // ic_block, ic_block, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 2, 4, 5, 3, 1))


def _float_conv_te(data, kernel, strides, padding, dilation):
    from tvm import topi

    ic_block = int(data.shape[-1])
    return topi.nn.conv2d_NCHWc(data, kernel, strides, padding, dilation,
                                f"NCHW{ic_block}c", f"NCHW{OC_BLOCK}c", "float32")


class Float32NCHWc(ConvPacking):
    """fp32 convs (16k output channels, groups=1) as ``topi.nn.conv2d_NCHWc``."""

    def accepts(self, bindings: Bindings, call) -> bool:
        out_dtype = call.attrs.out_dtype  # None: the input's dtype
        weight = bindings.const(call.args[1])
        return (str(call.args[0].ty.dtype) == "float32"
                and str(out_dtype) in ("None", "", "void", "float32")
                and weight is not None and weight.dtype == np.float32)

    def emit_conv(self, bb, data5, weight, strides, padding, dilation, zero_point_pad):
        from tvm import relax

        block = int(shape_of(data5)[-1])
        # TOPI's packed conv reads the target (it must be built inside ``with target``)
        return bb.call_te(_float_conv_te, data5,
                          relax.const(pack_float_weight(weight, block)), strides, padding,
                          dilation, primfunc_name_hint=self.kernel_name)


def PackFloat32NCHWc():  # noqa: N802  (a pass factory, named like TVM's)
    """Module pass: fp32 conv regions in packed NCHW16c (input blocks of 16, 8 or 4 channels).

    Run before legalization, inside ``with target:``. Weights are prepacked here; the
    bias add, ReLU, residual adds, max pooling and global average pooling stay packed.
    """
    return packing_pass(Float32NCHWc(), "PackFloat32NCHWc")
