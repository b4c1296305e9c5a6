"""The committed latency/quality baseline per machine class, and the regression gates."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.hashing import jsonable
from pipeline.nightly.parse import finite, latency_of, validation_metrics

BASELINE_FILE = Path("models") / "baselines" / "nightly_baseline.json"


DEFAULT_THRESHOLD = 1.25  # fail when ratio > 1.25 x the baseline ratio


DEFAULT_SQNR_DROP_DB = 3.0  # fail when int8-vs-fp32 SQNR falls > 3 dB below the baseline


BASELINE_MODES = ("check", "refresh")


QUALITY = ("tvm_int8_vs_ort_fp32", "sqnr_db")  # the ungated metric tracked against the baseline


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
            "ratio": res["ratio"], "latency": latency_of(res["bench"]),
            "validation": validation_metrics(res["validation"]), "recorded": now,
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
    old = finite(base.get("validation", {}).get(comparison, {}).get(metric))
    new = validation_metrics(res["validation"] or {}).get(comparison, {}).get(metric)
    value = math.inf if new in ("inf", math.inf) else finite(new)
    if old is not None and value is not None and value < old - sqnr_drop_db:
        out.append(f"{where}: {comparison} {metric} = {value:.4g}, threshold >= "
                   f"{old - sqnr_drop_db:.4g} (baseline {old:.4g} - {sqnr_drop_db:g} dB)")
    return out


def refresh_baseline(baseline: dict, path: Path, results: Sequence[dict], threshold: float,
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
