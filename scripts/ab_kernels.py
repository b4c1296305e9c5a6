#!/usr/bin/env python3
"""Per-kernel A/B of two builds of one model, or which kernels a slow minute hits hardest.

    # before/after a tuning top-up: keep the old compile dir (readlink the artifact's
    # `compile` link before rebuilding), then
    TVM_NUM_THREADS=2 python scripts/ab_kernels.py artifacts/.store/compile/<old> resnet50_int8
    # one build: the fastest third of 90 runs against the slowest third, per kernel
    TVM_NUM_THREADS=2 python scripts/ab_kernels.py resnet50_int8 --spread --runs 90

A build is an artifact name (its CPU `compile` folder) or a folder holding `model.so`,
`model.params` and `io.json`. Both builds run in one process, alternating run by run, so a
noisy minute slows both alike; whole-model A/B timings of separate processes on this
project's shared 2-core machines scattered by up to 1.5x between minutes. The measuring
code is pipeline/runtime/profile.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def compile_dir(build: str) -> Path:
    path = Path(build)
    if (path / "model.so").exists():
        return path.resolve()
    named = REPO / "artifacts" / build / "cpu" / "compile"
    if (named / "model.so").exists():
        return named.resolve()
    sys.exit(f"error: {build} is neither a folder with model.so nor a built CPU artifact "
             f"(run `doit build:{build}` first)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="build A: artifact name or compile folder")
    parser.add_argument("b", nargs="?", help="build B (leave out with --spread)")
    parser.add_argument("--spread", action="store_true",
                        help="one build: fastest vs slowest third of the runs, per kernel")
    parser.add_argument("--runs", type=int, default=40, help="model runs per build")
    parser.add_argument("--top", type=int, default=12, help="kernels listed at each end")
    args = parser.parse_args()
    if args.spread == (args.b is not None):
        parser.error("give two builds, or one with --spread")
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    from pipeline.runtime import profile

    if args.spread:
        fast, slow = profile.fast_and_slow_runs(compile_dir(args.a), runs=args.runs)
        slow_us = {k.name: k.us for k in slow}
        rows = sorted(((slow_us.get(k.name, 0.0) - k.us, k.name, k.us) for k in fast),
                      reverse=True)
        print(f"{args.a}: fastest third {sum(k.us for k in fast) / 1000:.2f} ms, slowest "
              f"third {sum(slow_us.values()) / 1000:.2f} ms in kernels ({args.runs} runs, "
              f"{os.environ['TVM_NUM_THREADS']} threads)")
        for delta, name, us in rows[:args.top]:
            print(f"  {name[:72]:72s} {us:8.0f} -> {us + delta:8.0f} us "
                  f"({(us + delta) / us if us else float('nan'):.2f}x)")
        return

    diffs = profile.compare_builds(compile_dir(args.a), compile_dir(args.b), runs=args.runs)
    total_a = sum(d.a_us or 0.0 for d in diffs)
    total_b = sum(d.b_us or 0.0 for d in diffs)
    print(f"in kernels: A {total_a / 1000:.2f} ms, B {total_b / 1000:.2f} ms "
          f"(B/A {total_b / total_a:.3f}; medians of {args.runs} alternating runs each, "
          f"{os.environ['TVM_NUM_THREADS']} threads)")
    shown = diffs if len(diffs) <= 2 * args.top else diffs[:args.top] + diffs[-args.top:]
    for d in shown:
        a = "-" if d.a_us is None else f"{d.a_us:8.0f}"
        b = "-" if d.b_us is None else f"{d.b_us:8.0f}"
        delta = (d.b_us or 0.0) - (d.a_us or 0.0)
        print(f"  {d.name[:72]:72s} {a:>8s} {b:>8s} us  {delta:+7.0f}")


if __name__ == "__main__":
    main()
