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
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="resnet50_fp32")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the full table here")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    import numpy as np
    import tvm
    from tvm import relax

    from pipeline.runtime.vm import model_weights

    compiled = REPO / "artifacts" / args.artifact / "cpu" / "compile"
    if not (compiled / "model.so").exists():
        sys.exit(f"error: {compiled}/model.so not found: run `doit build:{args.artifact}` first")
    io = json.loads((compiled / "io.json").read_text())
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled / "model.so")), dev)
    rng = np.random.default_rng(0)
    inputs = [tvm.runtime.tensor(rng.standard_normal(i["shape"]).astype(i["dtype"]), dev)
              for i in io["inputs"]]
    inputs += model_weights(compiled / "model.so", dev)  # model.params: after the inputs
    for _ in range(3):
        vm["main"](*inputs)

    # The VM calls the instrument before and after every kernel call: time between the two.
    calls: dict[str, float] = {}
    started: list[float] = []

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            started.append(time.perf_counter())
        else:
            calls[name] = calls.get(name, 0.0) + (time.perf_counter() - started.pop()) * 1e6

    vm.set_instrument(instrument)
    per_kernel: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        calls.clear()
        vm["main"](*inputs)
        for name, us in calls.items():
            per_kernel.setdefault(name, []).append(us)
    table = sorted(((name, statistics.median(v)) for name, v in per_kernel.items()),
                   key=lambda r: -r[1])
    total = sum(us for _, us in table)
    print(f"{args.artifact}: {total / 1000:.1f} ms in {len(table)} kernels (median of "
          f"{args.repeat} profiled runs, {os.environ['TVM_NUM_THREADS']} threads)")
    for name, us in table[:args.top]:
        print(f"  {us / 1000:7.2f} ms {100 * us / total:5.1f}%  {name}")
    if args.json:
        args.json.write_text(json.dumps({"total_us": total, "kernels": table}, indent=2))


if __name__ == "__main__":
    main()
