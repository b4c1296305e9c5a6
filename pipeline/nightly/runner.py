"""The nightly run itself: options, the doit subprocesses, per-artifact results, entry points."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.hashing import jsonable
from pipeline.core.project import REPO
from pipeline.nightly.baseline import (
    BASELINE_FILE,
    BASELINE_MODES,
    DEFAULT_SQNR_DROP_DB,
    DEFAULT_THRESHOLD,
    check,
    load_baseline,
    refresh_baseline,
)
from pipeline.nightly.history import append_history, history_chart, read_history
from pipeline.nightly.parse import (
    BUILT,
    FAILED,
    NOT_RUN,
    STAGES,
    classify,
    finite,
    latency_of,
    parse_doit_output,
    read_json,
    snapshot_links,
)
from pipeline.nightly.report import print_summary, write_report
from pipeline.tasks.actions import doit_action
from pipeline.tasks.options import NO_REMEMBER_ENV

REPORT_DIR = Path("artifacts") / "reports" / "nightly"
PASSTHROUGH = ("warmup", "repeat", "threads")  # doit options handed on to the builds


class NightlyFailed(PipelineError):
    """A nightly run found a failed build, a failed validation gate or a regression."""


# ----------------------------------------------------------------------------- options

@dataclass(frozen=True)
class NightlyOptions:
    """What ``doit nightly NAME=VALUE ...`` can set.

    ``threshold`` and ``sqnr_drop_db`` left at None take the baseline file's values, else
    :data:`DEFAULT_THRESHOLD` and :data:`DEFAULT_SQNR_DROP_DB`.
    """

    baseline: str = "check"  # check | refresh
    threshold: float | None = None
    sqnr_drop_db: float | None = None
    baseline_file: str = ""  # relative to the project; default models/baselines/...
    doit_vars: tuple[tuple[str, str], ...] = ()  # warmup/repeat/threads for the builds
    timeout_s: float | None = None  # per target's doit run
    # ``models=resnet50,minilm_int8``: model names (every variant) or artifact names; empty:
    # every artifact. A per-model baseline refresh on a new machine class needs no full run.
    models: tuple[str, ...] = ()

    @classmethod
    def from_vars(cls, values: Mapping[str, str | None]) -> tuple[NightlyOptions, list[str]]:
        """Parse doit's ``NAME=VALUE`` strings; every bad value is reported at once.

        Returns the options and the targets asked for (empty: every buildable target).
        """
        from pipeline.core.targets import TARGETS

        problems = []
        raw_targets = values.get("targets") or values.get("target") or ""
        targets = [t.strip() for t in raw_targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            problems.append(f"targets={raw_targets}: unknown {', '.join(unknown)}; known "
                            f"targets are {', '.join(TARGETS)} (comma-separated)")
        mode = values.get("baseline") or "check"
        if mode not in BASELINE_MODES:
            problems.append(f"baseline={mode}: use one of {', '.join(BASELINE_MODES)}")

        def number(name: str, low: float) -> float | None:
            text = values.get(name)
            if not text:
                return None
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not value > low:  # NaN fails too
                problems.append(f"{name}={text}: must be a number > {low:g}")
                return None
            return value

        threshold = number("threshold", 1.0)
        drop = number("sqnr_drop_db", 0.0)
        timeout = number("timeout", 0.0)
        passthrough = []
        for name in PASSTHROUGH:
            if values.get(name):
                if not str(values[name]).isdigit():
                    problems.append(f"{name}={values[name]}: must be a whole number")
                passthrough.append((name, str(values[name])))
        if problems:
            raise ConfigError("bad `doit nightly` option(s):\n  - " + "\n  - ".join(problems))
        models = tuple(m.strip() for m in (values.get("models") or "").split(",")
                       if m.strip())
        return cls(baseline=mode, threshold=threshold, sqnr_drop_db=drop,
                   baseline_file=values.get("baseline_file") or "", doit_vars=tuple(passthrough),
                   timeout_s=timeout, models=models), targets


def select_artifacts(project, names: Sequence[str] = ()) -> list[tuple[Any, Any]]:
    """The (spec, variant) pairs a run covers: all of them, or those ``models=`` names (a
    model name selects each of its variants, ``<model>_<variant>`` one artifact).

    An unknown name is a :class:`ConfigError` listing what the project has.
    """
    pairs = [(spec, variant) for spec in project.specs.values()
             for variant in spec.variants.values()]
    if not names:
        return pairs
    by_artifact = {f"{spec.name}_{variant.name}": (spec, variant) for spec, variant in pairs}
    unknown = [n for n in names if n not in project.specs and n not in by_artifact]
    if unknown:
        raise ConfigError(
            f"models={','.join(names)}: unknown {', '.join(unknown)}; this project has the "
            f"models {', '.join(sorted(project.specs)) or '(none)'} and the artifacts "
            f"{', '.join(sorted(by_artifact)) or '(none)'} (comma-separated, either kind)")
    return [(spec, variant) for spec, variant in pairs
            if spec.name in names or f"{spec.name}_{variant.name}" in names]


def buildable_targets(asked: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The targets this machine can build, and the skipped ones with the reason.

    CPU always builds; a CUDA target needs ``nvcc`` (cross-compiling needs no GPU).
    """
    from pipeline.core.targets import TARGETS

    nvcc = _find_nvcc()
    chosen, skipped = [], {}
    for name in asked or list(TARGETS):
        if TARGETS[name].is_gpu and not nvcc:
            skipped[name] = ("skipped: nvcc not found (cross-compiling a CUDA target needs the "
                             "CUDA toolkit on PATH, in CUDA_HOME or /usr/local/cuda)")
        else:
            chosen.append(name)
    return chosen, skipped


