"""The tuning search: MetaSchedule over a lowered module, reusing what the database holds.

MetaSchedule alone re-tunes every task even when its database holds records, so this module
decides per workload what still needs work: in ``missing`` mode only workloads with no valid
record are tuned (a fully cached model tunes nothing); in ``extend`` mode every workload is
tuned up to ``trials_per_task`` records (resuming a killed run). A task that ends with no
valid measurement is retried once, then reported: compile would otherwise use its naive
schedule without any error (FACTS.md). Used by the tune stage and by the layout search
(both tune, neither owns the search).

The search is prior-guided and hierarchical (``TuneBudget``): a new task starts from the
schedules of recorded kernels of its kind and its default rule schedule
(:func:`_seed_from_kind`); each task keeps one cost model across its rounds (or, opt-in, one
model trained first on every record held serves the run: :mod:`.cost_model`); a coarse pass
gives every task a few trials, largest estimated share first, then rounds go to the task
with the largest measured share of model latency; a task rests when its best stops
improving, and resting tasks come back in longer rounds while budget is left. CPU
candidates are measured with their weights out of the caches, as inside a model
(:data:`COLD_REPEATS`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.compiler.passes.winograd import is_transform_kernel
from pipeline.compiler.workloads import TaskPlan, plan_tasks
from pipeline.core.errors import ConfigError, StageFailed, collect
from pipeline.core.project import REPO
from pipeline.tuning import logs as tuning_log
from pipeline.tuning.kernel_check import reads_by_index

log = logging.getLogger(__name__)


RETRY_SEED_OFFSET = 1000  # a retry searches from another seed, so it samples other candidates


@dataclass(frozen=True)
class TuneBudget:
    """How much tuning one run may do."""

    trials_per_task: int = 64
    max_trials: int = 2000  # over all tasks of this run
    wall_seconds: float = 3600.0
    mode: str = "missing"  # "missing": tune unseen workloads only; "extend": top up to budget
    seed: int = 0
    builder_timeout: float = 120.0
    # Candidates built and measured per batch: the wall-clock cap is checked between
    # batches, so a run ends at most about one batch past it.
    trials_per_iter: int = 64
    # Prior-guided: a task with no record first measures the schedules borrowed from records
    # of kernels of its kind (see _seed_from_kind); False searches as stock MetaSchedule.
    seed_from_kind: bool = True
    # One cost model for the whole run, trained first on every record the database holds
    # (pipeline.tuning.cost_model). Off by default: measured, it hurt. On squeezenet's
    # heaviest conv (150 s, 2 cores) the warm model kept the search near the borrowed
    # schedule (12.4 ms after 48 trials, 44 s spent training it) where MetaSchedule's fresh
    # model, which ranks at random for its first 100 samples, let the same seeded search
    # reach 2.75 ms in 96 trials. False: a fresh model per task, as MetaSchedule does.
    warm_cost_model: bool = False
    # Without a warm model: each task keeps one XGBoost model across all its rounds, as it
    # would over one long MetaSchedule run. A fresh model per round never reaches the 100
    # samples before which MetaSchedule's model ranks at random, so rounds of 16-32 trials
    # were never model-guided: measured on bert-mini, the rounds led stock MetaSchedule at 5
    # minutes (4.87 vs 5.23 ms) and fell behind at 20 (4.82 vs 4.67), where stock's
    # 256-trial runs had trained models.
    task_cost_models: bool = True
    # Hierarchical: a coarse pass gives every task up to ``coarse_trials``, then rounds of
    # ``round_trials`` go to the task with the largest measured share of model latency,
    # until a task's best has improved by less than ``min_gain`` for ``patience`` rounds
    # in a row (it rests) or reaches ``trials_per_task``. When every task rests (or every
    # task still going is under ``min_share``) and budget is left, the resting ones go on in
    # rounds twice as long as their last, and so on until the budget is spent. 0 coarse
    # trials: each task takes its whole budget in turn (stock MetaSchedule's way).
    coarse_trials: int = 16
    round_trials: int = 16
    patience: int = 2
    min_gain: float = 0.02
    # Kernels under ``min_share`` of the model get focus rounds only once no heavier task
    # can go on: when every task still going is under it, the resting heavier ones come back
    # first (in their doubled rounds). Measured on squeezenet (20 minutes): 237 of 852 s of
    # focus rounds went to kernels under 1%, gaining nothing, while its heaviest conv (25% of
    # the model) waited at rest; back in a doubled round it went 1.82 -> 1.07 ms.
    min_share: float = 0.01
    # Candidates the evolutionary search breeds (and the cost model scores) per batch.
    # MetaSchedule's 512 took 88 s of a 150 s, 16-trial batch of a squeezenet conv on 2
    # loaded cores (build 23 s, measure 5 s); a warm cost model needs fewer to rank well.
    population: int = 128
    # One pool of builder workers for the whole run. MetaSchedule's LocalBuilder starts
    # fresh workers for every batch (and one more to check itself), each importing TVM and
    # the tensor intrinsics: 10-20 s a batch on 2 loaded cores, more than building 16
    # candidates takes.
    persistent_builder: bool = True
    # Portability: in ``extend`` mode, a task none of whose records was measured on this
    # CPU first re-measures its best ``remeasure_top`` records here (another CPU's times
    # do not rank schedules for this one), then searches.
    remeasure_top: int = 4
    # Measure CPU candidates with their weights out of the caches, as a kernel runs inside
    # a model (see COLD_REPEATS); False: MetaSchedule's hot loop.
    cold_weights: bool = True

    @classmethod
    def stock(cls, **kw) -> TuneBudget:
        """MetaSchedule as it comes: no seeds, no warm model, each task in turn."""
        return cls(**{"seed_from_kind": False, "warm_cost_model": False,
                      "task_cost_models": False,
                      "coarse_trials": 0, "remeasure_top": 0, "population": 512,
                      "persistent_builder": False, "cold_weights": False, **kw})


@dataclass
class TuneOutcome:
    """What one :func:`tune` call did: every task, and whether its budget ran out first."""

    plans: list[TaskPlan]
    complete: bool = True  # False: stopped on its budget with tasks (or trials) left
    left: list[str] = field(default_factory=list)  # tasks not tuned, or cut short, this run
    trials: int = 0  # candidates measured (failed ones included)
    seconds: float = 0.0


class TuningFailed(StageFailed):
    """Tasks still without a valid record after their retry; ``tasks`` names them.

    Raised once every task had its turn, so the database keeps all that was measured;
    ``plans`` is what :func:`tune_module` would have returned.
    """

    def __init__(self, tasks: list[str], plans: list[TaskPlan], db_dir: Path) -> None:
        self.tasks = tasks
        self.plans = plans
        super().__init__(
            "tune", f"{len(tasks)} task(s) got no valid measurement (each retried once with "
            f"another seed and a doubled builder timeout, budget permitting): "
            f"{', '.join(tasks)}. Compiled as is, "
            "they would run their naive schedules. Check the builder/runner errors in the "
            "logs, raise the builder timeout, or tune on a less loaded machine",
            artifact_dir=db_dir, log_path=db_dir / "logs")


class TuningInterrupted(StageFailed):
    """SIGINT or SIGTERM stopped tuning; the workers are ended, measured records are kept."""

    def __init__(self, signame: str, db_dir: Path, records: int) -> None:
        self.signame = signame
        super().__init__(
            "tune", f"interrupted by {signame}; tuning workers stopped; the {records} "
            f"record(s) in the tuning cache {db_dir} are kept (measured so far included). "
            "Run the same command again to continue where it stopped",
            artifact_dir=db_dir)


def _descendants() -> dict[int, object]:
    import psutil

    return {c.pid: c for c in psutil.Process().children(recursive=True)}


def _end_processes(procs: list) -> None:
    """Terminate ``procs`` (psutil processes), then kill those still alive after 2 s."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=2)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)


