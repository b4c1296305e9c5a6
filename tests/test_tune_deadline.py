"""The wall-clock cap ends a task in flight after the batch being measured, records kept."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from test_tune import budget, record_lines, target, tiny_module
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from pipeline.tuning import tuner


@derived_object
class ClockJumpRunner(ms.runner.PyRunner):
    """LocalRunner that, on its first batch, moves the tuner's clock past any cap: the
    deadline passes while a batch is in flight, whatever this machine's speed."""

    def __init__(self, clock: dict) -> None:
        super().__init__()
        self.inner = ms.runner.LocalRunner()
        self.clock = clock
        self.batches = 0

    def run(self, runner_inputs):
        self.batches += 1
        if self.batches == 1:
            # the first batch: the task's seeds (its default rule schedule: nothing to
            # borrow in an empty database) or, without seeds, the search's first batch
            self.first_batch = len(runner_inputs)
            self.clock["offset"] = 1e6
            self.clock["crossed_at"] = time.monotonic()
        return self.inner.run(runner_inputs)


@pytest.mark.slow
def test_the_cap_ends_a_task_after_the_batch_in_flight(tmp_path, monkeypatch):
    clock = {"offset": 0.0}
    monkeypatch.setattr(tuner, "time", SimpleNamespace(
        monotonic=lambda: time.monotonic() + clock["offset"]))
    runner = ClockJumpRunner(clock)
    messages: list[str] = []
    outcome = tuner.tune(tiny_module(), target(), tmp_path / "db",
                         budget(trials_per_task=40, trials_per_iter=2, wall_seconds=3600),
                         runner=runner, progress=messages.append)
    stopped = time.monotonic() - clock["crossed_at"]
    (plan,) = outcome.plans
    # one batch measured, none started after the cap; no retry, no TuningFailed
    assert runner.batches == 1 and plan.attempts == 1
    assert outcome.trials == runner.first_batch >= 1
    # what it measured is in the database
    assert len(record_lines(tmp_path / "db")) == runner.first_batch
    assert not outcome.complete and outcome.left == [plan.name]
    assert any("stopped at the time cap" in m for m in messages)
    assert any("1 task(s) left for a later run: run the same command again" in m
               for m in messages)
    # past the cap only the batch in flight finished: its measurement, not another build
    assert stopped < 30, stopped