def _find_nvcc() -> str | None:
    """Where TVM's nvcc lookup would find it: PATH, then CUDA_HOME/CUDA_PATH, /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


# ----------------------------------------------------------------------------- doit runs

def doit_command(project: Path, target: str, doit_vars: Sequence[tuple[str, str]] = (),
                 artifacts: Sequence[str] = ()) -> list[str]:
    """The build/validate/bench command of one target, as a user would type it: every
    artifact, or only ``artifacts`` (``<model>_<variant>`` names) with their own tasks."""
    tasks = [task for name in artifacts
             for task in (f"build:{name}", f"validate:{name}@{target}", f"bench:{name}@{target}")
             ] or ["build", "validate", "bench"]
    return [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project),
            "--continue", *tasks, f"target={target}", "tune=off",
            *(f"{k}={v}" for k, v in doit_vars)]


def _run_streaming(cmd: list[str], cwd: Path, timeout_s: float | None) -> tuple[int, str]:
    """Run ``cmd``, echoing its output as it comes (CI logs show progress) and keeping it.

    The run gets its own process group so that a timeout or a Ctrl-C stops doit together
    with what it started (CMake, the benchmark processes); the store keeps what was finished.
    """
    import signal
    import threading

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           NO_REMEMBER_ENV: "1"}  # the nightly's tune=off must not become the user's
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, stop) if timeout_s else None
    try:
        if timer:
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        returncode = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if timer:
            timer.cancel()
    if timed_out.is_set():
        lines.append(f"nightly: doit killed after {timeout_s:g} s (timeout={timeout_s:g})\n")
    return returncode, "".join(lines)


# ----------------------------------------------------------------------------- results


def artifact_result(project, spec, variant, target: str, rows: dict[str, dict],
                    machine_class: str) -> dict:
    """What this run knows of one artifact: build status, validation, latency."""
    from pipeline.core.project import artifact_paths

    name = f"{spec.name}_{variant.name}"
    p = artifact_paths(project, spec, variant, target)
    own = [f"source:{spec.name}", f"quantize:{name}", f"import:{name}",
           *(f"{s}:{name}@{target}" for s in STAGES[3:])]
    failed = [rows[t] for t in own if t in rows and rows[t]["status"] == FAILED
              and not t.startswith("validate:")]
    res: dict[str, Any] = {"artifact": name, "model": spec.name, "variant": variant.name,
                           "target": target, "machine_class": machine_class,
                           "build": "failed at " + failed[0]["task"] if failed else "ok",
                           "build_error": " ".join(failed[0]["why"].split())[-600:]
                           if failed else ""}

    def current(stage: str, filename: str) -> tuple[dict | None, bool, str]:
        row = rows.get(f"{stage}:{name}@{target}")
        if row is None:
            return None, False, f"doit did not run {stage}:{name}@{target}"
        if row["status"] == NOT_RUN or (row["status"] == FAILED and not row["recipe"]):
            return None, False, row["why"]  # a stale report of an earlier run must not count
        return read_json(p.artifact_dir / stage / filename), row["status"] == BUILT, ""

    res["validation"], res["validated_now"], res["validate_error"] = \
        current("validate", "validation.json")
    res["bench"], res["measured_now"], res["bench_error"] = current("bench", "bench.json")
    bench = res["bench"] or {}
    res["validation_status"] = (res["validation"] or {}).get("status", "not run")
    res["bench_status"] = bench.get("status", "not run")
    res["ratio"] = finite(bench.get("ratio")) if bench.get("status") == "ok" else None
    bundles = sorted(p.artifact_dir.glob("*.tar.gz"))
    res["bundles"] = [str(b.relative_to(project.root)) for b in bundles]
    return res


# ----------------------------------------------------------------------------- baseline


# ----------------------------------------------------------------------------- history


# ----------------------------------------------------------------------------- report


# ----------------------------------------------------------------------------- entry points

def _git_commit(root: Path) -> str:
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"][:12]
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def run(project_dir: Path, targets: Sequence[str] | None = None,
        options: NightlyOptions | None = None,
        run_doit: Callable[[list[str], Path, float | None], tuple[int, str]] | None = None
        ) -> dict:
    """Rebuild, validate and bench every model x variant x buildable target; check and report.

    Parameters
    ----------
    project_dir : Path
        The project (``models/`` specs, ``artifacts/``).
    targets : sequence of str, optional
        Targets to build; default every target in :data:`pipeline.core.targets.TARGETS` this
        machine can build.
    options : NightlyOptions, optional
        Baseline mode, thresholds, bench settings.
    run_doit : callable, optional
        ``(command, cwd, timeout) -> (returncode, output)``; default: a subprocess whose
        output is echoed as it comes.

    Returns
    -------
    dict
        ``status`` ("pass" or "fail"), ``failures`` (one line each naming artifact, metric,
        value and threshold), ``warnings``, ``artifacts`` (per model x variant x target),
        ``targets`` (per target: doit's exit code and one row per task: status and why),
        ``skipped_targets``, ``stage_counts`` and the report paths. Also written as
        ``artifacts/reports/nightly/nightly.json``.
    """
    from pipeline.core.project import Project
    from pipeline.core.targets import host_machine_class
    from pipeline.stages.bench import chart as latency_chart

    options = options or NightlyOptions()
    root = Path(project_dir).resolve()
    project = Project.load(root)
    out_dir = root / REPORT_DIR
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    baseline_path = root / (options.baseline_file or BASELINE_FILE)
    baseline = load_baseline(baseline_path)
    threshold = options.threshold or float(baseline.get("threshold", DEFAULT_THRESHOLD))
    drop = options.sqnr_drop_db or float(baseline.get("sqnr_drop_db", DEFAULT_SQNR_DROP_DB))
    machine_class = host_machine_class()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    commit = _git_commit(root)
    chosen, skipped = buildable_targets(targets or ())
    selected = select_artifacts(project, options.models)
    names = [f"{spec.name}_{variant.name}" for spec, variant in selected] \
        if options.models else []
    run_doit = run_doit or _run_streaming

    per_target, results = [], []
    for target in chosen:
        before = snapshot_links(root / "artifacts")
        cmd = doit_command(root, target, options.doit_vars, names)
        print(f"nightly: {target}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        returncode, output = run_doit(cmd, root, options.timeout_s)
        seconds = time.monotonic() - start
        log = out_dir / "logs" / f"doit-{target}.log"
        log.write_text(output, encoding="utf-8")
        rows = classify(parse_doit_output(output), before)
        counts: dict[str, int] = {}
        for row in rows:
            if row["kind"] == "stage":
                counts[row["status"]] = counts.get(row["status"], 0) + 1
        per_target.append({"target": target, "command": cmd[1:], "returncode": returncode,
                           "seconds": round(seconds, 1), "log": str(log.relative_to(root)),
                           "tasks": rows, "counts": counts})
        by_name = {row["task"]: row for row in rows}
        results += [artifact_result(project, spec, variant, target, by_name, machine_class)
                    for spec, variant in selected]

    refresh = options.baseline == "refresh"
    # A refresh sets new numbers: they are not compared with the ones they replace.
    failures, warnings = check(results, {"entries": []} if refresh else baseline, threshold,
                               drop)
    for t in per_target:
        if t["returncode"] != 0 and not any(r["status"] in (FAILED, NOT_RUN)
                                            for r in t["tasks"]):
            tail = " ".join((root / t["log"]).read_text(encoding="utf-8").split())[-800:]
            failures.append(f"target {t['target']}: doit exited {t['returncode']}: {tail}")
    if not chosen:
        failures.append("no target can be built on this machine: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))

    refreshed: list[dict] = []
    if refresh:
        warnings = [w for w in warnings if "no baseline entry" not in w]
        refreshed = refresh_baseline(baseline, baseline_path, results, threshold, drop,
                                      commit, now)
        append_history(out_dir / "history.jsonl", jsonable({
            "kind": "baseline_refresh", "time": now, "commit": commit,
            "file": _rel(baseline_path, root), "entries": refreshed}))

    status = "fail" if failures else "pass"
    stage_counts: dict[str, int] = {}
    for t in per_target:
        for k, v in t["counts"].items():
            stage_counts[k] = stage_counts.get(k, 0) + v
    append_history(out_dir / "history.jsonl", jsonable({
        "kind": "run", "time": now, "commit": commit, "machine_class": machine_class,
        "status": status, "baseline_mode": options.baseline, "threshold": threshold,
        "targets": chosen, "skipped_targets": skipped, "stage_counts": stage_counts,
        "failures": failures,
        "artifacts": [{k: r.get(k) for k in ("artifact", "model", "variant", "target",
                                              "machine_class", "ratio", "baseline_ratio",
                                              "ratio_limit", "measured_now",
                                              "validation_status", "bench_status")}
                      | ({"latency": latency_of(r["bench"])} if r["ratio"] is not None else {})
                      for r in results]}))
    history = read_history(out_dir / "history.jsonl")
    history_chart(history, out_dir / "history.png")
    chart_name = None
    measured = [r["bench"] for r in results if r["bench"] is not None]
    (out_dir / "latency.png").unlink(missing_ok=True)  # never show an earlier run's chart
    if measured:
        latency_chart(measured, out_dir / "latency.png")
        chart_name = "latency.png"

    summary = {"status": status, "time": now, "commit": commit, "machine_class": machine_class,
               "project": str(root), "baseline_file": _rel(baseline_path, root),
               "baseline_mode": options.baseline, "threshold": threshold,
               "sqnr_drop_db": drop, "failures": failures, "warnings": warnings,
               "baseline_refreshed": refreshed, "stage_counts": stage_counts,
               "targets": per_target, "skipped_targets": skipped, "artifacts": results,
               "history_runs": sum(1 for h in history if h.get("kind") == "run"),
               "history_chart": "history.png", "latency_chart": chart_name,
               "report": str(out_dir / "nightly.md")}
    write_report(summary, out_dir)
    (out_dir / "nightly.json").write_text(
        json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print_summary(summary)
    return summary


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


@doit_action
def action(root: Path, values: dict[str, str | None]) -> None:
    """The ``doit nightly`` action: parse the options, run, fail naming every problem."""
    options, targets = NightlyOptions.from_vars(values)
    summary = run(root, targets, options)
    if summary["status"] != "pass":
        raise NightlyFailed(f"nightly failed (report: {summary['report']}):\n  - "
                            + "\n  - ".join(summary["failures"]))


NIGHTLY_VARS = ("targets", "target", "models", "baseline", "threshold", "sqnr_drop_db",
                "baseline_file", "timeout", *PASSTHROUGH)


def nightly_task(root: Path, get_var: Callable[..., str | None]) -> dict:
    """The ``doit nightly`` task dict: always runs; options are parsed when it runs."""
    values = {name: get_var(name, None) for name in NIGHTLY_VARS}
    return {"actions": [(action, [root, values])], "uptodate": [False], "verbosity": 2}


__all__ = ["NightlyFailed", "NightlyOptions", "action", "buildable_targets", "check",
           "classify", "doit_command", "history_chart", "load_baseline", "nightly_task",
           "parse_doit_output", "read_history", "run", "select_artifacts", "snapshot_links"]
