"""Tests for pipeline.stages.tune: cache hits, remote measurement over RPC, failed-task retries."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from pipeline.compiler.lowering import lower_for_target
from pipeline.core.errors import ConfigError
from pipeline.tuning import logs as tuning_log
from pipeline.tuning import tuner

# Each tuning attempt costs a builder batch whose workers import the tensor intrinsics first
# (7-80 s depending on load), so these tests tune as few times as they can: one tuned
# database (a failed first attempt, then a good retry) serves two tests.
TARGET = {"kind": "llvm", "num-cores": 2}
TRIALS = 4
RPC_KEY = "onnx2deploy-test-cpu"


def target():
    return tvm.target.Target(TARGET)


def tiny_module():
    """ONNX relu(x @ w + b), 16x16, imported and lowered: a single fused tuning task."""
    from onnx import TensorProto, helper, numpy_helper
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Add", ["y", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [16, 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return lower_for_target(from_onnx(model, keep_params_in_input=False), target())


def budget(**kw) -> tuner.TuneBudget:
    defaults = dict(trials_per_task=TRIALS, max_trials=100, wall_seconds=600, mode="missing",
                    seed=0, builder_timeout=60)
    return tuner.TuneBudget(**{**defaults, **kw})


def record_lines(db_dir) -> list[str]:
    path = db_dir / tuning_log.RECORD_FILE
    return path.read_text().splitlines() if path.exists() else []


@derived_object
class FailFirstRunner(ms.runner.PyRunner):
    """LocalRunner whose first ``n_fail`` measurements come back as errors (a broken device)."""

    def __init__(self, n_fail: int) -> None:
        super().__init__()
        self.inner = ms.runner.LocalRunner()
        self.n_fail = n_fail

    def run(self, runner_inputs):
        n = min(self.n_fail, len(runner_inputs))
        self.n_fail -= n
        failed = [ms.runner.RunnerFuture(
            f_done=lambda: True,
            f_result=lambda: ms.runner.RunnerResult(None, "forced failure (test)"))
            for _ in range(n)]
        if n < len(runner_inputs):
            failed += list(self.inner.run(runner_inputs[n:]))
        return failed


@pytest.fixture(scope="module")
def retried(tmp_path_factory):
    """A database tuned by a run whose first attempt had every measurement fail."""
    db = tmp_path_factory.mktemp("retried") / "db"
    messages: list[str] = []
    plans = tuner.tune_module(tiny_module(), target(), db, budget(),
                             runner=FailFirstRunner(TRIALS), progress=messages.append)
    return db, plans, messages


@pytest.mark.slow
def test_task_failing_once_is_retried(retried):
    db, (plan,), messages = retried
    assert plan.attempts == 2 and plan.best_us is not None
    assert f"tune: retrying {plan.name} (seed 1001, builder timeout 120 s)" in messages
    assert sum("NO VALID RECORD" in m for m in messages) == 1  # the first attempt only
    s = tuning_log.stats(db)
    assert s["records"] > s["valid_records"] > 0  # failed first-attempt records kept


@pytest.mark.slow
def test_cache_hit_tunes_zero_trials(retried, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(retried[0], db)
    before = record_lines(db)
    messages: list[str] = []
    (plan,) = tuner.tune_module(tiny_module(), target(), db, budget(), progress=messages.append)
    assert record_lines(db) == before  # nothing measured
    assert "1 already tuned in the cache, 0 to tune" in messages[0]
    assert not any(m.startswith("tune: task") for m in messages)
    assert plan.attempts == 0
    assert plan.best_us == pytest.approx(retried[1][0].best_us)


@pytest.mark.slow
def test_a_new_cpu_remeasures_the_best_records_before_searching(retried, tmp_path):
    """Records carry the CPU that measured them; ``tune=extend`` on another CPU first
    re-measures the best of a task's foreign records here, and those then rank it."""
    import json

    from pipeline.core.targets import cpu_identity, num_threads

    here = tuner.measuring_cpu(target(), None)  # the CPU and how it measures (cold weights)
    assert here == cpu_identity() + tuner.COLD_TAG + tuner.THREADS_TAG.format(num_threads())

    db = tmp_path / "db"
    shutil.copytree(retried[0], db)
    contents = tuning_log.load(db)
    # the fixture measured with MetaSchedule's LocalRunner (hot): this CPU, untagged
    assert {contents.cpu_of(r) for r in contents.records} == {cpu_identity()}
    # as if the logs came from a machine 1000x faster than this one
    lines = []
    for line in (db / tuning_log.RECORD_FILE).read_text().splitlines():
        index, (trace, run_secs, *rest) = json.loads(line)
        if max(run_secs) < tuning_log.FAILED_RUN_SECS:  # failed records stay failed
            run_secs = [t / 1000 for t in run_secs]
        lines.append(json.dumps([index, [trace, run_secs, *rest]]))
    (db / tuning_log.RECORD_FILE).write_text("\n".join(lines) + "\n")
    (db / tuning_log.MEASURED_ON_FILE).unlink()
    tuning_log.tag_measured_on(db, 0, "Some Other CPU 1/2")
    records = retried[1][0].records

    messages: list[str] = []
    outcome = tuner.tune(tiny_module(), target(), db,
                         budget(mode="extend", trials_per_task=records + 1, remeasure_top=2),
                         progress=messages.append)
    assert any("best record(s) were measured otherwise (another CPU" in m
               for m in messages), messages
    contents = tuning_log.load(db)
    measured_here = [r for r in contents.records if contents.cpu_of(r) == here]
    assert len(measured_here) >= 2  # the two re-measured, and what the search added
    # the task's best (model estimate, stop rule) is this CPU's, not the 1000x faster one's
    (plan,) = outcome.plans
    assert plan.best_us == pytest.approx(min(r.mean_secs for r in measured_here) * 1e6)
    assert plan.best_us > 100 * min(r.mean_secs for r in contents.records) * 1e6
    view = tuning_log.merge([db], tmp_path / "view", prefer_cpu=here)
    assert view.other_cpus_dropped == len(contents.records) - len(measured_here)


