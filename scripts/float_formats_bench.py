"""fp32 vs fp16 vs bf16 on one MatMul stack (batch 1, one row): model.so size and latency of
TVM (untuned: naive loops) and onnxruntime on the same ONNX, in one run.

    TVM_NUM_THREADS=2 python scripts/float_formats_bench.py [--hidden 1024 --layers 4]

Set TVM_NUM_THREADS before starting: TVM sizes its pool when its runtime starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def _median_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != str(args.threads):
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import onnxruntime as ort
    import tvm
    from float_models import build_in_process, tiny_mlp
    from tvm import relax

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                 if line.startswith("Model name")), "?")
    print(f"CPU: {name}; {args.threads} threads; MatMul stack {args.layers} x "
          f"{args.hidden}x{args.hidden} + Gemm, batch 1; TVM untuned (naive loops)")
    model = tiny_mlp(hidden=args.hidden, layers=args.layers)
    x = np.random.default_rng(0).standard_normal((1, args.hidden)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("fp32", "fp16", "bf16"):
            built = build_in_process(model, scheme, (1, args.hidden), Path(tmp) / scheme)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(built["onnx"]), options,
                                           providers=["CPUExecutionProvider"])
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(built["so"])), tvm.cpu())
            inp = tvm.runtime.tensor(x)
            tvm_ms = _median_ms(lambda: vm["main"](inp), 3, args.repeat)
            ort_ms = _median_ms(lambda: session.run(None, {"x": x}), 3, args.repeat)
            rows.append((scheme, built["so"].stat().st_size / 1e6,
                         built["onnx"].stat().st_size / 1e6, tvm_ms, ort_ms))
    print("| scheme | model.so MB | ONNX MB | TVM ms (untuned) | onnxruntime ms | ratio |")
    print("|---|---|---|---|---|---|")
    for scheme, so_mb, onnx_mb, tvm_ms, ort_ms in rows:
        print(f"| {scheme} | {so_mb:.2f} | {onnx_mb:.2f} | {tvm_ms:.3f} | {ort_ms:.3f} | "
              f"{tvm_ms / ort_ms:.2f} |")


if __name__ == "__main__":
    main()
