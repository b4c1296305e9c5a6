"""A budget-stopped tune continues with the same command: is_complete, forget_incomplete,
the summary line's counts, and the interplay with the artifact store (no tuning here)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.compiler.workloads import TaskPlan
from pipeline.core import store
from pipeline.stages import tune as stage
from pipeline.tuning import tuner


def _publish(root: Path, complete: bool | None, rid_config: dict | None = None) -> Path:
    """Publish a tune output through the real store; returns its stable link."""
    stable = root / "art" / "tune"

    def produce(out: Path) -> None:
        report = {"tasks": []}
        if complete is not None:
            report.update(complete=complete, tasks_left=[] if complete else ["a", "b"])
        (out / stage.REPORT).write_text(json.dumps(report))
        (out / "database_tuning_record.json").write_text("")

    store.run_stage(root, "tune", rid_config or {"x": 1}, {}, stable, produce)
    return stable


def test_an_incomplete_output_is_not_up_to_date(tmp_path):
    assert stage.is_complete(_publish(tmp_path / "a", complete=True))
    assert not stage.is_complete(_publish(tmp_path / "b", complete=False))
    assert stage.is_complete(_publish(tmp_path / "c", complete=None))  # older outputs
    assert stage.is_complete(tmp_path / "never-built")  # store.intact says "rebuild" there


def test_forget_incomplete_makes_the_store_tune_again(tmp_path, capsys):
    stable = _publish(tmp_path, complete=False)
    built = []

    def produce(out: Path) -> None:
        built.append(out)
        (out / stage.REPORT).write_text(json.dumps({"complete": True, "tasks_left": []}))

    # without it the store reuses the stopped output: re-running was a no-op
    store.run_stage(tmp_path, "tune", {"x": 1}, {}, stable, produce)
    assert built == [] and not stage.is_complete(stable)
    assert stage.forget_incomplete(stable)
    assert "stopped on its budget with 2 task(s) left; continuing" in capsys.readouterr().out
    store.run_stage(tmp_path, "tune", {"x": 1}, {}, stable, produce)
    assert len(built) == 1 and stage.is_complete(stable) and store.intact(stable)
    assert not stage.forget_incomplete(stable)  # complete: kept


def test_forget_incomplete_removes_only_store_entries(tmp_path):
    plain = tmp_path / "tune"
    plain.mkdir()
    (plain / stage.REPORT).write_text(json.dumps({"complete": False}))
    assert not stage.forget_incomplete(plain)  # a real dir, not a link into the store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / stage.REPORT).write_text(json.dumps({"complete": False}))
    (tmp_path / "link").symlink_to(elsewhere)
    assert not stage.forget_incomplete(tmp_path / "link")
    assert (elsewhere / stage.REPORT).exists()


def _plans(records: list[int]) -> list[TaskPlan]:
    return [TaskPlan(f"t{i}", None, 1, 1.0, records=r) for i, r in enumerate(records)]


def test_extend_summary_counts_what_the_cache_holds():
    # the issue: all 29 had records, and extend mode said "0 already tuned in the cache"
    budget = tuner.TuneBudget(trials_per_task=64, mode="extend")
    plans = _plans([10] * 27 + [64, 80])
    todo = plans[:27]
    line = tuner._summary_line(plans, todo, budget)
    assert line.startswith("tune: 29 tasks, 29 with records in the cache (2 already at 64 "
                           "valid records), 27 to tune up to 64")
    missing = tuner.TuneBudget(trials_per_task=64, mode="missing")
    plans = _plans([0, 0, 5])
    assert "3 tasks, 1 already tuned in the cache, 2 to tune" in tuner._summary_line(
        plans, plans[:2], missing)
