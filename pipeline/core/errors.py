"""The pipeline's small error hierarchy: every message says what, which value, and what to do."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose (bad input, failed stage)."""


class ConfigError(PipelineError, ValueError):
    """A model spec, option or command-line value is wrong."""


class UnsupportedModelError(PipelineError, NotImplementedError):
    """The model uses something the pipeline (or TVM) cannot compile."""


class CorruptInputError(PipelineError):
    """An input file (ONNX model, tuning log, .npy) cannot be read."""


class ValidationFailed(PipelineError):
    """An artifact failed a validation gate."""


class StageFailed(PipelineError):
    """A stage's tool failed; carries where to look."""

    def __init__(self, stage: str, message: str, artifact_dir: Path | None = None,
                 log_path: Path | None = None) -> None:
        self.stage = stage
        self.artifact_dir = artifact_dir
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"stage '{stage}' failed: {message}{where}")


def collect(problems: list[str], exc_type: type[PipelineError], header: str) -> None:
    """Raise ``exc_type`` once listing every problem, or return if there are none."""
    if problems:
        raise exc_type(header + "\n  - " + "\n  - ".join(problems))
