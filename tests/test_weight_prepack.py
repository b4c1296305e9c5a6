"""Weights packed at compile time in the order a kernel reads them (pipeline.compiler.
weight_prepack): the twins, the packed replay of a record, and a compile that uses it."""

import numpy as np
import pytest
from test_transfer import _conv_relu, _kernels, _lowered

from pipeline.compiler import weight_prepack


def _conv_kernel(mod) -> str:
    (name,) = [n for n in _kernels(mod) if "conv" in n]
    return name


def test_twins_mark_the_constant_weights_of_reducing_kernels():
    mod, _ = _lowered(_conv_relu())
    conv = _conv_kernel(mod)
    weights = weight_prepack.constant_args(mod)
    # the conv takes (input, weight, bias, out): weight and bias are constants, the input
    # is not; the output is not an argument of call_tir
    assert weights[conv] == (1, 2)
    twins = weight_prepack.twins(mod)
    assert list(twins) == [conv]  # elementwise kernels (if any) are never twins
    assert [int(i) for i in twins[conv].attrs[weight_prepack.LAYOUT_FREE]] == [1, 2]
    swapped = weight_prepack.with_twins(mod, [conv])
    assert weight_prepack.LAYOUT_FREE in swapped[conv].attrs
    assert weight_prepack.LAYOUT_FREE not in (mod[conv].attrs or {})  # mod is untouched


def _records(mod, target, tmp_path):
    """A database holding, for the conv's twin, its rule schedule replayed with the weight
    packed (as the tuner's seeds do); returns (database dir, twin's packed schedule)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import cpu_rules
    from pipeline.compiler.workloads import plan_tasks
    from pipeline.tuning import transfer

    conv = _conv_kernel(mod)
    (plain,) = [p for p in plan_tasks(mod, target) if p.name == conv]
    (twin,) = [p for p in plan_tasks(weight_prepack.with_twins(mod, [conv]), target)
               if p.name == conv]
    _, sch = cpu_rules.rule_schedule_traced(plain.task.dispatched[0]["main"], target)
    scratch = ms.database.MemoryDatabase()
    source = ms.database.TuningRecord(
        sch.trace, scratch.commit_workload(plain.task.dispatched[0]), [1e-3], target,
        ms.arg_info.ArgInfo.from_prim_func(plain.task.dispatched[0]["main"]))
    packed = transfer._replayed_packed(source, twin.task.dispatched[0]["main"])
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    database.commit_tuning_record(ms.database.TuningRecord(
        packed.trace, database.commit_workload(twin.task.dispatched[0]), [1e-4], target,
        ms.arg_info.ArgInfo.from_entry_func(packed.mod, remove_preproc=True)))
    return db_dir, packed


def test_a_packed_replay_packs_the_weight_and_computes_the_same(tmp_path):
    """A record's trace replayed on the twin with MetaSchedule's postprocessors: the kernel
    gets a weight-packing block, its measured form takes the weight in another shape, and
    it computes what the naive kernel computes (the kernel check)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning.kernel_check import first_agreeing

    mod, target = _lowered(_conv_relu())
    conv = _conv_kernel(mod)
    _, packed = _records(mod, target, tmp_path)
    func = packed.mod["main"]
    assert weight_prepack.packs_weights(func)
    measured = ms.arg_info.ArgInfo.from_entry_func(packed.mod, remove_preproc=True)
    plain = ms.arg_info.ArgInfo.from_prim_func(mod[conv])
    assert [tuple(a.shape) for a in measured] != [tuple(a.shape) for a in plain]
    chosen, why_not = first_agreeing({conv: mod[conv]}, {conv: [lambda: func]}, target)
    assert conv in chosen, why_not


