"""The tuner's cost model, warm-started from the records the database already holds.

MetaSchedule's XGBoost cost model predicts *random* scores until it holds 100 measured
samples (``num_warmup_samples``), and each ``tune_tasks`` call builds a fresh one. This
project tunes a task at a time with 16-64 trials, so the evolutionary search was ranking its
candidates by coin toss for the whole budget. A model trained first on the records of every
workload in the database (the committed logs: ~1000 records of ~170 kernels) predicts from
its first batch, and one model serves every task of a run, learning from each.

XGBoost learns, per workload, each schedule's speed relative to that workload's best
(MetaSchedule groups samples by workload), from features of the scheduled loops (per-store
features), so what it learned on ResNet-50's convs carries to another model's convs: the
TenSet/TLP idea, with our own logs as the training set.

The trained model is cached beside the database, keyed by the digest of the record file it
was trained on, and saved again at the end of a run (with every sample measured in it) under
the digest of the record file as it is then: the next run starts from it without re-reading
the records.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict
from pathlib import Path

from pipeline.tuning import logs as tuning_log

log = logging.getLogger(__name__)

CACHE_DIR = "cost_model"  # inside the database directory
# Records per workload taken into the warm start: the fastest and a spread of slower ones
# (a model that saw only fast schedules could not tell a bad one).
RECORDS_PER_WORKLOAD = 32


def record_digest(db_dir: Path) -> str:
    """Digest of the database's record file: the key of the model trained on it."""
    path = Path(db_dir) / tuning_log.RECORD_FILE
    data = path.read_bytes() if path.exists() else b""
    return hashlib.sha256(data).hexdigest()[:16]


def _cached(db_dir: Path, digest: str) -> Path:
    return Path(db_dir) / CACHE_DIR / f"xgb-{digest}.tar"


def new_model():
    from tvm.s_tir import meta_schedule as ms

    return ms.cost_model.XGBModel(adaptive_training=True)


def _spread(records: list, k: int) -> list:
    """Up to ``k`` records, fastest first, then evenly spaced over the slower ones."""
    ranked = sorted(records, key=lambda r: sum(float(s) for s in r.run_secs) / len(r.run_secs))
    if len(ranked) <= k:
        return ranked
    head = ranked[: k // 2]
    rest = ranked[k // 2:]
    step = len(rest) / (k - len(head))
    return head + [rest[int(i * step)] for i in range(k - len(head))]


def train_on_database(database, target_kind: str, per_workload: int = RECORDS_PER_WORKLOAD):
    """A fresh XGBModel trained on the records of ``target_kind`` in ``database``.

    Returns (model, samples). Records that fail to turn back into a candidate are skipped.
    One training at the end (not one per workload): the model's adaptive training is held
    off while the samples are added.
    """
    from tvm.s_tir import meta_schedule as ms

    groups: dict[int, list] = defaultdict(list)
    workloads = {}
    for r in database.get_all_tuning_records():
        if r.target is None or r.target.kind.name != target_kind or not r.run_secs:
            continue
        if max(float(s) for s in r.run_secs) >= tuning_log.FAILED_RUN_SECS:
            continue
        # the database holds one Workload object per workload; a TVM object hashes by it
        key = hash(r.workload)
        groups[key].append(r)
        workloads[key] = r.workload
    model = new_model()
    model.last_train_size = 1 << 62  # no training while filling
    keys = list(groups)
    samples = 0
    for i, key in enumerate(keys):
        records = _spread(groups[key], per_workload)
        candidates, results = [], []
        for r in records:
            try:
                candidates.append(r.as_measure_candidate())
            except Exception:  # noqa: BLE001 -- a trace that no longer replays: skip it
                continue
            results.append(ms.runner.RunnerResult(r.run_secs, None))
        if not candidates:
            continue
        if i == len(keys) - 1:
            model.last_train_size = 0  # the last workload's samples trigger the one training
        model.update(ms.TuneContext(mod=workloads[key].mod, target=records[0].target),
                     candidates, results)
        samples += len(candidates)
    return model, samples


def warm_model(database, db_dir: Path, target_kind: str, progress=print):
    """The cost model for a tuning run on ``db_dir``: the cached one trained on this very
    record file if there is one, else one trained now (and cached). None when the database
    holds no record of ``target_kind`` (MetaSchedule's own fresh model is then as good)."""
    import time

    digest = record_digest(db_dir)
    path = _cached(db_dir, digest)
    if path.is_file():
        model = new_model()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model.load(str(path))
        except Exception as e:  # noqa: BLE001 -- a damaged cache entry: retrain below
            log.warning("cost model %s unreadable (%s); retraining", path, e)
        else:
            progress(f"tune: cost model warm-started from {path.name} "
                     f"({model.data_size} samples)")
            return model
    start = time.monotonic()
    model, samples = train_on_database(database, target_kind)
    if model.booster is None:
        return None
    progress(f"tune: cost model warm-started on {samples} records of "
             f"{len(model.data)} workloads in the database "
             f"({time.monotonic() - start:.0f} s)")
    save(model, db_dir)
    return model


def save(model, db_dir: Path) -> Path | None:
    """Cache ``model`` under the digest of ``db_dir``'s record file as it is now; older
    cache entries are removed (a model is only ever reused on the records it matches)."""
    if model is None or model.booster is None:
        return None
    folder = Path(db_dir) / CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = _cached(db_dir, record_digest(db_dir))
    tmp = path.with_suffix(".tmp.tar")
    with warnings.catch_warnings():  # xgboost's note on its default file format
        warnings.simplefilter("ignore", UserWarning)
        model.save(str(tmp))
    tmp.replace(path)
    for old in folder.glob("xgb-*.tar"):
        if old != path:
            old.unlink(missing_ok=True)
    return path