@pytest.mark.slow
def test_merged_log_of_a_real_run_is_a_cache_hit(retried, tmp_path):
    # Records from real tuning (full traces, failed ones included) survive a merge that
    # JSONDatabase loads, and the merged log alone makes the model a full cache hit.
    report = tuning_log.merge([retried[0], retried[0]], tmp_path / "merged")
    assert report.skipped == [] and report.records_out == report.records_in // 2
    messages: list[str] = []
    (plan,) = tuner.tune_module(tiny_module(), target(), tmp_path / "merged", budget(),
                               progress=messages.append)
    assert plan.attempts == 0 and "0 to tune" in messages[0]
    assert plan.best_us == pytest.approx(retried[1][0].best_us)


@pytest.fixture(scope="module")
def rpc_tracker():
    """A TVM RPC tracker and one server registered under RPC_KEY, both on 127.0.0.1."""
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9690, silent=True)
    server = Server(host="127.0.0.1", port=9700, port_end=10200, key=RPC_KEY, silent=True,
                    tracker_addr=(tracker.host, tracker.port))
    try:
        deadline = time.monotonic() + 60
        while RPC_KEY not in rpc.connect_tracker(tracker.host, tracker.port).text_summary():
            assert time.monotonic() < deadline, "the RPC server never registered"
            time.sleep(0.5)
        yield tracker
    finally:
        server.terminate()
        tracker.terminate()


@pytest.mark.slow
def test_tune_through_rpc_tracker(tmp_path, rpc_tracker):
    runner = tuner.make_runner({"tracker_host": rpc_tracker.host,
                                "tracker_port": rpc_tracker.port, "device_key": RPC_KEY,
                                "timeout": 60})
    assert isinstance(runner, ms.runner.RPCRunner)
    plans = tuner.tune_module(tiny_module(), target(), tmp_path / "db", budget(),
                              runner=runner, progress=lambda s: None)
    assert plans[0].best_us is not None and plans[0].attempts == 1
    stats = tuning_log.stats(tmp_path / "db")
    assert stats["valid_records"] > 0 and stats["warnings"] == []


