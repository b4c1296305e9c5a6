"""Build, smoke, validate and bench the onnx wheel's nine light model-zoo exports, fp32 and int8.

Each export is built twice, in a scratch project with the real dodo.py:

- **as shipped**: the file from ``onnx/backend/test/data/light/`` (IR 3, weights listed as
  graph inputs, weights made by ``ConstantOfShape``); every weight there is the constant
  0.02, so the outputs are a 1000-way tie and the numbers say little;
- **re-seeded**: the source stage's normalised copy with every float weight redrawn from a
  seed (He-scaled for conv/FC weights, BatchNorm statistics near identity), so validation
  compares real numbers.

Untuned (``tune=off``): no tuning for these models, but the repo's committed logs are
copied into each project, so kernels of a kind they hold (convs, dense) borrow a schedule
(``pipeline.tuning.transfer``); the rest run naive loops. This shows that every stage works
on models nobody here wrote, and how fast they are before any tuning. Prints a markdown
table (model x variant: build, validate metrics, latency vs onnxruntime) and writes it with
the raw results under ``--out``.

    python scripts/zoo_check.py --out /tmp/zoo            # all nine, ~30-40 min on 2 cores
    python scripts/zoo_check.py --only squeezenet --out /tmp/zoo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = ("squeezenet", "resnet50", "inception_v1", "inception_v2", "densenet121", "shufflenet",
          "vgg19", "bvlc_alexnet", "zfnet512")


def light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def io_of(path: Path) -> tuple[str, list[int], str]:
    """(input name, shape, output name) of a light export: its one non-weight input."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    # weights here are graph inputs fed by nothing; the image is the one that is 4-D float
    # and consumed by a node, with no producer (weights come from ConstantOfShape)
    produced = {o for n in model.graph.node for o in n.output}
    for inp in model.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.name in weights or inp.name in produced or inp.name not in used:
            continue
        if len(dims) == 4 and dims[1] == 3:
            return inp.name, dims, model.graph.output[0].name
    raise SystemExit(f"{path}: no image input found")


SPEC = """\
name = "{name}"
description = "light model-zoo {model} ({kind})"

[source]
path = "models/{name}.onnx"

[[inputs]]
name = "{input}"
shape = {shape}
dtype = "float32"

[[outputs]]
name = "{output}"
class_scores = true

[calibration]
samples = 4

[variants.fp32]
scheme = "fp32"

[variants.int8]
scheme = "int8"

[validation]
samples = 2
"""


