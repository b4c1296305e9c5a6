"""The nightly report: nightly.md (pass/fail first, charts embedded) and the console summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.nightly.parse import BUILT, FAILED, NOT_RUN, REUSED, UP_TO_DATE, WHY_UP_TO_DATE


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


def print_summary(summary: dict) -> None:
    c = summary["stage_counts"]
    print(f"nightly: {summary['status'].upper()}: stages "
          + ", ".join(f"{c.get(s, 0)} {s}" for s in (BUILT, REUSED, UP_TO_DATE, FAILED, NOT_RUN))
          + f"; {len(summary['artifacts'])} artifacts; report {summary['report']}", flush=True)
    for line in summary["failures"]:
        print(f"nightly: FAIL {line}", flush=True)
    for line in summary["warnings"]:
        print(f"nightly: WARNING {line}", flush=True)
