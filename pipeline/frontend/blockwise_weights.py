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

The 8-bit float-like formats (``fp8_e4m3``, ``posit8``: :mod:`pipeline.schemes.codes8`) go
the same way, from their own ONNX forms:

- ``MatMul(A, DequantizeLinear(codes float8e4m3fn [K, N], scale[, zero 0], axis=1))``
  (per-channel or per-tensor scale; no block size), which TVM's importer mis-decodes
  (FACTS.md: fp8 -> fp32 is wrong on llvm, ``relax.dequantize`` truncates);
- ``MatMul(A, Mul(Gather(table float32 [256], Cast(codes uint8 [K, N] -> int)), scale))``,
  a 256-entry decode table (posit8 is written so: ONNX has no posit type).

Their weights become :class:`~pipeline.schemes.codes8.CodeWeight` (``decode`` "fp8_e4m3",
"posit8" or "table8"), a sibling of ``BlockwiseWeight`` (``decode`` "int"), and the same
stand-in mechanism binds them to the same kernel with that decode.

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
from pipeline.schemes.codes8 import CodeWeight, weight_from_onnx

OP_TYPE = "MatMulNBits"
DOMAIN = "com.microsoft"
OP_TYPES = (OP_TYPE, "DequantizeLinear")  # the nodes whose constants extract() reads
STAND_IN_PREFIX = "blockwise_weight_"


@dataclass
class Extracted:
    """What :func:`extract` took out of the graph, by stand-in input name."""

    weights: dict[str, BlockwiseWeight | CodeWeight] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # stand-in -> MatMulNBits node name
    # matmul-like layers left in float32, with why: {"node", "op", "reason"}
    kept_float: list[dict] = field(default_factory=list)

    def add(self, model, weight: BlockwiseWeight | CodeWeight, label: str) -> str:
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
            layer = {"node": self.nodes[name], "k": w.k, "n": w.n, "bits": w.bits}
            if isinstance(w, CodeWeight):
                layer.update(w.describe())
            else:
                layer.update({"decode": "int", "block_size": w.block_size,
                              "scale_dtype": str(w.scales.dtype),
                              "zero_points": w.zeros is not None})
            layer["bits_per_weight"] = round(w.bits_per_weight, 4)
            layers.append(layer)
        params = sum(w.k * w.n for w in self.weights.values())
        stored = sum(w.stored_bytes for w in self.weights.values())
        return {"blockwise_layers": layers, "blockwise_params": params,
                "blockwise_bytes": stored,
                "blockwise_bits_per_weight": round(8.0 * stored / params, 4) if params else None,
                "float_layers": self.kept_float}


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
    _extract_fp8_dequantize(model, inits, out, problems)
    _extract_table_decode(model, inits, out)
    if problems:
        raise UnsupportedModelError("block-wise quantized weight(s) the importer cannot "
                                    "take:\n  - " + "\n  - ".join(problems))
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if out.weights:
        _drop_unused_opsets(model)
        out.kept_float = kept_float(model)
    return out