def _rpc_spec() -> str:
    """test_tune_continue's one-conv spec without its one-task-per-run trial cap."""
    from test_tune_continue import BUDGET_SPEC

    return "\n".join(line for line in BUDGET_SPEC.splitlines()
                     if not line.startswith("max_trials"))


@pytest.mark.slow
def test_rpc_from_the_doit_command_line(tmp_path, rpc_tracker):
    """``rpc=host:port:key`` as a user types it: every candidate is measured through the
    tracker (it used to fail at once: the stage gave the runner no session timeout)."""
    import json

    from doit_runner import doit
    from test_tune_continue import _one_conv

    from models import make_project

    project = make_project(tmp_path / "p", _one_conv(), _rpc_spec())
    run = doit(project, "tune:tiny_fp32@cpu", "tune=missing",
               f"rpc={rpc_tracker.host}:{rpc_tracker.port}:{RPC_KEY}")
    assert run.returncode == 0, run.output
    report = json.loads((project / "artifacts" / "tiny_fp32" / "cpu" / "tune"
                         / "tune_report.json").read_text())
    assert report["complete"] is True and report["untuned"] == [], report
    assert report["kernels_checked"] is False  # measured elsewhere: not checked here
    cache = project / "artifacts" / "tuning_cache"
    (db,) = [d for d in cache.iterdir() if d.is_dir()]
    assert tuning_log.stats(db)["valid_records"] >= len(report["tasks"])


def test_rpc_option_takes_an_optional_session_timeout():
    from pipeline.stages.tune import _rpc

    assert _rpc("h:9190:k") == {"tracker_host": "h", "tracker_port": 9190, "device_key": "k"}
    assert _rpc("h:9190:k:120")["timeout"] == 120
    runner = tuner.make_runner(_rpc("h:9190:k"))  # no timeout: the default, not an error
    assert isinstance(runner, ms.runner.RPCRunner)


def test_candidates_are_measured_on_every_core():
    """The artifact runs on every core; TVM's default pool in a runner worker takes half of
    them (it assumes two hardware threads per core), so records ranked 1-thread times."""
    from pipeline.core.targets import num_threads

    assert tuner.worker_threads(tuner.local_runner()) == num_threads()
    assert tuner.worker_threads(tuner.local_runner(cold=True)) == num_threads()


def test_make_runner_validates():
    assert isinstance(tuner.make_runner(None), ms.runner.LocalRunner)
    with pytest.raises(ConfigError) as err:
        tuner.make_runner({"tracker_host": "", "tracker_port": 70000, "devicekey": "x",
                          "timeout": -1})
    msg = str(err.value)
    for problem in ("missing 'device_key'", "unknown field 'devicekey'", "tracker_host is empty",
                    "tracker_port=70000", "timeout=-1"):
        assert problem in msg
    with pytest.raises(ConfigError, match="tracker_port='9190': expected int"):
        tuner.make_runner({"tracker_host": "h", "tracker_port": "9190", "device_key": "k",
                          "timeout": 10})


@pytest.mark.slow
def test_task_failing_twice_is_reported(tmp_path):
    # Every measurement fails. (A 1 ms builder timeout fails too, but each timed-out
    # worker restarts and re-imports the intrinsics: minutes more on a loaded machine.)
    messages: list[str] = []
    with pytest.raises(tuner.TuningFailed) as err:
        tuner.tune_module(tiny_module(), target(), tmp_path / "db", budget(),
                         runner=FailFirstRunner(10**9), progress=messages.append)
    (plan,) = err.value.plans
    assert err.value.tasks == [plan.name]
    assert plan.name in str(err.value)
    assert (plan.attempts, plan.records, plan.best_us) == (2, 0, None)
    assert f"tune: retrying {plan.name} (seed 1001, builder timeout 120 s)" in messages
    assert sum("NO VALID RECORD" in m for m in messages) == 3  # two attempts + the summary
    assert tuning_log.stats(tmp_path / "db")["valid_records"] == 0


