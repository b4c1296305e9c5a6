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
   up. Then each raised layer, most time saved first, tries one rung down again and stays
   there if the model still meets the budget. The search aims at 80% of the error the
   budget allows (:data:`HEADROOM`), so inputs it did not see stay within the budget too.
   The quantize stage measures the real quantized model again and reports it.

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
DEFAULT_FORMATS = ("w4g32", "w4g128", "w8g128", "fp8_e4m3", "posit8", "int8", "bf16", "fp32")
BUDGET_METRICS = ("cosine",)
# The search aims at this share of the error the budget allows (1 - min), so that inputs it
# did not see (validation's) stay within the budget too: minilm searched to exactly 0.99901 on
# its calibration samples measured 0.99897 on the validation inputs and failed the gate.
HEADROOM = 0.8
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class LayerFormat:
    """How one format stores a layer's weight, and which layers it can take."""

    name: str
    ops: tuple[str, ...]  # the layer op types it applies to
    bits: int = 0  # block-wise integer codes (MatMul weights [K, N])
    block_size: int = 0
    float_bits: int = 0  # bf16: 16, fp32: 32
    int8: bool = False  # static INT8 (activations too): onnxruntime's QDQ, integer compute
    code8: bool = False  # 8-bit float-like codes, a scale per output channel (schemes.codes8)


# bf16 takes no convolutions: a bf16 conv decodes its weight inside a kernel kept in NCHW
# (passes.float_formats), slower than the fp32 conv it would replace. int8 convs and
# matmuls are both packed for VNNI (passes.pack_int8_vnni) and have tuning records of
# their kinds.
FORMATS = {f.name: f for f in (
    LayerFormat("w4g32", ("MatMul",), bits=4, block_size=32),
    LayerFormat("w4g128", ("MatMul",), bits=4, block_size=128),
    LayerFormat("w8g128", ("MatMul",), bits=8, block_size=128),
    LayerFormat("fp8_e4m3", ("MatMul",), code8=True),
    LayerFormat("posit8", ("MatMul",), code8=True),
    LayerFormat("int8", ("Conv", "MatMul", "Gemm"), int8=True),
    LayerFormat("bf16", ("MatMul", "Gemm"), float_bits=16),
    LayerFormat("fp32", WEIGHT_OPS, float_bits=32))}


