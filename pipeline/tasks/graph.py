"""doit task dicts for every model x variant x stage.

Each stage's config is its own typed dataclass (``XConfig`` in ``pipeline.stages.x``), made
once here: its plain-data form is doit's ``config_changed`` and the stage's recipe, and the
same object is what the stage runs with. Nothing heavy is imported (dodo.py loads this for
``doit list``): stage modules import TVM and onnxruntime inside their functions only.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from pathlib import Path

from doit.tools import config_changed

from pipeline.core.code_digest import STAGE_DATA_DIRS
from pipeline.core.hashing import recipe_of, tool_versions
from pipeline.core.project import REPO, Project, artifact_paths
from pipeline.core.spec import (
    ModelSpec,
    VariantSpec,
    input_ranges,
    mixed_budget,
    variant_validation,
)
from pipeline.core.store import MANIFEST, intact
from pipeline.core.targets import TargetSpec, get_target, target_config, target_key
from pipeline.runtime.artifact import tvm_input_name
from pipeline.schemes import get_scheme
from pipeline.tasks import actions as stages
from pipeline.tasks.options import Options


def _inputs(spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple((i.name, tuple(i.shape), i.dtype) for i in spec.inputs)


def _compiled_input_ranges(spec: ModelSpec) -> dict[str, list]:
    """The spec's input ranges keyed by the compiled model's input names (TVM renames)."""
    return {tvm_input_name(n): list(r) for n, r in input_ranges(spec).items()}


def _renamed_inputs(spec: ModelSpec) -> dict[str, str]:
    """Compiled input name -> ONNX name, for the inputs TVM's importer renames."""
    return {tvm_input_name(i.name): i.name for i in spec.inputs
            if tvm_input_name(i.name) != i.name}


def _data_files(upstream: dict[str, Path], prefix: str, folder: Path) -> None:
    """Every sample file (``.npy``, ``.npz``) under ``folder`` as an input, keyed by its path
    inside it (inputs in subfolders may share file names)."""
    for f in _files(folder, "*.np[yz]"):
        upstream[f"{prefix}/{f.relative_to(folder).as_posix()}"] = f


def _files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in folder.rglob(pattern) if p.is_file()) if folder.is_dir() else []


def _clean_link(stable: Path) -> None:
    """``doit clean`` removes the stable link only; the store is gc's business."""
    if stable.is_symlink():
        stable.unlink()


def _task(project: Project, name: str, doc: str, action, config, upstream: dict[str, Path],
          stable: Path, target_file: str, extra_args: tuple = ()) -> dict:
    """One stage task: its upstream files are its file_dep, its config (with the versions of
    the tools the stage uses and the digest of the code it runs) its uptodate check, and an
    output that no longer matches its manifest makes it run again."""
    stage = action.__name__.rstrip("_")  # actions.import_ is the "import" stage
    checked = {"config": recipe_of(config), "tools": tool_versions(stage)}
    return {
        "name": name,
        "doc": doc,
        "actions": [(action, [project.artifacts, config, upstream, stable, *extra_args])],
        "file_dep": [str(p) for p in upstream.values()],
        "targets": [str(stable / target_file)],
        "uptodate": [config_changed(checked), functools.partial(_intact_check, stable)],
        "clean": [(_clean_link, [stable])],
        "verbosity": 2,
    }


def _intact_check(stable: Path, task, values) -> bool:
    return intact(stable)


def _tune_complete(stable: Path, task, values) -> bool:
    """A tune output that stopped on its budget with tasks left is not up to date: the same
    command continues the tuning (json only, no tvm import)."""
    from pipeline.stages.tune import is_complete

    return is_complete(stable)


def source_task(project: Project, spec: ModelSpec) -> dict:
    from pipeline.stages.source import SourceConfig

    stable = project.artifacts / spec.name / "source"
    if spec.source.generator:
        upstream = {"generator": project.root / "models" / f"{spec.source.generator}.py"}
    else:
        upstream = {"onnx": project.root / spec.source.path}
    config = SourceConfig(model=spec.name, seed=spec.source.seed, inputs=_inputs(spec),
                          kind="generator" if spec.source.generator else "file")
    return _task(project, spec.name, f"fp32 ONNX of {spec.name}", stages.source, config,
                 upstream, stable, "model.onnx")


