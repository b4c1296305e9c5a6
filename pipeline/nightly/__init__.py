"""``doit nightly``: rebuild every artifact from committed tuning logs, validate, bench, track.

One run, for each target this machine can build (``cpu``; the CUDA targets when ``nvcc`` is
there to cross-compile):

1. ``doit --continue build validate bench target=<t> tune=off`` as a subprocess (the real
   dodo.py, so the nightly takes the same incremental path a developer does: up-to-date stages
   are skipped, outputs found in the store are reused). ``tune=off``: nothing is tuned, every
   kernel's schedule comes from the tuning logs (committed under ``models/tuning_logs/``).
2. doit's output is parsed per task: ``.  task`` ran, ``-- task`` was up to date; the stage
   lines ``<stage>: built ...`` / ``<stage>: reusing verified output ...`` say whether a stage
   that ran made something new, and the manifests before and after say why (which config key,
   input file or tool version changed).
3. Each artifact's ``validation.json`` and ``bench.json`` are checked: a failed validation gate
   fails the run; so does a latency ratio (C++ median / onnxruntime median, measured in the
   same run so machine noise cancels) above ``threshold`` x the committed baseline's ratio for
   the same model, variant, target and machine class, and an int8 quantization quality (SQNR
   of TVM int8 vs onnxruntime fp32) more than ``sqnr_drop_db`` below the baseline's.
4. ``artifacts/reports/nightly/``: ``nightly.md`` (pass/fail first, charts embedded),
   ``nightly.json``, ``history.jsonl`` (one line appended per run and per baseline refresh),
   ``history.png``, ``latency.png`` and the doit logs.

``baseline=refresh`` rewrites the baseline entries of what this run measured and validated
(``models/baselines/nightly_baseline.json``; commit it), recorded in the history.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
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
from pipeline.tasks.actions import doit_action

STAGES = ("source", "quantize", "import", "tune", "compile", "package", "smoke", "validate",
          "bench")
BASELINE_FILE = Path("models") / "baselines" / "nightly_baseline.json"
REPORT_DIR = Path("artifacts") / "reports" / "nightly"
DEFAULT_THRESHOLD = 1.25  # fail when ratio > 1.25 x the baseline ratio
DEFAULT_SQNR_DROP_DB = 3.0  # fail when int8-vs-fp32 SQNR falls > 3 dB below the baseline
BASELINE_MODES = ("check", "refresh")
PASSTHROUGH = ("warmup", "repeat", "threads")  # doit options handed on to the builds
QUALITY = ("tvm_int8_vs_ort_fp32", "sqnr_db")  # the ungated metric tracked against the baseline
HISTORY_RUNS_CHARTED = 60

UP_TO_DATE = "up to date"
BUILT = "built"
REUSED = "reused"
RAN = "ran"
FAILED = "failed"
NOT_RUN = "not run"
WHY_UP_TO_DATE = "doit: file dependencies, config and tool versions unchanged, output intact"

_TASK = re.compile(r"^(\.  |-- )(\S+)\s*$")
_DOIT_ERROR = re.compile(r"^(TaskFailed|TaskError|UnmetDependency|SetupError|DependencyError)"
                         r" - taskid:(\S+)\s*$")
_STAGE = re.compile(r"^(\w+): (?:built (\w+) in [\d.]+ s|reusing verified output (\w+)) -> (.+)$")


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
        return cls(baseline=mode, threshold=threshold, sqnr_drop_db=drop,
                   baseline_file=values.get("baseline_file") or "", doit_vars=tuple(passthrough),
                   timeout_s=timeout), targets


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

def doit_command(project: Path, target: str, doit_vars: Sequence[tuple[str, str]] = ()
                 ) -> list[str]:
    """The build/validate/bench command of one target, as a user would type it."""
    return [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project),
            "--continue", "build", "validate", "bench", f"target={target}", "tune=off",
            *(f"{k}={v}" for k, v in doit_vars)]


def _run_streaming(cmd: list[str], cwd: Path, timeout_s: float | None) -> tuple[int, str]:
    """Run ``cmd``, echoing its output as it comes (CI logs show progress) and keeping it.

    The run gets its own process group so that a timeout or a Ctrl-C stops doit together
    with what it started (CMake, the benchmark processes); the store keeps what was finished.
    """
    import signal
    import threading

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
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


def parse_doit_output(output: str) -> dict[str, dict]:
    """Per task: what doit did and what the stage said.

    Returns
    -------
    dict
        Task name to ``{"doit": "ran" | "up to date" | "failed" | "not run", "store": "built" |
        "reused" | None, "recipe": str, "stable": str, "lines": [...], "error": str}``.
    """
    tasks: dict[str, dict] = {}
    current: dict | None = None
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        m = _TASK.match(line)
        if m:
            current = tasks.setdefault(m.group(2), {"doit": RAN if m.group(1) == ".  " else
                                                    UP_TO_DATE, "store": None, "recipe": "",
                                                    "stable": "", "lines": [], "error": ""})
            continue
        m = _DOIT_ERROR.match(line)
        if m:
            body = []
            while i < len(lines) and lines[i].strip() and not _TASK.match(lines[i]) \
                    and not _DOIT_ERROR.match(lines[i]):
                body.append(lines[i])
                i += 1
            task = tasks.setdefault(m.group(2), {"doit": RAN, "store": None, "recipe": "",
                                                 "stable": "", "lines": [], "error": ""})
            if m.group(1) == "UnmetDependency":
                task["doit"] = NOT_RUN
                task["error"] = "a task it depends on failed: " + " ".join(body).strip()
            else:
                task["doit"] = FAILED
                task["error"] = "\n".join(body[-20:]).strip() or m.group(1)
            current = None
            continue
        if current is None:
            continue
        current["lines"].append(line)
        m = _STAGE.match(line)
        if m:
            current["store"] = BUILT if m.group(2) else REUSED
            current["recipe"] = m.group(2) or m.group(3)
            current["stable"] = m.group(4).strip()
    return tasks


def _norm(path: str | Path) -> str:
    """A link's path with its parent resolved (the link itself is not followed)."""
    p = Path(path)
    return str(Path(os.path.realpath(p.parent)) / p.name)


