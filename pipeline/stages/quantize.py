"""Stage ``quantize``: fp32 ONNX -> QDQ ONNX with onnxruntime's static quantizer.

u8 activations x s8 per-channel weights by default (what VNNI multiplies). Calibration
reads a folder of ``.npy`` samples or makes seeded synthetic ones, in a fixed order, so the
same inputs give the same scales and the same bytes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
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
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_selection(model_path, config)
    feeds = calibration_samples(config.inputs, config.samples, config.seed, config.data_dir,
                                config.ranges)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    out = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        # Pre-processing fuses Conv+BatchNorm and infers shapes, as onnxruntime recommends.
        pre = Path(scratch) / "preprocessed.onnx"
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=qtype[config.activation_type], weight_type=qtype[config.weight_type],
            per_channel=config.per_channel, calibrate_method=method,
            op_types_to_quantize=list(config.op_types) or None,
            nodes_to_exclude=list(config.exclude_nodes) or None,
            extra_options={"CalibTensorRangeSymmetric": False})
    import onnx

    model = onnx.load(str(out))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"calibration_samples": len(feeds), "op_counts": dict(sorted(counts.items()))}


def _check_selection(model_path: Path, config: QuantizeConfig) -> None:
    """ConfigError for a selection onnxruntime would silently ignore: op types none of which
    the model has (nothing would be quantized), node names it does not have. Op types the
    model lacks among others are fine: ["MatMul", "Gemm"] suits every transformer."""
    import onnx

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
    import logging

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from pipeline.schemes.blockwise import round_scales_to_float16

    model = onnx.load(str(model_path))
    _check_selection(model_path, config)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=config.bits, block_size=config.block_size,
        is_symmetric=config.symmetric, accuracy_level=config.accuracy_level or None,
        nodes_to_exclude=list(config.exclude_nodes))
    quantizer.process()
    model = quantizer.model.model
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise ConfigError(f"{model_path}: no MatMul with a constant weight to quantize (the "
                          f"{config.bits}-bit weight-only schemes quantize MatMul weights); "
                          "use fp32 or int8 for this model")
    scales = {n.input[2] for n in nodes}
    for init in model.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(
                round_scales_to_float16(numpy_helper.to_array(init)), init.name))
    onnx.save(model, str(out_dir / "model.onnx"))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    # what stays float: MatMuls with a computed weight (attention), Gemm, excluded nodes
    left = sorted(n.name or n.op_type for n in model.graph.node
                  if n.op_type in ("MatMul", "Gemm"))
    return {"op_counts": dict(sorted(counts.items())), "quantized_matmuls": len(nodes),
            "float_matmuls_left": left,
            "scales": "rounded to float16 values (each moves by <= 2**-11 relative)"}


# How a scheme's ONNX is quantized: pipeline.schemes names a key of this table.
RECIPES = {
    "static_qdq": _static_qdq,
    "matmul_nbits": _matmul_nbits,
}
