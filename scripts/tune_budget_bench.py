"""Whole-model latency after a wall-clock tuning budget: prior-guided tuner vs stock MetaSchedule.

For models the committed logs have never seen, in one run on 2 threads, against
onnxruntime (same threads, same process, timed alternately):

- (a) untuned: every kernel as TVM lowers it (naive loops; what a build was before transfer),
- rules only: no logs to borrow from, every kernel on the default rules (cpu_rules),
- (b) ``tune=off``: kernels borrow the schedule of a recorded kernel of their kind, the rest
  get the default rules,
- (c) tuned for each budget (minutes, cumulative within one run), twice from a fresh copy of
  the committed CPU logs: the project's tuner (seeds from kernels of the same kind, a cost
  model warm-started on the logs, coarse pass then focus rounds with a stop rule) and stock
  MetaSchedule (``TuneBudget.stock``: no seeds, a fresh cost model per task, each task's
  whole budget in turn). Kernels left without a record get (b)'s transferred schedules in
  both, so the difference is the search alone.

A budget's build uses the database as it stood at that minute (a copy taken by a timer
thread while the tuner runs), so one 10-minute run gives the 5- and 10-minute points. All
builds of a model are then timed round-robin with onnxruntime (one run of each per round):
TVM's spinning thread pool slows several-fold when the machine gets busy, so only builds
timed side by side compare. ``--measure-only`` times the databases an earlier run kept in
``--out`` again (on a quieter machine, say).

    TVM_NUM_THREADS=2 python scripts/tune_budget_bench.py --models squeezenet,bert_mini \
        --minutes 5,10 --out /tmp/tune_budget
    TVM_NUM_THREADS=2 python scripts/tune_budget_bench.py --models squeezenet \
        --minutes 5,10 --out /tmp/tune_budget --measure-only
    # the project's tuner again (changed), stock MetaSchedule's databases kept from before:
    TVM_NUM_THREADS=2 python scripts/tune_budget_bench.py --models bert_mini \
        --minutes 5,10 --out /tmp/tune_budget --tune guided
    # rows (a) and (b) only, no tuning:
    TVM_NUM_THREADS=2 python scripts/tune_budget_bench.py --models shufflenet --minutes ""
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "models"))
CPU_LOGS = REPO / "models" / "tuning_logs" / "cpu-x86_64-avx512-vnni"
THREADS = int(os.environ["TVM_NUM_THREADS"])


def _zoo(name: str):
    """A light model-zoo export of the onnx wheel: (path, inputs)."""
    import onnx

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # weights made by ConstantOfShape count as weights too
        weights.update(node.output)
    (image,) = [i for i in model.graph.input if i.name not in weights
                and len(i.type.tensor_type.shape.dim) == 4]
    shape = tuple(d.dim_value for d in image.type.tensor_type.shape.dim)
    return path, ((image.name, shape, "float32"),)


def _bert_mini(scratch: Path):
    """A BERT encoder with bert-mini's shape (4 layers, hidden 256, 4 heads), random weights."""
    import bert_gen

    path = scratch / "bert_mini.onnx"
    bert_gen.export(path, seed=0, config="bert_mini")
    seq = bert_gen.CONFIGS["bert_mini"][-1]
    return path, tuple((n, (1, seq), "int64")
                       for n in ("input_ids", "attention_mask", "token_type_ids"))


