"""The stage actions doit runs: each wires one stage's ``run()`` into the artifact store.

An action resolves its inputs from stable paths, calls :func:`store.run_stage` with the
stage's plain-data config, and turns a :class:`PipelineError` into a one-line doit failure
(no traceback for bad input: the message says what to do).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.hashing import recipe_of
from pipeline.core.store import run_stage


def doit_action(fn):
    """Report a PipelineError as a clean doit task failure (non-zero exit, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from doit.exceptions import TaskFailed

        try:
            fn(*args, **kwargs)
        except PipelineError as e:
            print(f"ERROR: {e}", file=sys.stderr, flush=True)
            return TaskFailed(str(e))
        return True

    return wrapper


@doit_action
def broken_spec(message: str) -> None:
    """The action of a spec that cannot be built: fail with its message."""
    from pipeline.core.errors import ConfigError

    raise ConfigError(message)


@doit_action
def source(root: Path, config, upstream: dict[str, Path], stable: Path) -> None:
    from pipeline.stages import source as stage

    given = upstream.get("generator") or upstream["onnx"]
    run_stage(root, "source", recipe_of(config), upstream, stable,
              lambda out: stage.run(config, given, out))


@doit_action
def quantize(root: Path, config, upstream: dict[str, Path], stable: Path) -> None:
    from pipeline.stages import quantize as stage

    run_stage(root, "quantize", recipe_of(config), upstream, stable,
              lambda out: stage.run(upstream["model"], config, out))


@doit_action
def import_(root: Path, config, upstream: dict[str, Path], stable: Path) -> None:
    from pipeline.stages import import_model as stage

    run_stage(root, "import", recipe_of(config), upstream, stable,
              lambda out: stage.run(upstream["model"], config, out))


@doit_action
def tune(root: Path, config, upstream: dict[str, Path], stable: Path,
         seed_logs: Path, cache_dir: Path) -> None:
    from pipeline.stages import tune as stage

    # A budget-stopped output has this same recipe: without this the store would reuse it,
    # and the same command could never continue the tuning.
    stage.forget_incomplete(stable)
    run_stage(root, "tune", recipe_of(config), upstream, stable,
              lambda out: stage.run(upstream["module"], seed_logs, cache_dir, config, out))


@doit_action
def compile_(root: Path, config, upstream: dict[str, Path], stable: Path,
             seed_logs: Path) -> None:
    from pipeline.stages import compile_model as stage

    run_stage(root, "compile", recipe_of(config), upstream, stable,
              lambda out: stage.run(upstream["module"], upstream["database"].parent,
                                    config, out, transfer_logs=seed_logs))


@doit_action
def package(root: Path, config, upstream: dict[str, Path], stable: Path) -> None:
    from pipeline.stages import package as stage

    run_stage(root, "package", recipe_of(config), upstream, stable,
              lambda out: stage.package_artifact(upstream["model"], upstream["io"], config,
                                                 out))


@doit_action
def smoke(root: Path, config, upstream: dict[str, Path], stable: Path) -> None:
    from pipeline.stages import smoke as stage

    run_stage(root, "smoke", recipe_of(config), upstream, stable,
              lambda out: stage.run(upstream["binary"].parent.parent, upstream["io"], config,
                                    out))


DELIVERABLES = ("model.so", "model.params", "bin", "src")


def unlink_deliverables(artifact_dir: Path) -> None:
    for path in [*(artifact_dir / n for n in DELIVERABLES), *artifact_dir.glob("*.tar.gz")]:
        if path.is_symlink():
            path.unlink()


def _wanted_links(artifact_dir: Path) -> dict[Path, Path]:
    """Deliverable link -> what it must point at, in the package the stable link names."""
    package_dir = (artifact_dir / "package").resolve()
    wanted = {artifact_dir / n: package_dir / n for n in DELIVERABLES
              if (package_dir / n).exists()}
    wanted.update({artifact_dir / b.name: b for b in package_dir.glob("*.tar.gz")})
    return wanted


def deliverables_current(artifact_dir: Path) -> bool:
    """Every deliverable link exists and points into the current package; no stale bundle."""
    wanted = _wanted_links(artifact_dir)
    if not wanted:
        return False
    for link_path, dest in wanted.items():
        if not link_path.is_symlink() or link_path.resolve() != dest:
            return False
    stale = [b for b in artifact_dir.glob("*.tar.gz") if b not in wanted]
    return not stale


def link_deliverables(artifact_dir: Path) -> None:
    """Top-level convenience links: ``model.so`` (and its ``model.params``), ``bin``,
    ``src``, the bundle, all into
    the package the stable ``package`` link names (a bundle of an older package goes)."""
    from pipeline.core.store import link

    wanted = _wanted_links(artifact_dir)
    for link_path, dest in wanted.items():
        link(link_path, dest)
    for bundle in artifact_dir.glob("*.tar.gz"):
        if bundle not in wanted and bundle.is_symlink():
            bundle.unlink()


def _artifact(spec, variant, target, paths):
    from pipeline.runtime.artifact import ArtifactUnderTest

    return ArtifactUnderTest.from_spec(spec, variant, target, paths)


@doit_action
def kit(root: Path, config, upstream: dict[str, Path], stable: Path, spec, variant,
        target, paths) -> None:
    """The artifact's validation kit: inputs, onnxruntime's references, gates, check.py."""
    from pipeline.stages import validate as stage

    art = _artifact(spec, variant, target, paths)
    run_stage(root, "kit", recipe_of(config), upstream, stable,
              lambda out: stage.make_kit(art, config, out))


@doit_action
def validate(root: Path, config, upstream: dict[str, Path], stable: Path, spec, variant,
             target, paths) -> None:
    """Validate one artifact; the report is published even when a gate fails, then the
    task fails naming model, target, comparison, metric, value and threshold."""
    from pipeline.core.errors import ValidationFailed
    from pipeline.stages import validate as stage

    art = _artifact(spec, variant, target, paths)
    result = run_stage(root, "validate", recipe_of(config), upstream, stable,
                       lambda out: stage.run(art, config.gates, out, check=False,
                                             comparisons=config.comparisons,
                                             class_scores=config.class_scores,
                                             kit_report=upstream.get("kit_report"),
                                             kit_dir=paths.artifact_dir / "kit"))
    report = json.loads((result.path / "validation.json").read_text(encoding="utf-8"))
    # (the stage itself ran in a temp dir: the report's lasting address is the stable one)
    print(f"validate: report {stable / 'validation.md'}", flush=True)
    failures = stage.failure_lines(report)
    if failures:
        raise ValidationFailed("validation failed (report: "
                               f"{stable / 'validation.md'}):\n  - " + "\n  - ".join(failures))


@doit_action
def bench(root: Path, config, upstream: dict[str, Path], stable: Path, spec, variant,
          target, paths) -> None:
    from pipeline.stages import bench as stage

    art = _artifact(spec, variant, target, paths)
    run_stage(root, "bench", recipe_of(config), upstream, stable,
              lambda out: stage.run(art, config.threads, config.warmup, config.repeat, out,
                                  rounds=config.rounds))


@doit_action
def summarize(kind: str, reports: list[Path], out_dir: Path) -> None:
    """Aggregate per-artifact validation or bench results into one report (+ chart)."""
    results = [json.loads(p.read_text(encoding="utf-8")) for p in reports if p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "validate":
        from pipeline.stages.validate import summarize as write
    else:
        from pipeline.stages.bench import report as write
    write(results, out_dir)
    print(f"{kind}: report in {out_dir}", flush=True)


@doit_action
def save_tuning_logs(cache: Path, logs: Path) -> None:
    from pipeline.tuning import logs as tuning_log

    report = tuning_log.export_compressed([cache], logs)
    for problem in report.skipped:
        print(f"save_tuning_logs: WARNING {problem}", flush=True)
    print(f"save_tuning_logs: {report.workloads} workloads, {report.records_out} records -> "
          f"{logs} (git add it to share)", flush=True)


@doit_action
def gc(root: Path) -> None:
    from pipeline.core.store import gc as collect

    removed = collect(root)
    print(f"gc: removed {len(removed)} unreferenced store entries", flush=True)
