"""A budget-stopped tune continues with the same command: is_complete, forget_incomplete,
the summary line's counts, and the interplay with the artifact store (no tuning here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.compiler.workloads import TaskPlan
from pipeline.core import store
from pipeline.core.errors import ConfigError
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


def test_tune_tasks_names_kernels_by_name_or_pattern():
    plans = [TaskPlan(n, None, 1, 1.0, share=s) for n, s in
             (("fused_conv2d18_add13_relu10", 0.05), ("fused_conv2d2_add1_relu1", 0.07),
              ("transpose", 0.01))]
    assert tuner.tasks_named(plans, ("fused_conv2d18_add13_relu10",)) == {
        "fused_conv2d18_add13_relu10"}
    assert tuner.tasks_named(plans, ("*conv2d*",)) == {"fused_conv2d18_add13_relu10",
                                                      "fused_conv2d2_add1_relu1"}
    with pytest.raises(ConfigError) as err:
        tuner.tasks_named(plans, ("*conv2d2*", "conv2d18", "*dense*"))
    msg = str(err.value)
    # an exact name must be the whole name; the kernels are listed, heaviest first
    assert "conv2d18, *dense* name(s) no kernel of this model" in msg
    assert ("fused_conv2d2_add1_relu1, fused_conv2d18_add13_relu10, transpose" in msg), msg


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


BUDGET_SPEC = """
name = "tiny"
[source]
path = "models/tiny.onnx"
[[inputs]]
name = "x"
shape = [1, 3, 8, 8]
[variants.fp32]
scheme = "fp32"
[tuning]
trials_per_task = 2
max_trials = 2      # one task per run: a run stops on its budget with tasks left
wall_seconds = 600
"""


def _one_conv():
    """Conv + Relu: the fewest tasks (the conv and its layout transposes) for a tuning run."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["y"])], "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
    return model


@pytest.mark.slow
def test_a_budget_stopped_tune_continues_with_the_same_command(tmp_path):
    """Through the real doit: the same command, repeated, tunes the tasks the last run left
    (it is not "up to date"), until every task has a record and the run is complete."""
    import json

    from doit_runner import doit

    from models import make_project

    project = make_project(tmp_path / "p", _one_conv(), BUDGET_SPEC)
    report_path = project / "artifacts" / "tiny_fp32" / "cpu" / "tune" / "tune_report.json"
    command = ("tune:tiny_fp32@cpu", "tune=missing")
    run = doit(project, *command)
    assert run.returncode == 0, run.output
    first = json.loads(report_path.read_text())
    assert first["complete"] is False and first["tasks_left"], first
    tasks = len(first["tasks"])
    left = [len(first["tasks_left"])]
    for _ in range(tasks):  # each run tunes at least one more task
        run = doit(project, *command)
        assert run.returncode == 0, run.output
        assert "tune:tiny_fp32@cpu" in run.executed, run.output  # not "up to date"
        report = json.loads(report_path.read_text())
        left.append(len(report["tasks_left"]))
        if report["complete"]:
            break
    assert report["complete"] is True and report["untuned"] == [], (left, report)
    assert all(b < a for a, b in zip(left, left[1:])), left  # progress every run
    assert doit(project, *command).executed == set()  # complete: now up to date


@pytest.mark.slow
def test_tune_tasks_tunes_only_the_named_kernels(tmp_path):
    """``tune_tasks=`` from the doit command line: only the named kernel gets records; a
    pattern that names no kernel is an error listing the kernels, and the tuned output
    stays."""
    import json

    from doit_runner import doit
    from test_tune import _rpc_spec

    from models import make_project

    project = make_project(tmp_path / "p", _one_conv(), _rpc_spec())
    report_path = project / "artifacts" / "tiny_fp32" / "cpu" / "tune" / "tune_report.json"
    run = doit(project, "tune:tiny_fp32@cpu", "tune=missing", "tune_tasks=*conv2d*")
    assert run.returncode == 0, run.output
    assert "tune_tasks selects 1 of" in run.output, run.output
    tasks = {t["name"]: t for t in json.loads(report_path.read_text())["tasks"]}
    assert len(tasks) > 1, tasks  # the conv and its layout transposes
    tuned = {n for n, t in tasks.items() if t["records"]}
    assert len(tuned) == 1 and "conv2d" in tuned.pop(), tasks

    before = report_path.read_bytes()
    run = doit(project, "tune:tiny_fp32@cpu", "tune=extend", "tune_tasks=*dense*")
    assert run.returncode != 0
    assert "*dense* name(s) no kernel of this model" in run.output, run.output
    assert "conv2d" in run.output.split("no kernel of this model")[1]  # the list
    assert report_path.read_bytes() == before