def stage_tasks(project: Project, spec: ModelSpec, variant: VariantSpec, target: TargetSpec,
                options: Options) -> dict[str, dict]:
    """The per-artifact tasks (quantize, import, tune, compile, package, smoke) by stage."""
    from pipeline.stages.compile_model import CompileConfig
    from pipeline.stages.import_model import ImportConfig
    from pipeline.stages.package import PackageStageConfig
    from pipeline.stages.quantize import QuantizeConfig
    from pipeline.stages.smoke import SmokeConfig
    from pipeline.stages.tune import TuneConfig

    name = f"{spec.name}_{variant.name}"
    at = f"{name}@{target.name}"
    scheme = get_scheme(variant.scheme)
    p = artifact_paths(project, spec, variant, target.name)
    tcfg = target_config(target)
    tasks: dict[str, dict] = {}
    model = p.source / "model.onnx"
    if scheme.quantized:
        cal = spec.calibration
        config = QuantizeConfig(
            method=cal.method, samples=cal.samples, seed=cal.seed,
            data_dir=str(project.root / cal.data_dir) if cal.data_dir else "",
            activation_type=variant.activation_type, weight_type=variant.weight_type,
            per_channel=variant.per_channel, inputs=_inputs(spec), recipe=scheme.quantize,
            ranges=input_ranges(spec), op_types=variant.op_types,
            exclude_nodes=variant.exclude_nodes, symmetric=variant.symmetric,
            accuracy_level=variant.accuracy_level, formats=variant.formats,
            budget_min=mixed_budget(variant),
            assignment=str(project.root / variant.assignment) if variant.assignment else "",
            **scheme.quantize_params)
        upstream = {"model": model}
        if variant.assignment:  # a pinned mixed-precision assignment: its content counts
            upstream["assignment"] = project.root / variant.assignment
        elif scheme.name == "mixed":  # the search times layers from the host's tuning logs
            host_logs = project.tuning_logs / target_key(get_target("cpu"))
            config = replace(config, latency_logs=str(host_logs))
            for f in _files(host_logs, "database_*"):
                upstream[f"logs/{f.name}"] = f
        if cal.data_dir:
            _data_files(upstream, "calibration", project.root / cal.data_dir)
        tasks["quantize"] = _task(project, name,
                                  f"{scheme.name} ONNX of {name} (onnxruntime, "
                                  f"{scheme.quantize})", stages.quantize, config, upstream,
                                  p.quantize, "model.onnx")
        model = p.quantize / "model.onnx"
    # in the tune and compile recipes both: they must lower identically
    layout = options.layout or variant.layout
    tasks["import"] = _task(project, name, f"Relax IRModule of {name}", stages.import_,
                            ImportConfig(inputs=_inputs(spec), passes=scheme.import_passes),
                            {"model": model}, p.import_, "module.json")
    module = p.import_ / "module.json"
    key = target_key(target)
    seed_logs = project.tuning_logs / key
    budget = spec.tuning
    tune_config = TuneConfig(
        target=tcfg, compute_dtype=scheme.compute_dtype, layout=layout, mode=options.tune,
        trials_per_task=options.trials or budget.trials_per_task,
        max_trials=budget.max_trials,
        wall_seconds=(options.tune_minutes * 60 if options.tune_minutes is not None
                      else budget.wall_seconds),
        seed=budget.seed, rpc=options.rpc, log_key=key,
        only_tasks=options.tune_task_patterns(), prepack=options.prepack == "on")
    upstream = {"module": module}
    for f in _files(seed_logs, "database_*"):  # plain or gzipped
        upstream[f"logs/{f.name}"] = f
    tasks["tune"] = _task(project, at, f"MetaSchedule database for {name} on {target.name} "
                          "(cached logs reused)", stages.tune, tune_config, upstream, p.tune,
                          "database_tuning_record.json",
                          extra_args=(seed_logs, project.artifacts / "tuning_cache" / key))
    tasks["tune"]["uptodate"].append(functools.partial(_tune_complete, p.tune))
    upstream = {"module": module, "weights": p.import_ / "module.params",
                "database": p.tune / "database_tuning_record.json",
                "workloads": p.tune / "database_workload.json"}
    for f in _files(seed_logs, "database_*"):  # kernels without a record borrow from them
        upstream[f"logs/{f.name}"] = f
    tasks["compile"] = _task(project, at, f"model.so of {name} for {target.name}",
                             stages.compile_,
                             CompileConfig(target=tcfg, compute_dtype=scheme.compute_dtype,
                                           layout=layout),
                             upstream, p.compile, "model.so", extra_args=(seed_logs,))
    upstream = {"model": p.compile / "model.so", "weights": p.compile / "model.params",
                "io": p.compile / "io.json"}
    for folder in STAGE_DATA_DIRS["package"]:  # templates/, runtime_cpp/
        for f in _files(REPO / folder):
            upstream[f"{folder}/{f.relative_to(REPO / folder).as_posix()}"] = f
    tasks["package"] = _task(project, at,
                             f"C++ app, bin/infer and bundle of {name} for {target.name}",
                             stages.package,
                             PackageStageConfig(artifact=name, target=tcfg,
                                                input_ranges=_compiled_input_ranges(spec),
                                                onnx_names=_renamed_inputs(spec)),
                             upstream, p.package, "bin/infer")
    gates = variant_validation(spec, variant)
    tasks["smoke"] = _task(project, at, f"smoke check of {name} on {target.name}: C++ == Python VM",
                           stages.smoke,
                           SmokeConfig(target=tcfg, seed=0, gpu_rel_tol=gates.gpu_rel_tol,
                                       input_ranges=_compiled_input_ranges(spec)),
                           {"binary": p.package / "bin" / "infer",
                            "model": p.package / "model.so",
                            "weights": p.package / "model.params",
                            "io": p.compile / "io.json"},
                           p.smoke, "smoke.json")
    return tasks


