"""The prior-guided, hierarchical search: the warm-started cost model, the focus rounds and
their stop rule (pipeline.tuning.tuner, pipeline.tuning.cost_model)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from pipeline.core.project import REPO
from pipeline.tuning import cost_model, transfer, tuner
from pipeline.tuning import logs as tuning_log

CPU_LOGS = REPO / "models" / "tuning_logs" / "cpu-x86_64-avx512-vnni"


@pytest.fixture(scope="module")
def committed_db():
    database, scratch = transfer.open_logs(CPU_LOGS)
    yield database, scratch
    shutil.rmtree(scratch, ignore_errors=True)


def _candidates_of_one_workload(database):
    records = database.get_all_tuning_records()
    workload = records[-1].workload
    mine = [r for r in records if r.workload.same_as(workload)][:4]
    return workload, [r.as_measure_candidate() for r in mine], mine[0].target


def test_the_warm_model_predicts_from_its_first_candidate(committed_db):
    """MetaSchedule's fresh model scores candidates at random until it has 100 samples;
    trained on the committed logs, the model ranks from the start (same input, same
    scores), having learned from many workloads."""
    from tvm.s_tir import meta_schedule as ms

    database, _ = committed_db
    workload, candidates, target = _candidates_of_one_workload(database)
    context = ms.TuneContext(mod=workload.mod, target=target)

    fresh = cost_model.new_model()
    assert not np.array_equal(fresh.predict(context, candidates),
                              fresh.predict(context, candidates))  # a coin toss

    model, samples = cost_model.train_on_database(database, "llvm", per_workload=4)
    assert model.booster is not None
    assert samples >= fresh.num_warmup_samples and len(model.data) >= 50
    scores = model.predict(context, candidates)
    assert np.array_equal(scores, model.predict(context, candidates))
    assert model.predict(context, candidates).std() > 0  # it tells the schedules apart
    assert cost_model.train_on_database(database, "cuda")[1] == 0  # only its target's


def test_the_warm_model_is_cached_by_the_records_it_learned(tmp_path, committed_db):
    database, scratch = committed_db
    db_dir = tmp_path / "db"
    shutil.copytree(scratch, db_dir, ignore=shutil.ignore_patterns("logs", "*.orig*"))
    lines: list[str] = []
    first = cost_model.warm_model(database, db_dir, "llvm", lines.append)
    assert "warm-started on" in lines[-1] and first.data_size > 100
    (cached,) = (db_dir / cost_model.CACHE_DIR).glob("xgb-*.tar")
    assert cost_model.record_digest(db_dir) in cached.name

    again = cost_model.warm_model(database, db_dir, "llvm", lines.append)
    assert f"warm-started from {cached.name}" in lines[-1]
    assert again.data_size == first.data_size

    with open(db_dir / tuning_log.RECORD_FILE, "a") as f:  # new records: another key
        f.write("\n")
    cost_model.warm_model(database, db_dir, "llvm", lines.append)
    assert "warm-started on" in lines[-1]
    assert [p.name for p in (db_dir / cost_model.CACHE_DIR).glob("*.tar")] != [cached.name]


@pytest.mark.slow
def test_focus_rounds_rest_a_task_that_stopped_improving(tmp_path):
    """A 16x16 matmul is tuned out within a few dozen trials: the stop rule rests it, and
    since it is the only task, it comes back at once in rounds twice as long, until the
    run's trial budget is spent (a rest never ends a run with budget left); every round
    reports the model estimate and the time left."""
    import re

    from test_tune import target, tiny_module

    messages: list[str] = []
    # min_gain 0.99: every round counts as stale, so the rest comes after the coarse pass
    # and two rounds (24 of 64 trials) whatever the timings. With 0.05 a noisy 1 us kernel
    # kept "improving" until the budget was spent, and no revival was left to see (CI).
    budget = tuner.TuneBudget(trials_per_task=200, max_trials=64, wall_seconds=900,
                              coarse_trials=8, round_trials=8, patience=2, min_gain=0.99,
                              trials_per_iter=8, builder_timeout=60, warm_cost_model=True)
    outcome = tuner.tune(tiny_module(), target(), tmp_path / "db", budget,
                         progress=messages.append)
    rounds = [m for m in messages if m.startswith("tune: round ")]
    assert any("coarse pass done: model estimate" in m for m in messages), messages
    assert all("model estimate" in r and " s left" in r for r in rounds)
    rests = [i for i, m in enumerate(messages) if "rests: < 99% in 2 rounds" in m]
    revivals = [i for i, m in enumerate(messages) if "go on, by share, in rounds twice" in m]
    assert rests and revivals and rests[0] < revivals[0], messages
    # the first round after a revival is twice as long as the rounds before the rest
    total = [int(re.search(r"; (\d+) trials, ", m).group(1)) for m in messages
             if m.startswith("tune: round ")]
    first_after = sum(1 for i, m in enumerate(messages)
                      if m.startswith("tune: round ") and i < revivals[0])
    sizes = [b - a for a, b in zip(total, total[1:])]
    assert sizes[first_after - 1] > 8 or "exhausted" in rounds[first_after], (sizes, rounds)
    # the run went on until its budget was spent (or the space had nothing new)
    assert (outcome.trials >= budget.max_trials
            or any("search space is exhausted" in r for r in rounds)), (outcome.trials, rounds)
    (plan,) = outcome.plans
    assert plan.records >= 8 + 2 * 8 - 4  # the coarse pass and two rounds (a few may fail)
    # the run's cost model is kept for the next run, under the records it ends with
    assert (tmp_path / "db" / cost_model.CACHE_DIR
            / f"xgb-{cost_model.record_digest(tmp_path / 'db')}.tar").is_file()


def test_a_resting_heavy_task_comes_back_before_tiny_ones_get_rounds():
    """Focus rounds on kernels under min_share of the model wait while a heavier task
    rests: squeezenet gave 237 of 852 s to such rounds, gaining nothing."""
    from pipeline.compiler.workloads import TaskPlan

    def plan(name, share):
        return TaskPlan(name=name, task=None, weight=1, flops=1.0, share=share)

    heavy, mid, tiny, tinier = (plan("conv", 0.30), plan("dense", 0.05),
                                plan("pool", 0.004), plan("mean", 0.001))
    assert tuner.heavier_task_rests([tiny, tinier], [heavy], 0.01)
    assert tuner.heavier_task_rests([], [heavy], 0.01)
    assert not tuner.heavier_task_rests([mid, tiny], [heavy], 0.01)  # a 5% task goes on
    assert not tuner.heavier_task_rests([tinier], [tiny], 0.01)  # only tiny ones rest
    assert not tuner.heavier_task_rests([tiny], [], 0.01)


@pytest.mark.slow
def test_a_task_keeps_one_cost_model_across_its_rounds(tmp_path, monkeypatch):
    """Rounds of 16-32 trials with a fresh model each never get past XGBModel's 100 random
    warm-up samples: a task's model is made once and serves all its rounds."""
    from test_tune import target, tiny_module

    made = []
    original = cost_model.new_model

    def counting():
        made.append(original())
        return made[-1]

    monkeypatch.setattr(cost_model, "new_model", counting)
    budget = tuner.TuneBudget(trials_per_task=200, max_trials=32, wall_seconds=900,
                              coarse_trials=8, round_trials=8, patience=99,
                              trials_per_iter=8, builder_timeout=60)
    messages: list[str] = []
    outcome = tuner.tune(tiny_module(), target(), tmp_path / "db", budget,
                         progress=messages.append)
    assert sum(m.startswith("tune: round ") for m in messages) >= 2, messages
    assert len(made) == 1  # one task, one model, every round
    assert made[0].data_size >= outcome.trials - 8  # it saw (nearly) every candidate
    made.clear()
    tuner.tune(tiny_module(), target(), tmp_path / "db2",
               dataclasses.replace(budget, task_cost_models=False),
               progress=messages.append)
    assert made == []  # MetaSchedule's own fresh model each round


def test_stock_budget_is_metaschedule_as_it_comes():
    stock = tuner.TuneBudget.stock(trials_per_task=8)
    assert (stock.seed_from_kind, stock.warm_cost_model, stock.coarse_trials,
            stock.remeasure_top, stock.population) == (False, False, 0, 0, 512)
    assert not stock.task_cost_models and not stock.cold_weights
    assert stock.trials_per_task == 8
    guided = tuner.TuneBudget()
    assert guided.seed_from_kind and guided.coarse_trials > 0 and guided.persistent_builder
    assert guided.population < stock.population and not stock.persistent_builder
    assert not guided.warm_cost_model  # measured to hurt (see TuneBudget): opt-in


def test_round_lines_read_in_us_and_ms():
    assert tuner._time(0.3684) == "0.368 us" and tuner._time(23456.0) == "23.5 ms"

