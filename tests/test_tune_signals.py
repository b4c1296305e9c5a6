"""Ctrl-C and SIGTERM during tuning: the workers end, no crash dump, the records stay.

Run as a script, this file is the child: it tunes the tiny module into the database given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _records(db: Path) -> int:
    path = db / "database_tuning_record.json"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group"])
def test_a_signal_stops_tuning_cleanly(tmp_path, how):
    import psutil

    from pipeline.tuning import logs as tuning_log

    db = tmp_path / "db"
    child = subprocess.Popen([sys.executable, __file__, str(db)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its own group, as a terminal's job
    try:
        # "measuring": a batch's records are in, and the next batch's workers are running
        deadline = time.monotonic() + 400
        workers: list = []
        while not (workers and _records(db) > 0):
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "tuning never started measuring"
            time.sleep(0.5)
            workers = psutil.Process(child.pid).children(recursive=True)
        kept = _records(db)
        if how == "SIGTERM":
            child.send_signal(signal.SIGTERM)
        else:
            os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C does: every process of the job
        sent = time.monotonic()
        out, _ = child.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = out.decode(errors="replace")
    assert took < 20, f"took {took:.0f} s to stop:\n{text[-3000:]}"
    assert child.returncode == 3, text[-3000:]
    assert "Segfault" not in text and "Traceback" not in text, text[-5000:]
    name = "SIGTERM" if how == "SIGTERM" else "SIGINT"
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ERROR:")]
    assert f"interrupted by {name}" in line and "Run the same command again" in line
    alive = [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"workers left running: {alive}"
    assert _records(db) >= kept > 0
    assert tuning_log.load(db).warnings == []  # no half-written line


def _child(db: Path) -> int:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from test_tune import target, tiny_module

    from pipeline.core.errors import PipelineError
    from pipeline.tuning import tuner

    budget = tuner.TuneBudget(trials_per_task=400, max_trials=400, wall_seconds=600,
                              trials_per_iter=2, builder_timeout=120)
    try:
        tuner.tune(tiny_module(), target(), db, budget, progress=lambda s: print(s, flush=True))
    except PipelineError as e:  # as the doit action reports it
        print(f"ERROR: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))



TUNER_KILLED_BY_SIGKILL = """
import os, sys, time
sys.path.insert(0, {repo!r})
from tvm.support.popen_pool import PopenPoolExecutor
from pipeline.tuning import tuner

pool = PopenPoolExecutor(max_workers=1, initializer=tuner.WORKER_INITIALIZERS["llvm"])
print(pool.submit(os.getpid).result(), flush=True)  # the worker, its initializer run
pool.submit(time.sleep, 300)  # a build that takes minutes
time.sleep(300)
"""


@pytest.mark.slow
def test_tuning_workers_die_with_a_killed_tuner():
    """``kill -9`` of the tuning process (doit) used to leave a busy builder worker running
    until its build ended; the worker initializer now asks the kernel to kill it too."""
    import psutil

    tuner_proc = subprocess.Popen(
        [sys.executable, "-c", TUNER_KILLED_BY_SIGKILL.format(repo=str(REPO))],
        stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = psutil.Process(int(tuner_proc.stdout.readline()))
        time.sleep(1)  # the sleep is in the worker's hands now
        assert worker.is_running()
        os.kill(tuner_proc.pid, signal.SIGKILL)
        tuner_proc.wait(10)
        _, alive = psutil.wait_procs([worker], timeout=10)
        assert not alive, "the builder worker outlived its killed tuner"
    finally:
        tuner_proc.kill()
        if worker is not None and worker.is_running():
            worker.kill()
