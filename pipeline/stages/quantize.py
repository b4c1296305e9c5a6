"""Stage ``quantize``: fp32 ONNX -> the ONNX model of the variant's number format.

The recipes (:data:`RECIPES`, named by the scheme): ``static_qdq``, onnxruntime's static
quantizer to QDQ, u8 activations x s8 per-channel weights by default (what VNNI multiplies),
calibrated on a folder of ``.npy`` samples or seeded synthetic ones, in a fixed order, so the
same inputs give the same scales and the same bytes; ``float16``, onnxconverter-common's
float16 conversion (inputs and outputs stay float32); ``bfloat16_weights``, MatMul/Gemm/Conv
weights and Gather tables rounded to bfloat16 and stored as bfloat16 initializers, each
decoded by a ``Cast(to=float)``; ``matmul_nbits``, onnxruntime's MatMulNBits quantizer
(block-wise INT4/INT8 MatMul weights, scales rounded to float16 values); ``weight_codes8``,
MatMul weights as FP8 E4M3 or posit8 codes with per-channel float32 scales
(:mod:`pipeline.schemes.codes8`); ``dynamic_int8``, onnxruntime's ``quantize_dynamic``
(weights s8 per channel offline, activations u8 at run time: DynamicQuantizeLinear ->
MatMulInteger -> float scale; no calibration). onnxruntime runs each recipe's model as the
reference and the baseline.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.runtime.data import calibration_samples


@dataclass(frozen=True)
class QuantizeConfig:
    method: str  # minmax | entropy | percentile
    samples: int
    seed: int
    data_dir: str
    activation_type: str
    weight_type: str
    per_channel: bool
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    recipe: str = "static_qdq"  # a key of RECIPES: the variant's scheme names it
    ranges: dict = field(default_factory=dict)  # input name -> [lo, hi] (the spec's range)
    op_types: tuple[str, ...] = ()  # empty: every op type onnxruntime quantizes
    exclude_nodes: tuple[str, ...] = ()
    # matmul_nbits (block-wise weight-only) only
    bits: int = 0
    block_size: int = 0
    symmetric: bool = False
    accuracy_level: int = 0
    # scheme mixed (pipeline.schemes.mixed): candidate formats, the least cosine to fp32,
    # a pinned assignment file (empty: search)
    formats: tuple[str, ...] = ()
    budget_min: float = 0.0
    assignment: str = ""
    latency_logs: str = ""  # tuning logs whose records time each layer in each format
    # weight_codes8 (fp8_e4m3, posit8) only: a key of pipeline.schemes.codes8.FORMATS
    weight_format: str = ""


def run(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """Write ``out_dir/model.onnx``, quantized by the config's recipe (see :data:`RECIPES`)."""
    try:
        recipe = RECIPES[config.recipe]
    except KeyError:
        raise ConfigError(f"unknown quantize recipe {config.recipe!r}; known: "
                          f"{', '.join(RECIPES)}") from None
    return recipe(model_path, config, out_dir)