def test_compile_packs_the_weight_where_the_twin_has_a_record(tmp_path):
    """compile's lowering: the kernel whose twin has a record is compiled as the twin, its
    weight packed at compile time (model.params holds it in the packed shape), and the
    model computes what the same model compiled without records computes."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup
    from pipeline.compiler.params import lift_constants
    from pipeline.stages.compile_model import lower_and_schedule

    model = _conv_relu()
    lowered, target = _lowered(model)
    db_dir, _ = _records(lowered, target, tmp_path)
    source = graph_cleanup()(from_onnx(model, keep_params_in_input=False))
    x = np.random.default_rng(1).standard_normal((1, 24, 20, 20)).astype(np.float32)
    results, shapes, reports = {}, {}, {}
    for label, database in (("packed", db_dir), ("plain", None)):
        scheduled, target, report = lower_and_schedule(source, "cpu", "float32", database)
        # the packed kernel keeps its name (the roofline and tune_tasks= go by it)
        assert _conv_kernel(lowered) in [g.name_hint for g in scheduled.get_global_vars()]
        scheduled, weights = lift_constants(scheduled)
        vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
        results[label] = vm["main"](tvm.runtime.tensor(x), *weights).numpy()
        shapes[label] = sorted(tuple(w.shape) for w in weights)
        reports[label] = report
    assert reports["packed"]["prepacked_weights"] == [_conv_kernel(lowered)]
    assert reports["plain"]["prepacked_weights"] == []
    assert shapes["packed"] != shapes["plain"]
    np.testing.assert_allclose(results["packed"], results["plain"], rtol=1e-5, atol=1e-5)


def test_a_twin_slower_than_its_plain_kernel_is_not_chosen(tmp_path):
    """The twin's best record against the plain kernel's best in the same database: the
    twin only where it is at least as fast; a twin about to be tuned (``wanted``) always."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import cpu_rules
    from pipeline.compiler.workloads import plan_tasks

    mod, target = _lowered(_conv_relu())
    conv = _conv_kernel(mod)
    db_dir, _ = _records(mod, target, tmp_path)  # the twin's record: 100 us
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    assert weight_prepack.prefer_prepacked(mod, target, database)[1] == [conv]
    (plain,) = [p for p in plan_tasks(mod, target) if p.name == conv]
    workload = plain.task.dispatched[0]
    _, sch = cpu_rules.rule_schedule_traced(workload["main"], target)
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(workload), [5e-5], target,
        ms.arg_info.ArgInfo.from_prim_func(workload["main"])))  # the plain kernel: 50 us
    assert weight_prepack.prefer_prepacked(mod, target, database)[1] == []
    assert weight_prepack.prefer_prepacked(mod, target, database, [conv])[1] == [conv]
    assert weight_prepack.prefer_prepacked(mod, target, None)[1] == []


def test_prepack_option_is_checked():
    from pipeline.core.errors import ConfigError
    from pipeline.tasks.options import REMEMBERED, Options, parse_options

    given = {"tune": "extend", "prepack": "on"}
    assert parse_options(lambda name, default=None: given.get(name)).prepack == "on"
    assert "prepack" not in REMEMBERED  # a one-off, like tune_tasks
    assert Options(tune="extend", prepack="on").problems() == []
    with pytest.raises(ConfigError, match="prepack=yes"):
        Options(prepack="yes").validate()
    with pytest.raises(ConfigError, match="tune=off tunes nothing"):
        Options(tune="off", prepack="on").validate()


