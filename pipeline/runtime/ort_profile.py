"""onnxruntime's time per operator, and the same work's time in a TVM artifact, side by side.

The roofline says how far a kernel runs from the machine's peak; this says how far it runs
from onnxruntime on the same layer, which is the number the product is judged by. The two
graphs do not share names (TVM fuses ``conv2d + add + relu`` into one kernel, onnxruntime
rewrites convs to its NCHWc ops), so they are joined on the work itself: a convolution or
matmul is identified by its multiply-accumulates and its output elements. Layers with the
same pair (a ResNet's downsample and its first 1x1 conv of a stage can share it) form one
group, compared as a whole: every kernel of the group against every node of the group.
onnxruntime's NCHWc convs pad channels to blocks of 16 and report the padded shapes: a
layer whose channel counts are not multiples of 16 finds no partner and counts as unmatched.
A TVM kernel holds what it fused (bias, ReLU, a residual add); onnxruntime fuses some of
that and runs the rest as nodes of their own (its int8 ``QLinearAdd``), which land in its
unmatched time: read a group's ratio with the two unmatched totals beside it.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError

# onnxruntime operators that are a convolution or a matmul, and where their weight is
_WEIGHT_INPUT = {"Conv": 1, "FusedConv": 1, "QLinearConv": 3, "ConvInteger": 1,
                 "MatMul": 1, "FusedMatMul": 1, "Gemm": 1, "QLinearMatMul": 3,
                 "MatMulInteger": 1, "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1}


_ORT_DTYPES = {"float": "float32", "double": "float64", "bool": "bool"}


@dataclass(frozen=True)
class OrtNode:
    name: str
    op: str
    us: float  # median time per model run
    signature: tuple[int, int] | None  # (multiply-accumulates, output elements); None: no MACs


def _shapes(entries) -> list[list[int]]:
    return [next(iter(e.values())) for e in entries or []]


def node_signature(op: str, inputs: list[list[int]], outputs: list[list[int]],
                   graph_weight: list[int] | None = None):
    """``(MACs, output elements)`` of a conv or matmul node from its profiled shapes; None
    for any other operator (or shapes the profile left out). ``graph_weight``: the weight's
    shape in the ONNX graph, for nodes whose weight onnxruntime prepacked (its int8
    QLinearConv then lists no weight among its inputs)."""
    index = _WEIGHT_INPUT.get(op)
    if index is None or not outputs or not outputs[0]:
        return None
    out = outputs[0]
    elements = math.prod(out)
    if "Conv" in op:
        listed = inputs[index] if len(inputs) > index else None
        # as it runs (NCHWc pads channels: the listed shape matches the output's padding)
        weight = listed if listed and len(listed) >= 3 else graph_weight
        if len(out) < 3 or not weight or len(weight) < 3:
            return None
        # weight [O, I/groups, kh, kw]: each output element takes I/groups * kh * kw MACs
        return elements * (math.prod(weight) // weight[0]), elements
    data = inputs[0] if inputs else None
    if not data or len(inputs) <= index:
        return None
    return elements * data[-1], elements  # [..., K] x [K, N]


def bench_session_options(threads: int, config: dict | None = None):
    """onnxruntime's CPU session as ``doit bench`` times it (and this profile, so the two
    agree): ``threads`` intra-op threads, one inter-op, sequential, every graph optimisation;
    ``config``: session config entries (a scheme's ``ort_session_config``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def profile_onnxruntime(model: Path, threads: int, repeat: int = 20, warmup: int = 3,
                        session_config: dict | None = None, seed: int = 0) -> list[OrtNode]:
    """Per-node median time of ``model`` in onnxruntime on the CPU (sequential, ``threads``
    intra-op threads, as ``doit bench`` runs it), on seeded inputs: normal floats, zeros for
    integer inputs (always valid indices)."""
    import numpy as np
    import onnxruntime as ort

    if not Path(model).is_file():
        raise ConfigError(f"{model} not found: build the artifact first")
    options = bench_session_options(threads, session_config)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        feed = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            element = i.type[len("tensor("):-1]
            dtype = np.dtype(_ORT_DTYPES.get(element, element))
            feed[i.name] = (np.zeros(shape, dtype) if dtype.kind in "iub"
                            else rng.standard_normal(shape).astype(dtype))
        for _ in range(warmup + repeat):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    weights = graph_weight_shapes(model)
    times: dict[str, list[float]] = {}
    meta: dict[str, tuple] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name, args = e["name"][:-len("_kernel_time")], e.get("args", {})
        times.setdefault(name, []).append(float(e["dur"]))
        meta[name] = (args.get("op_name", "?"), _shapes(args.get("input_type_shape")),
                      _shapes(args.get("output_type_shape")))
    nodes = []
    for name, durations in times.items():
        kept = durations[-repeat:]  # one per run, the warm-up runs first
        op, inputs, outputs = meta[name]
        graph_name = re.sub(r"(_token_\d+|_nchwc)$", "", name)
        nodes.append(OrtNode(name, op, statistics.median(kept),
                             node_signature(op, inputs, outputs, weights.get(graph_name))))
    return sorted(nodes, key=lambda n: -n.us)


