"""The nightly history: one JSON line per run, and its chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

HISTORY_RUNS_CHARTED = 60


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