def _static_qdq(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """onnxruntime ``quantize_static`` to QDQ, calibrated on the config's samples."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    _check_selection(model_path, config)
    feeds = calibration_samples(config.inputs, config.samples, config.seed, config.data_dir,
                                config.ranges)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    from pipeline.frontend import onnx_normalize

    # A source written with ONNX external data (given so, or past 1 GiB) stays so here.
    external = onnx_normalize.data_path(model_path).is_file()
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    out = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        pre = _preprocess(model_path, Path(scratch), external)
        try:
            quantize_static(
                str(pre), str(Path(scratch) / "quantized.onnx"), Reader(),
                quant_format=QuantFormat.QDQ, use_external_data_format=external,
                activation_type=qtype[config.activation_type],
                weight_type=qtype[config.weight_type],
                per_channel=config.per_channel, calibrate_method=method,
                op_types_to_quantize=list(config.op_types) or None,
                nodes_to_exclude=list(config.exclude_nodes) or None,
                extra_options={"CalibTensorRangeSymmetric": False})
        except ValueError as error:
            if "bins" not in str(error):
                raise
            # onnxruntime's histogram calibrators (entropy, percentile) cannot bin a tensor
            # spanning float32's range: a transformer's attention mask (-3.4e38) is one
            raise ConfigError(
                f"calibration method {config.method!r} failed in onnxruntime ({error}): a "
                "tensor it calibrates spans float32's whole range, as a transformer's "
                "attention mask does. Quantize only the layers (the variant's `op_types = "
                "[\"MatMul\", \"Gemm\"]`, or `exclude_nodes`), or use "
                "`[calibration] method = \"minmax\"`") from None
        # Written again by the pipeline: the same external-data layout as the source's
        # (model.onnx.data, its sha256 in model.onnx), and nothing of the scratch names.
        model = onnx_normalize.load_inline(Path(scratch) / "quantized.onnx")
    onnx_normalize.save_model(model, out, external)
    return {"calibration_samples": len(feeds), "op_counts": _op_counts(model),
            "external_data": external}


def _preprocess(model_path: Path, scratch: Path, external: bool = False) -> Path:
    """onnxruntime's pre-processing, as it recommends before quantizing: shapes inferred,
    Conv+BatchNorm fused and constants folded in float32 (so a low-precision format rounds
    the folded weights once). Returns the pre-processed model's path inside ``scratch``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = scratch / "preprocessed.onnx"
    quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True,
                      save_as_external_data=external, all_tensors_to_one_file=True,
                      external_data_location=pre.name + ".data")
    return pre


def _load_source(model_path: Path):
    """``(model, external)``: the source with its tensors read in, and whether it came with
    ONNX external data (the recipe's output then does too)."""
    from pipeline.frontend import onnx_normalize

    return (onnx_normalize.load_inline(model_path),
            onnx_normalize.data_path(model_path).is_file())


def _load_preprocessed(model_path: Path, out_dir: Path):
    """``(model, external)``: the source after :func:`_preprocess`, its tensors read in, and
    whether the source came with ONNX external data (the recipe's output then does too)."""
    from pipeline.frontend import onnx_normalize

    external = onnx_normalize.data_path(model_path).is_file()
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        model = onnx_normalize.load_inline(_preprocess(model_path, Path(scratch), external))
    return model, external


def _save(model, out_dir: Path, external: bool) -> None:
    """Write a recipe's ``model.onnx`` (with ``model.onnx.data`` when ``external``: a model
    past protobuf's 2 GiB limit must be). ``model`` is emptied of its tensors when external."""
    from pipeline.frontend import onnx_normalize

    onnx_normalize.save_model(model, out_dir / "model.onnx", external)


def _op_counts(model) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _initializer_dtypes(model) -> dict[str, int]:
    """Initializer count per ONNX element type name (``FLOAT16``, ``BFLOAT16``, ``FLOAT``...)."""
    from onnx import TensorProto

    return dict(sorted(Counter(TensorProto.DataType.Name(init.data_type)
                               for init in model.graph.initializer).items()))


