#!/usr/bin/env python3
"""Check a bundle's ``bin/infer`` against the references of its validation kit (numpy only).

This file is copied into every validation kit as ``check.py`` and runs where the pipeline
does not: a GPU machine with Python 3 and numpy but no TVM, no onnxruntime, no ``pipeline``
package. It must import nothing of this project. The kit (``kit.json`` next to this file)
holds the validation inputs, the reference outputs onnxruntime computed on the build
machine, and the gates; this script

1. finds the bundle (``--bundle`` .tar.gz or unpacked folder; default: the bundle named in
   ``kit.json``, next to the kit or inside it), checks it is the bundle the kit was made for
   (sha256 of the .tar.gz, or of ``model.so`` for a folder) and unpacks it;
2. runs ``bin/infer --input NAME=PATH ... --output NAME=PATH ...`` on each kit input;
3. compares every output with each reference, per output, with the kit's gates (metric,
   threshold, worst input);
4. times the binary (its ``--warmup``/``--repeat``/``--json`` mode: median, p90);
5. writes a JSON report (``--out``, default ``kit_report.json`` beside the kit folder) that
   ``doit validate:<artifact>@<target> kit_report=PATH`` reads back on the build machine.

    python3 <artifact>-<target>-kit/check.py [--bundle PATH] [--out report.json]

Exit status: 0 every gate passed; 1 a gate failed or the app failed; 2 cannot check (no
bundle, another bundle than the kit's, bad kit).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

KIT_FORMAT = 1
REPORT_FORMAT = 1
_OPS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "==": lambda v, t: v == t}


class CannotCheck(Exception):
    """The check cannot run here (exit status 2)."""


# ----------------------------------------------------------------------------- metrics

def error_stats(a: np.ndarray, r: np.ndarray) -> dict:
    """``max_abs_err``, ``max_ref``, ``max_rel_err``, ``cosine`` and ``sqnr_db`` of ``a``
    against ``r`` (same shape, float64). The pipeline's validate computes them with this
    very function, so the kit and validate cannot drift apart."""
    err = np.abs(a - r)
    max_abs = float(err.max()) if err.size else 0.0
    ref_max = float(np.abs(r).max()) if r.size else 0.0
    norm_a, norm_r = float(np.linalg.norm(a)), float(np.linalg.norm(r))
    if norm_a == 0.0 or norm_r == 0.0:
        cosine = 1.0 if norm_a == norm_r else 0.0
    else:
        cosine = float(np.dot(a.ravel(), r.ravel()) / (norm_a * norm_r))
    signal, noise = float(np.sum(r * r)), float(np.sum(err * err))
    sqnr = math.inf if noise == 0.0 else (-math.inf if signal == 0.0 else
                                          10.0 * math.log10(signal / noise))
    return {"max_abs_err": max_abs, "max_ref": ref_max,
            "max_rel_err": max_abs / max(1.0, ref_max), "cosine": cosine, "sqnr_db": sqnr}


def metrics(actual: np.ndarray, reference: np.ndarray, step: float | None = None) -> dict:
    """The metrics of one output against its reference, as the pipeline's validate defines
    them (``pipeline.stages.validate.compare``; a test keeps the two equal)."""
    if actual.shape != reference.shape:
        return {"shape_ok": False, "actual": f"{list(actual.shape)} {actual.dtype}",
                "reference": f"{list(reference.shape)} {reference.dtype}"}
    a, r = actual.astype(np.float64), reference.astype(np.float64)
    ra = a.reshape(1, -1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])
    rr = r.reshape(1, -1) if r.ndim == 0 else r.reshape(-1, r.shape[-1])
    top_a = np.argsort(-ra, axis=1, kind="stable")[:, 0]
    top_r = np.argsort(-rr, axis=1, kind="stable")[:, 0]
    top1 = int(np.sum(top_a == top_r))
    out = {"shape_ok": True, **error_stats(a, r),
           "rows": int(len(rr)), "top1_agree": top1, "top1_agreement": top1 / len(rr)}
    if step is not None:
        out["max_err_steps"] = out["max_abs_err"] / step
    return out


def judge(gate: dict, rows: list[dict]) -> dict:
    """One gate over one output's rows (one per input): the worst input's value, and a pass
    only if every input passes. ``pooled`` gates (top-1 agreement) pool the rows' counts."""
    metric, op, threshold = gate["metric"], gate["op"], gate["threshold"]
    if gate.get("pooled"):
        value = sum(r["top1_agree"] for r in rows) / sum(r["rows"] for r in rows)
        bad = [r for r in rows if r["top1_agree"] < r["rows"]]
        where = bad[0] if bad else None
        passed = _OPS[op](value, threshold)
    else:
        def margin(row):
            v = row[metric]
            scale = max(abs(threshold), 1e-300)
            return (v - threshold) / scale if op == "<=" else \
                (threshold - v) / scale if op == ">=" else float(v != threshold)
        where = max(rows, key=margin)
        value = where[metric]
        passed = all(_OPS[op](r[metric], threshold) for r in rows)
    return {"metric": metric, "op": op, "value": value, "threshold": threshold,
            "pass": bool(passed), "input_index": where["input"] if where else None}


