"""Command-line options of the doit tasks (``doit build:x target=cpu tune=missing ...``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import ConfigError
from pipeline.core.spec import CPU_FP32_LAYOUTS

TUNE_MODES = ("off", "missing", "extend")


@dataclass(frozen=True)
class Options:
    """Command-line choices (``doit build:x target=cpu tune=missing trials=32``)."""

    target: str = "cpu"
    tune: str = "missing"  # off | missing | extend
    trials: int | None = None  # overrides the spec's trials_per_task
    tune_minutes: float | None = None  # overrides the spec's wall_seconds
    rpc: str = ""  # host:port:device_key of a TVM RPC tracker for measurement
    layout: str = ""  # overrides the spec's fp32 conv layout on CPUs (NHWC | NCHW16c)
    threads: int | None = None  # bench threads (default: every core of this machine)
    warmup: int = 5
    repeat: int = 30

    def validate(self) -> None:
        """Collect every bad option into one ConfigError."""
        from pipeline.core.targets import TARGETS

        problems = []
        if self.target not in TARGETS:
            problems.append(f"target={self.target}: known targets are {', '.join(TARGETS)}")
        if self.tune not in TUNE_MODES:
            problems.append(f"tune={self.tune}: use one of {', '.join(TUNE_MODES)}")
        if self.trials is not None and self.trials < 1:
            problems.append(f"trials={self.trials}: must be >= 1")
        if self.layout and self.layout not in CPU_FP32_LAYOUTS:
            problems.append(f"layout={self.layout}: use one of {', '.join(CPU_FP32_LAYOUTS)}")
        if self.rpc and len(self.rpc.split(":")) != 3:
            problems.append(f"rpc={self.rpc}: use host:port:device_key")
        if problems:
            raise ConfigError("bad command-line option(s):\n  - " + "\n  - ".join(problems))
