#!/usr/bin/env python3
"""On a machine with an NVIDIA GPU: build, run, validate and benchmark the CUDA artifacts.

This needs TVM and this project on the GPU machine. Where the GPU machine has no TVM (only
Python, numpy and the driver), use the validation kit instead: ``scripts/gpu_kit.py`` packs
the bundle and its kit into one tarball, ``check.py`` runs there, and ``doit validate ...
kit_report=PATH`` reads its report back here (README, "Running on a GPU").

The CUDA targets cross-compile anywhere (no GPU needed), but they can only be checked where a
GPU is. This script does every such check in one go, for the fp32 and the int8 variant:

1. detects the GPU's compute capability (``nvidia-smi --query-gpu=compute_cap``) and picks the
   target built for it (8.9 -> ``rtx4090``, 9.0 -> ``h100``; anything else fails, clearly);
2. checks that TVM's Python runtime sees the GPU (otherwise every check would only say
   "not run: no CUDA device");
3. ``doit build:<model>_<variant> target=<t>``: compile, package (nvcc fatbins for the app) and
   the smoke check, which on a GPU runs ``bin/infer`` and the Python VM on one input and
   compares them (gate: the spec's ``gpu_rel_tol``; ``smoke.json`` says whether bit-identical);
4. runs the packaged ``bin/infer`` on the GPU and shows its output;
5. ``doit validate:<model>_<variant>@<t>``: TVM in Python and the C++ binary on the GPU against
   onnxruntime on the CPU, with the spec's gates;
6. ``doit bench:<model>_<variant>@<t>``: median and p90 latency of the C++ binary, TVM in Python
   and onnxruntime;

then prints a summary (also written to ``artifacts/reports/gpu_check/summary.{md,json}``).
Every command is printed before it runs. The Python VM compiles a CUDA model's kernels when
it loads it: TVM's default there is NVRTC, which needs the ``cuda-bindings`` package, so the
script sets ``TVM_CUDA_COMPILE_MODE=nvcc`` (the nvcc the package stage uses anyway).

    python scripts/gpu_check.py                       # resnet50, fp32 + int8, untuned (DLight)
    python scripts/gpu_check.py --model tiny --project /tmp/p --tune missing
    python scripts/gpu_check.py --dry-run             # detect the GPU, print the commands only

Exit status: 0 every check passed; 1 a check failed; 2 this machine cannot run the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.targets import TARGETS  # noqa: E402  (cheap: no TVM import)


class CannotCheck(Exception):
    """This machine cannot run the GPU checks (exit status 2)."""


def gpu_targets() -> dict[str, str]:
    """Compute capability ("9.0") -> name of the first CUDA target built for it."""
    out: dict[str, str] = {}
    for spec in TARGETS.values():
        if spec.is_gpu:
            digits = spec.arch.removeprefix("sm_")
            out.setdefault(f"{digits[:-1]}.{digits[-1]}", spec.name)
    return out


def detect_gpu() -> dict[str, str]:
    """Name, compute capability and driver of GPU 0, from nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise CannotCheck("nvidia-smi not found: this machine has no NVIDIA driver, so no GPU "
                          "to check on. The CUDA artifacts still cross-build here "
                          "(`doit build:<artifact> target=rtx4090`).")
    cmd = [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise CannotCheck(f"nvidia-smi failed (exit {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip() or 'no GPU listed'}")
    fields = [f.strip() for f in lines[0].split(",")]
    if len(fields) != 3:
        raise CannotCheck(f"cannot read nvidia-smi's answer {lines[0]!r}")
    print(f"  GPU 0: {fields[0]}, compute capability {fields[1]}, driver {fields[2]}"
          + (f" ({len(lines)} GPUs; checking GPU 0)" if len(lines) > 1 else ""), flush=True)
    return {"name": fields[0], "compute_cap": fields[1], "driver": fields[2]}


def pick_target(compute_cap: str) -> str:
    known = gpu_targets()
    if compute_cap not in known:
        listing = ", ".join(f"{cap} -> {name}" for cap, name in sorted(known.items()))
        raise CannotCheck(f"no build target for compute capability {compute_cap} (sm_"
                          f"{compute_cap.replace('.', '')}); targets exist for: {listing}. "
                          "Add one to pipeline/targets.py to check this GPU.")
    return known[compute_cap]


def preflight(env: dict[str, str]) -> None:
    """nvcc, cmake, and TVM's Python runtime seeing the GPU."""
    missing = [tool for tool in ("nvcc", "cmake") if shutil.which(tool) is None]
    if missing:
        raise CannotCheck(f"{' and '.join(missing)} not found on PATH: the package stage builds "
                          "the app with CMake and the CUDA kernels with nvcc (CUDA toolkit of "
                          "the major version the TVM wheel was built with)")
    probe = ("import tvm; d = tvm.cuda(0); "
             "print(d.exist and f'{d.device_name}, sm_{d.compute_version}' or 'NO DEVICE')")
    cmd = [sys.executable, "-c", probe]
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not answer or answer == "NO DEVICE":
        raise CannotCheck("TVM's Python runtime sees no CUDA device, so every check would only "
                          "report 'not run: no CUDA device'. Its libtvm_runtime_cuda.so needs "
                          "libcudart (of the wheel's CUDA major version) and libcuda.so.1 on the "
                          "loader path, e.g. LD_LIBRARY_PATH=/usr/local/cuda/lib64. Details: "
                          + (proc.stderr.strip()[-800:] or answer or "none"))
    print(f"  TVM sees: {answer}", flush=True)


class Runner:
    """Prints each command, runs it (unless dry), and records its exit status."""

    def __init__(self, project: Path, env: dict[str, str], dry_run: bool) -> None:
        self.project, self.env, self.dry_run = project, env, dry_run
        self.report_dir = project / "artifacts" / "reports" / "gpu_check"
        self.commands: list[str] = []

    def doit(self, *args: str) -> int:
        return self.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"),
                         "-d", str(self.project), *args])

    def run(self, cmd: list[str]) -> int:
        line = shlex.join(cmd)
        self.commands.append(line)
        print(f"\n$ {line}", flush=True)
        if self.dry_run:
            return 0
        return subprocess.run(cmd, env=self.env, check=False).returncode


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_variant(runner: Runner, model: str, variant: str, target: str, args) -> dict:
    """Build, run, validate and bench one artifact; returns what the summary needs."""
    art = f"{model}_{variant}"
    opts = [f"target={target}", f"tune={args.tune}"]
    out = runner.project / "artifacts" / art / target
    row: dict = {"artifact": art, "target": target}

    row["build_rc"] = runner.doit(f"build:{art}", *opts)
    row["smoke"] = _load(out / "smoke" / "smoke.json")

    binary, x = out / "bin" / "infer", out / "smoke" / "input.npy"
    if runner.dry_run or (binary.exists() and x.exists()):
        y = runner.report_dir / f"{art}-{target}-output.npy"
        if not runner.dry_run:
            runner.report_dir.mkdir(parents=True, exist_ok=True)
        row["run_rc"] = runner.run([str(binary), "--input", str(x), "--output", str(y),
                                    "--warmup", "10", "--repeat", "50"])
    else:
        row["run_rc"] = None  # nothing to run: the build failed before packaging

    row["validate_rc"] = runner.doit(f"validate:{art}@{target}", *opts)
    row["validation"] = _load(out / "validate" / "validation.json")
    row["bench_rc"] = runner.doit(f"bench:{art}@{target}", *opts, f"threads={args.threads}",
                                  f"warmup={args.warmup}", f"repeat={args.repeat}")
    row["bench"] = _load(out / "bench" / "bench.json")
    return row


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else \
        str(value)