# ----------------------------------------------------------------------------- the bundle

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_bundle(kit_dir: Path, kit: dict, given: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.exists():
            raise CannotCheck(f"--bundle {path}: no such file or folder")
        return path
    name = kit["bundle"]["file"]
    for candidate in (kit_dir / name, kit_dir.parent / name, Path.cwd() / name,
                      kit_dir.parent / name.removesuffix(".tar.gz")):
        if candidate.exists():
            return candidate
    raise CannotCheck(f"no bundle {name} next to the kit ({kit_dir.parent}) or inside it; "
                      "pass --bundle PATH (the .tar.gz or its unpacked folder)")


def unpack(bundle: Path, kit: dict, workdir: Path, any_bundle: bool) -> tuple[Path, dict]:
    """The unpacked bundle's root and what was verified."""
    expected = kit["bundle"]
    if bundle.is_dir():
        root = bundle
        verified = {"bundle": str(bundle), "checked": "model.so sha256"}
    else:
        digest = sha256_file(bundle)
        verified = {"bundle": str(bundle), "bundle_sha256": digest, "checked": "bundle sha256"}
        if digest != expected["sha256"] and not any_bundle:
            raise CannotCheck(f"{bundle} is not the bundle this kit was made for (sha256 "
                              f"{digest[:12]}..., the kit's is {expected['sha256'][:12]}...): "
                              "copy the bundle and the kit of the same build, or pass "
                              "--any-bundle to check it anyway")
        workdir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle) as tar:
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise CannotCheck(f"{bundle}: unsafe member path {member.name!r}")
            if hasattr(tarfile, "data_filter"):  # 3.12, and 3.8-3.11 security releases
                tar.extractall(workdir, filter="data")
            else:
                tar.extractall(workdir)
        root = workdir / expected["file"].removesuffix(".tar.gz")
        if not root.is_dir():
            tops = sorted({Path(n).parts[0] for n in os.listdir(workdir)})
            raise CannotCheck(f"{bundle} unpacked to {tops}, not {root.name}/")
    if not (root / "bin" / "infer").is_file() or not (root / "model.so").is_file():
        raise CannotCheck(f"{root} has no bin/infer or model.so: is it a bundle?")
    matches = verified.get("bundle_sha256", expected["sha256"]) == expected["sha256"]
    for name, key in (("model.so", "model_sha256"), ("model.params", "params_sha256")):
        if not expected.get(key):
            continue
        path = root / name
        digest = sha256_file(path) if path.is_file() else None
        verified[key] = digest
        if digest != expected[key]:
            matches = False
            if not any_bundle:
                raise CannotCheck(f"{path} is not the {name} this kit was made for (sha256 "
                                  f"{(digest or 'missing')[:12]}..., the kit's is "
                                  f"{expected[key][:12]}...); pass --any-bundle to check it "
                                  "anyway")
    verified["matches_kit"] = matches
    return root, verified


# ----------------------------------------------------------------------------- the machine