def _float16(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """float16 weights and activations: onnxconverter-common's conversion, inputs and
    outputs kept float32 (the app's interface does not change). onnxruntime's own
    ``onnxruntime.transformers.float16`` writes an unsorted graph TVM cannot import
    (FACTS.md). Ops the converter blocks stay float32 between Casts; the report lists them."""
    from onnxconverter_common import float16

    model, external = _load_preprocessed(model_path, out_dir)
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    fixed = _fix_float_casts(converted)
    report = {"op_counts": _op_counts(converted),
              "initializers": _initializer_dtypes(converted),
              "float32_ops": _float32_ops(converted), "casts_retargeted": fixed,
              "external_data": external}
    _save(converted, out_dir, external)
    return report


def _fix_float_casts(model) -> list[str]:
    """onnxconverter-common 1.16 declares the output of a ``Cast(to=FLOAT)`` from a
    non-float tensor (a BERT's attention mask, int64) as float16 but leaves ``to=FLOAT``:
    onnxruntime then refuses the model ("Type (tensor(float16)) of output arg ... does not
    match expected type (tensor(float))") and TVM's importer fails on the float16 x float32
    Mul after it. Such a Cast is made to cast to float16, as its consumers expect (in place).
    Returns the names of the Casts changed."""
    from onnx import TensorProto, helper

    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    fixed = []
    for node in model.graph.node:
        to = next((a for a in node.attribute if a.name == "to"), None)
        if (node.op_type == "Cast" and to is not None and to.i == TensorProto.FLOAT
                and declared.get(node.output[0]) == TensorProto.FLOAT16):
            to.CopyFrom(helper.make_attribute("to", TensorProto.FLOAT16))
            fixed.append(node.name or node.output[0])
    return fixed


def _float32_ops(model) -> list[str]:
    """Nodes (besides Casts) that still compute in float32 after a float16 conversion."""
    from onnx import TensorProto, shape_inference

    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    return sorted(f"{n.op_type} {n.name or n.output[0]}" for n in model.graph.node
                  if n.op_type != "Cast" and any(types.get(o) == TensorProto.FLOAT
                                                 for o in n.output))


# Which input of an op is its weight: those the bfloat16_weights recipe rounds (a Gather's
# table is an embedding: often the largest weight of a transformer)
WEIGHT_INPUTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}


