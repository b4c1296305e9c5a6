"""Input data for running a model: seeded synthetic tensors or sample files from a folder.

Calibration (quantize), validation, smoke and bench all draw their feeds here, so the same spec
settings give the same inputs in every stage.

A data folder holds, for a model with one input, one ``.npy`` file per sample; for any
model, one ``.npz`` file per sample whose arrays are named after the model's inputs (its ONNX
names); or, for several inputs, one subfolder per input name with one ``.npy`` per sample
(the i-th files, in sorted order, make the i-th sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError, CorruptInputError


def file_stems(names) -> dict[str, str]:
    """A file-name-safe, distinct stem for each tensor name: ONNX names may hold ``/`` or
    ``:`` (the zoo's ``gpu_0/data_0``), which would point into folders that do not exist."""
    import re

    stems: dict[str, str] = {}
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "tensor"
        while stem in stems.values():
            stem += "_"
        stems[name] = stem
    return stems


def synthetic_tensor(rng: np.random.Generator, shape, dtype: str,
                     value_range: tuple = ()) -> np.ndarray:
    """One seeded synthetic tensor: N(0, 1) for floats; 0 or 1 for integers; uniform over
    ``value_range`` (both ends included) when the spec gives the input one.

    Integer inputs of the models people bring are token ids, attention masks and segment
    ids: 0 and 1 are valid values of every one of them, where N(0, 1) cast to int gives
    negative indices and the full int range out-of-range ids (onnxruntime rejects those,
    the compiled model reads out of bounds). A range (``range = [0, 30521]``) makes ids
    that use the whole vocabulary.
    """
    floating = np.dtype(dtype).kind == "f"
    if value_range:
        lo, hi = value_range
        if floating:
            return rng.uniform(lo, hi, size=shape).astype(dtype)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    if floating:
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def check_range(name: str, array: np.ndarray, value_range: tuple, where: str) -> None:
    """ConfigError if ``array`` has values outside the input's ``value_range``."""
    if not value_range or array.size == 0:
        return
    lo, hi = value_range
    low, high = array.min(), array.max()
    if low < lo or high > hi:
        raise ConfigError(f"{where}: input {name!r} has values in [{low}, {high}], outside its "
                          f"spec range [{lo}, {hi}]; fix the data or the spec's range")


def calibration_samples(inputs, samples: int, seed: int, data_dir: str,
                        ranges: Mapping[str, tuple] | None = None) -> list[dict]:
    """Calibration (or validation) feeds: sample files from ``data_dir`` or seeded synthetic.

    ``inputs`` are ``(name, shape, dtype)``; ``ranges`` maps input names to their spec's
    ``(lo, hi)``. Files are read in sorted order (determinism); see the module docstring for
    the folder layouts.
    """
    ranges = ranges or {}
    if not data_dir:
        rng = np.random.default_rng(seed)
        return [{name: synthetic_tensor(rng, shape, dtype, ranges.get(name, ()))
                 for name, shape, dtype in inputs} for _ in range(samples)]
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"data_dir {root} does not exist: create it with one .npz file per "
                          "sample (arrays named after the inputs) or, for one input, one .npy "
                          "file per sample; or set data_dir = \"\" for synthetic data")
    archives = sorted(root.glob("*.npz"))[:samples]
    feeds = (_npz_samples(archives, inputs) if archives else
             _npy_samples(root, inputs, samples))
    for i, feed in enumerate(feeds):
        for name, shape, dtype in inputs:
            a = feed[name]
            if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
                raise ConfigError(f"{data_dir} sample {i}: input {name!r} is {a.dtype} "
                                  f"{list(a.shape)}, expected {dtype} {list(shape)}")
            check_range(name, a, ranges.get(name, ()), f"{data_dir} sample {i}")
    return feeds


def _load(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise CorruptInputError(f"cannot read data sample {path}: {e}") from None


def _npz_samples(archives: list[Path], inputs) -> list[dict]:
    feeds = []
    for path in archives:
        with _load(path) as npz:
            missing = [name for name, _, _ in inputs if name not in npz.files]
            if missing:
                raise ConfigError(f"data sample {path} has no array for input(s) "
                                  f"{', '.join(missing)} (it holds {', '.join(npz.files)}); "
                                  "name each array after the ONNX input it feeds")
            feeds.append({name: npz[name] for name, _, _ in inputs})
    return feeds


def _npy_samples(root: Path, inputs, samples: int) -> list[dict]:
    per_input = {}
    for name, _, _ in inputs:
        folder = root if len(inputs) == 1 else root / name
        files = sorted(folder.glob("*.npy"))[:samples]
        if not files:
            hint = ("" if len(inputs) == 1 else
                    "; a model with several inputs takes one .npz per sample (arrays named "
                    "after the inputs) or one subfolder per input")
            raise ConfigError(f"no .npy files for input {name!r} in {folder}{hint}")
        per_input[name] = [_load(f) for f in files]
    count = min(len(v) for v in per_input.values())
    return [{name: per_input[name][i] for name in per_input} for i in range(count)]


def seeded_input(shape, dtype: str, seed: int, value_range: tuple = ()) -> np.ndarray:
    """One synthetic tensor from its own seed (see :func:`synthetic_tensor`)."""
    return synthetic_tensor(np.random.default_rng(seed), shape, dtype, value_range)