def check_tasks(project: Project, spec: ModelSpec, variant: VariantSpec, target: TargetSpec,
                options: Options) -> dict[str, dict]:
    """validate and bench for one artifact: they run when the artifact, the gates or the
    validation data change."""
    from pipeline.stages.bench import BenchConfig
    from pipeline.stages.validate import KitConfig, ValidateConfig

    name = f"{spec.name}_{variant.name}"
    at = f"{name}@{target.name}"
    scheme = get_scheme(variant.scheme)
    p = artifact_paths(project, spec, variant, target.name)
    upstream = {"binary": p.package / "bin" / "infer", "model": p.package / "model.so",
                "weights": p.package / "model.params",
                "io": p.compile / "io.json", "fp32_onnx": p.source / "model.onnx"}
    if p.quantize:
        upstream["qdq_onnx"] = p.quantize / "model.onnx"
    extra = (spec, variant, target, p)
    tcfg = target_config(target)
    gates = variant_validation(spec, variant)
    validate_upstream = dict(upstream)
    if gates.data_dir:
        _data_files(validate_upstream, "validation", project.root / gates.data_dir)
    class_scores = tuple(o.name for o in spec.outputs if o.class_scores)
    kit_upstream = {**validate_upstream, "bundle": p.package / f"{name}-{target.name}.tar.gz"}
    del kit_upstream["weights"]  # in the bundle (the binary stays: package's doit target)
    kit = _task(project, at, f"validation kit of {name} for {target.name}: inputs, "
                "onnxruntime's outputs, gates, check.py", stages.kit,
                KitConfig(gates=asdict(gates), comparisons=scheme.comparisons, target=tcfg,
                          class_scores=class_scores),
                kit_upstream, p.artifact_dir / "kit", "kit.json", extra_args=extra)
    report = kit_report_for(project, name, target, options)
    if report is not None:  # the kit's checker ran the bundle elsewhere: validate reads it
        validate_upstream.update(kit_report=report, kit=p.artifact_dir / "kit" / "kit.json")
    validate = _task(project, at, f"validate {name} on {target.name} against onnxruntime",
                     stages.validate,
                     ValidateConfig(gates=asdict(gates), comparisons=scheme.comparisons,
                                    target=tcfg, class_scores=class_scores),
                     validate_upstream, p.artifact_dir / "validate", "validation.json",
                     extra_args=extra)
    bench_config = BenchConfig(threads=options.threads or tcfg.get("num_cores", 1),
                               warmup=options.warmup, repeat=options.repeat, target=tcfg,
                               rounds=options.rounds)
    bench = _task(project, at, f"latency of {name} on {target.name} vs onnxruntime",
                  stages.bench, bench_config, upstream, p.artifact_dir / "bench", "bench.json",
                  extra_args=extra)
    return {"kit": kit, "validate": validate, "bench": bench}


