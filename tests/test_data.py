"""Input data: synthetic tensors honour the spec's ranges; data folders in each layout."""

import numpy as np
import pytest

from pipeline.core.errors import ConfigError
from pipeline.runtime.data import calibration_samples

TOKENS = (("ids", (1, 64), "int64"), ("mask", (1, 64), "int64"))


def test_synthetic_ids_cover_the_range_and_stay_inside_it():
    feeds = calibration_samples(TOKENS, 4, 0, "", {"ids": (0, 30521)})
    ids = np.concatenate([f["ids"].ravel() for f in feeds])
    assert ids.min() >= 0 and ids.max() <= 30521 and ids.max() > 1000  # the vocabulary
    mask = np.concatenate([f["mask"].ravel() for f in feeds])
    assert set(mask) <= {0, 1}  # no range: 0/1, valid for masks and ids alike
    floats = calibration_samples((("x", (1000,), "float32"),), 1, 0, "", {"x": (2, 3)})[0]["x"]
    assert floats.min() >= 2 and floats.max() <= 3


def test_one_npz_per_sample(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", ids=np.full((1, 64), i, np.int64),
                 mask=np.ones((1, 64), np.int64))
    feeds = calibration_samples(TOKENS, 2, 0, str(tmp_path), {"ids": (0, 10)})
    assert [int(f["ids"][0, 0]) for f in feeds] == [0, 1]


def test_data_outside_the_range_or_missing_an_input_is_refused(tmp_path):
    np.savez(tmp_path / "s0.npz", ids=np.full((1, 64), 99, np.int64),
             mask=np.ones((1, 64), np.int64))
    with pytest.raises(ConfigError, match=r"input 'ids' has values in \[99, 99\], outside "
                                          r"its spec range \[0, 10\]"):
        calibration_samples(TOKENS, 1, 0, str(tmp_path), {"ids": (0, 10)})
    np.savez(tmp_path / "s0.npz", ids=np.zeros((1, 64), np.int64))
    with pytest.raises(ConfigError, match="no array for input.*mask"):
        calibration_samples(TOKENS, 1, 0, str(tmp_path))


def test_one_subfolder_per_input(tmp_path):
    for name in ("ids", "mask"):
        (tmp_path / name).mkdir()
        for i in range(2):  # same file names in both folders
            np.save(tmp_path / name / f"{i}.npy", np.full((1, 64), i, np.int64))
    feeds = calibration_samples(TOKENS, 4, 0, str(tmp_path))
    assert len(feeds) == 2 and int(feeds[1]["mask"][0, 0]) == 1
    np.save(tmp_path / "ids" / "2.npy", np.zeros((1, 8), np.int64))
    with pytest.raises(ConfigError, match=r"input 'ids' is int64 \[1, 8\], expected int64 "
                                          r"\[1, 64\]"):
        calibration_samples(TOKENS[:1], 4, 0, str(tmp_path / "ids"))  # one input
