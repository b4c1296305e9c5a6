"""Block-wise quantized weights (INT4/INT8, a scale per group) for TVM's importer.

Two ONNX forms carry them, both written by onnxruntime's ``MatMulNBitsQuantizer``:

- ``com.microsoft.MatMulNBits(A, B, scales[, zero points][, g_idx][, bias])`` (QOperator),
  which TVM 0.27's ONNX frontend does not know;
- ``MatMul(A, DequantizeLinear(codes, scales[, zero points], axis=0, block_size=B))`` with
  int4/uint4/int8/uint8 codes (QDQ, opset 21), which TVM rejects ("blocked quantization is not
  supported yet"; int4 tensors fail on import).

The frontend has no hook for a converter of our own, so the weight is split off before the
import and joined again after it:

1. :func:`extract` (on the ONNX graph) replaces each such matmul by ``Y = MatMul(A, W)``
   (``+ bias``), where ``W`` is a new *graph input* of shape ``[K, N]`` standing for the
   weight: the importer makes it a Relax parameter, so no float weight is ever materialised.
   The packed constants go to a table (:class:`~pipeline.schemes.blockwise.BlockwiseWeight`,
   the kernel's layout).
2. :func:`pipeline.compiler.passes.weight_only.bind_blockwise_weights` (on the Relax module)
   replaces each ``matmul(x, W)`` by the fused dequantize-matmul kernel over the packed
   constants and drops the stand-in parameters.

The stand-ins' names start with :data:`STAND_IN_PREFIX`, which survives the importer's
input-name sanitising.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import UnsupportedModelError
from pipeline.schemes.blockwise import (
    BlockwiseWeight,
    from_blocked_dequantize,
    from_matmul_nbits,
)

OP_TYPE = "MatMulNBits"
DOMAIN = "com.microsoft"
OP_TYPES = (OP_TYPE, "DequantizeLinear")  # the nodes whose constants extract() reads
STAND_IN_PREFIX = "blockwise_weight_"


@dataclass
class Extracted:
    """What :func:`extract` took out of the graph, by stand-in input name."""

    weights: dict[str, BlockwiseWeight] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # stand-in -> MatMulNBits node name

    def add(self, model, weight: BlockwiseWeight, label: str) -> str:
        """Record ``weight`` and declare its stand-in graph input; returns the input's name."""
        from onnx import TensorProto, helper

        stand_in = f"{STAND_IN_PREFIX}{len(self.weights)}"
        self.weights[stand_in] = weight
        self.nodes[stand_in] = label
        model.graph.input.append(helper.make_tensor_value_info(
            stand_in, TensorProto.FLOAT, [weight.k, weight.n]))
        return stand_in

    def report(self) -> dict:
        """Per layer: the node, its shape and format, and the bits stored per weight."""
        layers = []
        for name, w in self.weights.items():
            layers.append({"node": self.nodes[name], "k": w.k, "n": w.n, "bits": w.bits,
                           "block_size": w.block_size, "scale_dtype": str(w.scales.dtype),
                           "zero_points": w.zeros is not None,
                           "bits_per_weight": round(w.bits_per_weight, 4)})
        params = sum(w.k * w.n for w in self.weights.values())
        stored = sum(w.stored_bytes for w in self.weights.values())
        return {"blockwise_layers": layers, "blockwise_params": params,
                "blockwise_bytes": stored,
                "blockwise_bits_per_weight": round(8.0 * stored / params, 4) if params else None}