def _bfloat16_weights(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """bfloat16 weight storage, float32 compute: each float32 MatMul/Gemm/Conv weight and
    Gather table (an embedding) initializer is rounded to bfloat16 (round to nearest even,
    :mod:`pipeline.schemes.bfloat16`), stored as a BFLOAT16 initializer ``<name>.bf16``
    and decoded by a ``Cast(to=FLOAT)`` named ``<name>``, so onnxruntime computes with
    exactly the weights TVM keeps. Biases and everything else stay float32."""
    from onnx import TensorProto

    from pipeline.schemes.bfloat16 import store_bfloat16

    model, external = _load_preprocessed(model_path, out_dir)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    weights = sorted({node.input[k] for node in graph.node
                      for op, k in WEIGHT_INPUTS.items()
                      if node.op_type == op and len(node.input) > k
                      and node.input[k] in inits
                      and inits[node.input[k]].data_type == TensorProto.FLOAT
                      and len(inits[node.input[k]].dims) >= 2})
    store_bfloat16(model, weights)
    report = {"op_counts": _op_counts(model), "initializers": _initializer_dtypes(model),
              "bfloat16_weights": len(weights), "external_data": external}
    _save(model, out_dir, external)
    return report


def _check_selection(model_path: Path, config: QuantizeConfig, graph=None) -> None:
    """ConfigError for a selection onnxruntime would silently ignore: op types none of which
    the model has (nothing would be quantized), node names it does not have. Op types the
    model lacks among others are fine: ["MatMul", "Gemm"] suits every transformer."""
    import onnx

    if graph is None:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    op_types = {n.op_type for n in graph.node}
    names = {n.name for n in graph.node}
    problems = []
    if config.op_types and not set(config.op_types) & op_types:
        problems.append(f"op_types: none of {', '.join(config.op_types)} is an op of this "
                        f"model, so nothing would be quantized (its ops: "
                        f"{', '.join(sorted(op_types))})")
    missing = [n for n in config.exclude_nodes if n not in names]
    if missing:
        problems.append(f"exclude_nodes: no node named {', '.join(map(repr, missing))} (names "
                        f"as in the normalised model, e.g. {', '.join(sorted(names)[:5])})")
    if problems:
        raise ConfigError("the variant's quantization selection does not match the model:\n"
                          "  - " + "\n  - ".join(problems))


def _matmul_nbits(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """onnxruntime's ``MatMulNBitsQuantizer``: every MatMul with a constant weight (except
    ``exclude_nodes``) becomes ``com.microsoft.MatMulNBits`` with ``bits``-bit codes and a
    scale (and zero point unless symmetric) per ``block_size`` input channels. No calibration.

    The scales are then rounded to float16 values (kept as float32 in the ONNX): the artifact
    stores them in half precision, and onnxruntime must compute with the very same weights.
    Rounding a scale moves each weight by at most 2**-11 of its quantization step.
    """
    from pipeline.schemes.blockwise import quantize_blockwise

    model, external = _load_source(model_path)
    _check_selection(model_path, config, model.graph)
    model = quantize_blockwise(model, config.bits, config.block_size, config.symmetric,
                               exclude=config.exclude_nodes,
                               accuracy_level=config.accuracy_level)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise ConfigError(f"{model_path}: no MatMul with a constant weight to quantize (the "
                          f"{config.bits}-bit weight-only schemes quantize MatMul weights); "
                          "use fp32 or int8 for this model")
    # what stays float: MatMuls with a computed weight (attention), Gemm, excluded nodes
    left = sorted(n.name or n.op_type for n in model.graph.node
                  if n.op_type in ("MatMul", "Gemm"))
    report = {"op_counts": _op_counts(model), "quantized_matmuls": len(nodes),
              "float_matmuls_left": left, "external_data": external,
              "scales": "rounded to float16 values (each moves by <= 2**-11 relative)"}
    _save(model, out_dir, external)
    return report


def _mixed(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """A format per weight layer (:mod:`pipeline.schemes.mixed`): searched under the budget on
    the calibration samples, or read from a pinned assignment file. Writes ``model.onnx``
    (each layer in its format, as the single-format recipes write it) and
    ``assignment.json`` (the reviewable choice, with each layer's size and sensitivity)."""
    import onnx

    from pipeline.schemes import mixed

    # A CNN is pre-processed as the int8 recipe does (BatchNorm folded into the convs int8
    # may take); other models are not: the pre-processing fuses MatMul + Add into Gemm,
    # which the MatMul formats (block-wise, fp8, posit8) do not take.
    graph = onnx.load(str(model_path), load_external_data=False).graph
    if any(node.op_type == "Conv" for node in graph.node):
        model, external = _load_preprocessed(model_path, out_dir)
    else:
        model, external = _load_source(model_path)
    mixed.name_matmuls(model)
    feeds = calibration_samples(config.inputs, config.samples, config.seed, config.data_dir,
                                config.ranges)
    formats = config.formats or mixed.DEFAULT_FORMATS
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        int8 = mixed.Int8Static(feeds, Path(scratch), config.activation_type,
                                config.weight_type, config.per_channel, config.method)
        if config.assignment:
            assignment = mixed.read_assignment(Path(config.assignment), model)
            layers, steps, how = mixed.layers_of(model), [], f"pinned: {config.assignment}"
        else:
            found = mixed.search(model, feeds, formats, config.budget_min, config.symmetric,
                                 Path(config.latency_logs) if config.latency_logs else None,
                                 int8)
            assignment, layers, steps = found.assignment, found.layers, found.steps
            how = f"searched over {', '.join(formats)} (fp32 the last resort)"
        quantized = mixed.apply(model, assignment, config.symmetric, int8)
    achieved = mixed.model_cosine(quantized, model, feeds)
    mixed.write_assignment(out_dir / "assignment.json", assignment, config.budget_min, layers,
                           config.symmetric)
    fp32_bytes = sum(layer.bytes("fp32", config.symmetric) for layer in layers)
    est_ms = sum(layer.seconds[assignment[layer.node]][0] for layer in layers
                 if layer.seconds) * 1e3
    chosen_bytes = sum(layer.bytes(assignment[layer.node], config.symmetric)
                       for layer in layers)
    report = {"op_counts": _op_counts(quantized), "assignment": how,
              "budget": {"metric": "cosine", "min": config.budget_min},
              "cosine_vs_fp32": achieved, "meets_budget": achieved >= config.budget_min,
              "formats": dict(sorted(Counter(assignment.values()).items())),
              "weight_bytes": {"chosen": chosen_bytes, "fp32": fp32_bytes},
              # a ranking, not a prediction: records are timed cold, estimates are rough
              "layer_ms_sum": round(est_ms, 4),
              "layers": [{"node": layer.node, "op": layer.op, "k": layer.k, "n": layer.n,
                          "format": assignment[layer.node],
                          "bytes": layer.bytes(assignment[layer.node], config.symmetric),
                          "ms": {f: round(t * 1e3, 4) for f, (t, _) in layer.seconds.items()},
                          "ms_source": {f: src for f, (_, src) in layer.seconds.items()},
                          "sensitivity": layer.sensitivity} for layer in layers],
              "search_steps": steps, "external_data": external}
    print(f"quantize: mixed: {report['formats']}, cosine to fp32 {achieved:.6f} (budget "
          f"{config.budget_min}), weights {chosen_bytes / 2**20:.1f} MiB of "
          f"{fp32_bytes / 2**20:.1f} MiB fp32", flush=True)
    _save(quantized, out_dir, external)
    return report


def _weight_codes8(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """8-bit float-like weight-only formats (``fp8_e4m3``, ``posit8``): every MatMul with a
    constant 2-D float32 weight (except ``exclude_nodes``) gets its weight as 8-bit codes with
    a float32 scale per output channel (or per tensor), in the format's ONNX form
    (:func:`pipeline.schemes.codes8.quantize_matmul_weight`), so onnxruntime computes with
    exactly the weights TVM keeps. No calibration. Convs and Gemms stay float32 (listed).
    fp8 raises the model to opset 21 (float8 DequantizeLinear needs 19)."""
    from onnx import TensorProto

    from pipeline.schemes import codes8

    model, external = _load_source(model_path)
    _check_selection(model_path, config, model.graph)
    inits = {i.name: i for i in model.graph.initializer}
    for index, node in enumerate(model.graph.node):  # the layers are found by name
        if node.op_type == "MatMul" and not node.name:
            node.name = f"{node.output[0]}.MatMul{index}"
    targets = [n.name for n in model.graph.node
               if n.op_type == "MatMul" and n.name not in config.exclude_nodes
               and n.input[1] in inits and inits[n.input[1]].data_type == TensorProto.FLOAT
               and len(inits[n.input[1]].dims) == 2]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"{model_path}: MatMul nodes need unique names for the "
                          f"{config.weight_format} recipe; rename the duplicates")
    if not targets:
        raise ConfigError(f"{model_path}: no MatMul with a constant weight to quantize (the "
                          f"{config.weight_format} scheme quantizes MatMul weights); use fp32 "
                          "or int8 for this model")
    opset = codes8.ensure_opset(model, config.weight_format)
    layers = [codes8.quantize_matmul_weight(model, name, config.weight_format,
                                            config.per_channel) for name in targets]
    kept = sorted(f"{n.op_type} {n.name or n.output[0]}" for n in model.graph.node
                  if n.op_type in ("MatMul", "Gemm", "Conv")
                  and n.name not in targets)
    report = {"op_counts": _op_counts(model), "quantized_matmuls": len(layers),
              "format": config.weight_format, "opset": opset, "external_data": external,
              "scales": "per output channel" if config.per_channel else "per tensor",
              "float_layers_left": kept,
              "float_layers_why": "Conv and Gemm weights stay float32 (not in these formats' "
                                  "scope); MatMuls left have computed or excluded weights"}
    _save(model, out_dir, external)
    return report


# What dynamic quantization takes: onnxruntime's dynamic quantizer has an integer form for
# MatMul only among these (Gemm is rewritten to MatMul + Add first); its Conv form
# (ConvInteger) has no converter in TVM 0.27 (FACTS.md), its Gather/Attention/LSTM forms
# compute in float or are contrib ops.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")


def _dynamic_int8(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """onnxruntime ``quantize_dynamic``: each MatMul (and Gemm) with a constant weight gets
    its weight as int8 (or uint8) codes with a scale per output channel (or per tensor), and
    its input quantized at run time by ``DynamicQuantizeLinear`` (uint8, scale and zero
    point from the tensor's min/max) into a ``MatMulInteger`` whose int32 result is scaled
    back to float32. No calibration. MatMuls of two activations (attention) stay float32
    (``MatMulConstBOnly``, onnxruntime's dynamic default). A Gemm is first written as MatMul
    + Add (alpha, beta and transB folded into the constants), which onnxruntime's dynamic
    quantizer takes and fuses back into one kernel with the bias."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.frontend import onnx_normalize

    op_types = tuple(config.op_types) or DYNAMIC_OP_TYPES
    unsupported = sorted(set(op_types) - set(DYNAMIC_OP_TYPES))
    if unsupported:
        raise ConfigError(f"op_types: {', '.join(unsupported)} cannot be quantized dynamically "
                          f"here (allowed: {', '.join(DYNAMIC_OP_TYPES)}; Conv becomes "
                          "ConvInteger, which TVM cannot import: use the int8 scheme for "
                          "convolutions)")
    model, external = _load_source(model_path)
    _check_selection(model_path, replace(config, op_types=op_types), model.graph)
    gemms = _gemm_to_matmul(model, config.exclude_nodes) if "Gemm" in op_types else []
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        # given as a file, not a ModelProto: onnxruntime would serialize the proto whole,
        # which fails past protobuf's 2 GiB for a model with external data
        source = Path(scratch) / "source.onnx"
        onnx_normalize.save_model(model, source, external)
        quantized = Path(scratch) / "quantized.onnx"
        quantize_dynamic(str(source), str(quantized), op_types_to_quantize=["MatMul"],
                         per_channel=config.per_channel,
                         weight_type=qtype[config.weight_type],
                         nodes_to_exclude=list(config.exclude_nodes) or None,
                         use_external_data_format=external)
        model = onnx_normalize.load_inline(quantized)
    integer = [n.name or n.output[0] for n in model.graph.node if n.op_type == "MatMulInteger"]
    if not integer:
        raise ConfigError(f"{model_path}: no MatMul or Gemm with a constant weight to quantize "
                          "(int8_dynamic quantizes layers with constant weights); use fp32 or "
                          "int8 for this model")
    left = sorted(f"{n.op_type} {n.name or n.output[0]}" for n in model.graph.node
                  if n.op_type in ("MatMul", "Gemm", "Conv"))
    report = {"op_counts": _op_counts(model), "quantized_matmuls": len(integer),
              "gemms_as_matmul": gemms, "float_layers_left": left,
              "float_layers_why": "MatMuls of two activations (attention) and excluded nodes "
                                  "stay float32",
              "weights": f"{config.weight_type}, "
                         + ("per output channel" if config.per_channel else "per tensor"),
              "activations": "uint8, per tensor, quantized at run time",
              "external_data": external}
    _save(model, out_dir, external)
    return report


def _gemm_to_matmul(model, exclude: tuple[str, ...]) -> list[str]:
    """Each Gemm with a constant 2-D weight (``transA`` 0) -> MatMul (its name kept, so
    ``exclude_nodes`` still names it) + Add of the bias, in place: ``alpha`` and ``transB``
    folded into the weight, ``beta`` into the bias. Returns the names of the Gemms
    rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done, nodes = [], []
    for index, node in enumerate(graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in exclude or attrs.get("transA", 0)
                or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2
                or (len(node.input) > 2 and node.input[2]
                    and node.input[2] not in inits)):
            nodes.append(node)
            continue
        name = node.name or f"{node.output[0]}.Gemm{index}"
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
        weight = f"{name}.weight"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), weight))
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight],
                                      [f"{out}.matmul" if has_bias else out], name=name))
        if has_bias:
            c = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            bias = f"{name}.bias"
            graph.initializer.append(numpy_helper.from_array(
                c * np.float32(attrs.get("beta", 1.0)), bias))
            nodes.append(helper.make_node("Add", [f"{out}.matmul", bias], [out],
                                          name=f"{name}/bias"))
        done.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return done


# How a scheme's ONNX is quantized: pipeline.schemes names a key of this table.
RECIPES = {
    "static_qdq": _static_qdq,
    "matmul_nbits": _matmul_nbits,
    "float16": _float16,
    "bfloat16_weights": _bfloat16_weights,
    "mixed": _mixed,
    "weight_codes8": _weight_codes8,
    "dynamic_int8": _dynamic_int8,
}
