"""Stage ``tune``: seed the database from the committed logs and the local cache, tune what
still needs work (:mod:`pipeline.tuning.tuner` decides per workload, by mode and budget),
and publish one checked record per workload of this model for compile.

A run that stops on its budget with tasks left publishes what it has (compile can go on)
with ``"complete": false`` in ``tune_report.json``; :func:`is_complete` then tells doit the
stage is not up to date, and :func:`forget_incomplete` makes the store build it again, so
the same command continues the tuning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.compiler.workloads import TaskPlan, plan_tasks
from pipeline.tuning import logs as tuning_log
from pipeline.tuning.tuner import (
    TuneBudget,
    TuneOutcome,
    estimated_latency_us,
    make_runner,
    measuring_cpu,
    ranking_cpus,
    tune,
    valid_records,
    workload_stats,
)

REPORT = "tune_report.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneConfig:
    """What the tune stage does for one artifact on one target (its recipe, as data)."""

    target: dict  # core.targets.target_config()
    compute_dtype: str  # the scheme's: the tasks are those of the lowered module
    layout: str  # fp32 conv layout on CPUs: tune and compile must lower identically
    mode: str  # off | missing | extend (tasks.options.TUNE_MODES)
    trials_per_task: int
    max_trials: int
    wall_seconds: float
    seed: int = 0
    rpc: str = ""  # host:port:device_key of a TVM RPC tracker, or "" to measure here
    log_key: str = ""  # the committed logs' folder (models/tuning_logs/<log_key>)
    # fnmatch patterns of the kernels to tune (tune_tasks=); empty: every kernel
    only_tasks: tuple[str, ...] = ()
    # prepack=on: tune every conv/matmul over constant weights as its weight-packing twin
    # (pipeline.compiler.weight_prepack); twins that already have records are tuned as
    # twins either way
    prepack: bool = False


def _publish_records(cache_db, plans: list[TaskPlan], out_dir: Path, target,
                     verify: bool) -> list:
    """Write one record per workload of this model into a fresh database in ``out_dir``.

    With ``verify`` (a CPU target built on this host) it is the fastest record whose kernel
    computes what the naive kernel computes (:mod:`pipeline.tuning.kernel_check`); otherwise the
    fastest. The stage output holds only what compile needs, in task order, so equal inputs
    give equal bytes (the cache itself keeps every record for later tuning). Returns the
    kernel verdicts (empty without ``verify``).
    """
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning import kernel_check

    candidates = {p.name: (p.task.dispatched[0], valid_records(
        cache_db, p.task.dispatched[0], kernel_check.MAX_CANDIDATES if verify else 1))
        for p in plans}
    verdicts = []
    if verify:
        chosen, verdicts = kernel_check.check_records(
            candidates, target, progress=lambda s: print(s, flush=True))
    else:
        chosen = {n: recs[0] for n, (_, recs) in candidates.items() if recs}
    out_db = ms.database.JSONDatabase(work_dir=str(out_dir))
    for name in sorted(chosen):
        r = chosen[name]
        # Commit the workload the record was tuned on, not the task's module: they are
        # structurally equal, but a trace finds blocks by name, and some block names
        # (a reduction's "lv224_red") follow the importer's variable numbering.
        out_db.commit_tuning_record(ms.database.TuningRecord(
            r.trace, out_db.commit_workload(r.workload.mod), r.run_secs, r.target,
            r.args_info))
    for name in ("database_workload.json", "database_tuning_record.json"):
        (out_dir / name).touch()  # present even when nothing is tuned: compile's file_dep
    return verdicts


def _plans_with_stats(mod, target, database, outcome: TuneOutcome) -> list[TaskPlan]:
    """``mod``'s tasks, with the tuner's numbers where it tuned the same task (same name,
    both plain or both weight-packing twins), else the database's."""
    from pipeline.compiler.weight_prepack import is_twin

    tuned = {p.name: p for p in outcome.plans}
    plans = plan_tasks(mod, target)
    for p in plans:
        same = tuned.get(p.name)
        if same is not None and is_twin(same.task.dispatched[0]["main"]) == \
                is_twin(p.task.dispatched[0]["main"]):
            p.records, p.best_us = same.records, same.best_us
        else:
            p.records, p.best_us = workload_stats(database, p)
    return plans