def graph_weight_shapes(model: Path) -> dict[str, list[int]]:
    """Conv node name -> its weight's shape in the ONNX graph: an initializer, or one behind
    a DequantizeLinear (a QDQ model)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in dims:
            dims[node.output[0]] = dims[node.input[0]]
    return {n.name: dims[n.input[1]] for n in graph.node
            if "Conv" in n.op_type and len(n.input) > 1 and n.input[1] in dims}


def kernel_signature(work) -> tuple[int, int] | None:
    """``(MACs, output elements)`` of a TVM kernel (``kernel_flops.KernelWork``); for the
    kernels of a Winograd conv, the direct conv's (the work onnxruntime's conv node does)."""
    if work and work.direct_conv:
        return work.direct_conv
    if not work or not work.flops or not work.outputs:
        return None
    return work.flops // 2, work.outputs


def compare(kernels: list[dict], work_by_name: dict, nodes: list[OrtNode]) -> dict:
    """Join the roofline's kernel rows (``name``, ``us`` per run, ``calls``) with
    onnxruntime's nodes by signature. Returns ``groups`` (kernels, nodes, both times, the
    ratio; largest time lost first), the time of the kernels and nodes no group holds, and
    both totals."""
    by_sig: dict[tuple, dict] = {}
    tvm_other = 0.0
    for k in kernels:
        sig = kernel_signature(work_by_name.get(k["name"]))
        if sig is None:
            tvm_other += k["us"]
            continue
        group = by_sig.setdefault(sig, {"kernels": [], "nodes": [], "tvm_us": 0.0,
                                        "ort_us": 0.0, "calls": 0})
        group["kernels"].append(k["name"])
        group["tvm_us"] += k["us"]
        group["calls"] += k["calls"]
    ort_other = 0.0
    for n in nodes:
        group = by_sig.get(n.signature) if n.signature else None
        if group is None:
            ort_other += n.us
            continue
        group["nodes"].append(n.name)
        group["ort_us"] += n.us
    groups, tvm_alone = [], 0.0
    for (macs, outputs), g in by_sig.items():
        if not g["nodes"]:  # work onnxruntime does another way (or not at all)
            tvm_alone += g["tvm_us"]
            continue
        groups.append({**g, "macs": macs, "outputs": outputs,
                       "ratio": g["tvm_us"] / g["ort_us"] if g["ort_us"] > 0 else None,
                       "lost_us": g["tvm_us"] - g["ort_us"]})
    groups.sort(key=lambda g: -g["lost_us"])
    return {"groups": groups,
            "tvm_total_us": sum(k["us"] for k in kernels),
            "ort_total_us": sum(n.us for n in nodes),
            "tvm_unmatched_us": tvm_other + tvm_alone, "ort_unmatched_us": ort_other}


def format_comparison(result: dict, top: int | None = 15) -> str:
    """Markdown: the groups that lose the most time to onnxruntime first."""
    lines = [f"vs onnxruntime (same threads, per model run): TVM {result['tvm_total_us'] / 1e3:.2f}"
             f" ms in kernels, onnxruntime {result['ort_total_us'] / 1e3:.2f} ms in nodes; "
             f"outside the matched conv/matmul groups: TVM "
             f"{result['tvm_unmatched_us'] / 1e3:.2f} ms, onnxruntime "
             f"{result['ort_unmatched_us'] / 1e3:.2f} ms",
             "",
             "| TVM kernel(s) | onnxruntime node(s) | TVM ms | onnxruntime ms | ratio | lost ms |",
             "|---|---|---|---|---|---|"]
    for g in result["groups"][:top]:
        names = ", ".join(k if len(k) <= 40 else k[:37] + "..." for k in g["kernels"])
        nodes = ", ".join(g["nodes"][:3]) + (f" (+{len(g['nodes']) - 3})"
                                              if len(g["nodes"]) > 3 else "")
        ratio = "-" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        lines.append(f"| {names} | {nodes} | {g['tvm_us'] / 1e3:.3f} | {g['ort_us'] / 1e3:.3f} "
                     f"| {ratio} | {g['lost_us'] / 1e3:+.3f} |")
    return "\n".join(lines)
