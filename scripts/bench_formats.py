"""Number formats side by side: size, latency and accuracy of every variant of some models.

For each artifact (``<model>_<variant>`` on the cpu target) this runs the real tasks
(``doit build validate bench``, with the options given, e.g. ``tune=off``), then reads what
they wrote and prints one markdown table:

- bits stored per MatMul weight (codes + scales + zero points, from the import report),
  ``model.so`` + ``model.params`` (the weights) and bundle sizes;
- latency in one run, same threads: the C++ app, onnxruntime running the very ONNX the
  artifact was validated against (fp32 for fp32, the quantized model otherwise), and for the
  block-wise schemes also onnxruntime's fastest path for the same weights (the MatMulNBits
  nodes with ``accuracy_level=4``: activations quantized to int8 per block, not the same
  arithmetic, timed here only);
- speed-up over the model's own TVM fp32 artifact, and quality against onnxruntime fp32
  (cosine, SQNR) from the validation report.

    python scripts/bench_formats.py mlp4k minilm tune=off
    python scripts/bench_formats.py mlp4k --variants fp32,w4g32 --out /tmp/formats
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _artifacts(models: list[str], variants: str | None) -> list[tuple[str, str]]:
    from pipeline.core.spec import load_spec

    out = []
    for model in models:
        spec = load_spec(REPO / "models" / f"{model}.toml")
        names = variants.split(",") if variants else list(spec.variants)
        out += [(model, v) for v in names if v in spec.variants]
    return out


def _ort_fastest(quantized_onnx: Path, feed: dict, threads: int, repeat: int) -> float | None:
    """Median ms of onnxruntime on a copy whose MatMulNBits nodes ask for accuracy_level 4."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(quantized_onnx))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return None
    for node in nodes:
        for attr in [a for a in node.attribute if a.name == "accuracy_level"]:
            node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute("accuracy_level", 4))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acc4.onnx"
        onnx.save(model, str(path))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    times = []
    for i in range(5 + repeat):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= 5:
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _feed(art_dir: Path) -> dict:
    """The bench stage's own input (``bench/input_*.npy``), keyed by ONNX input name."""
    io = json.loads((art_dir / "compile" / "io.json").read_text())
    names = [t["name"] for t in io["inputs"]]
    files = sorted((art_dir / "bench").glob("input*.npy"))
    if len(files) == 1 and len(names) == 1:
        return {names[0]: np.load(files[0])}
    return {f.stem.removeprefix("input_"): np.load(f) for f in files}


def collect(model: str, variant: str, threads: int, repeat: int) -> dict:
    name = f"{model}_{variant}"
    art = REPO / "artifacts" / name / "cpu"
    bench = json.loads((art / "bench" / "bench.json").read_text())
    validation = json.loads((art / "validate" / "validation.json").read_text())
    imported = json.loads((REPO / "artifacts" / name / "import" / "import_report.json")
                          .read_text())
    quality = next((r for r in validation["records"] if r["comparison"] in
                    ("tvm_vs_ort_fp32_quality", "tvm_int8_vs_ort_fp32",
                     "tvm_fp16_vs_ort_fp32", "tvm_bf16_vs_ort_fp32")), None)
    bundle = next(art.glob("*.tar.gz"), None)
    row = {"artifact": name, "model": model, "scheme": bench["scheme"],
           "validation": validation["status"],
           "bits_per_weight": imported.get("blockwise_bits_per_weight"),
           # the executable and its weights file (model.params) together
           "model_mb": sum(f.stat().st_size for f in (art / "model.so", art / "model.params")
                           if f.is_file()) / 2**20,
           "bundle_mb": bundle.stat().st_size / 2**20 if bundle else None,
           "cpp_ms": bench["cpp"]["median_ms"], "ort_ms": bench["onnxruntime"]["median_ms"],
           "ratio": bench["ratio"],
           "cosine": quality["metrics"]["cosine"] if quality else None,
           "sqnr_db": quality["metrics"]["sqnr_db"] if quality else None}
    quantized = REPO / "artifacts" / name / "quantize" / "model.onnx"
    if quantized.is_file():
        row["ort_fastest_ms"] = _ort_fastest(quantized, _feed(art), threads, repeat)
    return row


def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    # by model name: variant names may hold underscores (fp8_e4m3)
    fp32 = {r["model"]: r["cpp_ms"] for r in rows if r["scheme"] == "fp32"}
    lines = ["| artifact | bits/weight | model.so + params MB | bundle MB | C++ ms | "
             "onnxruntime ms "
             "(same ONNX) | ratio | onnxruntime acc-4 ms | vs TVM fp32 | cosine vs fp32 | "
             "SQNR dB | validate |", "|" + "---|" * 12]
    for r in rows:
        base = fp32.get(r["model"])
        speedup = f"{base / r['cpp_ms']:.2f}x" if base else "-"
        lines.append(
            f"| {r['artifact']} | {_fmt(r['bits_per_weight'])} | {r['model_mb']:.1f} | "
            f"{_fmt(r['bundle_mb'], '.1f')} | {r['cpp_ms']:.3f} | {r['ort_ms']:.3f} | "
            f"{r['ratio']:.2f} | {_fmt(r.get('ort_fastest_ms'), '.3f')} | {speedup} | "
            f"{_fmt(r['cosine'], '.4f')} | {_fmt(r['sqnr_db'], '.1f')} | {r['validation']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model names (models/<name>.toml); "
                        "NAME=VALUE arguments are passed to doit (tune=off, repeat=50)")
    parser.add_argument("--variants", help="comma-separated variants (default: all)")
    parser.add_argument("--out", type=Path, help="also write rows.json and table.md here")
    args = parser.parse_intermixed_args(argv)
    models = [m for m in args.models if "=" not in m]
    options = [m for m in args.models if "=" in m]
    arts = _artifacts(models, args.variants)
    tasks = [f"{t}:{m}_{v}" + ("@cpu" if t != "build" else "")
             for m, v in arts for t in ("build", "validate", "bench")]
    proc = subprocess.run([sys.executable, "-m", "doit", "--continue", *tasks, *options],
                          cwd=REPO, check=False)
    threads = os.cpu_count() or 1
    repeat = next((int(o.split("=", 1)[1]) for o in options if o.startswith("repeat=")), 30)
    rows = []
    for model, variant in arts:
        try:
            rows.append(collect(model, variant, threads, repeat))
        except (OSError, KeyError, StopIteration) as e:
            print(f"{model}_{variant}: no results ({e})", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "table.md").write_text(text + "\n")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