def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def gpus() -> list[dict]:
    """nvidia-smi's GPUs (name, compute capability, driver); [] without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    proc = _run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
    if proc is None or proc.returncode != 0:
        return []
    found = []
    for line in proc.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3:
            found.append({"name": fields[0], "compute_cap": fields[1], "driver": fields[2]})
    return found


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(kit: dict) -> dict:
    found = gpus()
    if kit["target_kind"] == "cuda":
        if found:
            gpu = found[0]
            return {"name": gpu["name"], "source": "nvidia-smi", "compute_cap":
                    gpu["compute_cap"], "driver": gpu["driver"], "gpus": found}
        return {"name": "unknown CUDA device (no nvidia-smi)", "source": "none", "gpus": []}
    return {"name": cpu_name(), "source": "/proc/cpuinfo", "cores": os.cpu_count(),
            "gpus": found}


# ----------------------------------------------------------------------------- running

def run_app(root: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [str(root / "bin" / "infer"), *args]
    print("$ " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:g} s")


def input_args(kit_dir: Path, sample: dict) -> list[str]:
    args = []
    for name, rel in sorted(sample["inputs"].items()):
        args += ["--input", f"{name}={kit_dir / rel}"]
    return args


def check(kit_dir: Path, bundle_arg: str | None, workdir: Path, any_bundle: bool,
          warmup: int | None, repeat: int | None, timeout: float) -> dict:
    """Every step; returns the report (its ``status`` says pass or fail)."""
    try:
        kit = json.loads((kit_dir / "kit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CannotCheck(f"cannot read {kit_dir / 'kit.json'}: {e}") from None
    if kit.get("format") != KIT_FORMAT:
        raise CannotCheck(f"kit format {kit.get('format')!r}; this checker reads {KIT_FORMAT}")
    bundle = find_bundle(kit_dir, kit, bundle_arg)
    root, verified = unpack(bundle, kit, workdir, any_bundle)
    report = {"format": REPORT_FORMAT, "artifact": kit["artifact"], "target": kit["target"],
              "kit_sha256": sha256_file(kit_dir / "kit.json"), "bundle": verified,
              "device": device_info(kit), "host": platform.node(),
              "checked_at": datetime.datetime.now(
                  datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.9)
              "python": platform.python_version(), "numpy": np.__version__}
    outputs = kit["outputs"]
    out_dir = workdir / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    actual: list[list[np.ndarray]] = []
    errors = []
    for i, sample in enumerate(kit["samples"]):
        paths = [out_dir / f"output{i}_{k}.npy" for k in range(len(outputs))]
        for p in paths:
            if p.exists():
                p.unlink()  # a stale output must not pass
        proc = run_app(root, input_args(kit_dir, sample) +
                       [a for k, o in enumerate(outputs)
                        for a in ("--output", f"{o['name']}={paths[k]}")], timeout)
        missing = [p.name for p in paths if not p.is_file()]
        if proc.returncode != 0 or missing:
            errors.append({"input_index": i, "exit": proc.returncode,
                           "message": (proc.stderr or proc.stdout).strip()[-2000:]
                           or f"no {', '.join(missing)}"})
            break
        actual.append([np.load(p) for p in paths])

    comparisons = []
    failures = []
    for comp in kit["comparisons"] if not errors else []:
        per_output = []
        for k, out in enumerate(outputs):
            step = comp["steps"][k] if comp.get("steps") else None
            rows = []
            for i, sample in enumerate(kit["samples"]):
                ref = np.load(kit_dir / sample["references"][comp["reference"]][k])
                rows.append({"input": i, **metrics(actual[i][k], ref, step)})
            bad = next((r for r in rows if not r["shape_ok"]), None)
            if bad is not None:
                gates = [{"metric": "shape", "op": "==", "value": bad["actual"],
                          "threshold": bad["reference"], "pass": False,
                          "input_index": bad["input"]}]
                worst: dict = {}
            else:
                gates = [judge(g, rows) for g in comp["gates"] if k in g["outputs"]]
                worst = {"max_abs_err": max(r["max_abs_err"] for r in rows),
                         "max_rel_err": max(r["max_rel_err"] for r in rows),
                         "cosine": min(r["cosine"] for r in rows),
                         "sqnr_db": min(r["sqnr_db"] for r in rows),
                         "top1_agreement": sum(r["top1_agree"] for r in rows) /
                         sum(r["rows"] for r in rows)}
                if step is not None:
                    worst["max_err_steps"] = max(r["max_err_steps"] for r in rows)
            for g in gates:
                g["output_index"] = k
                if not g["pass"]:
                    failures.append(f"{kit['artifact']} on {kit['target']}: "
                                    f"{comp['name']}: output {out['name']!r}: {g['metric']} = "
                                    f"{_fmt(g['value'])}, threshold {g['op']} "
                                    f"{_fmt(g['threshold'])} at input {g['input_index']}")
            per_output.append({"output": k, "name": out["name"], "metrics": worst,
                               "gates": gates,
                               "per_input": [_plain(r) for r in rows]})
        passed = all(g["pass"] for o in per_output for g in o["gates"])
        comparisons.append({"comparison": comp["name"], "title": comp["title"],
                            "reference": comp["reference"], "pass": passed,
                            "outputs": per_output})
    for e in errors:
        failures.append(f"{kit['artifact']} on {kit['target']}: bin/infer failed on input "
                        f"{e['input_index']} (exit {e['exit']}): {e['message'][-300:]}")

    timing = kit.get("timing", {})
    latency = None
    if not errors:
        stats = workdir / "latency.json"
        proc = run_app(root, input_args(kit_dir, kit["samples"][0]) +
                       ["--warmup", str(timing.get("warmup", 10) if warmup is None else warmup),
                        "--repeat", str(timing.get("repeat", 50) if repeat is None else repeat),
                        "--json", str(stats)], timeout)
        if proc.returncode == 0 and stats.is_file():
            latency = json.loads(stats.read_text(encoding="utf-8"))
        else:
            failures.append(f"{kit['artifact']} on {kit['target']}: the timed run failed "
                            f"(exit {proc.returncode}): {(proc.stderr or '').strip()[-300:]}")
    passed = not failures and bool(comparisons)
    report.update(status="pass" if passed else "fail", **{"pass": passed},
                  samples=len(kit["samples"]), comparisons=comparisons, errors=errors,
                  failures=failures, latency=latency,
                  latency_ms=({"median": latency["latency_ms"]["median"],
                               "p90": latency["latency_ms"]["p90"],
                               "device_timing": latency.get("device_timing")}
                              if latency else None))
    return report


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("top1_agree", "rows", "max_ref")}


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=Path(__file__).resolve().parent,
                        help="the kit folder (default: the folder of this script)")
    parser.add_argument("--bundle", help="the bundle .tar.gz or its unpacked folder "
                        "(default: the kit's bundle, next to the kit folder or inside it)")
    parser.add_argument("--out", type=Path, help="the JSON report (default: "
                        "kit_report.json beside the kit folder)")
    parser.add_argument("--workdir", type=Path,
                        help="where to unpack the bundle and write outputs (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--warmup", type=int, help="untimed runs (default: the kit's)")
    parser.add_argument("--repeat", type=int, help="timed runs (default: the kit's)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds per bin/infer run (default 300)")
    parser.add_argument("--any-bundle", action="store_true",
                        help="check a bundle other than the kit's (the report says so)")
    args = parser.parse_args(argv)
    kit_dir = args.kit.resolve()
    out = (args.out or kit_dir.parent / "kit_report.json").resolve()
    temp = None if args.workdir else tempfile.mkdtemp(prefix="kit-check-")
    workdir = args.workdir.resolve() if args.workdir else Path(temp)
    try:
        report = check(kit_dir, args.bundle, workdir, args.any_bundle, args.warmup,
                       args.repeat, args.timeout)
    except CannotCheck as e:
        print(f"check: cannot check: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n",
                   encoding="utf-8")
    print(f"\n{report['artifact']} on {report['target']}, device {report['device']['name']}: "
          f"{report['status'].upper()}")
    for comp in report["comparisons"]:
        for o in comp["outputs"]:
            for g in o["gates"]:
                print(f"  {'pass' if g['pass'] else 'FAIL'}  {comp['comparison']}  "
                      f"{o['name']}: {g['metric']} = {_fmt(g['value'])} (threshold {g['op']} "
                      f"{_fmt(g['threshold'])}, worst input {g['input_index']})")
    if report["latency_ms"]:
        lat = report["latency_ms"]
        print(f"  latency ({lat['device_timing']}): median {lat['median']:.4f} ms, "
              f"p90 {lat['p90']:.4f} ms")
    for line in report["failures"]:
        print(f"  FAILED: {line}")
    print(f"report: {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
