"""The kernels of a module: what tune tunes and compile applies, looked up the same way.

Tuning and compilation must agree on the tasks of a lowered module (records are matched by
workload structural hash), so both stages take them from :func:`plan_tasks`; the module's
I/O signature and its (de)serialisation live here too, below both stages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TaskPlan:
    """One tuning task with its estimated share of model latency."""

    name: str
    task: object  # ms.ExtractedTask
    weight: int
    flops: float
    share: float = 0.0
    records: int = 0
    best_us: float | None = None
    attempts: int = 0  # tuning runs of this task in this call (2 after a retry)


def has_reduction(func) -> bool:
    """Whether a PrimFunc has a reduction axis (a conv, matmul, pooling, norm)."""
    return re.search(r'T\.axis\.(reduce\(|remap\("[SR]*R)', func.script()) is not None


def plan_tasks(mod, target) -> list[TaskPlan]:
    """Extract tuning tasks and order them by estimated share (weight x FLOPs)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    plans = []
    for task in ms.relax_integration.extract_tasks(mod, target):
        try:
            flops = float(estimate_tir_flops(task.dispatched[0]))
        except Exception:  # some kernels (pure copies) have no FLOP estimate
            flops = 0.0
        plans.append(TaskPlan(task.task_name, task, int(task.weight), max(flops, 1.0)))
    total = sum(p.weight * p.flops for p in plans) or 1.0
    for p in plans:
        p.share = p.weight * p.flops / total
    plans.sort(key=lambda p: (-p.share, p.name))
    return plans


def load_module(module_json: Path):
    """The import stage's module, its weights (``module.params`` next to it) bound back as
    constants: the very module the import stage lifted them from."""
    import tvm

    from pipeline.compiler.params import bind_params, num_inputs
    from pipeline.runtime.params import load_params, params_path

    mod = tvm.ir.load_json(Path(module_json).read_text(encoding="utf-8"))
    main = mod["main"]
    if num_inputs(main) < len(main.params):  # lifted weights: the file must be there
        mod = bind_params(mod, load_params(params_path(module_json)))
    return mod


def io_signature(mod) -> dict:
    """Input and output names/shapes/dtypes of ``main``, as plain data for the C++ app."""
    from tvm import relax

    func = mod["main"]

    def tensor(name, ty):
        if not isinstance(ty, relax.TensorType):
            raise TypeError(f"{name}: only tensor inputs/outputs are supported, got {ty}")
        return {"name": name, "shape": [int(d) for d in ty.shape], "dtype": str(ty.dtype)}

    # TVM 0.27 names struct info "ty": Var.ty, Function.ret_ty.
    ret = func.ret_ty
    outs = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    from pipeline.compiler.params import num_inputs

    inputs = func.params[:num_inputs(func)]  # lifted weights, if any, follow the inputs
    return {"inputs": [tensor(p.name, p.ty) for p in inputs],
            "outputs": [tensor(f"output{i}", s) for i, s in enumerate(outs)]}


def untuned_kernels(mod, target, database) -> tuple[list[str], list[str]]:
    """(tuned, untuned) task names of the lowered module against ``database``."""
    from pipeline.compiler.workloads import plan_tasks

    tuned, untuned = [], []
    for plan in plan_tasks(mod, target):
        workload_mod = plan.task.dispatched[0]
        found = database is not None and database.query_tuning_record(
            workload_mod, target, plan.name) is not None
        (tuned if found else untuned).append(plan.name)
    return sorted(tuned), sorted(untuned)
