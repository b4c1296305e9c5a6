"""Stage ``quantize``: fp32 ONNX -> QDQ ONNX with onnxruntime's static quantizer.

u8 activations x s8 per-channel weights by default (what VNNI multiplies). Calibration
reads a folder of ``.npy`` samples or makes seeded synthetic ones, in a fixed order, so the
same inputs give the same scales and the same bytes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
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

    feeds = calibration_samples(config.inputs, config.samples, config.seed, config.data_dir)

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
            extra_options={"CalibTensorRangeSymmetric": False})
    import onnx

    model = onnx.load(str(out))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"calibration_samples": len(feeds), "op_counts": dict(sorted(counts.items()))}


# How a scheme's ONNX is quantized: pipeline.schemes names a key of this table.
RECIPES = {
    "static_qdq": _static_qdq,
}
