"""``doit nightly``: rebuild every artifact from committed tuning logs, validate, bench, track.

One run, for each target this machine can build (``cpu``; the CUDA targets when ``nvcc`` is
there to cross-compile):

1. ``doit --continue build validate bench target=<t> tune=off`` as a subprocess (the real
   dodo.py, so the nightly takes the same incremental path a developer does: up-to-date stages
   are skipped, outputs found in the store are reused). ``tune=off``: nothing is tuned, every
   kernel's schedule comes from the tuning logs (committed under ``models/tuning_logs/``).
   ``models=resnet50,minilm_int8`` narrows the run to those models (every variant) or
   artifacts: doit is then asked for their own ``build:``, ``validate:`` and ``bench:`` tasks.
2. doit's output is parsed per task: ``.  task`` ran, ``-- task`` was up to date; the stage
   lines ``<stage>: built ...`` / ``<stage>: reusing verified output ...`` say whether a stage
   that ran made something new, and the manifests before and after say why (which config key,
   input file or tool version changed).
3. Each artifact's ``validation.json`` and ``bench.json`` are checked: a failed validation gate
   fails the run; so does a latency ratio (C++ median / onnxruntime median, measured in the
   same run so machine noise cancels) above ``threshold`` x the committed baseline's ratio for
   the same model, variant, target and machine class, and an int8 quantization quality (SQNR
   of TVM int8 vs onnxruntime fp32) more than ``sqnr_drop_db`` below the baseline's.
4. ``artifacts/reports/nightly/``: ``nightly.md`` (pass/fail first, charts embedded),
   ``nightly.json``, ``history.jsonl`` (one line appended per run and per baseline refresh),
   ``history.png``, ``latency.png`` and the doit logs.

``baseline=refresh`` rewrites the baseline entries of what this run measured and validated
(``models/baselines/nightly_baseline.json``; commit it), recorded in the history.
"""

from __future__ import annotations

from pipeline.nightly.baseline import (
    BASELINE_FILE,
    DEFAULT_SQNR_DROP_DB,
    DEFAULT_THRESHOLD,
    check,
    load_baseline,
)
from pipeline.nightly.history import append_history, history_chart, read_history
from pipeline.nightly.parse import (
    BUILT,
    FAILED,
    NOT_RUN,
    RAN,
    REUSED,
    STAGES,
    UP_TO_DATE,
    classify,
    parse_doit_output,
    snapshot_links,
)
from pipeline.nightly.report import write_report
from pipeline.nightly.runner import (
    NIGHTLY_VARS,
    REPORT_DIR,
    NightlyFailed,
    NightlyOptions,
    buildable_targets,
    nightly_task,
    run,
    select_artifacts,
)

__all__ = ["BASELINE_FILE", "BUILT", "DEFAULT_SQNR_DROP_DB", "DEFAULT_THRESHOLD", "FAILED",
           "NIGHTLY_VARS", "NOT_RUN", "RAN", "REPORT_DIR", "REUSED", "STAGES", "UP_TO_DATE",
           "NightlyFailed", "NightlyOptions", "append_history", "buildable_targets", "check",
           "classify", "history_chart", "load_baseline", "nightly_task", "parse_doit_output",
           "read_history", "run", "select_artifacts", "snapshot_links",
           "write_report"]
