#!/usr/bin/env python3
"""Where the time goes: per-kernel profile of a built CPU artifact, measured inside the model.

Runs ``model.so`` in the Relax VM with an instrument timing every kernel call (2 threads by
default, a few warm-up runs, then the median of ``--repeat`` runs per kernel) and prints
kernels grouped by name, heaviest first, with their share of the total. Tuning estimates
(tune_report.json) time one kernel at a time with hot caches; this is the model as it runs.

    TVM_NUM_THREADS=2 python scripts/profile_kernels.py --artifact resnet50_fp32 --top 15
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="resnet50_fp32")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the full table here")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    from pipeline.runtime.profile import profile_kernels

    compiled = REPO / "artifacts" / args.artifact / "cpu" / "compile"
    if not (compiled / "model.so").exists():
        sys.exit(f"error: {compiled}/model.so not found: run `doit build:{args.artifact}` first")
    table = profile_kernels(compiled, repeat=args.repeat)
    total = sum(k.us for k in table)
    print(f"{args.artifact}: {total / 1000:.1f} ms in {len(table)} kernels (median of "
          f"{args.repeat} profiled runs, {os.environ['TVM_NUM_THREADS']} threads)")
    for k in table[:args.top]:
        print(f"  {k.us / 1000:7.2f} ms {100 * k.us / total:5.1f}%  {k.name}")
    if args.json:
        args.json.write_text(json.dumps({"total_us": total,
                                         "kernels": [[k.name, k.us] for k in table]},
                                        indent=2))


if __name__ == "__main__":
    main()
