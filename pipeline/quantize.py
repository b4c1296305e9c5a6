"""Stage ``quantize``: fp32 ONNX -> QDQ ONNX with onnxruntime's static quantizer.

u8 activations x s8 per-channel weights by default (what VNNI multiplies). Calibration
reads a folder of ``.npy`` samples or makes seeded synthetic ones, in a fixed order, so the
same inputs give the same scales and the same bytes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, CorruptInputError


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


def calibration_samples(inputs, samples: int, seed: int, data_dir: str) -> list[dict]:
    """Calibration (or validation) feeds: ``.npy`` files from ``data_dir`` or seeded N(0,1).

    With one model input, each ``.npy`` file is one sample; with several, ``data_dir`` holds
    one subfolder per input name. Files are read in sorted order (determinism).
    """
    if not data_dir:
        rng = np.random.default_rng(seed)
        return [{name: rng.standard_normal(shape).astype(dtype) for name, shape, dtype in inputs}
                for _ in range(samples)]
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"calibration data_dir {root} does not exist: create it with .npy "
                          "files (one sample each) or set data_dir = \"\" for synthetic data")
    feeds: list[dict] = []
    per_input = {}
    for name, shape, dtype in inputs:
        folder = root if len(inputs) == 1 else root / name
        files = sorted(folder.glob("*.npy"))[:samples]
        if not files:
            raise ConfigError(f"no .npy files for input {name!r} in {folder}")
        arrays = []
        for f in files:
            try:
                a = np.load(f, allow_pickle=False)
            except Exception as e:
                raise CorruptInputError(f"cannot read calibration sample {f}: {e}") from None
            if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
                raise ConfigError(f"calibration sample {f}: shape {a.shape} {a.dtype}, "
                                  f"expected {tuple(shape)} {dtype}")
            arrays.append(a)
        per_input[name] = arrays
    count = min(len(v) for v in per_input.values())
    for i in range(count):
        feeds.append({name: per_input[name][i] for name in per_input})
    return feeds


def run(model_path: Path, config: QuantizeConfig, out_dir: Path) -> dict:
    """Write ``out_dir/model.onnx``, the QDQ model."""
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
