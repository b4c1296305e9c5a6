"""Default CPU schedules from rules (pipeline.compiler.cpu_rules): kernels that neither a
tuning record nor a transferred schedule covers run parallel and vectorised instead of as
naive loops, checked against the naive kernel."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from pipeline.compiler import cpu_rules
from pipeline.tuning.kernel_check import _build, _random_args, _run


def _lowered(nodes, inputs, outputs, initializers=()):
    from test_transfer import _lowered as lowered

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return lowered(model)


def _kernels(mod) -> dict:
    from tvm import tirx

    return {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _ruled(mod, target, part: str, rtol: float):
    """The kernel of ``mod`` whose name holds ``part``, scheduled by its rule and checked
    against its naive self here: ``(naive func, rule, scheduled script)``."""
    kernels = _kernels(mod)
    (name,) = [n for n in kernels if part in n]
    rule, func = cpu_rules.rule_schedule(kernels[name], target)
    args = _random_args(kernels[name], 1)
    want = _run(_build({name: kernels[name]}, target), name, args)
    got = _run(_build({name: func}, target), name, args)
    np.testing.assert_allclose(got[-1], want[-1], rtol=rtol, atol=rtol)
    return kernels[name], rule, func.script()


def _transpose_add_sum():
    """A transpose + add (a layout kernel, no reduction) and a sum over the last axis."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Add", ["t", "y"], ["a"]),
             helper.make_node("ReduceSum", ["a", "axes"], ["s"], keepdims=0),
             helper.make_node("Gather", ["table", "ids"], ["g"], axis=0)]
    inputs = [helper.make_tensor_value_info("x", f, [1, 32, 64, 48]),
              helper.make_tensor_value_info("y", f, [1, 64, 32, 48]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [8])]
    outputs = [helper.make_tensor_value_info("s", f, [1, 64, 32]),
               helper.make_tensor_value_info("g", f, [8, 16])]
    table = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    return _lowered(nodes, inputs, outputs, [
        numpy_helper.from_array(np.array([3], np.int64), "axes"),
        numpy_helper.from_array(table, "table")])


def test_a_layout_kernel_gets_a_parallel_vectorised_schedule_that_computes_the_same():
    mod, target = _transpose_add_sum()
    naive, rule, script = _ruled(mod, target, "transpose", rtol=0)
    assert rule == "Injective"
    assert "T.parallel" in script and "T.vectorized" in script
    assert "T.parallel" not in naive.script()


def test_rules_schedule_what_is_left_checked_and_gathers_keep_naive_loops_saying_why():
    mod, target = _transpose_add_sum()
    names = sorted(_kernels(mod))
    scheduled, by_rule, why_not = cpu_rules.schedule_by_rules(mod, target, names)
    assert set(by_rule) | set(why_not) == set(names) and not set(by_rule) & set(why_not)
    gathers = [n for n in names if "take" in n]
    assert gathers and all("gather" in why_not[n] for n in gathers)
    small = [n for n in why_not if "too small" in why_not[n]]  # e.g. the 8 index fix-ups
    assert small and all(cpu_rules.iterations(_kernels(mod)[n]) < cpu_rules.MIN_ITERATIONS
                         for n in small)
    big = [n for n in names if "transpose" in n or "sum" in n]
    assert len(big) == 2 and set(big) <= set(by_rule)
    assert by_rule[next(n for n in big if "sum" in n)] == "TiledReduction"
    for name in big:
        func = _kernels(scheduled)[name]
        assert bool(func.attrs["tirx.is_scheduled"]) and "T.parallel" in func.script()


def test_a_wrong_rule_schedule_is_refused_by_the_check(monkeypatch):
    """The kernel check stands behind the rules too: a schedule computing something else
    (here: the kernel of another function) is refused and the kernel keeps naive loops."""
    mod, target = _transpose_add_sum()
    kernels = _kernels(mod)
    (name,) = [n for n in kernels if "transpose" in n]
    from tvm.script import from_source

    right = cpu_rules.rule_schedule(kernels[name], target)[1].script().splitlines()
    (store,) = [i for i, line in enumerate(right) if "T.reads" not in line and " = x[" in line]
    right[store] += " * T.float32(2)"  # the same loops, twice the value
    wrong = from_source("\n".join(right))

    def swapped(func, target):
        return "Injective", wrong

    monkeypatch.setattr(cpu_rules, "rule_schedule", swapped)
    _, by_rule, why_not = cpu_rules.schedule_by_rules(mod, target, [name])
    assert not by_rule and "Injective" in why_not[name]


def test_a_grouped_conv_no_record_covers_gets_a_tiled_vectorised_reduction():
    """A grouped 1x1 conv with bias and ReLU (shufflenet's kind: no committed record has its
    blocks): the reduction runs inside the spatial loops with a 16-wide vector tile of
    output channels, and computes what the naive kernel does."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 16, 1, 1)) * 0.1).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    f = TensorProto.FLOAT
    mod, target = _lowered(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=4),
         helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_tensor_value_info("x", f, [1, 64, 14, 14])],
        [helper.make_tensor_value_info("y", f, [1, 64, 14, 14])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    _, rule, script = _ruled(mod, target, "conv2d", rtol=1e-5)
    assert rule == "TiledReduction"
    assert "T.parallel" in script and "T.vectorized(T.int64(16))" in script
    assert "_update" in script  # the reduction's init split off: the tile accumulates