def run(module_json: Path, seed_logs: Path, cache_dir: Path, config: TuneConfig,
        out_dir: Path) -> dict:
    """Stage entry: seed from the committed logs and the local cache, tune what is missing,
    publish the best record of each of this model's workloads into ``out_dir``.

    Tuning writes straight into the persistent cache (``artifacts/tuning_cache/<key>``), not
    into the stage's temp dir, so a killed run keeps every record it measured. Without
    tuning, the cache is only read (through the tolerant loader, into a scratch copy), so a
    build never waits for, nor disturbs, a long tuning run of another artifact.
    """
    import tempfile

    from pipeline.compiler import intrinsics, weight_prepack
    from pipeline.compiler.lowering import lower_for_target
    from pipeline.compiler.weight_prepack import prefer_prepacked
    from pipeline.compiler.workloads import load_module
    from pipeline.core.store import file_lock
    from pipeline.core.targets import get_target, tvm_target

    # Records of tensorized schedules name their intrinsic: it must be registered before
    # any database holding them is opened (or JSONDatabase fails to load).
    spec = get_target(config.target["name"])
    target = tvm_target(spec)
    intrinsics.register(target.kind.name)
    mod = lower_for_target(load_module(module_json), target, config.compute_dtype,
                           config.layout)
    budget = TuneBudget(trials_per_task=config.trials_per_task, max_trials=config.max_trials,
                        wall_seconds=config.wall_seconds, mode=config.mode, seed=config.seed)
    can_measure = spec.backend.runs_on_build_host or config.rpc or _has_cuda()
    # Kernels are checked where they can run: a CPU target is this host (unless an RPC
    # tracker measures on another machine, whose CPU may differ).
    verify = spec.backend.kernel_check and not config.rpc
    if budget.mode == "off" or not can_measure:
        if budget.mode != "off":
            print(f"tune: no {spec.name} device here and no rpc= tracker: not tuning; "
                  "untuned kernels get DLight schedules", flush=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
            db_dir = Path(scratch) / "db"
            _merge_logs([seed_logs, cache_dir], db_dir, prefer_cpu=ranking_cpus(
                measuring_cpu(target, None, budget.cold_weights)))
            database = tuning_log.open_database(db_dir, report=_say)
            plans = plan_tasks(prefer_prepacked(mod, target, database)[0], target)
            for p in plans:
                p.records, p.best_us = workload_stats(database, p)
            outcome = TuneOutcome(plans)  # nothing more this command could do
            verdicts = _publish_records(database, plans, out_dir, target, verify)
    else:
        # One tuner per cache at a time: the database is appended to line by line, and
        # merging rewrites it; a second artifact's tuning waits here.
        with file_lock(cache_dir.parent / f".{cache_dir.name}.lock",
                       f"tuning cache {cache_dir}"):
            _merge_logs([seed_logs, cache_dir], cache_dir)
            # no rpc=: tune() measures here, with the budget's cold_weights
            runner = make_runner(_rpc(config.rpc)) if config.rpc else None
            # twins with records are tuned as twins (compile will use them); prepack=on
            # makes every conv/matmul over constant weights one
            wanted = weight_prepack.twins(mod) if config.prepack else ()
            outcome = tune(mod, target, cache_dir, budget, runner=runner, progress=_say,
                           only=config.only_tasks,
                           prefer=lambda m, db: prefer_prepacked(m, target, db, wanted)[0])
            with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
                view = Path(scratch) / "db"
                # rank each workload by this CPU's own measurements where it has any
                _merge_logs([cache_dir], view, prefer_cpu=ranking_cpus(
                    measuring_cpu(target, runner, budget.cold_weights)))
                database = tuning_log.open_database(view, report=_say)
                # a twin left without a record (budget spent) goes back to its plain kernel
                plans = _plans_with_stats(
                    prefer_prepacked(mod, target, database)[0], target, database, outcome)
                verdicts = _publish_records(database, plans, out_dir, target, verify)
    verdict = {v.name: v for v in verdicts}
    summary = {
        "tasks": [{"name": p.name, "share": round(p.share, 4), "weight": p.weight,
                   "records": p.records, "best_us": p.best_us,
                   **_verdict_fields(verdict.get(p.name), p)} for p in plans],
        "kernels_checked": bool(verify),
        "wrong_records_skipped": sum(len(v.rejected) for v in verdicts),
        "untuned": sorted(p.name for p in plans if p.best_us is None or (
            p.name in verdict and not verdict[p.name].ok)),
        "estimated_latency_us": estimated_latency_us(plans),
        # False: the budget ran out first; the next run of the same command continues
        "complete": outcome.complete,
        "tasks_left": outcome.left,
    }
    if verify:
        wrong = [v for v in verdicts if v.rejected]
        print(f"tune: checked the published kernel of {len(plans) - len(summary['untuned'])} "
              f"workloads against the naive kernel: "
              + (f"{summary['wrong_records_skipped']} wrong record(s) skipped in "
                 f"{', '.join(v.name for v in wrong)}" if wrong else "all agree"), flush=True)
    if not outcome.complete:
        _say(f"tune: published what is tuned so far ({len(outcome.left)} task(s) left, in "
             f"{REPORT}); the same command continues tuning")
    (out_dir / REPORT).write_text(json.dumps(summary, indent=2) + "\n")
    return {"tasks": len(plans), "untuned": len(summary["untuned"]),
            "complete": outcome.complete}


def is_complete(stable: Path) -> bool:
    """doit ``uptodate`` check: False when the tune output behind ``stable`` stopped on its
    budget with tasks left (``"complete": false`` in its report), so the task runs again.

    An output without the field (published before it existed) counts as complete; a
    missing or unreadable report counts as complete too, because the store's own
    integrity check (``store.intact``) already rejects a damaged output.
    """
    try:
        report = json.loads((Path(stable) / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(report, dict) and report.get("complete") is False)


def forget_incomplete(stable: Path) -> bool:
    """Remove the budget-stopped tune output behind ``stable`` from the store, so
    ``store.run_stage`` (which reuses any verified output of the same recipe) tunes again.

    Returns True if it removed one. The stable link is left; it is re-pointed when the new
    output is published. Only an output this stage published, and only an incomplete one,
    is removed: the records it was built from live in the tuning cache, not here.
    """
    import shutil

    stable = Path(stable)
    if not stable.is_symlink() or is_complete(stable):
        return False
    store_dir = stable.resolve()
    if store_dir.parent.name != "tune" or store_dir.parent.parent.name != ".store":
        return False  # not a store entry: not ours to remove
    report = json.loads((store_dir / REPORT).read_text(encoding="utf-8"))
    _say(f"tune: the last run stopped on its budget with {len(report.get('tasks_left', []))} "
         "task(s) left; continuing it")
    shutil.rmtree(store_dir)
    return True


def _say(line: str) -> None:
    print(line, flush=True)


def _verdict_fields(verdict, plan: TaskPlan) -> dict:
    """tune_report.json fields of one task's kernel check (none when not checked)."""
    if verdict is None or plan.records == 0:
        return {}
    return {"published_record": verdict.chosen_rank, "wrong_records": verdict.rejected}


def _merge_logs(sources: list[Path], dest: Path,
                prefer_cpu: tuple[str, ...] | None = None) -> None:
    report = tuning_log.merge(sources, dest, prefer_cpu=prefer_cpu)
    for problem in [*report.skipped, *report.warnings]:
        print(f"tune: WARNING {problem}", flush=True)


def _rpc(spec: str) -> dict | None:
    """``host:port:device_key[:timeout_s]`` (checked by tasks.options) as make_runner's dict."""
    if not spec:
        return None
    host, port, key, *timeout = spec.split(":")
    return {"tracker_host": host, "tracker_port": int(port), "device_key": key,
            **({"timeout": float(timeout[0])} if timeout else {})}


def _has_cuda() -> bool:
    from pipeline.runtime.vm import cuda_available

    return cuda_available()