class _StopOnSignal:
    """While tuning: SIGINT/SIGTERM end the builder and runner workers and ask the search to
    stop, instead of unwinding through TVM's C++ (a crash dump) or leaving the workers
    running. Only processes started inside the ``with`` block are ended; on exit the old
    handlers come back and, after a signal, any worker started since is ended too. Without
    a signal nothing is ended: a caller's runner may keep its worker for its next run.
    """

    def __init__(self) -> None:
        self.signame: str | None = None
        self._before: set[int] = set()
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopOnSignal:
        self._before = set(_descendants())
        if threading.current_thread() is threading.main_thread():  # else signals can't be set
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _ours(self) -> list:
        return [p for pid, p in _descendants().items() if pid not in self._before]

    def _handle(self, signum, frame) -> None:
        if self.signame is None:
            self.signame = signal.Signals(signum).name
            print(f"tune: {self.signame} received: stopping the tuning workers", flush=True)
        _end_processes(self._ours())

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        if self.signame:
            _end_processes(self._ours())


def _deadline_scheduler(deadline: float, stop: _StopOnSignal):
    """A round-robin task scheduler that ends every task at ``deadline`` (time.monotonic) or
    on a signal. It is asked for the next task after each measured batch has been joined
    (its records are in the database by then), so tuning never runs more than one batch
    past the cap; MetaSchedule's own schedulers stop only when the trial budget is spent.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class DeadlineScheduler(ms.task_scheduler.PyTaskScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.cut_short = False
            self._next = 0

        def next_task_id(self) -> int:
            outer = self._outer()
            tasks = outer.tasks_
            for i, t in enumerate(tasks):
                if not t.is_terminated and t.measure_candidates is not None:
                    self.join_running_task(i)  # results into the database, cost model
            alive = [i for i, t in enumerate(tasks) if not t.is_terminated]
            if alive and (stop.signame or time.monotonic() >= deadline):
                self.cut_short = True
                for i in alive:
                    outer.terminate_task(i)
                return -1
            if not alive:
                return -1
            task_id = alive[self._next % len(alive)]
            self._next += 1
            return task_id

    return DeadlineScheduler()


def _workers_can_import_pipeline() -> None:
    """Builder workers are fresh interpreters started in the current directory; the
    initializer below is pickled by reference, so they must find this package too."""
    root = str(REPO)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, paths)])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Worker initializer part: the kernel kills this worker when the tuning process dies.

    A worker otherwise notices its parent is gone only when it next reads its pipe, after
    the build or measurement in hand (a build may run minutes past a ``kill -9`` of doit,
    and a timed-out one is never interrupted). SIGINT/SIGTERM are handled by
    :class:`_StopOnSignal`; this covers SIGKILL and crashes. Linux only; elsewhere a no-op.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _cpu_worker() -> None:
    """Builder/runner worker initializer: die with the tuner, and register the tensor
    intrinsics outside the per-build timeout.

    Each fresh LocalBuilder worker would otherwise import the whole stock set (7-80 s by
    load) inside its build timeout, and on a loaded 2-core machine whole batches come back
    as timeouts (FACTS.md). Only the target's own are registered (see intrinsics.py).
    """
    from pipeline.compiler import intrinsics

    die_with_parent()
    intrinsics.register("llvm")


def _cuda_worker() -> None:
    """:func:`_cpu_worker` for CUDA tasks (tensor-core intrinsics too)."""
    from pipeline.compiler import intrinsics

    die_with_parent()
    intrinsics.register("cuda")


# Initializers are pickled by reference, so each target kind has its own function.
WORKER_INITIALIZERS = {"llvm": _cpu_worker, "cuda": _cuda_worker}


# Cold-weight measurement (the default for CPU targets, TuneBudget.cold_weights).
# MetaSchedule's LocalRunner calls a kernel over and over for 100 ms, its weights hot in
# L1/L2. Inside a model a kernel's weights arrive cold (the kernels before it evicted them)
# and its input hot (the kernel before it wrote it). Measured on bert-mini's FFN matmul
# (1 MiB of weights; AMD EPYC Zen 4, 2 threads): the two tuners' best schedules took 337
# and 334 us hot, 473 and 409 us per call inside the model; with every argument but the
# first flushed from the caches before each call (MetaSchedule's enable_cpu_cache_flush)
# 593 and 468 us: the model's order, which the hot times had reversed.
COLD_REPEATS = 10  # one call per repeat, each after a flush; the record keeps all ten
COLD_TAG = ", weights cold"  # appended to the CPU identity of records measured so


# Candidates are measured on as many threads as the artifact runs on (every core:
# core.targets.num_threads, the C++ app's default). MetaSchedule's runner workers are left to
# TVM's default thread pool, which on x86 assumes two hardware threads per core and takes
# half of the CPUs: one thread on a 2-vCPU machine. Every record before this measured so,
# and it ranked schedules for the wrong machine. Measured on ResNet-50 int8's heaviest
# kernel (1x1 conv 256->1024 @14x14, AMD EPYC Zen 4): its published record, a schedule with
# no parallel loop, took 356 us on 1 thread and 356 us on 2; a schedule that splits its
# channels across the threads, ranked third by the 1-thread times, 357 us on 1 thread and
# 179 us on 2.
THREADS_TAG = ", {} threads"  # appended to the CPU identity of records measured so


def _measuring_worker() -> None:
    """Runner worker initializer: die with the tuner, and measure on the artifact's thread
    count (TVM reads TVM_NUM_THREADS when its thread pool starts, at the first kernel)."""
    from pipeline.core.targets import num_threads

    die_with_parent()
    os.environ["TVM_NUM_THREADS"] = str(num_threads())


def _pool_threads() -> int:
    """The thread count of this process's TVM thread pool (run in a runner worker)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def worker_threads(runner) -> int:
    """Threads a LocalRunner's worker measures on: asked of the worker itself."""
    return runner.pool.submit(_pool_threads).result()


