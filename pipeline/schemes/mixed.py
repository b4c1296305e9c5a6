"""Mixed precision: a number format per layer, chosen by search under an accuracy budget.

The ``mixed`` scheme quantizes each MatMul weight in the cheapest of the candidate formats
(``w4g32``, ``w4g128``, ``w8g128``, ``bf16``, ``fp32`` ...) that keeps the whole model within
the spec's budget (``budget = {metric = "cosine", min = 0.999}``: cosine of the outputs to
the fp32 model's, worst calibration sample). The search is coarse first and cheap:

1. **Sensitivity** of every layer to every format, one layer at a time (the others float32),
   as onnxruntime's ``qdq_loss_debug`` does per tensor: ``1 - cosine`` of the outputs on the
   calibration samples. One onnxruntime session serves every trial: the candidate weights
   are made graph inputs, and a trial feeds one layer's weight decoded from that format
   (the very numbers the quantize recipe stores: each format's own quantizer, then its
   decoder).
2. **Time** of a layer in a format, from the tuning database (the host CPU's committed
   logs): the best measured record of the kernel that holds that layer's weight in that
   format (matched by its buffers: ``uint8[K/2, N]`` codes and ``float16[K/32, N]`` scales
   for w4g32, ``bfloat16[K, N]`` for bf16 ...). A layer/format with no record is estimated
   from its weight bytes at the seconds-per-byte the database shows for that format (or,
   with no record of the format at all, for every format): at one row a matmul streams each
   weight once, so bytes rank formats, but not exactly (w8g128's kernel reads rows a page
   apart and is slower than bf16's on Zen 4, which bytes alone would get backwards).
3. **Greedy ascent** (the coarse level of a hierarchical search: formats first, then the
   tuner schedules the chosen kernels): every layer starts in its fastest format; while the
   model (all layers in their formats at once, measured, not summed) misses the budget, the
   layer whose next more precise format buys the most sensitivity per extra second moves
   up. The quantize stage measures the real quantized model again and reports it.

The assignment is written to ``assignment.json`` (reviewable; a variant's
``assignment = "<file>"`` pins a reviewed copy, and the search is skipped). Formats are
applied per layer by :func:`apply`, which the quantize stage calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError

ASSIGNMENT_FORMAT = "onnx2deploy-mixed-assignment/1"
DEFAULT_FORMATS = ("w4g32", "w4g128", "w8g128", "bf16", "fp32")
BUDGET_METRICS = ("cosine",)


@dataclass(frozen=True)
class LayerFormat:
    """How one format stores a MatMul weight ``[K, N]``: ``bytes(k, n)`` per inference."""

    name: str
    bits: int = 0  # block-wise integer codes; 0: a float format
    block_size: int = 0
    float_bits: int = 0  # bf16: 16, fp32: 32

    def bytes(self, k: int, n: int, symmetric: bool) -> int:
        if self.float_bits:
            return k * n * self.float_bits // 8
        groups = -(-k // self.block_size)
        zeros = 0 if symmetric else -(-groups * self.bits // 8) * n
        return -(-k * self.bits // 8) * n + groups * n * 2 + zeros  # float16 scales


FORMATS = {f.name: f for f in (
    LayerFormat("w4g32", bits=4, block_size=32), LayerFormat("w4g128", bits=4, block_size=128),
    LayerFormat("w8g128", bits=8, block_size=128), LayerFormat("bf16", float_bits=16),
    LayerFormat("fp32", float_bits=32))}


@dataclass
class Layer:
    """A MatMul with a constant weight: the unit the search assigns a format to."""

    node: str
    weight: str
    k: int
    n: int
    sensitivity: dict[str, float] = field(default_factory=dict)  # format -> 1 - cosine
    seconds: dict[str, tuple[float, str]] = field(default_factory=dict)  # format -> (s, source)

    def bytes(self, fmt: str, symmetric: bool) -> int:
        return FORMATS[fmt].bytes(self.k, self.n, symmetric)


def _args_of(fmt: str, k: int, n: int) -> tuple[str, ...]:
    """The buffers (as the tuning log's ``args_info`` spells them) that identify the kernel
    holding a ``[K, N]`` weight in ``fmt``."""
    spec = FORMATS[fmt]
    if spec.bits:
        return (f"uint8[{-(-k * spec.bits // 8)},{n}]", f"float16[{-(-k // spec.block_size)},{n}]")
    return (f"{'bfloat16' if fmt == 'bf16' else 'float32'}[{k},{n}]",)


def layer_seconds(layers: Sequence[Layer], formats: Sequence[str], logs_dir: Path | None,
                  symmetric: bool) -> dict[tuple[str, str], tuple[float, str]]:
    """``(node, format) -> (seconds, source)``: the tuning database's best record for the
    layer's kernel in that format (source "tuning record"), else an estimate from its bytes
    (source "estimated from bytes"); see the module docstring."""
    from collections import defaultdict

    best: dict[frozenset, float] = {}
    if logs_dir is not None and Path(logs_dir).is_dir():
        from pipeline.tuning import logs

        for record in logs.load(logs_dir).records:
            if record.valid and record.args:
                key = frozenset(a.strip() for a in record.args.split(", "))
                best[key] = min(best.get(key, float("inf")), record.mean_secs)
    found, rates = {}, defaultdict(list)
    for layer in layers:
        for fmt in formats:
            want = set(_args_of(fmt, layer.k, layer.n))
            times = [secs for args, secs in best.items() if want <= args]
            if times:
                found[(layer.node, fmt)] = (min(times), "tuning record")
                rates[fmt].append(min(times) / layer.bytes(fmt, symmetric))
    every = sorted(r for rs in rates.values() for r in rs) or [1e-10]  # 10 GB/s
    for layer in layers:
        for fmt in formats:
            if (layer.node, fmt) not in found:
                rate = sorted(rates[fmt] or every)[len(rates[fmt] or every) // 2]
                found[(layer.node, fmt)] = (rate * layer.bytes(fmt, symmetric),
                                            "estimated from bytes")
    return found


def check_formats(formats: Sequence[str]) -> list[str]:
    """Problems with a variant's candidate list (unknown names), for the spec's report."""
    return [f"unknown format {f!r} (known: {', '.join(FORMATS)})"
            for f in formats if f not in FORMATS]


def name_matmuls(model) -> None:
    """Give every unnamed node a name (in place): formats are assigned by node name, and
    onnxruntime's quantizer selects nodes by name."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type.lower()}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def layers_of(model) -> list[Layer]:
    """The MatMuls with a 2-D float32 initializer as weight, in graph order (the ones the
    block-wise quantizer quantizes)."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2:
            found.append(Layer(node.name, weight.name, int(weight.dims[0]),
                               int(weight.dims[1])))
    return found


# ------------------------------------------------------------------ formats, per layer

def apply(model, assignment: dict[str, str], symmetric: bool):
    """The model with each MatMul node of ``assignment`` in its format (the real ONNX the
    quantize stage writes). Returns the new model."""
    import copy

    from pipeline.schemes.bfloat16 import store_bfloat16
    from pipeline.schemes.blockwise import quantize_blockwise

    model = copy.deepcopy(model)
    by_format: dict[str, list[str]] = {}
    for node, fmt in assignment.items():
        by_format.setdefault(fmt, []).append(node)
    weights = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    for fmt, nodes in sorted(by_format.items()):
        spec = FORMATS[fmt]
        if spec.bits:
            model = quantize_blockwise(model, spec.bits, spec.block_size, symmetric, nodes)
        elif fmt == "bf16":
            store_bfloat16(model, [weights[n] for n in nodes])
    return model


def decoded_weights(model, layers: Sequence[Layer], fmt: str,
                    symmetric: bool) -> dict[str, np.ndarray]:
    """Each layer's weight as the format stores it, decoded to float32: ``node -> [K, N]``."""
    import copy

    from onnx import numpy_helper

    from pipeline.schemes import bfloat16

    spec = FORMATS[fmt]
    inits = {i.name: i for i in model.graph.initializer}
    if spec.float_bits:
        out = {}
        for layer in layers:
            w = numpy_helper.to_array(inits[layer.weight])
            out[layer.node] = bfloat16.round_to_bfloat16(w) if fmt == "bf16" else w
        return out
    from pipeline.frontend.blockwise_weights import extract
    from pipeline.schemes.blockwise import dequantize, quantize_blockwise

    quantized = quantize_blockwise(copy.deepcopy(model), spec.bits, spec.block_size, symmetric,
                                   [layer.node for layer in layers])
    extracted = extract(quantized)
    suffix = f"_Q{spec.bits}"
    return {label.removesuffix(suffix): dequantize(extracted.weights[stand_in])
            for stand_in, label in extracted.nodes.items()}


# ------------------------------------------------------------------ the search

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def worst_cosine(outputs: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> float:
    """The budget's metric: the lowest cosine over samples and outputs (as validate's)."""
    return min(_cosine(o, r) for got, ref in zip(outputs, reference) for o, r in zip(got, ref))


class _Evaluator:
    """One onnxruntime session of the fp32 model with the layers' weights as graph inputs:
    ``outputs(weights)`` runs every calibration sample with those weights."""

    def __init__(self, model, layers: Sequence[Layer], feeds: list[dict]):
        import copy

        import onnxruntime as ort
        from onnx import helper, numpy_helper

        model = copy.deepcopy(model)
        inits = {i.name: i for i in model.graph.initializer}
        self.fp32 = {}
        for layer in layers:
            init = inits[layer.weight]
            self.fp32[layer.node] = numpy_helper.to_array(init)
            model.graph.initializer.remove(init)
            model.graph.input.append(helper.make_tensor_value_info(
                layer.weight, init.data_type, list(init.dims)))
        self.names = {layer.node: layer.weight for layer in layers}
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.feeds = feeds
        self.reference = self.outputs({})

    def outputs(self, weights: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        feed_weights = {self.names[node]: weights.get(node, w) for node, w in self.fp32.items()}
        return [self.session.run(None, {**feed, **feed_weights}) for feed in self.feeds]

    def cosine(self, weights: dict[str, np.ndarray]) -> float:
        return worst_cosine(self.outputs(weights), self.reference)


def model_cosine(quantized, fp32, feeds: list[dict]) -> float:
    """The budget's metric for a real quantized ONNX model against the fp32 one, both run
    by onnxruntime on ``feeds``."""
    import onnxruntime as ort

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return [session.run(None, feed) for feed in feeds]

    return worst_cosine(run(quantized), run(fp32))


@dataclass
class SearchResult:
    assignment: dict[str, str]
    layers: list[Layer]
    cosine_estimated: float
    steps: list[str]


def search(model, feeds: list[dict], formats: Sequence[str], budget_min: float,
           symmetric: bool, logs_dir: Path | None = None,
           log: Callable[[str], None] = print) -> SearchResult:
    """The greedy ascent of the module docstring over ``formats`` (fp32 is always the last
    resort), layer times from the tuning logs in ``logs_dir``. ``model`` must have named
    nodes (:func:`name_matmuls`)."""
    layers = layers_of(model)
    if not layers:
        raise ConfigError("scheme mixed: the model has no MatMul with a constant weight to "
                          "give a format; use fp32 or int8 for it")
    formats = list(dict.fromkeys([*formats, "fp32"]))
    for (node, fmt), timed in layer_seconds(layers, formats, logs_dir, symmetric).items():
        next(layer for layer in layers if layer.node == node).seconds[fmt] = timed
    evaluator = _Evaluator(model, layers, feeds)
    decoded = {fmt: decoded_weights(model, layers, fmt, symmetric) for fmt in formats}
    for layer in layers:
        for fmt in formats:
            layer.sensitivity[fmt] = (0.0 if fmt == "fp32" else
                                      1.0 - evaluator.cosine({layer.node: decoded[fmt][layer.node]}))
    # each layer's ladder: formats by time, fastest first, keeping only those more accurate
    # (for that layer) than every faster one
    ladders = {}
    for layer in layers:
        ladder = []
        for fmt in sorted(formats, key=lambda f: (layer.seconds[f][0], f)):
            if not ladder or layer.sensitivity[fmt] < layer.sensitivity[ladder[-1]]:
                ladder.append(fmt)
        ladders[layer.node] = ladder
    rung = {layer.node: 0 for layer in layers}

    def current() -> dict[str, str]:
        return {node: ladders[node][i] for node, i in rung.items()}

    def model_cosine() -> float:
        return evaluator.cosine({node: decoded[fmt][node] for node, fmt in current().items()})

    steps = []
    cosine = model_cosine()
    by_node = {layer.node: layer for layer in layers}
    while cosine < budget_min:
        best, best_gain = None, -1.0
        for node, i in rung.items():
            if i + 1 >= len(ladders[node]):
                continue
            layer, now, up = by_node[node], ladders[node][i], ladders[node][i + 1]
            gain = ((layer.sensitivity[now] - layer.sensitivity[up]) /
                    max(1e-12, layer.seconds[up][0] - layer.seconds[now][0]))
            if gain > best_gain:
                best, best_gain = node, gain
        if best is None:
            break  # every layer in fp32
        rung[best] += 1
        cosine = model_cosine()
        steps.append(f"{best} -> {ladders[best][rung[best]]}: cosine {cosine:.6f}")
        log(f"quantize: mixed search: {steps[-1]}")
    return SearchResult(current(), layers, cosine, steps)


def write_assignment(path: Path, assignment: dict[str, str], budget_min: float,
                     layers: Sequence[Layer] = (), symmetric: bool = True) -> None:
    """The reviewable file: the format of every layer (and, for a reader, its size and
    sensitivity); :func:`read_assignment` reads back only ``layers``."""
    detail = {layer.node: {"k": layer.k, "n": layer.n,
                           "bytes": layer.bytes(assignment[layer.node], symmetric),
                           "sensitivity": {f: round(s, 8) for f, s in layer.sensitivity.items()},
                           "ms": {f: [round(t * 1e3, 4), src]
                                  for f, (t, src) in layer.seconds.items()}}
              for layer in layers}
    payload = {"format": ASSIGNMENT_FORMAT,
               "budget": {"metric": "cosine", "min": budget_min},
               "layers": dict(assignment),
               "detail": detail}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def read_assignment(path: Path, model) -> dict[str, str]:
    """A pinned assignment, checked against the model: every layer named, known formats."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        assignment = dict(payload["layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a mixed-precision assignment ({e}); write one with "
                          "a build without `assignment` (it is in the quantize stage's "
                          "output as assignment.json)") from None
    names = {layer.node for layer in layers_of(model)}
    problems = [f"{node}: no such MatMul layer" for node in assignment if node not in names]
    problems += [f"{node}: {p}" for node, fmt in assignment.items() for p in check_formats([fmt])]
    problems += [f"{node}: missing (every layer needs a format)" for node in sorted(names)
                 if node not in assignment]
    if problems:
        raise ConfigError(f"{path}: the assignment does not fit the model:\n  - "
                          + "\n  - ".join(problems))
    return assignment