@dataclass
class Layer:
    """A MatMul, Gemm or Conv with a constant weight: the unit the search gives a format.
    ``k``/``n``: input/output channels (a conv's ``n`` is its output channels); ``positions``:
    how many output positions reuse each weight (a conv's output pixels; 1 for matmuls)."""

    node: str
    weight: str
    op: str
    shape: tuple[int, ...]
    k: int
    n: int
    positions: int = 1
    sensitivity: dict[str, float] = field(default_factory=dict)  # format -> 1 - cosine
    seconds: dict[str, tuple[float, str]] = field(default_factory=dict)  # format -> (s, source)

    def takes(self, fmt: str) -> bool:
        return self.op in FORMATS[fmt].ops

    def bytes(self, fmt: str, symmetric: bool) -> int:
        """Bytes of the weight as ``fmt`` stores it (codes, scales, zero points)."""
        spec, count = FORMATS[fmt], int(np.prod(self.shape))
        if spec.float_bits:
            return count * spec.float_bits // 8
        if spec.int8 or spec.code8:
            return count + 4 * self.n  # a float32 scale per output channel
        groups = -(-self.k // spec.block_size)
        zeros = 0 if symmetric else -(-groups * spec.bits // 8) * self.n
        return -(-self.k * spec.bits // 8) * self.n + groups * self.n * 2 + zeros

    def work(self, fmt: str, symmetric: bool) -> int:
        """What an estimate scales with: the weight bytes, times the positions that reuse
        them (a conv does that many multiply-adds per weight)."""
        return self.bytes(fmt, symmetric) * self.positions


def _args_of(fmt: str, layer: Layer) -> tuple[str, ...] | None:
    """The buffers (as the tuning log's ``args_info`` spells them) that identify the kernel
    holding a MatMul's ``[K, N]`` weight in ``fmt``; None where no such spelling is known
    (convolutions and int8 weights are repacked by the lowering; Gemm transposes)."""
    spec, k, n = FORMATS[fmt], layer.k, layer.n
    if spec.int8 and layer.op in ("MatMul", "Gemm") and k % 4 == 0 and n % 16 == 0:
        return (f"int8[{n // 16},{k // 4},16,4]",)  # packed in vpdpbusd blocks
    # code8 kernels hold uint8[K, N] codes and float32[N] scales, as w8g128's hold codes and
    # its bias: no spelling tells them apart, so they are estimated
    if layer.op != "MatMul" or spec.int8 or spec.code8:
        return None
    if spec.bits:
        return (f"uint8[{-(-k * spec.bits // 8)},{n}]", f"float16[{-(-k // spec.block_size)},{n}]")
    return (f"{'bfloat16' if fmt == 'bf16' else 'float32'}[{k},{n}]",)


# Formats whose kernels compute alike (float32 multiply-adds on weights decoded in the
# kernel: the block-wise template and the 8-bit code kernels): where a layer has a record in
# one of them and none in another, the record times the other too. A bytes estimate from
# other shapes would not: at one row these kernels are bound by weight bytes, at a BERT's
# 128 rows by arithmetic, where 4-bit weights are no faster than 8-bit ones.
_DECODED = ("w4g32", "w4g128", "w8g128", "fp8_e4m3", "posit8")
KERNEL_FAMILIES = {fmt: tuple(f for f in _DECODED if f != fmt) for fmt in _DECODED}


def layer_seconds(layers: Sequence[Layer], formats: Sequence[str], logs_dir: Path | None,
                  symmetric: bool) -> dict[tuple[str, str], tuple[float, str]]:
    """``(node, format) -> (seconds, source)`` for each format a layer takes: the tuning
    database's best record for the layer's kernel in that format (source "tuning record"),
    else the best record of the layer in a format whose kernel computes alike
    (:data:`KERNEL_FAMILIES`, source "record of a sibling format"), else an estimate: its
    :meth:`Layer.work` at the seconds per unit of work the database shows for that format
    (or for all formats) (source "estimated from bytes")."""
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
            want = _args_of(fmt, layer) if layer.takes(fmt) else None
            times = [secs for args, secs in best.items() if want and set(want) <= args]
            if times:
                found[(layer.node, fmt)] = (min(times), "tuning record")
                rates[fmt].append(min(times) / layer.work(fmt, symmetric))
    every = sorted(r for rs in rates.values() for r in rs) or [1e-10]  # 10 GB/s
    recorded = dict(found)
    for layer in layers:
        for fmt in formats:
            if not layer.takes(fmt) or (layer.node, fmt) in found:
                continue
            siblings = [recorded[(layer.node, f)][0] for f in KERNEL_FAMILIES.get(fmt, ())
                        if (layer.node, f) in recorded]
            if siblings:
                found[(layer.node, fmt)] = (min(siblings), "record of a sibling format")
                continue
            rate = sorted(rates[fmt] or every)[len(rates[fmt] or every) // 2]
            found[(layer.node, fmt)] = (rate * layer.work(fmt, symmetric),
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
    """The MatMuls (2-D weight), Gemms (2-D weight) and Convs (4-D weight) whose weight is a
    float32 initializer, in graph order. A conv's output positions come from ONNX shape
    inference (1 where it cannot tell)."""
    from onnx import TensorProto, shape_inference

    inits = {i.name: i for i in model.graph.initializer}
    candidates = [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1
                  and n.input[1] in inits
                  and inits[n.input[1]].data_type == TensorProto.FLOAT]
    spatial = {}
    if any(n.op_type == "Conv" for n in candidates):
        inferred = shape_inference.infer_shapes(model).graph
        for info in (*inferred.value_info, *inferred.output):
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            if len(dims) == 4 and all(dims):
                spatial[info.name] = dims[2] * dims[3]
    found = []
    for node in candidates:
        dims = tuple(int(d) for d in inits[node.input[1]].dims)
        if node.op_type == "Conv" and len(dims) == 4:
            k, n, positions = dims[1] * dims[2] * dims[3], dims[0], spatial.get(node.output[0], 1)
        elif node.op_type == "Gemm" and len(dims) == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            (n, k), positions = (dims if trans_b else dims[::-1]), 1
        elif node.op_type == "MatMul" and len(dims) == 2:
            (k, n), positions = dims, 1
        else:
            continue
        found.append(Layer(node.name, node.input[1], node.op_type, dims, k, n, positions))
    return found


# ------------------------------------------------------------------ formats, per layer

class Int8Static:
    """onnxruntime's static QDQ (what the int8 recipe writes) of chosen layers, calibrated
    once: the ranges go to ``scratch/ranges.json`` and every later quantization reads them
    (``calibration_cache_path``), so each trial costs a graph rewrite, not a calibration."""

    def __init__(self, feeds: list[dict], scratch: Path, activation_type: str = "uint8",
                 weight_type: str = "int8", per_channel: bool = True, method: str = "minmax"):
        self.feeds, self.scratch = feeds, Path(scratch)
        self.activation_type, self.weight_type = activation_type, weight_type
        self.per_channel, self.method = per_channel, method
        self.ranges = self.scratch / "ranges.json"

    def quantize(self, model, nodes: Sequence[str], only: bool = False):
        """``model`` with the layers ``nodes`` in int8. ``only``: nothing else quantized
        (a sensitivity trial); otherwise, in a CNN, as the int8 recipe quantizes with every
        other weight layer in ``exclude_nodes`` (the ops between int8 layers: Add,
        pooling ... in int8 too, so the integer regions stay whole), and in a model without
        convolutions, those layers alone (see below)."""
        import logging

        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        feeds = self.feeds

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)

        layers = layers_of(model)
        layer_nodes = {layer.node for layer in layers}
        # A CNN gets every op between its int8 layers quantized (integer regions). A model
        # without convolutions (a transformer) gets its int8 layers only: quantizing the mask
        # arithmetic ruins it (FACTS.md), and a quantized attention MatMul's dequantize
        # would travel (onnxruntime's QDQ propagation through Transpose/Reshape) to the
        # input of a layer in another format, which onnxruntime then fuses with that
        # layer's FP8 weight dequantize into an integer MatMul that refuses FP8. For the
        # same reason each int8 layer gets its own quantize/dequantize pair of a shared
        # input, so a LayerNorm's output read by int8 and FP8 layers stays float for the latter.
        # With every layer int8 nothing can conflict: the int8 scheme's recipe (attention's
        # MatMuls integer too, one quantize per shared input).
        cnn = any(layer.op == "Conv" for layer in layers)
        every_layer = set(nodes) == layer_nodes  # all int8: the int8 scheme's own recipe
        selected = list(nodes) if only or not (cnn or every_layer) else None
        op_types = ["MatMul", "Gemm"] if not cnn else None
        source, out = self.scratch / "int8_in.onnx", self.scratch / "int8_out.onnx"
        onnx.save(model, str(source))
        # onnxruntime warns on the root logger that the model was not pre-processed: the
        # quantize stage pre-processes it before the search
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.method]
        try:
            quantize_static(
                str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                activation_type=qtype[self.activation_type],
                weight_type=qtype[self.weight_type],
                per_channel=self.per_channel, calibrate_method=method,
                nodes_to_quantize=selected, op_types_to_quantize=op_types,
                nodes_to_exclude=None if selected else sorted(layer_nodes - set(nodes)),
                calibration_cache_path=str(self.ranges),
                extra_options={"CalibTensorRangeSymmetric": False,
                               "DedicatedQDQPair": bool(selected) and not only})
        finally:
            root.setLevel(level)
        return onnx.load(str(out))


def apply(model, assignment: dict[str, str], symmetric: bool, int8: Int8Static | None = None):
    """The model with each layer of ``assignment`` in its format (the real ONNX the quantize
    stage writes): int8 first (onnxruntime's QDQ, the other layers excluded), then the
    weight-only formats. Returns the new model."""
    import copy

    from pipeline.schemes import codes8
    from pipeline.schemes.bfloat16 import store_bfloat16
    from pipeline.schemes.blockwise import quantize_blockwise

    by_format: dict[str, list[str]] = {}
    for node, fmt in assignment.items():
        by_format.setdefault(fmt, []).append(node)
    weights = {n.name: n.input[1] for n in model.graph.node if n.op_type in WEIGHT_OPS}
    if by_format.get("int8"):
        if int8 is None:
            raise ConfigError("scheme mixed: the assignment puts layers in int8, which needs "
                              "calibration; quantize through the quantize stage")
        model = int8.quantize(model, by_format["int8"])
    else:
        model = copy.deepcopy(model)
    for fmt, nodes in sorted(by_format.items()):
        spec = FORMATS[fmt]
        if spec.bits:
            model = quantize_blockwise(model, spec.bits, spec.block_size, symmetric, nodes)
        elif fmt == "bf16":
            store_bfloat16(model, [weights[n] for n in nodes])
    for fmt, nodes in sorted(by_format.items()):  # last: fp8 raises the opset to 21
        if FORMATS[fmt].code8:
            codes8.ensure_opset(model, fmt)
            for node in nodes:
                codes8.quantize_matmul_weight(model, node, fmt)
    return model


def decoded_weights(model, layers: Sequence[Layer], fmt: str,
                    symmetric: bool) -> dict[str, np.ndarray]:
    """Each layer's weight as a weight-only format stores it, decoded to float32:
    ``node -> weight`` (the ONNX initializer's shape)."""
    import copy

    from onnx import numpy_helper

    from pipeline.schemes import bfloat16

    spec = FORMATS[fmt]
    inits = {i.name: i for i in model.graph.initializer}
    if spec.code8:
        from pipeline.schemes import codes8

        out = {}
        for layer in layers:
            codes, scales = codes8.quantize_weight(numpy_helper.to_array(inits[layer.weight]),
                                                   fmt)
            out[layer.node] = codes8.dequantize(codes8.CodeWeight(
                layer.k, layer.n, fmt, codes, scales))
        return out
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


# onnxruntime 1.31's MatMulAddFusion fails on some pre-processed graphs whose weights are
# decoded by a node ("AddInitializedOrtValue Attempt to replace the existing tensor", seen on
# a BERT with bfloat16 Casts and MatMulNBits); every session of a mixed model runs without it
# (the scheme's ort_session_config says the same for the reference and the baseline).
SESSION_CONFIG = {"optimization.disable_specified_optimizers": "MatMulAddFusion"}


def ort_session(model):
    """An onnxruntime CPU session of ``model`` (a ModelProto) with :data:`SESSION_CONFIG`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


class _Evaluator:
    """onnxruntime sessions of the model with the weight-only layers' weights as graph
    inputs: ``outputs(weights, int8_nodes)`` runs every calibration sample with those
    weights, the ``int8_nodes`` quantized by :class:`Int8Static` (one session per int8 set,
    the last one kept)."""

    def __init__(self, model, layers: Sequence[Layer], feeds: list[dict],
                 int8: Int8Static | None = None):
        from onnx import numpy_helper

        inits = {i.name: i for i in model.graph.initializer}
        self.model, self.layers, self.feeds, self.int8 = model, list(layers), feeds, int8
        self.fp32 = {layer.node: numpy_helper.to_array(inits[layer.weight]) for layer in layers}
        self._key, self._session, self._inputs = None, None, {}
        self.reference = self.outputs({})

    def _session_for(self, int8_nodes: frozenset, only: bool):
        import copy

        from onnx import helper

        key = (int8_nodes, only)
        if key == self._key:
            return self._session
        model = (self.int8.quantize(self.model, sorted(int8_nodes), only) if int8_nodes
                 else copy.deepcopy(self.model))
        inits = {i.name: i for i in model.graph.initializer}
        self._inputs = {}
        for layer in self.layers:
            if layer.node in int8_nodes or layer.weight not in inits:
                continue
            init = inits[layer.weight]
            model.graph.initializer.remove(init)
            model.graph.input.append(helper.make_tensor_value_info(
                layer.weight, init.data_type, list(init.dims)))
            self._inputs[layer.node] = layer.weight
        self._session = None  # one session at a time: a CNN's is hundreds of MiB
        self._session = ort_session(model)
        self._key = key
        return self._session

    def outputs(self, weights: dict[str, np.ndarray], int8_nodes=(),
                only: bool = False) -> list[list[np.ndarray]]:
        session = self._session_for(frozenset(int8_nodes), only)
        feed_weights = {name: weights.get(node, self.fp32[node])
                        for node, name in self._inputs.items()}
        return [session.run(None, {**feed, **feed_weights}) for feed in self.feeds]

    def cosine(self, weights: dict[str, np.ndarray], int8_nodes=(), only: bool = False) -> float:
        return worst_cosine(self.outputs(weights, int8_nodes, only), self.reference)


def model_cosine(quantized, fp32, feeds: list[dict]) -> float:
    """The budget's metric for a real quantized ONNX model against the fp32 one, both run
    by onnxruntime on ``feeds``."""

    def run(model):
        session = ort_session(model)
        return [session.run(None, feed) for feed in feeds]

    return worst_cosine(run(quantized), run(fp32))


@dataclass
class SearchResult:
    assignment: dict[str, str]
    layers: list[Layer]
    cosine_estimated: float
    steps: list[str]


def search(model, feeds: list[dict], formats: Sequence[str], budget_min: float,
           symmetric: bool, logs_dir: Path | None = None, int8: Int8Static | None = None,
           log: Callable[[str], None] = print) -> SearchResult:
    """The greedy ascent of the module docstring over ``formats`` (fp32 is always the last
    resort; each layer gets the formats that take its op), layer times from the tuning logs
    in ``logs_dir``; ``int8`` quantizes int8 trials (without it int8 is no candidate).
    ``model`` must have named nodes (:func:`name_matmuls`). The search's own target is
    ``1 - HEADROOM * (1 - budget_min)``."""
    budget_min = 1.0 - HEADROOM * (1.0 - budget_min)
    layers = layers_of(model)
    if not layers:
        raise ConfigError("scheme mixed: the model has no MatMul, Gemm or Conv with a "
                          "constant weight to give a format; use fp32 for it")
    formats = [f for f in dict.fromkeys([*formats, "fp32"]) if f != "int8" or int8 is not None]
    for (node, fmt), timed in layer_seconds(layers, formats, logs_dir, symmetric).items():
        next(layer for layer in layers if layer.node == node).seconds[fmt] = timed
    evaluator = _Evaluator(model, layers, feeds, int8)
    decoded = {fmt: decoded_weights(model, [x for x in layers if x.takes(fmt)], fmt, symmetric)
               for fmt in formats if not FORMATS[fmt].int8}
    for layer in layers:
        for fmt in formats:
            if not layer.takes(fmt):
                continue
            if fmt == "fp32":
                layer.sensitivity[fmt] = 0.0
            elif FORMATS[fmt].int8:
                layer.sensitivity[fmt] = 1.0 - evaluator.cosine({}, [layer.node], only=True)
            else:
                layer.sensitivity[fmt] = 1.0 - evaluator.cosine(
                    {layer.node: decoded[fmt][layer.node]})
    # each layer's ladder: formats by time, fastest first, keeping only those more accurate
    # (for that layer) than every faster one
    ladders = {}
    for layer in layers:
        ladder = []
        for fmt in sorted(layer.seconds, key=lambda f: (layer.seconds[f][0], f)):
            if not ladder or layer.sensitivity[fmt] < layer.sensitivity[ladder[-1]]:
                ladder.append(fmt)
        ladders[layer.node] = ladder
    rung = {layer.node: 0 for layer in layers}

    def current() -> dict[str, str]:
        return {node: ladders[node][i] for node, i in rung.items()}

    def model_cosine() -> float:
        chosen = current()
        return evaluator.cosine({node: decoded[fmt][node] for node, fmt in chosen.items()
                                 if fmt in decoded},
                                [node for node, fmt in chosen.items() if fmt == "int8"])

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
    # Refinement: a step up is chosen on one-layer sensitivities, which do not add up
    # exactly, so the ascent can overshoot. Each raised layer, the most time saved first,
    # tries its next faster format again and keeps it if the model still meets the budget.
    raised = sorted((node for node, i in rung.items() if i > 0), key=lambda node: -(
        by_node[node].seconds[ladders[node][rung[node]]][0] -
        by_node[node].seconds[ladders[node][rung[node] - 1]][0]))
    for node in raised if cosine >= budget_min else ():
        rung[node] -= 1
        lowered = model_cosine()
        if lowered >= budget_min:
            cosine = lowered
            steps.append(f"{node} back to {ladders[node][rung[node]]}: cosine {cosine:.6f}")
            log(f"quantize: mixed search: {steps[-1]}")
        else:
            rung[node] += 1
    if raised and cosine >= budget_min:
        cosine = model_cosine()  # the evaluator's session may hold the last trial
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
