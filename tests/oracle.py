"""One comparison helper for every test that checks TVM against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_run(model_path: Path, feeds: dict[str, np.ndarray],
            quantized: bool = False) -> np.ndarray:
    """onnxruntime's first output; ``quantized``: from the int8 reference session for this
    CPU (see pipeline.runtime.ort_reference: without VNNI its fused kernels saturate)."""
    import onnxruntime as ort

    from pipeline.runtime import ort_reference

    options = ort_reference.session_options(quantized, threads=1)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_close_fp32(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """DESIGN.md's fp32 gate: max abs err <= rel * max(1, max abs ref), same top-1."""
    tol = rel * max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"
    assert np.argmax(actual) == np.argmax(expected)
