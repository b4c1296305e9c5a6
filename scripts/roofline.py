#!/usr/bin/env python3
"""Roofline report: this machine's measured fp32/int8 peak, and each kernel of built CPU
artifacts in GFLOP/s (GOP/s), share of model time and % of that peak.

    python scripts/roofline.py                                   # resnet50_fp32 and _int8
    python scripts/roofline.py --artifacts resnet50_int8 --top 30 --json roofline.json
    python scripts/roofline.py --peak-only
    python scripts/roofline.py --no-onnxruntime      # without the per-layer onnxruntime table

Build the artifacts first (`doit build:resnet50_fp32 tune=off`). The measuring code is
pipeline/runtime/roofline.py (peak probe: pipeline/runtime/peak_probe.cc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipeline.core.targets import cpu_identity, num_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="resnet50_fp32,resnet50_int8",
                        help="comma-separated built CPU artifacts")
    parser.add_argument("--threads", type=int, default=num_threads(),
                        help="threads of the model run and of the peak it is held against")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per artifact")
    parser.add_argument("--repeat", type=int, default=5, help="profiled model runs")
    parser.add_argument("--peak-only", action="store_true")
    parser.add_argument("--no-onnxruntime", action="store_true",
                        help="skip the per-layer comparison with onnxruntime")
    parser.add_argument("--json", type=Path, help="also write everything here")
    args = parser.parse_args()
    # before TVM starts its thread pool
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from pipeline.core.errors import PipelineError
    from pipeline.runtime import roofline

    try:
        peaks = roofline.measure_peak(threads=sorted({1, args.threads}))
        print(f"{cpu_identity()}: measured peak\n\n{roofline.format_peaks(peaks)}\n")
        reports = {}
        after = peaks
        if not args.peak_only:
            for name in [a for a in args.artifacts.split(",") if a]:
                compile_dir, module_json = roofline.artifact_dirs(REPO / "artifacts", name)
                onnx_model = (None if args.no_onnxruntime
                              else roofline.reference_onnx(REPO / "artifacts", name))
                reports[name] = roofline.artifact_roofline(compile_dir, module_json, peaks,
                                                           args.threads, args.repeat,
                                                           onnx_model)
                print(roofline.format_report(name, reports[name], args.top) + "\n")
            after = roofline.measure_peak(threads=sorted({1, args.threads}))
            drift = roofline.peak_drift(peaks, after)
            print(f"peak re-measured after the profiles:\n\n{roofline.format_peaks(after)}\n")
            if drift > 0.2:
                print(f"WARNING: the measured peak changed by {100 * drift:.0f}% during this "
                      "run (a busy shared machine): the % of peak above is approximate; "
                      "compare kernels with each other, or rerun on a quiet machine")
    except PipelineError as error:
        sys.exit(f"error: {error}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_identity(),
                                         "peaks": [asdict(p) for p in peaks],
                                         "peaks_after": [asdict(p) for p in after],
                                         "artifacts": reports}, indent=2) + "\n")


if __name__ == "__main__":
    main()