def kept_float(model) -> list[dict]:
    """The matmul-like layers still float32 after :func:`extract`, each with the reason."""
    inits = {i.name for i in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            reason = "convolutions stay float32 (the weight-only formats cover MatMul weights)"
        elif node.op_type == "Gemm":
            reason = "Gemm stays float32 (the weight-only formats cover MatMul weights)"
        elif node.op_type == "MatMul":
            if node.input[1].startswith(STAND_IN_PREFIX):
                continue
            reason = ("its weight is computed, not a constant (e.g. attention scores)"
                      if node.input[1] not in inits else
                      "not quantized by the variant (excluded, or a float weight)")
        else:
            continue
        kept.append({"node": node.name or node.output[0], "op": node.op_type,
                     "reason": reason})
    return kept


def needed_initializers(model) -> set[str]:
    """Names of the initializers :func:`extract` reads (for models with external data)."""
    graph = model.graph
    names = {name for node in graph.node if node.op_type in OP_TYPES for name in node.input}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # Mul(Gather(table, Cast(codes)), scale)
        if node.op_type != "Mul":
            continue
        gather = next((producers.get(i) for i in node.input
                       if getattr(producers.get(i), "op_type", "") == "Gather"), None)
        if gather is None or len(gather.input) < 2:
            continue
        cast = producers.get(gather.input[1])
        if cast is not None and cast.op_type == "Cast":
            names |= {*node.input, gather.input[0], *cast.input}
    return names


def _single_matmul_rhs(consumers, outputs, name: str):
    """The MatMul that uses ``name`` as its right-hand side and is its only user, or None."""
    users = consumers.get(name, [])
    if (len(users) == 1 and users[0].op_type == "MatMul" and users[0].input[1] == name
            and name not in outputs):
        return users[0]
    return None


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _raw_bytes(array):
    """An 8-bit tensor's bit patterns as uint8 (float8 arrays come as ml_dtypes types)."""
    import numpy as np

    return np.ascontiguousarray(array).view(np.uint8)


def _extract_fp8_dequantize(model, inits, out: Extracted, problems: list[str]) -> None:
    """``MatMul(A, DequantizeLinear(codes float8e4m3fn [K, N], scale[, zero], axis=1))``
    (no block size) becomes ``MatMul(A, stand-in)``; other fp8 forms are refused by name."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    for index, dq in enumerate(list(graph.node)):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if inits[dq.input[0]].data_type != TensorProto.FLOAT8E4M3FN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        label = dq.name or f"#{index}"
        inputs = list(dq.input) + [""] * (3 - len(dq.input))
        matmul = _single_matmul_rhs(consumers, outputs, dq.output[0])
        if matmul is None or not all(n in inits for n in inputs if n):
            problems.append(f"{label}: an fp8 DequantizeLinear is supported only on a "
                            "constant weight feeding one MatMul as its right-hand side")
            continue
        codes = _raw_bytes(numpy_helper.to_array(inits[inputs[0]]))
        scales = numpy_helper.to_array(inits[inputs[1]])
        zero = _raw_bytes(numpy_helper.to_array(inits[inputs[2]])) if inputs[2] else None
        axis = int(attrs.get("axis", 1))
        if (codes.ndim != 2 or attrs.get("block_size") or scales.dtype != np.float32
                or (scales.size > 1 and axis not in (1, -1))
                or (zero is not None and np.any(zero & 0x7F))):
            problems.append(f"{label}: fp8 DequantizeLinear of a {codes.ndim}-D weight "
                            f"along axis {axis} with {scales.dtype} scales; supported: 2-D "
                            "weights, float32 scales per output channel (axis 1) or per "
                            "tensor, no block size, zero point 0")
            continue
        label = matmul.name or label
        try:
            weight = weight_from_onnx("fp8_e4m3", codes, scales)
        except UnsupportedModelError as err:
            problems.append(f"{label}: {err}")
            continue
        matmul.input[1] = out.add(model, weight, label)
        graph.node.remove(dq)


def _extract_table_decode(model, inits, out: Extracted) -> None:
    """``MatMul(A, Mul(Gather(table [256], Cast(codes uint8 [K, N] -> int)), scale))``, every
    intermediate used once and every tensor but A constant, becomes ``MatMul(A, stand-in)``.
    Anything else that only looks like it is left alone (it imports as ordinary ops)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}

    def only_use(name, node):
        return consumers.get(name, []) == [node] and name not in outputs

    for index, mul in enumerate(list(graph.node)):
        if mul.op_type != "Mul":
            continue
        matmul = _single_matmul_rhs(consumers, outputs, mul.output[0])
        if matmul is None:
            continue
        gather_in = next((i for i in mul.input if i in producers
                          and producers[i].op_type == "Gather"), None)
        scale_in = next((i for i in mul.input if i != gather_in), None)
        if gather_in is None or scale_in not in inits or not only_use(gather_in, mul):
            continue
        gather = producers[gather_in]
        axis = {a.name: helper.get_attribute_value(a) for a in gather.attribute}.get("axis", 0)
        cast = producers.get(gather.input[1])
        if (axis != 0 or gather.input[0] not in inits or cast is None or cast.op_type != "Cast"
                or not only_use(gather.input[1], gather) or cast.input[0] not in inits):
            continue
        if inits[cast.input[0]].data_type != TensorProto.UINT8:
            continue
        table = numpy_helper.to_array(inits[gather.input[0]])
        codes = numpy_helper.to_array(inits[cast.input[0]])
        scales = numpy_helper.to_array(inits[scale_in])
        if (table.shape != (256,) or table.dtype != np.float32 or codes.ndim != 2
                or scales.dtype != np.float32 or scales.size not in (1, codes.shape[1])
                or (scales.size > 1 and scales.shape[-1] != codes.shape[1])):
            continue
        label = matmul.name or mul.name or f"#{index}"
        weight = weight_from_onnx("table", codes, scales, table)
        matmul.input[1] = out.add(model, weight, label)
        for node in (mul, gather, cast):
            graph.node.remove(node)


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