def summarize(rows: list[dict], gpu: dict, args) -> tuple[str, bool]:
    """Markdown summary, and whether every check passed."""
    ok = True
    lines = [f"# GPU check on {gpu['name']} (compute capability {gpu['compute_cap']}, "
             f"driver {gpu['driver']})", "",
             f"tune={args.tune}; TVM_CUDA_COMPILE_MODE=nvcc; bench: {args.threads} CPU threads, "
             f"{args.warmup} warmup, {args.repeat} timed runs", "",
             "| artifact | check | result | details |", "|---|---|---|---|"]
    for r in rows:
        a = f"{r['artifact']}@{r['target']}"
        s = r["smoke"] or {}
        smoke_ok = r["build_rc"] == 0 and s.get("status") == "pass"
        detail = (f"bit-identical: {s.get('bit_identical')}, max abs diff "
                  f"{_fmt(s.get('max_abs_diff'))}; {s.get('gate', '')}" if s else "no smoke.json")
        lines.append(f"| {a} | build + smoke (C++ vs Python VM on GPU) | "
                     f"{'PASS' if smoke_ok else 'FAIL'} (exit {r['build_rc']}, "
                     f"{s.get('status', '-')}) | {detail} |")
        run_ok = r["run_rc"] == 0
        lines.append(f"| {a} | bin/infer on the GPU | {'PASS' if run_ok else 'FAIL'} | "
                     f"exit {_fmt(r['run_rc'])} |")
        v = r["validation"] or {}
        val_ok = r["validate_rc"] == 0 and v.get("status") == "pass"
        for rec in v.get("records", []):
            m = rec.get("metrics") or {}
            verdict = {True: "PASS", False: "FAIL", None: "reported"}[rec.get("pass")]
            lines.append(f"| {a} | validate: {rec.get('title', rec.get('comparison'))} | "
                         f"{verdict} | max abs err {_fmt(m.get('max_abs_err'))}, max rel err "
                         f"{_fmt(m.get('max_rel_err'))}, cosine {_fmt(m.get('cosine'), '.6f')},"
                         f" top-1 {_fmt(m.get('top1_agreement'))} |")
        if not v.get("records"):
            lines.append(f"| {a} | validate | FAIL | exit {r['validate_rc']}, "
                         f"{v.get('status', 'no validation.json')} |")
        b = r["bench"] or {}
        bench_ok = r["bench_rc"] == 0 and b.get("status") == "ok"
        for runner in ("cpp", "tvm_python", "onnxruntime"):
            st = b.get(runner) or {}
            where = f" ({st['provider']})" if "provider" in st else ""
            lines.append(f"| {a} | bench: {runner}{where} | "
                         f"{'ok' if bench_ok else 'FAIL'} | median {_fmt(st.get('median_ms'))} "
                         f"ms, p90 {_fmt(st.get('p90_ms'))} ms |")
        ok = ok and smoke_ok and run_ok and val_ok and bench_ok
    lines += ["", "Overall: " + ("every check passed" if ok else "SOME CHECKS FAILED")]
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="model spec name (models/NAME.toml)")
    parser.add_argument("--variants", default="fp32,int8", help="comma-separated variants")
    parser.add_argument("--project", type=Path, default=REPO,
                        help="project directory doit runs in (default: this repository)")
    parser.add_argument("--tune", default="off", choices=("off", "missing", "extend"),
                        help="off (default): DLight schedules only; missing: tune on this GPU "
                             "what the logs lack (can take an hour for ResNet-50)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for the bench's onnxruntime and TVM host pools")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--dry-run", action="store_true",
                        help="detect the GPU and print the commands without running them")
    args = parser.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TVM_CUDA_COMPILE_MODE": "nvcc"}
    try:
        gpu = detect_gpu()
        target = pick_target(gpu["compute_cap"])
        print(f"  -> target {target} ({TARGETS[target].description})", flush=True)
        print("  TVM_CUDA_COMPILE_MODE=nvcc (the Python VM compiles the kernels with nvcc)",
              flush=True)
        if not args.dry_run:
            preflight(env)
    except CannotCheck as e:
        print(f"gpu_check: cannot check here: {e}", file=sys.stderr, flush=True)
        return 2

    runner = Runner(args.project.resolve(), env, args.dry_run)
    rows = [check_variant(runner, args.model, v.strip(), target, args)
            for v in args.variants.split(",") if v.strip()]
    print("\nCommands run (with TVM_CUDA_COMPILE_MODE=nvcc PYTHONPATH=" + str(REPO) + "):")
    for line in runner.commands:
        print("  " + line)
    if args.dry_run:
        return 0
    text, ok = summarize(rows, gpu, args)
    report = runner.report_dir
    report.mkdir(parents=True, exist_ok=True)
    (report / "summary.md").write_text(text, encoding="utf-8")
    (report / "summary.json").write_text(json.dumps(
        {"gpu": gpu, "target": target, "tune": args.tune, "passed": ok, "artifacts": rows},
        indent=2, default=str) + "\n", encoding="utf-8")
    print("\n" + text + f"(written to {report}/summary.md)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
