"""Prior-guided tuning against stock MetaSchedule, kernel by kernel, at equal trials.

For each kernel of a few small models built here that the committed logs have never seen
(shapes no record has), this tunes twice from a fresh copy of the committed CPU logs with
the same trial budget and seed: once as stock MetaSchedule (random initial population) and
once prior-guided (the schedules borrowed from records of kernels of the same kind are
measured first and seed the evolutionary search: ``TuneBudget.seed_from_kind``). It prints
the best latency each reached, and the naive and the borrowed (``tune=off``) latency.

    TVM_NUM_THREADS=2 python scripts/tune_prior_bench.py --trials 16
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CPU_LOGS = REPO / "models" / "tuning_logs" / "cpu-x86_64-avx512-vnni"


def _conv_net(channels: int, size: int):
    """A 3x3 conv + bias + ReLU then a 1x1 conv, at a shape ResNet-50's records lack."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
             for n, s in (("w", (channels, channels, 3, 3)), ("b", (channels,)),
                          ("w1", (channels * 2, channels, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"])]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       [1, channels * 2, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _mlp(rows: int, hidden: int):
    """A BERT-base-sized feed-forward block (MatMul + bias + GELU, MatMul + bias)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.05).astype(np.float32), n)
             for n, s in (("w0", (hidden, 4 * hidden)), ("b0", (4 * hidden,)),
                          ("w1", (4 * hidden, hidden)), ("b1", (hidden,)))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("Add", ["h", "b0"], ["hb"]),
             # GELU as BERT exports it: x * 0.5 * (1 + erf(x / sqrt(2)))
             helper.make_node("Div", ["hb", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["hb", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w1"], ["o"]),
             helper.make_node("Add", ["o", "b1"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MODELS = {"conv24@20": lambda: _conv_net(24, 20), "conv96@28": lambda: _conv_net(96, 28),
          "ffn768x128": lambda: _mlp(128, 768)}


def _lowered(model):
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup, lower_for_target
    from pipeline.core.targets import get_target, tvm_target

    target = tvm_target(get_target("cpu"))
    mod = graph_cleanup()(from_onnx(model, keep_params_in_input=False))
    return lower_for_target(mod, target, "float32", ""), target


def _tune(mod, target, prior: bool, trials: int, seed: int) -> dict[str, float]:
    from pipeline.tuning import logs, tuner

    scratch = Path(tempfile.mkdtemp(prefix="prior-bench-"))
    try:
        logs.merge([CPU_LOGS], scratch / "db")
        budget = tuner.TuneBudget(trials_per_task=trials, max_trials=10 * trials,
                                  wall_seconds=3600, seed=seed, trials_per_iter=8,
                                  seed_from_kind=prior)
        outcome = tuner.tune(mod, target, scratch / "db", budget, progress=lambda _: None)
        return {p.name: p.best_us for p in outcome.plans if p.best_us is not None}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="trials per kernel, both ways")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    print(f"| model | kernel | stock MetaSchedule, {args.trials} trials (us) | prior-guided, "
          f"{args.trials} trials (us) | prior / stock |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        mod, target = _lowered(MODELS[name]())
        stock = _tune(mod, target, False, args.trials, args.seed)
        prior = _tune(mod, target, True, args.trials, args.seed)
        for kernel in sorted(set(stock) & set(prior), key=lambda k: -stock[k]):
            if stock[kernel] < 20:  # elementwise crumbs: nothing to learn from
                continue
            print(f"| {name} | {kernel} | {stock[kernel]:.1f} | {prior[kernel]:.1f} | "
                  f"{prior[kernel] / stock[kernel]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
