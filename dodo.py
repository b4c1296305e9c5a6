"""doit entry point: ``doit list`` shows every task; the work is done in pipeline/.

Kept thin and free of heavy imports (no TVM, no onnxruntime) so ``doit list`` and a no-op
``doit build:...`` start instantly. Options: ``doit build:resnet50_int8 target=rtx4090``,
``tune=off|missing|extend``, ``trials=N``, ``tune_minutes=M``, ``rpc=host:port:key``,
``layout=NHWC|NCHW16c`` (fp32 convs on CPUs).
"""

import sys
from pathlib import Path

from doit import get_var

from pipeline.core.errors import PipelineError
from pipeline.core.project import Project
from pipeline.core.store import check_writable
from pipeline.core.targets import get_target
from pipeline.nightly import NIGHTLY_VARS
from pipeline.tasks.graph import all_tasks, maintenance_tasks
from pipeline.tasks.options import parse_options, remembering, unknown_task_args

ROOT = Path.cwd()

DOIT_CONFIG = {
    # sqlite3 survives concurrent doit processes; dbm and json lose records (FACTS.md).
    "backend": "sqlite3",
    "dep_file": str(ROOT / "artifacts" / ".doit.sqlite3"),
    "default_tasks": ["build"],
    "verbosity": 2,
}


def _target_named_in_argv():
    """``doit validate:resnet50_int8@h100`` names its target: no ``target=`` needed."""
    named = {arg.rsplit("@", 1)[1] for arg in sys.argv[1:] if "@" in arg and "=" not in arg}
    return named.pop() if len(named) == 1 else None


def _fail(message):
    """A user's mistake: one message saying what to do, exit 2, no traceback."""
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(2)


def _check_task_args(project, tasks):
    """``doit build:resnet51_int8``: name the known artifacts (doit would only say "Invalid
    parameter"); a name of a spec that cannot be built repeats that spec's message."""
    names = {group: [t["name"] for t in members] for group, members in tasks.items()}
    for name, problem in unknown_task_args(sys.argv[1:], names):
        model = name.split("@")[0]
        for spec_path, message in project.broken.items():
            stem = Path(spec_path).stem
            if model == stem or model.startswith(f"{stem}_"):
                problem += f"\n{message}"
        if project.broken:
            problem += ("\n(invalid specs have no tasks: "
                        f"{', '.join(Path(p).name for p in sorted(project.broken))})")
        _fail(problem)


def _load():
    try:
        check_writable(ROOT / "artifacts")
        options = parse_options(
            remembering(get_var, ROOT / "artifacts",
                        lambda line: print(f"NOTE: {line}", file=sys.stderr)),
            _target_named_in_argv(), argv=sys.argv[1:], other_vars=NIGHTLY_VARS)
        project, target = Project.load(ROOT), get_target(options.target)
        tasks, maintenance = all_tasks(project, target, options), maintenance_tasks(project,
                                                                                    target)
    except PipelineError as e:
        _fail(e)
    for spec_path, message in sorted(project.broken.items()):
        problems = [line[4:] for line in message.splitlines() if line.startswith("  - ")]
        print(f"ERROR: {Path(spec_path).relative_to(ROOT)} is invalid, its model is left out "
              f"(`doit build:{Path(spec_path).stem}` says why; the other models build): "
              f"{'; '.join(problems) or message}", file=sys.stderr)
    if not project.specs and not project.broken:
        print(f"WARNING: no model specs (models/*.toml) in {ROOT}: run doit in a project "
              "directory (see the README)", file=sys.stderr)
    _check_task_args(project, tasks)
    return tasks, maintenance


_TASKS, _MAINTENANCE = _load()


def _group(name):
    yield from _TASKS[name]


def task_source():
    """Stage 1: the fp32 ONNX model (generated or a local file), normalised and checked."""
    yield from _group("source")


def task_quantize():
    """Stage 2: the scheme quantizes the ONNX with onnxruntime (int8 QDQ, w4g32 MatMulNBits...)."""
    yield from _group("quantize")


def task_import():
    """Stage 3: Relax IRModule, weights in module.params; the scheme's passes; packed 4-bit kept."""
    yield from _group("import")


def task_tune():
    """Stage 4: MetaSchedule tuning; cached logs reused, only unseen workloads tuned."""
    yield from _group("tune")


def task_compile():
    """Stage 5: model.so for the target; untuned kernels reported by name."""
    yield from _group("compile")


def task_package():
    """Stage 6: generated C++ app, bin/infer built with CMake, runnable .tar.gz bundle."""
    yield from _group("package")


def task_smoke():
    """Stage 7: smoke check, C++ binary output bit-identical to the Python VM."""
    yield from _group("smoke")


def task_kit():
    """Validation kit next to the bundle: inputs, onnxruntime's outputs, gates, check.py."""
    yield from _group("kit")


def task_build():
    """Build an artifact end to end: doit build:<model>_<variant> [target=cpu|rtx4090|h100]."""
    yield from _group("build")


def task_validate():
    """Every artifact vs onnxruntime (fp32 and QDQ), TVM in Python and the C++ binary."""
    yield from _group("validate")


def task_bench():
    """Latency of each C++ binary vs onnxruntime and TVM in Python, same threads, one run."""
    yield from _group("bench")


def task_save_tuning_logs():
    """Merge this machine's tuning cache into models/tuning_logs/ (then commit it)."""
    return _MAINTENANCE["save_tuning_logs"]


def task_gc():
    """Delete stored outputs that no artifact points at."""
    return _MAINTENANCE["gc"]


def task_nightly():
    """Rebuild every model x variant x target (tune=off), validate, bench, check the baseline."""
    from pipeline.nightly import nightly_task

    return nightly_task(ROOT, get_var)
