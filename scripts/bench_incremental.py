#!/usr/bin/env python3
"""Benchmark: a cold ``doit build:<artifact>`` against a no-op rebuild (everything up to date).

Runs in a fresh project directory (a copy of models/, committed tuning logs included) so the
cold build really starts from nothing; never tunes (``tune=off``). Prints both wall times,
their ratio and how many tasks the no-op run executed (must be 0).

    python scripts/bench_incremental.py --artifact resnet50_int8
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_doit(project: Path, *args: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="resnet50_int8")
    parser.add_argument("--keep", action="store_true", help="keep the temp project dir")
    args = parser.parse_args()
    project = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    shutil.copytree(REPO / "models", project / "models",
                    ignore=shutil.ignore_patterns("__pycache__"))
    try:
        build = (f"build:{args.artifact}", "tune=off")
        cold, _ = timed_doit(project, *build)
        noop, out = timed_doit(project, *build)
        executed = re.findall(r"^\.  (\S+)", out, re.M)
        print(f"cold build : {cold:8.2f} s")
        print(f"no-op build: {noop:8.2f} s  ({len(executed)} tasks executed"
              f"{': ' + ', '.join(executed) if executed else ''})")
        print(f"ratio      : {cold / noop:8.1f}x  (goal: no-op < 1 s and 0 tasks executed)")
        if executed:
            sys.exit("FAIL: the no-op build did work")
    finally:
        if args.keep:
            print(f"project kept in {project}")
        else:
            shutil.rmtree(project, ignore_errors=True)


if __name__ == "__main__":
    main()
