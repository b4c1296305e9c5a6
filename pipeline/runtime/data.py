"""Input data for running a model: seeded synthetic tensors or ``.npy`` files from a folder.

Calibration (quantize), validation and bench all draw their feeds here, so the same spec
settings give the same inputs in every stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError, CorruptInputError


def synthetic_tensor(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """One seeded synthetic tensor: N(0, 1) for floats; 0 or 1 for integers.

    Integer inputs of the models people bring are token ids, attention masks and segment
    ids: 0 and 1 are valid values of every one of them, where N(0, 1) cast to int gives
    negative indices and the full int range out-of-range ids (onnxruntime rejects those,
    the compiled model reads out of bounds). Give a ``data_dir`` for realistic ids.
    """
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def calibration_samples(inputs, samples: int, seed: int, data_dir: str) -> list[dict]:
    """Calibration (or validation) feeds: ``.npy`` files from ``data_dir`` or seeded N(0,1).

    With one model input, each ``.npy`` file is one sample; with several, ``data_dir`` holds
    one subfolder per input name. Files are read in sorted order (determinism).
    """
    if not data_dir:
        rng = np.random.default_rng(seed)
        return [{name: synthetic_tensor(rng, shape, dtype) for name, shape, dtype in inputs}
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


def seeded_input(shape, dtype: str, seed: int) -> np.ndarray:
    """One synthetic tensor from its own seed (see :func:`synthetic_tensor`)."""
    return synthetic_tensor(np.random.default_rng(seed), shape, dtype)