def reseed(src: Path, dst: Path, seed: int) -> None:
    """Copy ``src`` (a normalised model, weights as initializers) with redrawn float weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    bn_role = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:], strict=False):
                bn_role[name] = role
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype != np.float32 or value.size <= 1:
            continue
        role = bn_role.get(init.name)
        if role == "scale":
            new = 1.0 + 0.1 * rng.standard_normal(value.shape)
        elif role == "var":
            new = 1.0 + 0.1 * np.abs(rng.standard_normal(value.shape))
        elif role in ("bias", "mean") or value.ndim == 1:
            new = 0.05 * rng.standard_normal(value.shape)
        else:  # conv / FC weight: He scaling keeps activations in range through the depth
            fan_in = int(np.prod(value.shape[1:])) if value.ndim > 1 else value.shape[0]
            new = rng.standard_normal(value.shape) * np.sqrt(2.0 / max(fan_in, 1))
        init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    onnx.save(model, str(dst))


def doit(project: Path, *args: str, log: Path) -> int:
    cmd = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def results_of(project: Path, name: str) -> list[dict]:
    rows = []
    for variant in ("fp32", "int8"):
        art = project / "artifacts" / f"{name}_{variant}" / "cpu"
        row = {"artifact": f"{name}_{variant}", "built": (art / "smoke" / "smoke.json").exists()}
        val = art / "validate" / "validation.json"
        if val.exists():
            report = json.loads(val.read_text())
            row["validate"] = report["status"]
            for rec in report.get("records", []):
                m = rec["metrics"]
                row[rec["comparison"]] = {k: m.get(k) for k in
                                          ("max_abs_err", "cosine", "sqnr_db", "max_err_steps",
                                           "top1_agreement")}
        bench = art / "bench" / "bench.json"
        if bench.exists():
            b = json.loads(bench.read_text())
            row["bench"] = {"status": b.get("status"), "ratio": b.get("ratio"),
                            "cpp_ms": (b.get("cpp") or {}).get("median_ms"),
                            "ort_ms": (b.get("onnxruntime") or {}).get("median_ms")}
        rows.append(row)
    return rows


def check(model: str, out: Path) -> list[dict]:
    """Both copies of one light model: built, validated, benched; their result rows."""
    src = light_dir() / f"light_{model}.onnx"
    inp, shape, output = io_of(src)
    rows = []
    for kind in ("shipped", "reseeded"):
        name = f"{model}_{kind}".replace("bvlc_", "")
        project = out / name
        (project / "models").mkdir(parents=True, exist_ok=True)
        log = out / f"{name}.log"
        log.write_text("")
        if kind == "shipped":
            (project / "models" / f"{name}.onnx").write_bytes(src.read_bytes())
        else:  # the shipped build's normalised source, weights redrawn
            shipped = out / f"{model}_shipped".replace("bvlc_", "")
            normalised = shipped / "artifacts" / shipped.name / "source" / "model.onnx"
            if not normalised.exists():
                rows.append({"artifact": name, "built": False, "error": "no normalised source"})
                continue
            reseed(normalised, project / "models" / f"{name}.onnx", seed=0)
        (project / "models" / f"{name}.toml").write_text(SPEC.format(
            name=name, model=model, kind=kind, input=inp, shape=shape, output=output))
        # the repo's committed tuning logs, as a model added to this repo's models/ sees
        # them: none of these models has records of its own, but kernels of the same kind
        # borrow a schedule from them (pipeline.tuning.transfer)
        logs = project / "models" / "tuning_logs"
        if not logs.exists():
            shutil.copytree(REPO / "models" / "tuning_logs", logs)
        start = time.monotonic()
        rc = doit(project, f"build:{name}_fp32", f"build:{name}_int8", "tune=off", log=log)
        built_s = time.monotonic() - start
        if rc == 0:
            doit(project, "--continue", "validate", log=log)
            doit(project, "--continue", "bench", "repeat=20", "warmup=3", log=log)
        for row in results_of(project, name):
            row.update(kind=kind, model=model, build_rc=rc, build_s=round(built_s))
            rows.append(row)
        print(f"{name}: build rc={rc} in {built_s:.0f} s", flush=True)
    return rows


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| model | copy | variant | built | validate | TVM vs ORT (same model) | "
             "int8 vs fp32 cosine | C++ / ORT, no tuning (borrowed schedules) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        variant = r["artifact"].rsplit("_", 1)[-1]
        same = r.get("tvm_fp32_vs_ort_fp32") or r.get("tvm_int8_vs_ort_int8") or {}
        if variant == "fp32":
            vs = f"max abs err {_f(same.get('max_abs_err'), '.2g')}"
        else:
            vs = (f"cos {_f(same.get('cosine'), '.6f')}, "
                  f"{_f(same.get('max_err_steps'), '.0f')} step(s)")
        quality = (r.get("tvm_int8_vs_ort_fp32") or {}).get("cosine")
        bench = r.get("bench") or {}
        ratio = (f"{bench['cpp_ms']:.1f} / {bench['ort_ms']:.1f} ms = {bench['ratio']:.1f}x"
                 if bench.get("cpp_ms") and bench.get("ort_ms") and bench.get("ratio") else "-")
        lines.append(f"| {r.get('model', '')} | {r.get('kind', '')} | {variant} | "
                     f"{'yes' if r['built'] else 'NO'} | {r.get('validate', '-')} | {vs} | "
                     f"{_f(quality, '.4f')} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="scratch folder for the projects")
    ap.add_argument("--only", nargs="*", choices=MODELS, help="a subset of the nine")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.only or MODELS:
        rows += check(model, args.out.resolve())
        (args.out / "zoo.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    (args.out / "zoo.md").write_text(text + "\n")
    print(textwrap.dedent(text))
    return 0 if all(r["built"] and r.get("validate") == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