def _feed(inputs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for name, shape, dtype in inputs:
        if dtype == "int64":
            feed[name] = (np.ones(shape, np.int64) if "mask" in name else
                          np.zeros(shape, np.int64) if "type" in name else
                          rng.integers(0, 1000, shape).astype(np.int64))
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _source_and_import(name: str, scratch: Path):
    """The project's source and import stages on model ``name``: (onnx path, module, feed)."""
    from pipeline.stages import import_model, source

    given, inputs = _bert_mini(scratch) if name == "bert_mini" else _zoo(name)
    out = scratch / f"{name}-source"
    out.mkdir()
    source.run(source.SourceConfig(model=name, seed=0, inputs=inputs), given, out)
    mod = import_model.import_onnx(out / "model.onnx", import_model.ImportConfig(inputs))
    return out / "model.onnx", mod, _feed(inputs)


class _Timer:
    """Median latency (ms) of onnxruntime and of TVM builds, timed alternately."""

    def __init__(self, onnx_path: Path, feed: dict, repeat: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts,
                                            providers=["CPUExecutionProvider"])
        self.feed, self.repeat = feed, repeat
        self.reference = self.session.run(None, feed)[0]

    def _ort_once(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return (time.perf_counter() - start) * 1e3

    def cosine(self, vm, args) -> float:
        """Cosine of a build's output against onnxruntime's."""
        out = vm["main"](*args)
        got = (out[0] if hasattr(out, "__len__") and not hasattr(out, "numpy") else out).numpy()
        ref = self.reference.ravel().astype(np.float64)
        return float(np.dot(got.ravel(), ref) / (np.linalg.norm(got) * np.linalg.norm(ref)
                                                  or 1))

    def interleaved(self, vms: dict, args) -> dict[str, float]:
        """Median ms of every build and of onnxruntime ("onnxruntime"), timed round-robin
        (one run of each per round): TVM's spinning thread pool slows several-fold when the
        machine gets busy (20 -> 128 ms seen), so builds timed at different minutes are not
        comparable; in one round-robin they share the load. Each timed run follows an
        untimed one of the same build: onnxruntime's and TVM's worker threads spin for a
        while after a run, and a run started right after the other runtime's was measured
        up to 4x slower (bert-mini: TVM 38 ms timed straight after onnxruntime, 10 ms
        alone)."""
        times: dict[str, list[float]] = {name: [] for name in [*vms, "onnxruntime"]}
        for _ in range(3):  # warm up
            for vm in vms.values():
                vm["main"](*args)
            self._ort_once()
        for _ in range(self.repeat):
            for name, vm in vms.items():
                vm["main"](*args)  # untimed: the last runtime's threads are still spinning
                start = time.perf_counter()
                vm["main"](*args)
                times[name].append((time.perf_counter() - start) * 1e3)
            self._ort_once()
            times["onnxruntime"].append(self._ort_once())
        return {name: float(np.median(v)) for name, v in times.items()}


def _build(mod, db_dir: Path | None, transfer: bool | None):
    """(vm, seconds to build): the compile stage's lowering and scheduling, then tvm.compile.
    ``transfer`` None: lowered only, every kernel naive loops (the build before transferred
    schedules and rules)."""
    import tvm
    from tvm import relax

    from pipeline.compiler.lowering import lower_for_target
    from pipeline.core.targets import get_target, tvm_target
    from pipeline.stages.compile_model import lower_and_schedule

    start = time.monotonic()
    if transfer is None:
        target = tvm_target(get_target("cpu"))
        scheduled = lower_for_target(mod, target, "float32", "")
    else:
        scheduled, target, _ = lower_and_schedule(mod, "cpu", "float32", db_dir, "",
                                                  CPU_LOGS if transfer else None)
    executable = tvm.compile(scheduled, target=target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm, time.monotonic() - start


def _snapshots(db_dir: Path, at_minutes: list[float], out: Path, start: float,
               stop: threading.Event) -> threading.Thread:
    """A thread copying ``db_dir`` to ``out/<minutes>`` at each budget mark (records first,
    then workloads: every record's workload is in the copy)."""
    from pipeline.tuning import logs

    def run() -> None:
        for minutes in at_minutes:
            if stop.wait(max(0.0, start + minutes * 60 - time.monotonic())):
                pass  # the tuner finished early: the copy now is the copy at the mark
            raw = out / f"raw-{minutes:g}"
            raw.mkdir(parents=True)
            for name in (logs.RECORD_FILE, logs.WORKLOAD_FILE):
                if (db_dir / name).exists():
                    shutil.copy2(db_dir / name, raw / name)
            logs.merge([raw], out / f"{minutes:g}")  # drops a line cut mid-write

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _tune_for(mod, minutes: list[float], guided: bool, scratch: Path, trials: int,
              keep: Path) -> dict:
    """Tune from a fresh copy of the committed logs for max(minutes); the database as it
    stood at each mark is kept in ``keep/<minutes>``."""
    from pipeline.compiler.lowering import lower_for_target
    from pipeline.core.targets import get_target, tvm_target
    from pipeline.tuning import logs, tuner

    label = "guided" if guided else "stock"
    db_dir = scratch / f"{label}-db"
    logs.merge([CPU_LOGS], db_dir)
    target = tvm_target(get_target("cpu"))
    lowered = lower_for_target(mod, target, "float32", "")
    make = tuner.TuneBudget if guided else tuner.TuneBudget.stock
    budget = make(trials_per_task=trials, max_trials=10**6, wall_seconds=max(minutes) * 60,
                  mode="missing")
    stop = threading.Event()
    start = time.monotonic()
    thread = _snapshots(db_dir, minutes, keep, start, stop)
    lines: list[str] = []
    try:
        outcome = tuner.tune(lowered, target, db_dir, budget,
                             progress=lambda s: (lines.append(s), print(f"  [{label}] {s}",
                                                                        flush=True)))
    except tuner.TuningFailed as e:  # some task got no valid record: the rest still count
        print(f"  [{label}] {e}", flush=True)
        outcome = None
    stop.set()
    thread.join()
    tuned = sum(1 for p in outcome.plans if p.records) if outcome else None
    info = {"trials": outcome.trials if outcome else None, "tasks_with_records": tuned,
            "seconds": time.monotonic() - start}
    (keep / "tuning.json").write_text(json.dumps(info))
    return info


LABELS = {True: "prior-guided", False: "stock MetaSchedule"}


def bench_model(name: str, minutes: list[float], trials: int, repeat: int,
                scratch: Path, keep: Path, tune: tuple[str, ...] = ("guided", "stock")
                ) -> list[dict]:
    """Tune with the tuners named in ``tune`` (the others' snapshots are those an earlier
    run left in ``keep``), then build every variant and time them all round-robin with
    onnxruntime."""
    import tvm

    print(f"== {name}", flush=True)
    onnx_path, mod, feed = _source_and_import(name, scratch)
    for guided in (True, False):
        where = keep / ("guided" if guided else "stock")
        if ("guided" if guided else "stock") in tune and minutes:
            shutil.rmtree(where, ignore_errors=True)
            _tune_for(mod, minutes, guided, scratch, trials, where)
    builds = {"untuned (naive)": (None, None), "rules only (no logs)": (None, False),
              "tune=off (transferred + rules)": (None, True)}
    for guided in (True, False):
        where = keep / ("guided" if guided else "stock")
        for m in minutes:
            builds[f"{LABELS[guided]}, {m:g} min"] = (where / f"{m:g}", True)
    timer = _Timer(onnx_path, feed, repeat)
    args = [tvm.runtime.tensor(v) for v in feed.values()]
    vms, extra = {}, {}
    for label, (db_dir, transfer) in builds.items():
        vms[label], build_s = _build(mod, db_dir, transfer)
        extra[label] = {"build_s": build_s, "cosine": timer.cosine(vms[label], args)}
        if db_dir is not None:
            extra[label].update(json.loads((db_dir.parent / "tuning.json").read_text()))
    times = timer.interleaved(vms, args)
    rows = []
    for label in builds:
        row = {"model": name, "build": label, "tvm_ms": times[label],
               "ort_ms": times["onnxruntime"], "ratio": times[label] / times["onnxruntime"],
               **extra[label]}
        rows.append(row)
        print(f"  {label}: {row['tvm_ms']:.2f} ms vs onnxruntime {row['ort_ms']:.2f} ms "
              f"({row['ratio']:.2f}x), cosine {row['cosine']:.6f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | build | TVM (ms) | onnxruntime (ms) | ratio | cosine |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['build']} | {r['tvm_ms']:.2f} | {r['ort_ms']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['cosine']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="squeezenet,bert_mini",
                        help="comma-separated: bert_mini or light zoo names (squeezenet, "
                        "shufflenet, inception_v1, ...)")
    parser.add_argument("--minutes", default="5,10", help="budget marks, cumulative; "
                        "\"\" for no tuning (rows (a) and (b) only)")
    parser.add_argument("--trials", type=int, default=64, help="trials per task (cap)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, help="rows.json, table.md and the tuned "
                        "databases at each mark (<model>/<guided|stock>/<minutes>)")
    parser.add_argument("--measure-only", action="store_true",
                        help="no tuning: build and time the databases an earlier run left "
                        "in --out")
    parser.add_argument("--tune", default="guided,stock",
                        help="which tuners run (guided, stock); the other's databases are "
                        "those an earlier run left in --out")
    args = parser.parse_args(argv)
    tuners = () if args.measure_only else tuple(t for t in args.tune.split(",") if t)
    if set(tuners) - {"guided", "stock"}:
        parser.error("--tune takes guided, stock or both, comma-separated")
    if len(tuners) < 2 and not args.out:
        parser.error("--measure-only and --tune with one tuner need --out (where the earlier "
                     "run kept the other databases)")
    minutes = sorted(float(m) for m in args.minutes.split(",") if m.strip())
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-budget-") as scratch:
        for name in args.models.split(","):
            model_scratch = Path(scratch) / name
            model_scratch.mkdir()
            keep = (args.out or Path(scratch)) / name
            rows += bench_model(name, minutes, args.trials, args.repeat, model_scratch, keep,
                                tune=tuners)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "rows.json").write_text(json.dumps(rows, indent=2))
                (args.out / "table.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
