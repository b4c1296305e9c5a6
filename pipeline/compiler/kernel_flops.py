"""How much arithmetic each kernel of a lowered module does: 2 x its multiply-accumulates.

The roofline report divides this by a kernel's measured time. Only multiply-accumulate
blocks count (convolutions, matmuls: ``C[...] = C[...] + x * y`` over a reduction), in
float and integer alike, because that is what the machine's FMA and VNNI peaks measure;
epilogues (bias, ReLU, requantize), pooling and layout copies count 0 and are reported as
memory-bound kernels instead of inflating a GFLOP/s figure. TVM's ``estimate_tir_flops``
counts every arithmetic node, epilogues included, which is right for a cost model and
wrong for "% of the FMA peak".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


def conv2d_flops(batch: int, out_channels: int, out_h: int, out_w: int, in_channels: int,
                 kernel_h: int, kernel_w: int, groups: int = 1) -> int:
    """2 x multiply-accumulates of a 2-D convolution (the textbook count, for checks)."""
    if groups < 1 or in_channels % groups:
        raise ValueError(f"in_channels {in_channels} is not divisible by groups {groups}")
    return 2 * batch * out_channels * out_h * out_w * (in_channels // groups) * kernel_h \
        * kernel_w


def _is_multiply_accumulate(block) -> bool:
    """``C[i] = C[i] + x * y`` (either operand order, casts allowed) over a reduction."""
    from tvm import ir, tirx

    if not any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
        return False
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return False
    add = store.value

    def reads_target(e) -> bool:
        while isinstance(e, tirx.Cast):
            e = e.value
        # TVM 0.27: a buffer load is an ``ir.TensorLoad`` whose ``source`` is the buffer
        return isinstance(e, ir.expr.TensorLoad) and e.source.same_as(store.buffer)

    def is_product(e) -> bool:
        while isinstance(e, tirx.Cast):
            e = e.value
        return isinstance(e, tirx.Mul)

    return (reads_target(add.a) and is_product(add.b)) or (
        reads_target(add.b) and is_product(add.a))


@dataclass(frozen=True)
class KernelWork:
    """A kernel's multiply-accumulate work: ``flops`` = 2 x MACs, ``label`` its MAC blocks'
    iteration domains, e.g. ``conv2d_nhwc 1x14x14x256 * 3x3x256`` (spatial * reduction):
    readable where fused kernel names are not."""

    flops: int
    label: str
    outputs: int = 0  # output elements of its MAC blocks (their spatial iterations)
    # A Winograd kernel (input transform, batched matmul, output transform): the ``(MACs,
    # output elements)`` of the direct 3x3 conv the three compute together, so that the
    # comparison with onnxruntime joins them with its conv node; ``flops`` stays the work
    # the kernel itself does (a Winograd matmul has fewer MACs than the conv).
    direct_conv: tuple[int, int] | None = None


def kernel_work(func) -> KernelWork:
    """The MACs of a naive (unscheduled) TIR kernel: for each MAC block, the product of its
    iteration domain (every block iteration is one MAC)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    macs = outputs = 0
    labels = []
    pending = list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block_rv = pending.pop(0)
        pending.extend(sch.get_child_blocks(block_rv))
        block = sch.get(block_rv)
        if not _is_multiply_accumulate(block):
            continue
        extents = [(int(iv.dom.extent), iv.iter_type == tirx.IterVar.CommReduce)
                   for iv in block.iter_vars]
        count = 1
        for extent, _ in extents:
            count *= extent
        macs += count
        outputs += math.prod(e for e, reduce in extents if not reduce)
        spatial = "x".join(str(e) for e, reduce in extents if not reduce)
        reduction = "x".join(str(e) for e, reduce in extents if reduce)
        labels.append(f"{block.name_hint} {spatial} * {reduction}")
    return KernelWork(2 * macs, "; ".join(labels), outputs)


def multiply_accumulates(func) -> int:
    """Multiply-accumulates of a naive (unscheduled) TIR kernel."""
    return kernel_work(func).flops // 2


def module_kernel_work(mod) -> dict[str, KernelWork]:
    """The work of every PrimFunc of a lowered module, by function name (the name the Relax
    VM calls it by, and the profile reports); Winograd kernels carry their conv's work as
    ``direct_conv``."""
    from dataclasses import replace

    from tvm import tirx

    work = {gv.name_hint: kernel_work(func)
            for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
    for name, conv in winograd_direct_convs(mod).items():
        if name in work:
            work[name] = replace(work[name], direct_conv=conv)
    return work


def winograd_direct_convs(mod) -> dict[str, tuple[int, int]]:
    """For each kernel of a Winograd conv (see :mod:`.passes.winograd`) in ``mod``'s Relax
    functions, the ``(MACs, output elements)`` of the direct conv it is part of, read from
    the chain ``winograd_input -> batched matmul V[a*a, tiles, Cin] @ U -> output transform``:
    an F(m, 3) tile is m x m outputs, so the conv has ``tiles * m^2 * Cout`` outputs and 9 x
    Cin MACs each. A kernel shared by convs of different work (one input transform for two
    output widths) is left out: it cannot be joined to either."""
    from tvm import relax

    from pipeline.compiler.passes._qdq import op_name, shape_of
    from pipeline.compiler.passes.winograd import INPUT_KERNEL, is_transform_kernel

    found: dict[str, set] = {}
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        callee_of, consumers = {}, {}  # var -> (kernel name, call); var -> vars reading it
        for block in func.body.blocks:
            for binding in block.bindings:
                if op_name(binding.value) != "relax.call_tir":
                    continue
                callee_of[binding.var] = (binding.value.args[0].name_hint, binding.value)
                for arg in binding.value.args[1].fields:
                    consumers.setdefault(arg, []).append(binding.var)
        for var, (callee, call) in callee_of.items():
            source = call.args[1].fields[0] if call.args[1].fields else None
            if source not in callee_of or not callee_of[source][0].startswith(INPUT_KERNEL):
                continue
            shape = shape_of(var)  # [a*a, tiles, Cout]
            a = math.isqrt(shape[0])
            if len(shape) != 3 or a * a != shape[0]:
                continue
            outputs = shape[1] * (a - 2) ** 2 * shape[2]  # tiles x m^2 x Cout
            conv = (outputs * 9 * shape_of(source)[-1], outputs)
            kernels = [callee_of[source][0], callee]
            kernels += [callee_of[v][0] for v in consumers.get(var, [])
                        if is_transform_kernel(callee_of[v][0])]
            for name in kernels:
                found.setdefault(name, set()).add(conv)
    return {name: convs.pop() for name, convs in found.items() if len(convs) == 1}


def artifact_kernel_work(module_json: Path, target, compute_dtype: str,
                         layout: str = "") -> dict[str, KernelWork]:
    """The work of each kernel of an artifact: its import-stage module lowered as the compile stage
    lowers it (same target, compute dtype and layout, so the kernel names agree)."""
    from pipeline.compiler.lowering import lower_for_target
    from pipeline.compiler.workloads import load_module

    lowered = lower_for_target(load_module(module_json), target, compute_dtype, layout)
    return module_kernel_work(lowered)