def test_best_records_are_published_with_the_workload_they_were_tuned_on(tmp_path):
    """A trace finds blocks by name; the task's own module may name them differently
    (the importer numbers variables) while being structurally equal. Publishing the record
    against the task's module gave a database TVM refused to load."""
    from types import SimpleNamespace

    from test_tuning_log import make_db
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.workloads import TaskPlan
    from pipeline.stages.tune import _publish_records

    def matmul_named(block: str):
        a = te.placeholder((16, 16), name="a")
        b = te.placeholder((16, 16), name="b")
        k = te.reduce_axis((0, 16), name="k")
        c = te.compute((16, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name=block)
        return tvm.IRModule({"main": te.create_prim_func([a, b, c])})

    cache = make_db(tmp_path / "cache", [16], [(16, 4, [2e-6])])  # tuned on block "C"
    renamed = matmul_named("D")
    db = ms.database.JSONDatabase(work_dir=str(cache))
    assert db.has_workload(renamed)  # structurally equal despite the name
    plan = TaskPlan("matmul", SimpleNamespace(dispatched=[renamed]), 1, 1.0)
    out = tmp_path / "out"
    out.mkdir()
    verdicts = _publish_records(db, [plan], out, target(), verify=True)
    loaded = ms.database.JSONDatabase(work_dir=str(out), allow_missing=False)
    assert len(loaded) == 1
    # and checked: the record, replayed on the block it was tuned on, computes the matmul
    assert [v.chosen_rank for v in verdicts] == [0]


def test_recalibration_keeps_every_workload(tmp_path):
    """Same shapes, new calibration data (new scales and zero points, the input's included):
    every kernel keeps its workload, so the tuning logs are reused.

    The input edge is where constants used to leak: the input quantize and the first conv,
    whose padded pixels hold the input's zero point. Both now read them from (1,) buffers.
    """
    import tvm_ffi
    from qdq_helpers import inputs, quantize_qdq, residual_model
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler import lowering
    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer
    from pipeline.compiler.workloads import plan_tasks
    from pipeline.core.targets import get_target, tvm_target

    target = tvm_target(get_target("cpu"))
    model = residual_model()
    workloads, zero_points = [], []
    for seed, scale, shift in ((1, 1.0, 0.0), (2, 3.0, 0.7)):
        workdir = tmp_path / f"cal{seed}"
        workdir.mkdir()
        calib = [{"x": x * scale + shift} for x in inputs((1, 4, 8, 8), 4, seed=seed)]
        qdq = quantize_qdq(model, workdir, calib=calib)
        zero_points.append(_input_zero_point(qdq))
        mod = lowering.graph_cleanup()(from_onnx(qdq, keep_params_in_input=False))
        mod, _ = quantize_to_integer(mod)
        mod = lowering.lower_for_target(mod, target, "int8")
        workloads.append({p.name: tvm_ffi.structural_hash(p.task.dispatched[0])
                          for p in plan_tasks(mod, target)})
    # the calibrations really differ at the input edge, both with a nonzero zero point
    assert zero_points[0] != zero_points[1] and 0 not in zero_points, zero_points
    first, second = workloads
    assert sorted(first) == sorted(second)
    changed = sorted(name for name in first if first[name] != second[name])
    assert changed == []
    # the first conv pads with the zero point inside its own kernel (the VNNI packing)
    from pipeline.core.targets import host_has_vnni

    if host_has_vnni():
        assert any(name.startswith("fused_conv2d_NCHWc_int8") for name in first), sorted(first)


def _input_zero_point(model) -> int:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                   and n.input[0] == model.graph.input[0].name)
    return int(numpy_helper.to_array(inits[first_q.input[2]]).reshape(()))