@pytest.mark.slow  # two small tuning runs (builder and runner workers): ~1 minute
def test_the_tuner_seeds_a_twin_with_its_plain_and_packed_schedule(tmp_path):
    """A conv tuned plain, then as its twin (what `prepack=on` does): the twin's first
    candidates are the plain record replayed as it is and with its weight packed, so the
    twin's records hold both, each measured on its own arguments; the twin is what the
    database now prefers for compile."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.workloads import plan_tasks
    from pipeline.tuning import tuner
    from pipeline.tuning.kernel_check import scheduled_func

    mod, target = _lowered(_conv_relu(channels=16, size=8))
    conv = _conv_kernel(mod)
    db_dir = tmp_path / "db"
    budget = tuner.TuneBudget(trials_per_task=4, max_trials=100, wall_seconds=600,
                              builder_timeout=60, coarse_trials=4)
    tuner.tune(mod, target, db_dir, budget, progress=lambda s: None, only=(conv,))
    lines: list[str] = []
    twin_budget = tuner.TuneBudget(trials_per_task=6, max_trials=100, wall_seconds=600,
                                   builder_timeout=60, coarse_trials=6)
    tuner.tune(mod, target, db_dir, twin_budget, progress=lines.append, only=(conv,),
               prefer=lambda m, db: weight_prepack.prefer_prepacked(m, target, db, [conv])[0])
    assert any("started from" in line for line in lines), lines
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    (twin,) = [p for p in plan_tasks(weight_prepack.with_twins(mod, [conv]), target)
               if p.name == conv]
    records = database.get_top_k(database.commit_workload(twin.task.dispatched[0]), 100)
    packed = [weight_prepack.packs_weights(scheduled_func(r)) for r in records]
    assert True in packed and False in packed, packed
    plain_shapes = [tuple(int(d) for d in p.shape) for p in mod[conv].params]
    for r, packs in zip(records, packed):
        # measured on the packed tensors (the weight's, or the bias's, or both)
        assert ([tuple(a.shape) for a in r.args_info] != plain_shapes) == packs
    (plain,) = [p for p in plan_tasks(mod, target) if p.name == conv]
    plain_best = database.get_top_k(database.commit_workload(plain.task.dispatched[0]), 1)[0]
    twin_faster = (sum(map(float, records[0].run_secs)) / len(records[0].run_secs)
                   <= sum(map(float, plain_best.run_secs)) / len(plain_best.run_secs))
    chosen, names = weight_prepack.prefer_prepacked(mod, target, database)
    assert (names == [conv]) == twin_faster
    assert (weight_prepack.LAYOUT_FREE in (chosen[conv].attrs or {})) == twin_faster


@pytest.mark.slow  # two doit runs that tune (builder and runner workers), and a C++ build
def test_prepack_on_from_the_doit_command_line(tmp_path):
    """``prepack=on`` as a user types it, after a plain tuning run: the conv's twin is
    tuned into the cache (a workload marking its weights layout-free), the build goes
    through every stage (the C++ app agrees with TVM in Python), and a kernel compile
    reports as packed is published as its twin. A bad value is refused before anything
    runs."""
    import json

    from doit_runner import doit
    from test_tune import _rpc_spec
    from test_tune_continue import _one_conv

    from models import make_project

    project = make_project(tmp_path / "p", _one_conv(), _rpc_spec())
    run = doit(project, "tune:tiny_fp32@cpu", "tune=missing", "tune_tasks=*conv2d*")
    assert run.returncode == 0, run.output
    run = doit(project, "build:tiny_fp32", "tune=extend", "prepack=on", "tune_tasks=*conv2d*")
    assert run.returncode == 0, run.output
    assert "started from" in run.output, run.output  # the twin's seeds: the plain records
    def twins_recorded(db_dir) -> int:
        from tvm.s_tir import meta_schedule as ms

        database = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
        return sum(weight_prepack.is_twin(r.workload.mod["main"])
                   for r in database.get_all_tuning_records())

    (cache,) = (project / "artifacts" / "tuning_cache").glob("*/database_workload.json")
    assert twins_recorded(cache.parent) >= 1
    out = project / "artifacts" / "tiny_fp32" / "cpu"
    packed = json.loads((out / "compile" / "compile_report.json").read_text())[
        "prepacked_weights"]
    assert len(packed) <= 1 and all("conv2d" in name for name in packed), packed
    if packed:
        assert twins_recorded(out / "tune") == 1
    assert (out / "smoke").exists()
    bad = doit(project, "build:tiny_fp32", "tune=extend", "prepack=yes")
    assert bad.returncode != 0 and "prepack=yes" in bad.output, bad.output
