#!/usr/bin/env python3
"""Layout search: tune a model's heaviest fp32 convs in NHWC and in packed NCHW16c, same trials.

Reads the fp32 import of the model (build it first: ``doit build:resnet50_fp32``), seeds from
the committed logs and the local tuning cache, tunes what is short of ``--trials`` in a
scratch database (the cache is not written), prints a table and writes
artifacts/reports/layout_search/<model>.json. See pipeline/layout_search.py.

    python scripts/layout_search.py --model resnet50 --top 4 --trials 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipeline.compiler.workloads import load_module
    from pipeline.core.targets import get_target, target_key, tvm_target
    from pipeline.tuning import layout_search

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--top", type=int, default=4, help="how many conv shapes")
    parser.add_argument("--trials", type=int, default=64, help="trials per layer and layout")
    args = parser.parse_args()

    module_json = REPO / "artifacts" / f"{args.model}_fp32" / "import" / "module.json"
    if not module_json.exists():
        sys.exit(f"error: {module_json} not found: run `doit build:{args.model}_fp32` first")
    spec = get_target("cpu")
    target = tvm_target(spec)
    key = target_key(spec)
    seeds = [REPO / "models" / "tuning_logs" / key, REPO / "artifacts" / "tuning_cache" / key]
    out = REPO / "artifacts" / "reports" / "layout_search" / f"{args.model}.json"
    rows = layout_search.search(load_module(module_json), target, seeds, args.trials,
                                args.top, out, progress=lambda s: print(s, flush=True))
    print(layout_search.summary(rows))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