def snapshot_links(artifacts: Path) -> dict[str, str]:
    """Every stable stage link under ``artifacts`` and the store dir it points at."""
    links = {}
    for dirpath, dirnames, _ in os.walk(artifacts):
        if ".store" in Path(dirpath).parts or "reports" in Path(dirpath).parts:
            dirnames[:] = []
            continue
        for name in dirnames:
            p = Path(dirpath) / name
            if p.is_symlink():
                links[_norm(p)] = os.path.realpath(p)
    return links


def _manifest(store_dir: str | None) -> dict | None:
    if not store_dir:
        return None
    try:
        return json.loads((Path(store_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            keys += _diff(a, b, f"{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def explain_change(old: dict | None, new: dict | None) -> str:
    """Why a stage's recipe differs from the one its stable link pointed at before."""
    if old is None:
        return "no earlier output"
    if new is None:
        return "new output (manifest unreadable)"
    parts = []
    config = _diff(old.get("config", {}), new.get("config", {}))
    if config:
        parts.append("config " + ", ".join(config))
    upstream = _diff(old.get("upstream", {}), new.get("upstream", {}))
    if upstream:
        parts.append("input " + ", ".join(upstream))
    tools = [f"{k} {old.get('tools', {}).get(k)} -> {new.get('tools', {}).get(k)}"
             for k in _diff(old.get("tools", {}), new.get("tools", {}))]
    if tools:
        parts.append("tools " + ", ".join(tools))
    return "changed: " + "; ".join(parts) if parts else "same recipe"


def classify(tasks: dict[str, dict], before: dict[str, str]) -> list[dict]:
    """One row per task: kind (stage or bookkeeping), status and why."""
    rows = []
    for name, t in tasks.items():
        group, _, sub = name.partition(":")
        kind = "stage" if group in STAGES and sub and sub != "report" else "bookkeeping"
        status, why = t["doit"], ""
        if status == UP_TO_DATE:
            why = WHY_UP_TO_DATE
        elif status in (FAILED, NOT_RUN):
            why = t["error"]
        elif kind == "bookkeeping":
            why = ("summary report over this target's artifacts" if sub == "report" else
                   "links the deliverables (model.so, bin/, src/, bundle); always cheap")
        elif t["store"] is None:
            why = "ran (no store output reported)"
        else:
            stable = _norm(t["stable"])
            old_dir, new_dir = before.get(stable), os.path.realpath(t["stable"])
            rejected = next((line for line in t["lines"] if "rejected:" in line), "")
            if t["store"] == BUILT:
                status = BUILT
                why = (rejected.split(": ", 1)[-1] if rejected and old_dir == new_dir else
                       explain_change(_manifest(old_dir), _manifest(new_dir)))
            else:
                status = REUSED
                why = ("doit re-ran it (its records did not match: state deleted, project "
                       "moved or a dependency touched); the verified output was in the store, "
                       "nothing rebuilt" if old_dir == new_dir else
                       "switched to an output already in the store ("
                       + explain_change(_manifest(old_dir), _manifest(new_dir)) + ")")
        rows.append({"task": name, "kind": kind, "status": status, "why": why,
                     "recipe": t["recipe"]})
    return rows


# ----------------------------------------------------------------------------- results

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


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
        return _read_json(p.artifact_dir / stage / filename), row["status"] == BUILT, ""

    res["validation"], res["validated_now"], res["validate_error"] = \
        current("validate", "validation.json")
    res["bench"], res["measured_now"], res["bench_error"] = current("bench", "bench.json")
    bench = res["bench"] or {}
    res["validation_status"] = (res["validation"] or {}).get("status", "not run")
    res["bench_status"] = bench.get("status", "not run")
    res["ratio"] = _finite(bench.get("ratio")) if bench.get("status") == "ok" else None
    bundles = sorted(p.artifact_dir.glob("*.tar.gz"))
    res["bundles"] = [str(b.relative_to(project.root)) for b in bundles]
    return res


def _latency(bench: dict) -> dict:
    return {"cpp_median_ms": bench["cpp"]["median_ms"], "cpp_p90_ms": bench["cpp"]["p90_ms"],
            "onnxruntime_median_ms": bench["onnxruntime"]["median_ms"],
            "onnxruntime_p90_ms": bench["onnxruntime"]["p90_ms"], "threads": bench["threads"]}


def _validation_metrics(validation: dict) -> dict:
    out: dict[str, Any] = {"status": validation.get("status")}
    for rec in validation.get("records", []):
        out[rec["comparison"]] = rec.get("metrics", {})
    return out


# ----------------------------------------------------------------------------- baseline

def _key(entry: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (entry["model"], entry["variant"], entry["target"], entry["machine_class"])


def load_baseline(path: Path) -> dict:
    """The committed baseline (an empty one if the file does not exist yet)."""
    if not path.exists():
        return {"format": 1, "entries": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"baseline {path} is not valid JSON ({e}); restore it from git or "
                          "rewrite it with `doit nightly baseline=refresh`") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ConfigError(f"baseline {path}: expected an object with an 'entries' list")
    for i, entry in enumerate(data["entries"]):
        missing = [k for k in ("model", "variant", "target", "machine_class", "ratio")
                   if k not in entry]
        if missing:
            raise ConfigError(f"baseline {path}: entry {i} lacks {', '.join(missing)}")
    return data


def baseline_entry(res: dict, commit: str, now: str) -> dict:
    return {"model": res["model"], "variant": res["variant"], "target": res["target"],
            "machine_class": res["machine_class"], "artifact": res["artifact"],
            "ratio": res["ratio"], "latency": _latency(res["bench"]),
            "validation": _validation_metrics(res["validation"]), "recorded": now,
            "commit": commit}


def check(results: Sequence[dict], baseline: dict, threshold: float, sqnr_drop_db: float
          ) -> tuple[list[str], list[str]]:
    """Failures (each naming artifact, metric, value and threshold) and warnings.

    Each result also gets its own ``failures`` list (what a baseline refresh skips), and
    ``baseline_ratio``/``ratio_limit`` where the baseline has an entry for it.
    """
    from pipeline.stages.validate import failure_lines

    entries = {_key(e): e for e in baseline["entries"]}
    failures, warnings = [], []
    for res in results:
        where = f"{res['artifact']} on {res['target']} [{res['machine_class']}]"
        mine: list[str] = []
        res["failures"] = mine
        if res["build"] != "ok":
            mine.append(f"{where}: build {res['build']}: {res['build_error']}")
        else:
            validation = res["validation"]
            if validation is None:
                mine.append(f"{where}: validation did not produce a report: "
                            f"{res['validate_error'] or 'see the doit log'}")
            else:
                mine += [f"validation gate: {line}" for line in failure_lines(validation)]
            if res["bench"] is None:
                mine.append(f"{where}: bench did not produce a result: "
                            f"{res['bench_error'] or 'see the doit log'}")
            base = entries.get(_key(res))
            if res["ratio"] is not None and base is None:
                warnings.append(f"{where}: no baseline entry, latency not compared (record "
                                "one with `doit nightly baseline=refresh`)")
            elif res["ratio"] is not None:
                mine += _regressions(res, base, where, threshold, sqnr_drop_db)
        failures += mine
    return failures, warnings


def _regressions(res: dict, base: dict, where: str, threshold: float,
                 sqnr_drop_db: float) -> list[str]:
    """Latency ratio and int8 quality of one artifact against its baseline entry."""
    out = []
    res["baseline_ratio"] = base["ratio"]
    res["ratio_limit"] = threshold * base["ratio"]
    if res["ratio"] > res["ratio_limit"]:
        bench = res["bench"]
        out.append(f"{where}: latency ratio C++/onnxruntime (median) = {res['ratio']:.4g}, "
                   f"threshold <= {res['ratio_limit']:.4g} ({threshold:g} x baseline "
                   f"{base['ratio']:.4g}); C++ {bench['cpp']['median_ms']:.4g} ms, "
                   f"onnxruntime {bench['onnxruntime']['median_ms']:.4g} ms")
    comparison, metric = QUALITY
    old = _finite(base.get("validation", {}).get(comparison, {}).get(metric))
    new = _validation_metrics(res["validation"] or {}).get(comparison, {}).get(metric)
    value = math.inf if new in ("inf", math.inf) else _finite(new)
    if old is not None and value is not None and value < old - sqnr_drop_db:
        out.append(f"{where}: {comparison} {metric} = {value:.4g}, threshold >= "
                   f"{old - sqnr_drop_db:.4g} (baseline {old:.4g} - {sqnr_drop_db:g} dB)")
    return out


# ----------------------------------------------------------------------------- history

def read_history(path: Path) -> list[dict]:
    """Every readable line of ``history.jsonl`` (a truncated last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            print(f"nightly: WARNING skipping an unreadable line of {path}", flush=True)
    return out


def append_history(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")


def history_chart(history: Sequence[dict], png: Path) -> Path:
    """Latency ratio (C++/onnxruntime) per artifact over the nightly runs; baseline refreshes
    drawn as dotted vertical lines. Agg canvas, like :func:`pipeline.stages.bench.chart`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [h for h in history if h.get("kind") == "run"][-HISTORY_RUNS_CHARTED:]
    first = history.index(runs[0]) if runs else len(history)
    fig = Figure(figsize=(8.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for x, run in enumerate(runs):
        for a in run.get("artifacts", []):
            if a.get("ratio") is not None:
                label = f"{a['artifact']}@{a['target']} [{a['machine_class']}]"
                series.setdefault(label, []).append((x, a["ratio"]))
    limits = {f"{a['artifact']}@{a['target']} [{a['machine_class']}]": a.get("ratio_limit")
              for a in (runs[-1].get("artifacts", []) if runs else [])}
    for label, points in sorted(series.items()):
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if limits.get(label) is not None:  # where the latest run would have failed
            ax.axhline(limits[label], linestyle="--", linewidth=0.8, alpha=0.6,
                       color=line.get_color())
    x = -0.5
    for h in history[first:]:
        if h.get("kind") == "run":
            x += 1
        elif h.get("kind") == "baseline_refresh":
            ax.axvline(x, linestyle=":", color="gray")
            ax.annotate("baseline refresh", (x, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7, color="gray")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ticks = list(range(len(runs)))
    step = max(1, len(ticks) // 12)
    labels = [r.get("time", "")[5:16].replace("T", " ") for r in runs]  # MM-DD HH:MM
    ax.set_xticks(ticks[::step], labels[::step], fontsize=7, rotation=30)
    ax.set_xlim(-0.6, max(len(runs), 1) - 0.4)
    ax.set_ylabel("C++ median / onnxruntime median")
    ax.set_title("Nightly latency ratio per artifact (lower is better; dashed: fail above)")
    if series:
        ax.legend(fontsize=7)
    else:
        ax.annotate("no latency measured yet", (0.5, 0.5), xycoords="axes fraction",
                    ha="center", color="gray")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(png), format="png")
    return png


# ----------------------------------------------------------------------------- report

def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write_report(summary: dict, out_dir: Path) -> Path:
    """``nightly.md`` (pass/fail first, then artifacts, charts, stages, bundles)."""
    word = summary["status"].upper()
    lines = [f"# Nightly: {word}", "",
             f"{summary['time']} · commit `{summary['commit'] or 'unknown'}` · machine class "
             f"`{summary['machine_class']}` · baseline `{summary['baseline_file']}` "
             f"({summary['baseline_mode']}) · ratio threshold {summary['threshold']:g}x · "
             f"SQNR drop limit {summary['sqnr_drop_db']:g} dB", ""]
    counts = summary["stage_counts"]
    lines.append("Stages: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in
                                        (BUILT, REUSED, UP_TO_DATE, FAILED, NOT_RUN)) + ".")
    if summary["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in summary["failures"]]
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    if summary["baseline_refreshed"]:
        lines += ["", f"Baseline refreshed: {len(summary['baseline_refreshed'])} entries "
                  f"written to `{summary['baseline_file']}` (commit it)."]
    lines += ["", "## Artifacts", "",
              "| artifact | target | build | validation | C++ median ms | C++ p90 ms | "
              "onnxruntime ms | ratio | baseline ratio | limit | measured |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["artifacts"]:
        bench = r["bench"] or {}
        ok = bench.get("status") == "ok"
        cpp = bench.get("cpp") or {}
        ort = bench.get("onnxruntime") or {}
        lines.append(
            f"| {r['artifact']} | {r['target']} | {r['build']} | {r['validation_status']} | "
            f"{_fmt(cpp.get('median_ms')) if ok else r['bench_status']} | "
            f"{_fmt(cpp.get('p90_ms'))} | {_fmt(ort.get('median_ms'))} | {_fmt(r['ratio'])} | "
            f"{_fmt(r.get('baseline_ratio'))} | {_fmt(r.get('ratio_limit'))} | "
            f"{'this run' if r['measured_now'] else 'stored' if ok else '-'} |")
    for target, why in summary["skipped_targets"].items():
        lines.append(f"| every artifact | {target} | {why} | - | - | - | - | - | - | - | - |")
    if summary.get("latency_chart"):
        lines += ["", "## Latency (this run)", "", f"![latency per artifact]"
                  f"({summary['latency_chart']})"]
    lines += ["", "## History", "", f"![latency ratio over time]({summary['history_chart']})", "",
              f"Runs recorded in `history.jsonl`: {summary['history_runs']}."]
    lines += ["", "## Stages", "",
              "`-- task` (doit: up to date) and `.  task` (ran) from doit; for a stage that ran, "
              "`built` made a new output and `reused` found it verified in the store.", ""]
    for t in summary["targets"]:
        c = t["counts"]
        lines += [f"### {t['target']}: " + ", ".join(f"{c.get(s, 0)} {s}" for s in
                                                     (BUILT, REUSED, UP_TO_DATE, FAILED,
                                                      NOT_RUN)) +
                  f" (doit exit {t['returncode']}, {t['seconds']:.1f} s, log `{t['log']}`)", ""]
        ran = [row for row in t["tasks"] if row["status"] != UP_TO_DATE]
        if ran:
            lines += ["| task | status | why |", "|---|---|---|"]
            for row in ran:
                why = row["why"].replace("\n", " ").replace("|", "\\|")
                lines.append(f"| {row['task']} | {row['status']} | {why} |")
            lines.append("")
        skipped = [row["task"] for row in t["tasks"] if row["status"] == UP_TO_DATE]
        if skipped:
            lines += [f"Skipped as up to date ({WHY_UP_TO_DATE}): "
                      + ", ".join(f"`{name}`" for name in skipped) + ".", ""]
    bundles = [b for r in summary["artifacts"] for b in r["bundles"]]
    lines += ["## Bundles", ""] + ([f"- `{b}`" for b in bundles] or ["(none)"])
    md = out_dir / "nightly.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md


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
    run_doit = run_doit or _run_streaming

    per_target, results = [], []
    for target in chosen:
        before = snapshot_links(root / "artifacts")
        cmd = doit_command(root, target, options.doit_vars)
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
        for spec in project.specs.values():
            for variant in spec.variants.values():
                results.append(artifact_result(project, spec, variant, target, by_name,
                                               machine_class))

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
        refreshed = _refresh_baseline(baseline, baseline_path, results, threshold, drop,
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
                      | ({"latency": _latency(r["bench"])} if r["ratio"] is not None else {})
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
    _print_summary(summary)
    return summary


def _refresh_baseline(baseline: dict, path: Path, results: Sequence[dict], threshold: float,
                      drop: float, commit: str, now: str) -> list[dict]:
    """Replace the entries of every artifact this run validated (pass) and measured; keep
    every other entry. Returns what changed, old and new ratio."""
    entries = {_key(e): e for e in baseline["entries"]}
    changed = []
    for res in results:
        if res["ratio"] is None or res["validation_status"] != "pass" or res["failures"]:
            continue
        new = baseline_entry(res, commit, now)
        old = entries.get(_key(new))
        entries[_key(new)] = new
        res["baseline_ratio"], res["ratio_limit"] = new["ratio"], threshold * new["ratio"]
        changed.append({"artifact": res["artifact"], "target": res["target"],
                        "machine_class": res["machine_class"],
                        "old_ratio": old["ratio"] if old else None, "new_ratio": new["ratio"]})
    data = {"format": 1, "threshold": baseline.get("threshold", threshold),
            "sqnr_drop_db": baseline.get("sqnr_drop_db", drop),
            **{k: v for k, v in baseline.items() if k not in ("format", "entries")},
            "entries": [entries[k] for k in sorted(entries)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    print(f"nightly: baseline {path}: {len(changed)} entries refreshed (commit it)", flush=True)
    return changed


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _print_summary(summary: dict) -> None:
    c = summary["stage_counts"]
    print(f"nightly: {summary['status'].upper()}: stages "
          + ", ".join(f"{c.get(s, 0)} {s}" for s in (BUILT, REUSED, UP_TO_DATE, FAILED, NOT_RUN))
          + f"; {len(summary['artifacts'])} artifacts; report {summary['report']}", flush=True)
    for line in summary["failures"]:
        print(f"nightly: FAIL {line}", flush=True)
    for line in summary["warnings"]:
        print(f"nightly: WARNING {line}", flush=True)


@doit_action
def action(root: Path, values: dict[str, str | None]) -> None:
    """The ``doit nightly`` action: parse the options, run, fail naming every problem."""
    options, targets = NightlyOptions.from_vars(values)
    summary = run(root, targets, options)
    if summary["status"] != "pass":
        raise NightlyFailed(f"nightly failed (report: {summary['report']}):\n  - "
                            + "\n  - ".join(summary["failures"]))


NIGHTLY_VARS = ("targets", "target", "baseline", "threshold", "sqnr_drop_db", "baseline_file",
                "timeout", *PASSTHROUGH)


def nightly_task(root: Path, get_var: Callable[..., str | None]) -> dict:
    """The ``doit nightly`` task dict: always runs; options are parsed when it runs."""
    values = {name: get_var(name, None) for name in NIGHTLY_VARS}
    return {"actions": [(action, [root, values])], "uptodate": [False], "verbosity": 2}


__all__ = ["NightlyFailed", "NightlyOptions", "action", "buildable_targets", "check",
           "classify", "doit_command", "history_chart", "load_baseline", "nightly_task",
           "parse_doit_output", "read_history", "run", "snapshot_links"]