def local_runner(cold: bool = False):
    """MetaSchedule's LocalRunner whose workers die with the tuning process and measure on
    every core (see THREADS_TAG); ``cold``: with the weights out of the caches (see
    COLD_REPEATS)."""
    from tvm.s_tir import meta_schedule as ms

    config = (ms.runner.EvaluatorConfig(number=1, repeat=COLD_REPEATS, min_repeat_ms=0,
                                        enable_cpu_cache_flush=True) if cold else None)
    return ms.runner.LocalRunner(evaluator_config=config, initializer=_measuring_worker)


def local_builder(kind: str, timeout: float, persistent: bool = False):
    """A builder for ``kind`` ("llvm", "cuda") tasks: MetaSchedule's LocalBuilder (fresh
    workers every batch), or with ``persistent`` one whose workers live until ``close()``
    (restarted only after a timeout or crash, or every ``BUILDS_PER_WORKER`` builds)."""
    from tvm.s_tir import meta_schedule as ms

    if not persistent:
        return ms.builder.LocalBuilder(timeout_sec=timeout,
                                       initializer=WORKER_INITIALIZERS[kind])
    return _persistent_builder(kind, timeout)


BUILDS_PER_WORKER = 500  # then a fresh worker: LLVM's memory is not all given back


def _persistent_builder(kind: str, timeout: float):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder as stock
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(ms.builder.PyBuilder):
        """LocalBuilder's build, on one pool of workers kept across batches."""

        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(
                max_workers=max(1, os.cpu_count() or 1), timeout=timeout,
                initializer=WORKER_INITIALIZERS[kind], maximum_process_uses=BUILDS_PER_WORKER)

        def build(self, build_inputs):
            results = []
            jobs = [(None, None, b.mod, b.target, stock._serialize_params(b.params))
                    for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda x: stock._worker_func(*x), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(
                        None, f"PersistentBuilder: timeout, killed after {timeout} seconds"))
                else:
                    results.append(ms.builder.BuilderResult(
                        None, f"PersistentBuilder: an exception occurred\n{r.value}"))
            return results

        def close(self) -> None:
            self.pool.shutdown()

    return PersistentBuilder()


RPC_FIELDS: dict[str, tuple[type, ...]] = {
    "tracker_host": (str,), "tracker_port": (int,), "device_key": (str,),
    "timeout": (int, float),
}
RPC_REQUIRED = ("tracker_host", "tracker_port", "device_key")
# Bounds one RPC session (upload, measure one batch). MetaSchedule's own default; the
# command line's rpc=host:port:key may set it as a fourth field.
RPC_DEFAULT_TIMEOUT = 60


def make_runner(rpc: dict | None):
    """MetaSchedule runner: local measurement, or on a device behind a TVM RPC tracker.

    Parameters
    ----------
    rpc : dict or None
        None measures on this machine (``LocalRunner``). Otherwise
        ``{"tracker_host": str, "tracker_port": int, "device_key": str, "timeout": seconds}``:
        candidates are measured on a device registered with the tracker under
        ``device_key``; ``timeout`` (optional, default ``RPC_DEFAULT_TIMEOUT``) bounds each
        RPC session.

    Returns
    -------
    ms.runner.Runner
        A ``LocalRunner`` or an ``RPCRunner``.

    Raises
    ------
    ConfigError
        Listing every missing, unknown or ill-typed field of ``rpc``.
    """
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        return local_runner()
    if not isinstance(rpc, dict):
        raise ConfigError(f"rpc settings must be a dict or None, got {type(rpc).__name__}")
    problems = [f"missing '{k}'" for k in RPC_REQUIRED if k not in rpc]
    problems += [f"unknown field '{k}' (known: {', '.join(RPC_FIELDS)})"
                 for k in sorted(set(rpc) - set(RPC_FIELDS))]
    for key, types in RPC_FIELDS.items():
        if key not in rpc:
            continue
        value = rpc[key]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"{key}={value!r}: expected {' or '.join(t.__name__ for t in types)}")
        elif isinstance(value, str) and not value.strip():
            problems.append(f"{key} is empty")
        elif key == "tracker_port" and not 0 < value < 65536:
            problems.append(f"tracker_port={value}: expected 1-65535")
        elif key == "timeout" and not (value > 0 and math.isfinite(value)):
            problems.append(f"timeout={value}: expected a positive number of seconds")
    collect(problems, ConfigError, "bad RPC runner settings "
            "{tracker_host, tracker_port, device_key, timeout}:")
    return ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(
        tracker_host=rpc["tracker_host"], tracker_port=rpc["tracker_port"],
        tracker_key=rpc["device_key"],
        session_timeout_sec=rpc.get("timeout", RPC_DEFAULT_TIMEOUT)))


