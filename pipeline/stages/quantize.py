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

    from pipeline.frontend import onnx_normalize

    # A source written with ONNX external data (given so, or past 1 GiB) stays so here.
    external = onnx_normalize.data_path(model_path).is_file()
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    out = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        # Pre-processing fuses Conv+BatchNorm and infers shapes, as onnxruntime recommends.
        pre = Path(scratch) / "preprocessed.onnx"
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True,
                          save_as_external_data=external, all_tensors_to_one_file=True,
                          external_data_location=pre.name + ".data")
        quantize_static(
            str(pre), str(Path(scratch) / "quantized.onnx"), Reader(),
            quant_format=QuantFormat.QDQ, use_external_data_format=external,
            activation_type=qtype[config.activation_type], weight_type=qtype[config.weight_type],
            per_channel=config.per_channel, calibrate_method=method,
            op_types_to_quantize=list(config.op_types) or None,
            nodes_to_exclude=list(config.exclude_nodes) or None,
            extra_options={"CalibTensorRangeSymmetric": False})
        # Written again by the pipeline: the same external-data layout as the source's
        # (model.onnx.data, its sha256 in model.onnx), and nothing of the scratch names.
        model = onnx_normalize.load_inline(Path(scratch) / "quantized.onnx")
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    onnx_normalize.save_model(model, out, external)
    return {"calibration_samples": len(feeds), "op_counts": dict(sorted(counts.items())),
            "external_data": external}


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


# How a scheme's ONNX is quantized: pipeline.schemes names a key of this table.
RECIPES = {
    "static_qdq": _static_qdq,
}