def test_tasks_with_records_are_ranked_by_measured_time():
    """Once measured, a slow kernel with few FLOPs outranks a fast one with many; a task
    not measured yet is costed at the median GFLOP/s of the others."""
    plans = [
        tuner.TaskPlan("big_but_fast", None, weight=1, flops=4e9, best_us=1000.0),
        tuner.TaskPlan("small_but_slow", None, weight=2, flops=1e9, best_us=2000.0),
        tuner.TaskPlan("unmeasured", None, weight=1, flops=2e9),
        tuner.TaskPlan("tiny", None, weight=1, flops=1e6, best_us=1.0),
    ]
    tuner.rank_by_measured_share(plans)
    # costs in us: small_but_slow 2 x 2000, unmeasured 2e9 FLOP at the median rate of
    # 1e6 FLOP/us = 2000, big_but_fast 1000, tiny 1
    assert [p.name for p in plans][:2] == ["small_but_slow", "unmeasured"]
    assert abs(sum(p.share for p in plans) - 1.0) < 1e-9
    rates = sorted([4e9 / 1000.0, 1e9 / 2000.0, 1e6 / 1.0])  # FLOP per us of measured tasks
    unmeasured = next(p for p in plans if p.name == "unmeasured")
    assert unmeasured.share == pytest.approx((2e9 / rates[1]) / (4000 + 1000 + 2e9 / rates[1] + 1))


def test_ranking_without_any_record_keeps_the_flop_estimate():
    plans = [tuner.TaskPlan("a", None, 1, 1e9, share=0.75), tuner.TaskPlan("b", None, 1, 3e8,
                                                                         share=0.25)]
    tuner.rank_by_measured_share(plans)
    assert [(p.name, p.share) for p in plans] == [("a", 0.75), ("b", 0.25)]


def test_a_task_is_tuned_on_the_module_the_database_stores(tmp_path):
    """New records must replay on the stored workload: a task whose block names differ
    from the stored workload's (same structure) is tuned on the stored module."""
    from test_tuning_log import _matmul_with_block, make_db

    from pipeline.tuning.tuner import _on_stored_workload

    cache = make_db(tmp_path / "db", [16], [(16, 4, [2e-6])])  # tuned on block "C"
    db = ms.database.JSONDatabase(work_dir=str(cache))
    renamed = _matmul_with_block(16, "D")
    task = ms.ExtractedTask("matmul", renamed, target(), [renamed], 1)
    tuned_on = _on_stored_workload(db, task).dispatched[0]
    assert db.has_workload(tuned_on) and not tuned_on.same_as(renamed)
    assert "sblock(\"C\")" in tuned_on.script() and "sblock(\"D\")" not in tuned_on.script()
    fresh = _matmul_with_block(8, "D")  # not in the database: tuned as extracted
    assert _on_stored_workload(db, ms.ExtractedTask("m8", fresh, target(), [fresh], 1)) \
        .dispatched[0].same_as(fresh)


def test_the_estimate_says_how_long_and_how_to_skip_or_cap():
    from pipeline.tuning.tuner import TuneBudget, _estimate_line

    short = _estimate_line(40, 2, TuneBudget(trials_per_task=20, max_trials=2000,
                                             wall_seconds=3600))
    assert "for 40 trials over 2 task(s)" in short and "cap ends it" not in short
    assert "tune=off" in short and "tune_minutes=N" in short
    long = _estimate_line(2000, 60, TuneBudget(trials_per_task=32, max_trials=2000,
                                               wall_seconds=900))
    assert "about 15 min" in long and "the 15-minute cap ends it first" in long


def test_gathers_are_recognised_as_unmeasurable_and_matmuls_are_not():
    """MetaSchedule measures with random inputs: a take/gather reads out of bounds with
    them (no valid record, or a crash), so the tuner leaves such tasks untuned."""
    import tvm
    from tvm import te, topi

    from pipeline.tuning.kernel_check import reads_by_index

    table = te.placeholder((100, 16), "float32", name="table")
    ids = te.placeholder((1, 8), "int64", name="ids")
    gather = te.create_prim_func([table, ids, topi.take(table, ids, axis=0)])
    a = te.placeholder((8, 16), "float32", name="a")
    b = te.placeholder((16, 4), "float32", name="b")
    k = te.reduce_axis((0, 16), name="k")
    mm = te.compute((8, 4), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k))
    matmul = te.create_prim_func([a, b, mm])
    assert reads_by_index(tvm.IRModule({"main": gather}))
    assert not reads_by_index(tvm.IRModule({"main": matmul}))