def read_kit_report_names(path: Path) -> tuple[str, str]:
    """(artifact, target) a kit checker's report is about; ConfigError if unreadable."""
    import json

    from pipeline.core.errors import ConfigError

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        return str(report["artifact"]), str(report["target"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"kit_report={path}: not a report of a kit's check.py ({e}); pass "
                          "the JSON file check.py wrote (--out)") from None


def kit_report_for(project: Project, name: str, target: TargetSpec,
                   options: Options) -> Path | None:
    """The kit report validate reads for artifact ``name`` on ``target``: ``kit_report=PATH``
    when it names this artifact and target, else ``artifacts/<name>/<target>/kit_report.json``
    if there is one."""
    from pipeline.stages.validate import KIT_REPORT

    if options.kit_report:
        path = Path(options.kit_report).resolve()
        if read_kit_report_names(path) == (name, target.name):
            return path
    default = project.artifacts / name / target.name / KIT_REPORT
    return default if default.is_file() else None


def summary_task(project: Project, kind: str, members: list[dict]) -> dict:
    """One report over every artifact's validate/bench output."""
    reports = [Path(t["targets"][0]) for t in members]
    out_dir = project.artifacts / "reports" / kind
    return {"name": "report", "doc": f"{kind} report over every artifact",
            "actions": [(stages.summarize, [kind, reports, out_dir])],
            "file_dep": [str(r) for r in reports],
            "targets": [str(out_dir / f"{'validation' if kind == 'validate' else 'bench'}.md")],
            "verbosity": 2}


def maintenance_tasks(project: Project, target: TargetSpec) -> dict[str, dict]:
    """Tasks that manage the store and the shared tuning logs (they always run when asked)."""
    key = target_key(target)
    cache = project.artifacts / "tuning_cache" / key
    logs = project.tuning_logs / key
    return {
        "save_tuning_logs": {
            "actions": [(stages.save_tuning_logs, [cache, logs])],
            "doc": f"merge what this machine tuned into {logs.relative_to(project.root)} "
                   "(commit it to share)",
            "uptodate": [False], "verbosity": 2},
        "gc": {
            "actions": [(stages.gc, [project.artifacts])],
            "doc": "delete stored outputs no artifact points at (and dead temp dirs)",
            "uptodate": [False], "verbosity": 2},
    }


def build_task(project: Project, spec: ModelSpec, variant: VariantSpec,
               target: TargetSpec) -> dict:
    """The artifact end to end, and its deliverables (``model.so``, ``bin``, ``src``, the
    bundle) linked to the package that passed the smoke check.

    The links are a function of the package's store entry: the package manifest (whose
    recipe id changes with any upstream change: a template, a re-tuned model) is a
    file_dep, and every build checks that each link is there and points into the current
    package (a deleted or stale link is restored; the check costs a few ``readlink``s).
    """
    name = f"{spec.name}_{variant.name}"
    p = artifact_paths(project, spec, variant, target.name)
    return {
        "name": name,
        "doc": f"{name} for {target.name}: every stage, up to the smoke check",
        "actions": [(stages.link_deliverables, [p.artifact_dir])],
        "file_dep": [str(p.smoke / "smoke.json"), str(p.package / MANIFEST),
                     str(p.artifact_dir / "kit" / "kit.json")],
        "targets": [str(p.artifact_dir / "model.so")],
        "uptodate": [config_changed({"deliverables": list(stages.DELIVERABLES)}),
                     functools.partial(_deliverables_current, p.artifact_dir)],
        "clean": [(stages.unlink_deliverables, [p.artifact_dir])],
        "verbosity": 2,
    }


def _deliverables_current(artifact_dir: Path, task, values) -> bool:
    return stages.deliverables_current(artifact_dir)


def all_tasks(project: Project, target: TargetSpec, options: Options) -> dict[str, list[dict]]:
    """Every task of the project, grouped by doit task group (stage name)."""
    groups: dict[str, list[dict]] = {g: [] for g in
                                     ("source", "quantize", "import", "tune", "compile",
                                      "package", "smoke", "kit", "build", "validate",
                                      "bench")}
    for spec in project.specs.values():
        groups["source"].append(source_task(project, spec))
        for variant in spec.variants.values():
            per_stage = stage_tasks(project, spec, variant, target, options)
            per_stage.update(check_tasks(project, spec, variant, target, options))
            for stage, task in per_stage.items():
                groups[stage].append(task)
            groups["build"].append(build_task(project, spec, variant, target))
    if options.kit_report:
        named = read_kit_report_names(Path(options.kit_report))
        built = {(t["name"].split("@")[0], target.name) for t in groups["validate"]}
        if named not in built:
            from pipeline.core.errors import ConfigError

            raise ConfigError(f"kit_report={options.kit_report} is a report on {named[0]} for "
                              f"target {named[1]}, which is not an artifact of this run "
                              f"(target {target.name}); run `doit validate:{named[0]}@"
                              f"{named[1]} kit_report={options.kit_report}`")
    for kind in ("validate", "bench"):
        groups[kind].append(summary_task(project, kind, groups[kind]))
    taken = {t["name"] for t in groups["build"]}
    for spec_path, message in sorted(project.broken.items()):
        task = broken_spec_task(spec_path, message)
        if task["name"] not in taken:  # last: `doit build` builds the good models first
            groups["build"].append(task)
    return groups


def broken_spec_task(spec_path: str, message: str) -> dict:
    """``build:<spec stem>`` of a spec that cannot be built: it fails with the spec's
    message, so ``doit build`` fails for it while the other models build."""
    stem = Path(spec_path).stem
    return {"name": stem, "doc": f"{stem}: cannot build, {Path(spec_path).name} is invalid",
            "actions": [(stages.broken_spec, [message])], "uptodate": [False],
            "verbosity": 2}
