#!/usr/bin/env python3
"""One kernel of a built fp32 artifact tuned with MetaSchedule's default x86 rules and with
the register-blocked micro-kernel intrinsic (same trials, same run), timed alternately.

    python scripts/microkernel_bench.py --kernel fused_conv2d16_add9_relu7 --trials 64

The code is pipeline/tuning/microkernel.py; the intrinsic pipeline/compiler/intrinsics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipeline.core.targets import cpu_identity, num_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="resnet50_fp32")
    parser.add_argument("--kernel", default="fused_conv2d16_add9_relu7",
                        help="the lowered kernel's name (scripts/roofline.py lists them)")
    parser.add_argument("--trials", type=int, default=64, help="tuning trials per space")
    parser.add_argument("--intrinsic", default=None,
                        help="micro-kernel intrinsic name (default: avx512_fp32_fma_7x32x64)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(num_threads())  # before TVM's thread pool starts
    # builder workers are fresh interpreters: they must find this package
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

    from pipeline.compiler.kernel_flops import kernel_work
    from pipeline.core.errors import PipelineError
    from pipeline.tuning import microkernel

    try:
        func, target = microkernel.artifact_kernel(REPO / "artifacts", args.artifact,
                                                   args.kernel)
    except PipelineError as error:
        sys.exit(f"error: {error}")
    work = kernel_work(func)
    tune_dir = REPO / "artifacts" / args.artifact / "cpu" / "tune"
    results = microkernel.compare(func, target, args.trials, rounds=args.rounds,
                                  baseline_database=tune_dir if tune_dir.exists() else None,
                                  intrin_name=args.intrinsic)
    print(f"{cpu_identity()}, {num_threads()} threads, micro-kernel "
          f"{args.intrinsic or 'avx512_fp32_fma_7x32x64'}: {args.kernel} ({work.label}, "
          f"{work.flops / 1e9:.3f} GFLOP)")
    print("| schedule | trials | us (median of rounds, each the best of 30) | rounds us | "
          "GFLOP/s | "
          "micro-kernel in TIR |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rate = "-" if r.best_us is None else f"{work.flops / r.best_us / 1e3:.0f}"
        us = "no valid schedule" if r.best_us is None else f"{r.best_us:.0f}"
        rounds = ", ".join(f"{t:.0f}" for t in r.rounds_us)
        print(f"| {r.label} | {r.trials} | {us} | {rounds} | {rate} | "
              f"{'yes' if r.tensorized else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(
            {"cpu": cpu_identity(), "kernel": args.kernel, "label": work.label,
             "flops": work.flops, "results": [
                 {"label": r.label, "trials": r.trials, "us": r.best_us,
                  "rounds_us": list(r.rounds_us),
                  "tensorized": r.tensorized} for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
