"""Reading a doit run: which tasks ran, which stage outputs were built or reused, and why."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

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


_STAGE = re.compile(r"^(\w+): (?:built (\w+) in [\d.]+ s(?:, peak RSS \d+ MiB)?|"
                    r"reusing verified output (\w+)) -> (.+)$")


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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def latency_of(bench: dict) -> dict:
    return {"cpp_median_ms": bench["cpp"]["median_ms"], "cpp_p90_ms": bench["cpp"]["p90_ms"],
            "onnxruntime_median_ms": bench["onnxruntime"]["median_ms"],
            "onnxruntime_p90_ms": bench["onnxruntime"]["p90_ms"], "threads": bench["threads"]}


def validation_metrics(validation: dict) -> dict:
    out: dict[str, Any] = {"status": validation.get("status")}
    for rec in validation.get("records", []):
        out[rec["comparison"]] = rec.get("metrics", {})
    return out


STAGES = ("source", "quantize", "import", "tune", "compile", "package", "smoke", "kit",
          "validate", "bench")