def extract(model, scale_dtype: str = "auto") -> Extracted:
    """Rewrite every MatMulNBits of ``model`` (in place) as described in the module docstring.

    ``scale_dtype``: ``"auto"`` stores the scales as float16 when every one of a layer's
    scales is a float16 value (the quantize stage rounds them so) and as float32 otherwise;
    ``"float16"`` / ``"float32"`` force one (float16 fails on scales it would change).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    out = Extracted()
    problems: list[str] = []
    for index, node in enumerate(list(graph.node)):
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        label = node.name or f"#{index}"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * (6 - len(node.input))
        a_name, b_name, s_name, zp_name, g_idx, bias = inputs[:6]
        missing = [n for n in (b_name, s_name, zp_name) if n and n not in inits]
        if missing:
            problems.append(f"{label}: its weight inputs must be constants (initializers); "
                            f"{', '.join(missing)} are not")
            continue
        if g_idx:
            problems.append(f"{label}: g_idx (act-order reordering) is not supported")
            continue
        zero_points = numpy_helper.to_array(inits[zp_name]) if zp_name else None
        if zero_points is not None and zero_points.dtype != np.uint8:
            problems.append(f"{label}: zero points of type {zero_points.dtype} (only uint8 "
                            "packed zero points are supported)")
            continue
        k, n, bits, block = (int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)),
                             int(attrs["block_size"]))
        scales = numpy_helper.to_array(inits[s_name])
        if scales.dtype != np.float32:
            problems.append(f"{label}: {scales.dtype} scales (a float16 model); only float32 "
                            "activations are supported so far")
            continue
        codes = numpy_helper.to_array(inits[b_name])
        weight = from_matmul_nbits(codes, scales, zero_points, k, n, bits, block, scale_dtype)
        stand_in = out.add(model, weight, label)
        product = node.output[0] if not bias else f"{node.output[0]}.{STAND_IN_PREFIX}matmul"
        replacement = [helper.make_node("MatMul", [a_name, stand_in], [product],
                                        name=f"{label}.dequant_matmul")]
        if bias:
            replacement.append(helper.make_node("Add", [product, bias], [node.output[0]],
                                                name=f"{label}.bias"))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(position + offset, new)
    _extract_blocked_dequantize(model, inits, scale_dtype, out, problems)
    if problems:
        raise UnsupportedModelError("block-wise quantized weight(s) the importer cannot "
                                    "take:\n  - " + "\n  - ".join(problems))
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if out.weights:
        _drop_unused_opsets(model)
    return out


def _extract_blocked_dequantize(model, inits, scale_dtype: str, out: Extracted,
                                problems: list[str]) -> None:
    """The QDQ form: ``MatMul(A, DequantizeLinear(codes, scales[, zp], axis=0, block_size))``
    with constant codes used by that one MatMul becomes ``MatMul(A, stand-in)``."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    for index, dq in enumerate(list(graph.node)):
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        if dq.op_type != "DequantizeLinear" or not attrs.get("block_size"):
            continue
        label = dq.name or f"#{index}"
        users = consumers.get(dq.output[0], [])
        inputs = list(dq.input) + [""] * (3 - len(dq.input))
        if (len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != dq.output[0]
                or dq.output[0] in outputs or not all(n in inits for n in inputs if n)):
            problems.append(f"{label}: a block-wise DequantizeLinear is supported only on a "
                            "constant weight feeding one MatMul as its right-hand side")
            continue
        codes = numpy_helper.to_array(inits[inputs[0]])
        scales = numpy_helper.to_array(inits[inputs[1]])
        zero = numpy_helper.to_array(inits[inputs[2]]) if inputs[2] else None
        axis = int(attrs.get("axis", 1))
        if codes.ndim != 2 or axis not in (0, -2) or scales.dtype != np.float32:
            problems.append(f"{label}: block-wise DequantizeLinear of a {codes.ndim}-D "
                            f"{codes.dtype} weight along axis {axis} with {scales.dtype} "
                            "scales; supported: 2-D weights blocked along axis 0 (the input "
                            "channels) with float32 scales")
            continue
        weight = from_blocked_dequantize(codes, scales, zero, int(attrs["block_size"]),
                                         scale_dtype)
        matmul = users[0]
        matmul.input[1] = out.add(model, weight, label)
        graph.node.remove(dq)


def _drop_unused_opsets(model) -> None:
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    for opset in [o for o in model.opset_import if o.domain not in used]:
        model.opset_import.remove(opset)
