"""Run the real dodo.py in a project dir, as a user would, and read what doit did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class DoitRun:
    returncode: int
    output: str

    @property
    def executed(self) -> set[str]:
        """Tasks doit ran (``.  name``), as opposed to found up to date (``-- name``)."""
        return set(re.findall(r"^\.  (\S+)", self.output, re.M))

    @property
    def up_to_date(self) -> set[str]:
        return set(re.findall(r"^-- (\S+)", self.output, re.M))

    @property
    def built(self) -> set[str]:
        """Stages that really produced a new output (not reused from the store)."""
        return set(re.findall(r"^(\w+): built ", self.output, re.M))

    @property
    def reused(self) -> set[str]:
        return set(re.findall(r"^(\w+): reusing verified output", self.output, re.M))


def doit_cmd(project: Path, *args: str, repo: Path = REPO) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(repo / "dodo.py"), "-d", str(project),
            *args]


def doit(project: Path, *args: str, timeout: float = 900, repo: Path = REPO) -> DoitRun:
    """Run doit in ``project`` with the code of ``repo`` (a temp copy, to test code changes)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(doit_cmd(project, *args, repo=repo), capture_output=True, text=True,
                          timeout=timeout, env=env)
    return DoitRun(proc.returncode, proc.stdout + proc.stderr)