def rank_by_measured_share(plans: list[TaskPlan]) -> list[TaskPlan]:
    """Re-order ``plans`` by measured time (weight x best latency) once records exist.

    FLOPs misjudge exactly the kernels worth more trials: those running far below peak
    (ResNet-50 fp32 at 32 trials/task: a 1x1 conv with 7.6% of the FLOPs took 18% of the
    time). A task with no record yet is costed at the median GFLOP/s of the measured ones.
    """
    measured = [p for p in plans if p.best_us]
    if not measured:
        return plans
    rates = sorted(p.flops / p.best_us for p in measured)
    median_rate = rates[len(rates) // 2]
    cost = {p.name: p.weight * (p.best_us or p.flops / median_rate) for p in plans}
    total = sum(cost.values())
    for p in plans:
        p.share = cost[p.name] / total
    plans.sort(key=lambda p: (-p.share, p.name))
    return plans


def heavier_task_rests(active: list[TaskPlan], resting: list[TaskPlan],
                       min_share: float) -> bool:
    """Whether the resting tasks come back now: every task still going is under
    ``min_share`` of the model (or none is left) and a resting one is not."""
    return (all(p.share < min_share for p in active)
            and any(q.share >= min_share for q in resting))


def valid_records(database, workload_mod, limit: int) -> list:
    """The workload's measured records in ``database``, fastest first (failed ones left out)."""
    if not database.has_workload(workload_mod):
        return []
    records = database.get_top_k(database.commit_workload(workload_mod), limit)
    return [r for r in records
            if r.run_secs and max(float(s) for s in r.run_secs) < tuning_log.FAILED_RUN_SECS]


def workload_stats(database, plan: TaskPlan) -> tuple[int, float | None]:
    """(valid records, best latency in us) of a task's workload in ``database``."""
    valid = valid_records(database, plan.task.dispatched[0], limit=100000)
    if not valid:
        return 0, None
    best = min(sum(float(s) for s in r.run_secs) / len(r.run_secs) for r in valid)
    return len(valid), best * 1e6


def _record_id(record) -> tuple[float, ...]:
    """A record's identity within one run: its measured times (ten floats, cold)."""
    return tuple(float(t) for t in record.run_secs)


class MeasuredHere:
    """Each task's best among the records measured the way this run measures (this CPU,
    and cold or hot as this run): tagged so in ``measured_on``, or new since the run began.
    The model estimate, the shares and the stop rule compare like with like: a cold time
    never "fails to improve" on a hot one, nor another CPU's. A task with no such record
    yet keeps the best of all its records."""

    def __init__(self, database, db_dir: Path, plans: list[TaskPlan], here: str | None):
        self.here = here
        self.tagged_best: dict[str, float] = {}  # task -> best secs of records tagged here
        self.before: dict[str, set] = {}  # task -> ids of the records the run began with
        self.tagged_ids: dict = {}  # workload key -> ids of its records tagged here
        if here is None:
            return
        contents = tuning_log.load(db_dir)
        by_index = contents._by_index()
        tagged: dict = {}
        for r in contents.records:
            if r.valid and contents.cpu_of(r) == here and r.workload_index in by_index:
                key = by_index[r.workload_index].key
                tagged[key] = min(tagged.get(key, math.inf), r.mean_secs)
                self.tagged_ids.setdefault(key, set()).add(tuple(r.run_secs))
        for p in plans:
            mod = p.task.dispatched[0]
            if not database.has_workload(mod):
                continue
            key = tuning_log.workload_key(database.commit_workload(mod))
            if key in tagged:
                self.tagged_best[p.name] = tagged[key]
            self.before[p.name] = {_record_id(r) for r in valid_records(database, mod, 100000)}

    def best_records(self, database, workload_mod, k: int) -> list:
        """The ``k`` fastest valid records of a workload, those measured the way this run
        measures first (another CPU's or a hot time ranks schedules for another machine)."""
        valid = valid_records(database, workload_mod, limit=100000)
        if not valid:
            return []
        here = self.tagged_ids.get(tuning_log.workload_key(database.commit_workload(
            workload_mod)), set())
        return sorted(valid, key=lambda r: _record_id(r) not in here)[:k]  # stable: by time

    def stats(self, database, p: TaskPlan) -> tuple[int, float | None]:
        """(valid records, best us) of ``p``: the best of those measured here, where any."""
        if self.here is None:  # not recorded (a GPU, a device behind RPC): every record
            return workload_stats(database, p)
        valid = valid_records(database, p.task.dispatched[0], limit=100000)
        if not valid:
            return 0, None
        times = {i: sum(i) / len(i) for i in map(_record_id, valid)}
        old = self.before.get(p.name, set())
        own = [t for i, t in times.items() if i not in old]
        if p.name in self.tagged_best:
            own.append(self.tagged_best[p.name])
        return len(valid), min(own or times.values()) * 1e6


def tune_module(mod, target, db_dir: Path, budget: TuneBudget, runner=None,
                progress=print, select=None) -> list[TaskPlan]:
    """:func:`tune`, returning only the task plans (the layout search's use)."""
    return tune(mod, target, db_dir, budget, runner, progress, select).plans


def _summary_line(plans: list[TaskPlan], todo: list[TaskPlan], budget: TuneBudget) -> str:
    """The first progress line: what the cache already holds and what this run will tune."""
    head = f"tune: {len(plans)} tasks, "
    if budget.mode == "extend":
        cached = sum(p.records > 0 for p in plans)
        full = sum(p.records >= budget.trials_per_task for p in plans)
        head += (f"{cached} with records in the cache ({full} already at "
                 f"{budget.trials_per_task} valid records), {len(todo)} to tune up to "
                 f"{budget.trials_per_task}")
    else:
        head += f"{len(plans) - len(todo)} already tuned in the cache, {len(todo)} to tune"
    return (head + f" (mode={budget.mode}, {budget.trials_per_task} trials/task, "
            f"cap {budget.max_trials} trials / {budget.wall_seconds:.0f} s)")


# Seen on the 2-core build machines: 32 trials of a BERT-layer task in ~3 minutes, ResNet-50's
# 2000 trials in ~55 minutes. An estimate to print before tuning, not a promise.
SECONDS_PER_TRIAL_2_CORES = 5.5


def _estimate_line(trials: int, tasks: int, budget: TuneBudget) -> str:
    """What the run is about to cost, and how to skip, cap or stop it."""
    cores = max(1, os.cpu_count() or 1)
    trials = min(trials, budget.max_trials)
    estimate = trials * SECONDS_PER_TRIAL_2_CORES * min(1.0, 2 / cores)
    capped = estimate > budget.wall_seconds
    minutes = min(estimate, budget.wall_seconds) / 60
    return (f"tune: about {minutes:.0f} min for {trials} trials over {tasks} task(s)"
            + (f" (the {budget.wall_seconds / 60:.0f}-minute cap ends it first; a later run "
               "continues)" if capped else "")
            + "; skip with tune=off (untuned kernels: slow), cap with tune_minutes=N, or "
            "Ctrl-C (measured records are kept)")


def tasks_named(plans: list[TaskPlan], patterns: tuple[str, ...]) -> set[str]:
    """The names of the tasks that ``patterns`` (exact names or fnmatch patterns) name.

    Raises
    ------
    ConfigError
        A pattern names no task: the message lists the model's tasks, heaviest first.
    """
    import fnmatch

    names = [p.name for p in sorted(plans, key=lambda p: -p.share)]
    unmatched = [pat for pat in patterns if not fnmatch.filter(names, pat)]
    if unmatched:
        raise ConfigError(
            f"tune_tasks: {', '.join(unmatched)} name(s) no kernel of this model; its "
            f"kernels, heaviest first: {', '.join(names)} (names or patterns such as "
            "*conv2d18*; python scripts/roofline.py shows where the time goes)")
    return {n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}


def tune(mod, target, db_dir: Path, budget: TuneBudget, runner=None, progress=print,
         select=None, only: tuple[str, ...] = (), prefer=None) -> TuneOutcome:
    """Tune ``mod``'s tasks into the JSON database in ``db_dir`` within ``budget``.

    Records are appended to the database as they are measured, so a killed run keeps what
    it measured; the next run picks up the tasks still short of their budget. A task that
    ends with no valid record is tuned once more with seed + 1000 and a doubled builder
    timeout. The wall-clock cap is checked after every measured batch (not only between
    tasks): a task in flight at the cap ends there, its records kept.

    Parameters
    ----------
    mod : tvm.IRModule
        Lowered Relax module (see :func:`pipeline.compiler.lowering.lower_for_target`).
    target : tvm.target.Target
        Target to tune for; keep one ``db_dir`` per target.
    db_dir : Path
        MetaSchedule JSON database directory (created if missing).
    budget : TuneBudget
        Trials, time and mode (``missing`` tunes only workloads with no valid record).
    runner : ms.runner.Runner, optional
        Where candidates are measured (see :func:`make_runner`); default ``LocalRunner``.
    progress : callable
        Receives one human-readable line per event.
    select : callable, optional
        ``select(plan) -> bool``: tune only the tasks it accepts (default: all).
    only : tuple of str
        Kernel names or fnmatch patterns (``tune_tasks=``): tune only the tasks they name;
        each must name at least one task of ``mod``.
    prefer : callable, optional
        ``prefer(mod, database) -> mod``: the module to tune, chosen once the database is
        open (the tune stage swaps in weight-packing twins: compiler.weight_prepack).

    Returns
    -------
    TuneOutcome
        Every task, largest estimated share first, with its records and best latency;
        ``complete`` is False when the budget ran out with tasks left (named in ``left``).

    Raises
    ------
    ConfigError
        A pattern of ``only`` names no task (the message lists the tasks).
    TuningFailed
        After all tasks ran, if some still have no valid record after their retry.
    TuningInterrupted
        On SIGINT or SIGTERM, once the workers are ended (records measured are kept).
    """

    db_dir.mkdir(parents=True, exist_ok=True)
    database = tuning_log.open_database(db_dir)
    if prefer is not None:
        mod = prefer(mod, database)
    plans = plan_tasks(mod, target)
    named = tasks_named(plans, only) if only else None
    kind = target.kind.name
    cold = budget.cold_weights and kind == "llvm"  # a GPU's buffers are not in our caches
    here = measuring_cpu(target, runner, cold)
    measured_here = MeasuredHere(database, db_dir, plans, here)
    for p in plans:
        p.records, p.best_us = measured_here.stats(database, p)
    rank_by_measured_share(plans)

    def wanted(p: TaskPlan) -> int:
        if budget.mode == "missing":
            return budget.trials_per_task if p.records == 0 else 0
        return max(0, budget.trials_per_task - p.records)

    # (printed as TVMScript to be read: only for the tasks this run would tune)
    gathers = [p for p in plans if wanted(p) > 0 and reads_by_index(p.task.dispatched[0])]
    if gathers:
        progress(f"tune: not tuning {len(gathers)} task(s) that read at data-dependent "
                 f"indices ({', '.join(p.name for p in gathers)}): MetaSchedule measures "
                 "with random inputs, which index out of bounds; they keep their "
                 "untuned schedules (a gather is a copy)")
    ruled = [p for p in plans if wanted(p) > 0 and is_transform_kernel(p.name)
             and (named is None or p.name not in named)]
    if ruled:
        progress(f"tune: not tuning {len(ruled)} Winograd transform(s) "
                 f"({', '.join(p.name for p in ruled)}): the CPU rules schedule them as a "
                 "search does, and their candidates build slowly; name them in tune_tasks= "
                 "to tune them")
    todo = [p for p in plans if wanted(p) > 0 and p not in gathers and p not in ruled
            and (select is None or select(p)) and (named is None or p.name in named)]
    if named is not None:
        progress(f"tune: tune_tasks selects {len(named)} of {len(plans)} kernels: "
                 f"{', '.join(sorted(named))}")
    progress(_summary_line(plans, todo, budget))
    if todo:
        progress(_estimate_line(sum(wanted(p) for p in todo), len(todo), budget))
    for p in plans:
        progress(f"  {p.share * 100:5.1f}%  {p.name}  x{p.weight}  records={p.records}"
                 + (f"  best={p.best_us:.1f}us" if p.best_us else ""))
    outcome = TuneOutcome(plans)
    if not todo:
        return outcome

    from pipeline.compiler import intrinsics

    # The stock VNNI intrinsic is broken with the wheel's LLVM 22: register ours here too,
    # or every tensorized candidate fails to build and the task silently stays untuned.
    for kind in {p.task.target.kind.name for p in todo}:
        intrinsics.register(kind)
    from pipeline.compiler import dequant_matmul

    dequant_matmul.register_tuning_rule()  # its search space is the project's template
    _workers_can_import_pipeline()
    run = _Run(database, db_dir, budget, outcome, progress, {p.name: wanted(p) for p in todo},
               measured_here)
    first_new_line = _record_count(db_dir)
    if budget.warm_cost_model:
        from pipeline.tuning import cost_model

        # without records of this target to learn from: still one model for the whole
        # run, so it starts predicting after 100 samples of any task, not of each
        run.cost_model = (cost_model.warm_model(database, db_dir,
                                                todo[0].task.target.kind.name, progress)
                          or cost_model.new_model())
    try:
        with _StopOnSignal() as stop:
            run.stop = stop
            run.runner = runner or local_runner(cold)
            if here:
                progress(f"tune: measuring on {here}")
            if budget.mode == "extend" and budget.remeasure_top and here:
                run.remeasure_elsewhere_measured(todo, here)
            run.coarse_pass(todo)
            if outcome.complete and budget.coarse_trials:  # no hierarchy: no focus rounds
                run.focus_rounds(todo)
    finally:
        run.close()
        if here:  # what this run measured, interrupted or not
            tuning_log.tag_measured_on(db_dir, first_new_line, here)
    outcome.seconds = time.monotonic() - run.start
    if budget.warm_cost_model and run.cost_model is not None:
        from pipeline.tuning import cost_model

        cost_model.save(run.cost_model, db_dir)  # with this run's samples, for the next run
    if run.failed:
        progress(f"tune: NO VALID RECORD after a retry for {len(run.failed)} task(s): "
                 + ", ".join(run.failed))
        raise TuningFailed(run.failed, plans, db_dir)
    return outcome


def _time(us: float) -> str:
    """``us`` microseconds, to 3 significant figures, in us or ms."""
    return f"{us / 1000:.3g} ms" if us >= 1000 else f"{us:.3g} us"


def measuring_cpu(target, runner, cold_weights: bool = True) -> str | None:
    """The CPU that measures ``target``'s candidates with ``runner``, and how: this host's
    identity for a CPU target measured here, with COLD_TAG when the weights are flushed
    before each call and THREADS_TAG when the runner is :func:`local_runner`'s (one given
    by the caller measures on threads we do not know); None (not recorded) for a GPU or a
    device behind an RPC tracker. ``runner`` None: the local runner :func:`tune` makes for
    a budget's ``cold_weights``."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.core.targets import cpu_identity, num_threads

    if target.kind.name != "llvm" or isinstance(runner, ms.runner.RPCRunner):
        return None
    threads = THREADS_TAG.format(num_threads())
    if runner is not None:
        config = getattr(runner, "evaluator_config", None)
        cold_weights = config is not None and config.enable_cpu_cache_flush
        threads = ""
    return cpu_identity() + (COLD_TAG if cold_weights else "") + threads


_THREADS_SUFFIX = re.compile(r", \d+ threads\Z")  # THREADS_TAG, any count


def ranking_cpus(here: str | None) -> tuple[str, ...] | None:
    """The measurements that rank a workload's records (logs.merge's ``prefer_cpu``), in
    order: those taken here the way this runner takes them; then on this CPU and thread
    count with the weights hot; then on this CPU on threads not recorded (records before
    THREADS_TAG: one thread), cold, then hot. Hot and cold times, or 1- and 2-thread
    times, of one CPU are not comparable, but each beats another CPU's."""
    if here is None:
        return None
    threads = _THREADS_SUFFIX.search(here)
    threads_text = threads.group(0) if threads else ""
    unthreaded = here.removesuffix(threads_text)
    cpu = unthreaded.removesuffix(COLD_TAG)
    return tuple(dict.fromkeys((here, cpu + threads_text, unthreaded, cpu)))


