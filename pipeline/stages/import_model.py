"""Stage ``import``: ONNX -> Relax IRModule with static shapes, cleaned up and, for a QDQ
model, rewritten to integer arithmetic by the project's quantization-aware passes.

The output is ``module.json`` (``tvm.ir.save_json``: deterministic bytes for equal modules),
holding the IR only: the weights are lifted out of ``main`` into ``module.params``
(:mod:`pipeline.compiler.params`; a JSON with base64 weights would need several copies of
them in memory, ~10 GiB for a 2 GiB model), and ``import_report.json`` (what the passes
matched, and what stays in fake-quant form).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class ImportConfig:
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    # the scheme's import passes, by name in pipeline.compiler.passes.IMPORT_PASSES
    passes: tuple[str, ...] = ()


def unsupported_ops(model) -> dict[str, list[str]]:
    """Operators TVM's ONNX frontend cannot convert, each with the node names using it."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If", "Constant"}
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in known:
            missing.setdefault(node.op_type, []).append(node.name or f"#{i}")
    return missing


def fold_batchnorm_into_conv(model) -> int:
    """Fold every inference BatchNormalization into the Conv that feeds it (in place).

    TVM's FoldBatchnormToConv2D only matches a bias-free conv; exporters often emit
    Conv(+bias) -> BatchNormalization. Folding here, on the ONNX graph, covers both and
    leaves one conv + bias per layer: w' = w * g / sqrt(v + eps), b' = (b - m) * g /
    sqrt(v + eps) + beta, computed in float64 and stored as float32. Returns the count.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0]) != 1
                or conv.output[0] in graph_outputs or conv.input[1] not in inits
                or (len(conv.input) > 2 and conv.input[2] not in inits)
                or not all(p in inits for p in params)
                or consumers.get(conv.input[1], 0) != 1):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64)
                                  for p in params)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        scale = gamma / np.sqrt(var + eps)
        new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((b - mean) * scale + beta).astype(np.float32)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(new_w, conv.input[1]))
        bias_name = f"{conv.input[1]}.folded_bias"
        graph.initializer.append(numpy_helper.from_array(new_b, bias_name))
        inits[bias_name] = graph.initializer[-1]
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = bias_name
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return len(folded)


def import_onnx(model_path: Path, config: ImportConfig, report: dict | None = None):
    """from_onnx with the spec's static shapes; every unsupported op named in one error.

    A model with ONNX external data is read without it: each weight goes from its file
    straight into its TVM tensor (one copy in memory, not the protobuf's and then TVM's);
    only the weights of BatchNorm folding and of block-wise layers are read into the
    protobuf first. MatMulNBits nodes and blocked DequantizeLinear (block-wise INT4/INT8
    weights), fp8 DequantizeLinear and table-decoded (posit8) weights are taken out before
    the import and become fused dequantize-matmul kernels after it
    (:mod:`pipeline.frontend.blockwise_weights`); ``report`` receives the format of each such
    layer and the matmul-like layers kept in float.
    """
    import onnx

    from pipeline.compiler.passes.weight_only import bind_blockwise_weights
    from pipeline.frontend import blockwise_weights
    from pipeline.frontend.onnx_normalize import has_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    base_dir = Path(model_path).parent
    if has_external_data(model):
        _load_data_of(model, base_dir, blockwise_weights.needed_initializers(model))
    blockwise = blockwise_weights.extract(model)
    missing = unsupported_ops(model)
    if missing:
        lines = [f"{op} (nodes: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
                 for op, names in sorted(missing.items())]
        hint = ""
        if any(op.startswith("QLinear") for op in missing):
            hint = (" QOperator-format quantized models are not supported: give the fp32 "
                    "model and let the quantize stage produce QDQ.")
        raise UnsupportedModelError(
            f"{model_path}: {len(missing)} operator type(s) are not supported by TVM's ONNX "
            "importer:\n  - " + "\n  - ".join(lines) +
            f"\nReplace them in the exporter or pre-process the graph.{hint}")
    if has_external_data(model):
        _load_data_of(model, base_dir, {name for node in model.graph.node
                                        if node.op_type in ("Conv", "BatchNormalization")
                                        for name in node.input})
    fold_batchnorm_into_conv(model)
    shape_dict = {name: list(shape) for name, shape, _ in config.inputs}
    shape_dict.update({name: [w.k, w.n] for name, w in blockwise.weights.items()})
    with _weights_from_files(base_dir):
        mod = from_onnx_module(model, shape_dict)
    del model  # the weights now live in the module's constants: one copy, not two
    if report is not None and blockwise.weights:
        report.update(blockwise.report())
    return bind_blockwise_weights(mod, blockwise.weights)


def from_onnx_module(model, shape_dict):
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)


def _load_data_of(model, base_dir: Path, names: set[str]) -> None:
    """Read the external data of the initializers ``names`` into the protobuf."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for tensor in model.graph.initializer:
        if tensor.name in names and uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


@contextlib.contextmanager
def _weights_from_files(base_dir: Path):
    """While TVM's importer runs: an initializer stored externally is read from its file
    (a memory map) into its TVM tensor, never into the protobuf. TVM 0.27's importer turns
    each initializer into a tensor in ``ONNXGraphImporter._parse_array``; that one method is
    wrapped, and restored afterwards."""
    import numpy as np
    import tvm
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    from onnx.helper import tensor_dtype_to_np_dtype
    from tvm.relax.frontend.onnx import onnx_frontend

    importer = onnx_frontend.ONNXGraphImporter
    stock = importer._parse_array

    def parse_array(self, tensor_proto):
        if not uses_external_data(tensor_proto):
            return stock(self, tensor_proto)
        info = ExternalDataInfo(tensor_proto)
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor_proto.data_type))
        shape = tuple(int(d) for d in tensor_proto.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if info.length and info.length != count * dtype.itemsize:
            raise UnsupportedModelError(f"initializer {tensor_proto.name}: {info.length} bytes "
                                        f"of external data for {shape} {dtype}")
        mapped = np.memmap(base_dir / info.location, dtype=dtype, mode="r",
                           offset=info.offset or 0, shape=shape)
        try:
            return tvm.runtime.tensor(np.asarray(mapped))
        finally:
            del mapped

    importer._parse_array = parse_array
    try:
        yield
    finally:
        importer._parse_array = stock


def run(model_path: Path, config: ImportConfig, out_dir: Path) -> dict:
    """Write ``module.json``, ``module.params`` and ``import_report.json`` into ``out_dir``."""
    import tvm

    from pipeline.compiler.lowering import graph_cleanup
    from pipeline.compiler.params import lift_constants
    from pipeline.runtime.params import save_params

    report: dict = {"integer_pass": False, "passes": list(config.passes)}
    mod = import_onnx(model_path, config, report)
    mod = graph_cleanup()(mod)
    from pipeline.compiler.passes import IMPORT_PASSES

    for name in config.passes:
        mod, fields = IMPORT_PASSES[name](mod)
        report.update(fields)
    mod, weights = lift_constants(mod)
    report["weights"] = {"tensors": len(weights),
                         "bytes": save_params(weights, out_dir / "module.params")}
    del weights
    (out_dir / "module.json").write_text(tvm.ir.save_json(mod), encoding="utf-8")
    (out_dir / "import_report.json").write_text(json.dumps(report, indent=2, sort_keys=True)
                                                + "\n", encoding="utf-8")
    return report