def _estimate_text(plans: list[TaskPlan]) -> str:
    """The model's estimated latency from the best record of each task (sum of weight x
    best), saying how many tasks have none yet."""
    measured = [p for p in plans if p.best_us is not None]
    text = _time(sum(p.weight * p.best_us for p in measured))
    missing = len(plans) - len(measured)
    return text + (f" + {missing} task(s) without a record" if missing else "")


class _Run:
    """One :func:`tune` call's search: the coarse pass, then the focus rounds."""

    def __init__(self, database, db_dir: Path, budget: TuneBudget, outcome: TuneOutcome,
                 progress, wanted: dict[str, int], measured_here: MeasuredHere) -> None:
        self.database, self.db_dir, self.budget = database, db_dir, budget
        self.measured_here = measured_here
        self.outcome, self.progress, self.wanted = outcome, progress, wanted
        self.done: dict[str, int] = dict.fromkeys(wanted, 0)  # trials measured this run
        self.start = time.monotonic()
        self.deadline = self.start + budget.wall_seconds
        self.failed: list[str] = []
        self.cost_model = None  # the run's one model (warm_cost_model); None: one per task
        self.task_models: dict[str, object] = {}  # task -> its model, kept across rounds
        self.stop: _StopOnSignal | None = None
        self.runner = None
        self._by_kind = None  # records grouped by kernel kind, read once a task needs them
        self._plain: dict[str, list] = {}  # twin -> its plain kernel's best records
        self._builders: dict[float, object] = {}  # by timeout (a retry doubles it)

    def builder(self, timeout: float, kind: str):
        """The builder for this timeout (one for the run when the budget says persistent),
        refusing to build once a signal came."""
        if not self.budget.persistent_builder:
            builder = local_builder(kind, timeout)
        else:
            if timeout not in self._builders:
                self._builders[timeout] = local_builder(kind, timeout, persistent=True)
            builder = self._builders[timeout]
        return _builder_stopping_on_signal(builder, self.stop)

    def close(self) -> None:
        for builder in self._builders.values():
            builder.close()
        self._builders.clear()

    def _left(self) -> tuple[float, int]:
        """(seconds, trials) this run may still spend."""
        return (self.budget.wall_seconds - (time.monotonic() - self.start),
                self.budget.max_trials - self.outcome.trials)

    def _measure(self, p: TaskPlan, seed: int, timeout: float, n: int) -> tuple[int, bool]:
        """Tune ``p`` for ``n`` trials; refresh its records and best. (measured, cut short)"""
        try:
            measured, cut_short = _tune_one(
                self.database, p, self.db_dir, seed,
                self.builder(timeout, p.task.target.kind.name), n,
                self.budget.trials_per_iter, self.runner, self.deadline, self.stop,
                self._cost_model(p), self.budget.population)
        except Exception:
            if not self.stop.signame:
                raise
            # a worker ended under a build or measurement: that is the signal's doing
            raise TuningInterrupted(self.stop.signame, self.db_dir,
                                    _record_count(self.db_dir)) from None
        p.attempts += 1
        p.records, p.best_us = self.measured_here.stats(self.database, p)
        self.outcome.trials += measured
        self.done[p.name] += measured
        if self.stop.signame:
            raise TuningInterrupted(self.stop.signame, self.db_dir, _record_count(self.db_dir))
        return measured, cut_short

    def _cost_model(self, p: TaskPlan):
        """The model that ranks ``p``'s candidates: the run's warm one, else ``p``'s own,
        kept across its rounds (``TuneBudget.task_cost_models``), else None (MetaSchedule
        makes a fresh one for this round)."""
        if self.cost_model is not None or not self.budget.task_cost_models:
            return self.cost_model
        if p.name not in self.task_models:
            from pipeline.tuning import cost_model

            self.task_models[p.name] = cost_model.new_model()
        return self.task_models[p.name]

    def _seed(self, p: TaskPlan, timeout: float) -> int:
        """Measure the schedules borrowed from kernels of ``p``'s kind (for a weight-packing
        twin: its plain kernel's best records, unpacked and packed); trials spent."""
        plain = self._plain_records(p)
        if self._by_kind is None and not plain:  # a twin's seeds need no other kernels
            from pipeline.tuning import transfer

            self._by_kind = transfer.records_by_kind(self.database)
        seeded, seeded_us = _seed_from_kind(
            self.database, p, self._by_kind, self.runner,
            self.builder(timeout, p.task.target.kind.name), plain)
        self.outcome.trials += seeded
        self.done[p.name] += seeded
        if seeded:
            self.progress(f"tune: {p.name}: started from {seeded} schedule(s) of kernels of "
                          "its kind: best " + (f"{seeded_us:.1f} us" if seeded_us
                                               else "none valid"))
        return seeded

    def _plain_records(self, p: TaskPlan) -> list:
        """For a weight-packing twin: its plain kernel's best records, this CPU's first
        (the twin starts from them, unpacked and packed); empty for any other task."""
        import tvm

        from pipeline.compiler.weight_prepack import LAYOUT_FREE, is_twin

        twin = p.task.dispatched[0]
        if not is_twin(twin["main"]):
            return []
        if p.name not in self._plain:
            plain = tvm.IRModule({"main": twin["main"].without_attr(LAYOUT_FREE)})
            self._plain[p.name] = (self.measured_here.best_records(
                self.database, plain, TWIN_SEEDS) if self.database.has_workload(plain)
                else [])
        return self._plain[p.name]

    def remeasure_elsewhere_measured(self, todo: list[TaskPlan], here: str) -> None:
        """For each task (largest share first) with no record measured the way this run
        measures (this CPU; weights cold or hot as this run): measure its best
        ``remeasure_top`` records here, filed as records of this CPU (the stage then ranks
        by them: logs.merge's ``prefer_cpu``)."""
        contents = tuning_log.load(self.db_dir)
        local = {contents._by_index()[r.workload_index].key for r in contents.records
                 if contents.cpu_of(r) == here}
        for p in todo:
            seconds_left, trials_left = self._left()
            if seconds_left <= 0 or trials_left <= 0:
                return
            mod = p.task.dispatched[0]
            if p.records == 0 or tuning_log.workload_key(
                    self.database.commit_workload(mod)) in local:
                continue
            records = valid_records(self.database, mod, self.budget.remeasure_top)
            before = p.best_us
            measured, best_here = _measure_schedules(
                self.database, p, [(r.as_measure_candidate().sch, r.trace) for r in records],
                self.runner,
                self.builder(self.budget.builder_timeout, p.task.target.kind.name))
            self.outcome.trials += measured
            self.done[p.name] += measured
            p.records, p.best_us = self.measured_here.stats(self.database, p)
            self.progress(f"tune: {p.name}: its {len(records)} best record(s) were measured "
                          "otherwise (another CPU, weights hot, or other threads) "
                          f"({_time(before)}); here, as this run measures: "
                          + (_time(best_here) if best_here else "none ran"))

    def coarse_pass(self, todo: list[TaskPlan]) -> None:
        """Every task in turn, largest share first: its coarse trials (all its trials
        without a hierarchy). A task that ends with no valid record is tuned once more from
        another seed with a doubled builder timeout."""
        budget, outcome = self.budget, self.outcome
        for i, p in enumerate(todo, 1):
            cut_short = False
            # First try, then one retry from another seed with twice the builder timeout:
            # most all-failed tasks seen so far were builder timeouts on a loaded machine.
            for attempt in range(2):
                seconds_left, trials_left = self._left()
                if seconds_left <= 0 or trials_left <= 0:
                    break
                seed = budget.seed + i + attempt * RETRY_SEED_OFFSET
                timeout = budget.builder_timeout * 2 ** attempt
                n = self.wanted[p.name]
                if budget.coarse_trials:
                    n = min(n, budget.coarse_trials)
                n = min(n, trials_left)
                if attempt:
                    self.progress(f"tune: retrying {p.name} (seed {seed}, builder timeout "
                                  f"{timeout:g} s)")
                self.progress(f"tune: task {i}/{len(todo)} {p.name} ({p.share * 100:.1f}% "
                              f"of model), {n} trials, {seconds_left:.0f} s left")
                # a twin starts every run from its plain kernel's best records (unpacked
                # and packed): its records then hold that schedule measured like its own
                if budget.seed_from_kind and attempt == 0 and (
                        p.records == 0 or self._plain_records(p)):
                    n = max(1, n - self._seed(p, timeout))
                before = p.records
                _, cut_short = self._measure(p, seed, timeout, n)
                best = f"{p.best_us:.1f} us" if p.best_us else "NO VALID RECORD"
                self.progress(
                    f"tune: task {i}/{len(todo)} {p.name}: +{p.records - before} valid "
                    f"records, best {best}; model estimate "
                    f"{_estimate_text(outcome.plans)}; {outcome.trials} trials in "
                    f"{time.monotonic() - self.start:.0f} s"
                    + (" (stopped at the time cap)" if cut_short else ""))
                if p.best_us is not None or cut_short:
                    break
            if p.attempts == 0 or cut_short or (
                    outcome.trials >= budget.max_trials and i < len(todo)):
                left = todo[i - 1:] if (p.attempts == 0 or cut_short) else todo[i:]
                outcome.complete = False
                outcome.left = [t.name for t in left]
                self.progress(f"tune: budget spent ({outcome.trials} trials, "
                              f"{time.monotonic() - self.start:.0f} s); {len(left)} task(s) "
                              "left for a later run: run the same command again to continue")
                return
            if p.best_us is None:
                self.failed.append(p.name)

    def focus_rounds(self, todo: list[TaskPlan]) -> None:
        """After the coarse pass: rounds for the task with the largest measured share,
        until every task has its trials (or its search space is exhausted), or the budget
        is spent. A task that stops improving rests until every task rests, or until every
        task still going is under ``min_share`` of the model; then the resting ones go on,
        by share, in rounds twice as long as their last."""
        budget = self.budget
        active = [p for p in todo if p.best_us is not None
                  and self.done[p.name] < self.wanted[p.name]]
        if not active:
            return
        self.progress(f"tune: coarse pass done: model estimate "
                      f"{_estimate_text(self.outcome.plans)}; focusing {len(active)} task(s) "
                      f"by measured share (rounds of {budget.round_trials} trials, a task "
                      f"rests after {budget.patience} rounds gaining < "
                      f"{budget.min_gain * 100:g}%)")
        stale = dict.fromkeys((p.name for p in active), 0)
        resting: list[TaskPlan] = []  # stopped improving, with trials left
        doublings = dict.fromkeys((p.name for p in active), 0)  # times it came back
        rounds = 0
        while active or resting:
            seconds_left, trials_left = self._left()
            if seconds_left <= 0 or trials_left <= 0:
                self.progress(f"tune: budget spent in the focus rounds; "
                              f"{len(active) + len(resting)} task(s) could still improve "
                              "(tune=extend continues them)")
                return
            rank_by_measured_share(self.outcome.plans)
            if not active or heavier_task_rests(active, resting, budget.min_share):
                # A stop moves a task to the back of the line; it does not end the run: the
                # budget is what the user chose to spend. Measured on bert-mini: with the
                # stops final, every task stopped with 270 of 600 s left (its heaviest
                # kernel 17% slower than stock MetaSchedule's), and with one second go
                # 764 of 1200 s were left unused.
                why = ("every task rests" if not active else
                       f"every task still going is under {budget.min_share * 100:g}% of "
                       "the model")
                for q in resting:
                    doublings[q.name] += 1
                    stale[q.name] = 0
                active, resting = active + resting, []
                self.progress(f"tune: {why} with {seconds_left:.0f} s left: the resting "
                              f"task(s) with trials left go on, by share, in rounds twice "
                              "as long as their last")
            p = max(active, key=lambda t: t.share)
            round_trials = budget.round_trials * 2 ** doublings[p.name]
            n = min(round_trials, self.wanted[p.name] - self.done[p.name], trials_left)
            before = p.best_us
            rounds += 1
            measured, cut_short = self._measure(p, budget.seed + rounds,
                                                budget.builder_timeout, n)
            gain = (before - p.best_us) / before
            stale[p.name] = 0 if gain >= budget.min_gain else stale[p.name] + 1
            why, rest = "", False
            if self.done[p.name] >= self.wanted[p.name]:
                why = f"its {self.wanted[p.name]} trials done"
            elif measured == 0:  # MetaSchedule found no candidate it had not measured
                why = "its search space is exhausted"
            elif stale[p.name] >= budget.patience:
                why, rest = f"rests: < {budget.min_gain * 100:g}% in {budget.patience} rounds", True
            if why:
                active.remove(p)
                if rest:
                    resting.append(p)
            self.progress(
                f"tune: round {rounds}: {p.name} ({p.share * 100:.1f}%) best {_time(before)} -> "
                f"{_time(p.best_us)}; model estimate {_estimate_text(self.outcome.plans)}; "
                f"{self.outcome.trials} trials, {max(0.0, self._left()[0]):.0f} s left"
                + (f"; {why}" if why else ""))
            if cut_short:
                self.progress("tune: time cap reached in the focus rounds")
                return


def _record_count(db_dir: Path) -> int:
    path = db_dir / tuning_log.RECORD_FILE
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _tune_one(database, plan: TaskPlan, db_dir: Path, seed: int, builder,
              trials: int, per_iter: int, runner, deadline: float,
              stop: _StopOnSignal, cost_model=None,
              population: int = 512) -> tuple[int, bool]:
    """One MetaSchedule run of one task; (candidates measured, whether the cap cut it).
    ``cost_model`` None: MetaSchedule's fresh XGBoost model for this run."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class CountMeasured(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            self.n += len(runner_results)

    counter = CountMeasured()
    scheduler = _deadline_scheduler(deadline, stop)
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2))
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [_on_stored_workload(database, plan.task)], work_dir=str(db_dir / "logs"),
        strategy=strategy, seed=seed)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(db_dir / "logs"),
        max_trials_global=trials, max_trials_per_task=trials,
        num_trials_per_iter=max(1, min(per_iter, trials)),
        builder=builder,
        runner=runner, database=database, task_scheduler=scheduler,
        cost_model=cost_model if cost_model is not None else "xgb",
        measure_callbacks=[*ms.MeasureCallback.create("default"), counter])
    return counter.n, scheduler.cut_short


TWIN_SEEDS = 2  # plain records a weight-packing twin starts from (each unpacked and packed)


def _seed_from_kind(database, plan: TaskPlan, by_kind: dict, runner,
                    builder, plain_records=()) -> tuple[int, float | None]:
    """Prior-guided start of a task with no record: the schedules :mod:`.transfer` would
    borrow for its kernel (the nearest records of kernels of its kind, tile sizes adapted)
    and, on CPUs, its default schedule from rules (:mod:`pipeline.compiler.cpu_rules`) are
    measured first and filed as its records, so the evolutionary search starts from the
    best of them instead of from random samples only. Why the rule too: on bert-mini the
    rules alone ran the model 20% faster than rules + borrowed schedules (7.11 vs 8.89 ms),
    and a kernel of a kind no record covers has nothing to borrow. A weight-packing twin
    starts from ``plain_records`` instead (its own kernel's best records, unpacked and
    packed). Returns (candidates measured, best us)."""
    from pipeline.tuning import transfer

    task = _on_stored_workload(database, plan.task)
    if plain_records:
        schedules = transfer.twin_seeds(task.dispatched[0]["main"], plain_records)
    else:
        schedules = transfer.seed_schedules(task.dispatched[0], by_kind)
    if task.target.kind.name == "llvm" and not reads_by_index(task.dispatched[0]):
        from pipeline.compiler import cpu_rules

        try:
            ruled = cpu_rules.rule_schedule_traced(task.dispatched[0]["main"], task.target)
        except Exception:  # noqa: BLE001  (no rule seed: the borrowed ones still start it)
            ruled = None
        if ruled is not None and ruled[1].trace is not None:
            schedules.append(ruled[1])
    return _measure_schedules(database, plan, [(s, s.trace) for s in schedules], runner,
                              builder)


def _measure_schedules(database, plan: TaskPlan, schedules: list, runner,
                       builder) -> tuple[int, float | None]:
    """Build and measure ``schedules`` ((schedule, trace) pairs of ``plan``'s workload) and
    file each that runs as a record of it. Returns (candidates measured, best us)."""
    from tvm.s_tir import meta_schedule as ms

    if not schedules:
        return 0, None
    task = _on_stored_workload(database, plan.task)
    mod, target = task.dispatched[0], task.target
    kind = target.kind.name
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch, _ in schedules])
    device = "cuda" if kind == "cuda" else "cpu"
    # each schedule's own arguments: one that packs a weight (weight_prepack) is built and
    # measured without its packing block, on the weight in the packed shape
    inputs = [(trace, b, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))
              for (sch, trace), b in zip(schedules, built) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, device, args)
                          for _, b, args in inputs])
    workload = database.commit_workload(mod)
    best = None
    for (trace, _, args), future in zip(inputs, futures):
        result = future.result()
        if result.error_msg is not None or not result.run_secs:
            continue
        database.commit_tuning_record(ms.database.TuningRecord(
            trace, workload, result.run_secs, target, args))
        secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
        best = secs * 1e6 if best is None else min(best, secs * 1e6)
    return len(inputs), best


def _builder_stopping_on_signal(builder, stop: _StopOnSignal):
    """``builder``, refusing every build once a signal came.

    The scheduler may already have picked the next batch when the signal ends the workers;
    the local builder would then start fresh workers for it, and each imports the tensor
    intrinsics first (7-14 s on a loaded machine; CI saw a Ctrl-C take 20 s to stop). Failed
    builds are not measured, so the batch ends at once and the scheduler stops the search.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class StoppingBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            if stop.signame:
                return [ms.builder.BuilderResult(None, f"not built: {stop.signame} received")
                        for _ in build_inputs]
            return builder.build(build_inputs)

    return StoppingBuilder()


def _on_stored_workload(database, task):
    """``task``, to be tuned on the module the database already holds for its workload.

    MetaSchedule files a new record under the stored workload that is structurally equal to
    the task's module, but builds the record's trace on the task's module. Block names that
    follow the importer's variable numbering ("lv224_red" here, "lv330_red" in the stored
    module) then differ, the trace cannot be replayed on the stored workload, and
    JSONDatabase refuses to open the whole database (seen: 56 such records after a 27-minute
    run). Tuning the stored module keeps every trace replayable.
    """
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return task
    stored = database.commit_workload(mod).mod
    return ms.ExtractedTask(task.task_name, task.mod, task.target, [stored], task.weight)


def estimated_latency_us(plans: list[TaskPlan]) -> float:
    """Sum of weight x best latency over tasks that have one (NaN if any has none)."""
    if any(p.best_us is None for p in plans):
        return math.nan
    return sum(p.weight * p.best_us for p in plans)
