"""Layout search for fp32 convolutions on the CPU: channels-last (NHWC/HWIO) or packed NCHW16c.

onnxruntime runs fp32 convolutions in a blocked NCHWc layout; FACTS.md measured channels-last
faster on two ResNet-50 layers and NCHW16c faster on a third. Which one a model should use is
a measurement, not a belief: this module takes a model's heaviest convolution shapes, builds
each as a one-layer module (conv + bias + ReLU, the fused kernel the model tunes) in both
layouts, tunes both with the same number of trials and reports the faster.

Each layer is lowered by the pipeline itself, so its conv task is the very workload the
model gets in that layout: the tuning cache often answers for the layout the model was tuned
in at no cost, and what the search tunes is tuned for the model too (in a scratch database
seeded from the cache; the cache is not written). ``lowering.DEFAULT_CPU_FP32_LAYOUT`` is
the choice the pipeline builds with; a spec's ``layout`` or ``doit ... layout=`` overrides it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.compiler.passes.pack_nchwc import OC_BLOCK
from pipeline.core.spec import CPU_FP32_LAYOUTS

# the data layouts a single conv layer is compared in; "NHWC-winograd" (also one of
# CPU_FP32_LAYOUTS) is an algorithm over NHWC whose conv is three kernels, compared on the
# whole model instead (doit bench)
LAYOUTS = tuple(layout for layout in CPU_FP32_LAYOUTS if layout != "NHWC-winograd")


@dataclass(frozen=True)
class ConvShape:
    """One fp32 conv2d of the model (NCHW terms), with how often the model runs it."""

    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int
    pad: int
    count: int

    @property
    def flops(self) -> float:
        out = (self.size + 2 * self.pad - self.kernel) // self.stride + 1
        return 2.0 * out * out * self.out_channels * self.in_channels * self.kernel ** 2

    @property
    def label(self) -> str:
        return (f"{self.kernel}x{self.kernel}/{self.stride} {self.in_channels}->"
                f"{self.out_channels} @{self.size}x{self.size}")


def conv_shapes(mod) -> list[ConvShape]:
    """The model's square NCHW conv2d shapes (groups=1), heaviest (count x FLOPs) first."""
    from tvm import relax

    from pipeline.compiler.passes._qdq import op_name, shape_of

    counts: dict[tuple, int] = {}

    def visit(expr):
        if op_name(expr) != "relax.nn.conv2d":
            return
        a = expr.attrs
        (_, c, h, w), (k, _, kh, kw) = shape_of(expr.args[0]), shape_of(expr.args[1])
        pads, strides = [int(p) for p in a.padding], [int(s) for s in a.strides]
        if (int(a.groups) != 1 or h != w or kh != kw or len(set(pads)) != 1
                or len(set(strides)) != 1 or str(a.data_layout) != "NCHW"):
            return
        key = (c, k, h, kh, strides[0], pads[0])
        counts[key] = counts.get(key, 0) + 1

    relax.analysis.post_order_visit(mod["main"], visit)
    shapes = [ConvShape(*key, count=n) for key, n in counts.items()]
    return sorted(shapes, key=lambda s: -s.count * s.flops)


def layer_module(shape: ConvShape, layout: str, target):
    """conv + bias + ReLU as the model holds it (NCHW), lowered by the pipeline in ``layout``:
    the conv task is the very workload the model gets in that layout."""
    import numpy as np
    from tvm import relax
    from tvm.relax import op

    from pipeline.compiler.lowering import lower_for_target

    rng = np.random.default_rng(0)
    c, k, n, kk = shape.in_channels, shape.out_channels, shape.size, shape.kernel
    weight = rng.standard_normal((k, c, kk, kk)).astype("float32")
    bias = rng.standard_normal((1, k, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, n, n), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(op.nn.conv2d(x, relax.const(weight), [shape.stride] * 2,
                                     [shape.pad] * 4))
            out = bb.emit_output(bb.emit(op.nn.relu(bb.emit(op.add(y, relax.const(bias))))))
        bb.emit_func_output(out)
    return lower_for_target(bb.get(), target, "float32", layout)


def search(mod, target, seed_dbs: list[Path], trials: int, top: int, out_json: Path,
           progress=print) -> list[dict]:
    """Tune the ``top`` heaviest conv shapes of ``mod`` in both layouts, ``trials`` each.

    Records already in ``seed_dbs`` count towards the trials (the model's own channels-last
    tuning usually covers that side); everything new goes into a scratch database.
    Writes and returns one row per shape: best microseconds per layout and the winner.
    """
    from pipeline.compiler import intrinsics
    from pipeline.tuning import logs as tuning_log
    from pipeline.tuning.tuner import TuneBudget, tune_module

    intrinsics.register()
    shapes = [s for s in conv_shapes(mod)
              if s.in_channels % OC_BLOCK == 0 and s.out_channels % OC_BLOCK == 0][:top]
    budget = TuneBudget(trials_per_task=trials, max_trials=10 * trials * top,
                        wall_seconds=math.inf, mode="extend")
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="layout_search_"))
    try:
        tuning_log.merge([p for p in seed_dbs if p.exists()], scratch)
        for i, shape in enumerate(shapes, 1):
            row = {**asdict(shape), "label": shape.label, "gflop": shape.flops / 1e9}
            for layout in LAYOUTS:
                progress(f"layout search {i}/{len(shapes)}: {shape.label} x{shape.count}, "
                         f"{layout}")
                plans = tune_module(layer_module(shape, layout, target), target, scratch,
                                    budget, progress=lambda s: None,
                                    select=lambda p: "conv2d" in p.name)
                conv = max(plans, key=lambda p: p.flops)
                row[layout] = {"best_us": conv.best_us, "records": conv.records,
                               "gflops": shape.flops / conv.best_us / 1e3
                               if conv.best_us else None}
            times = {lay: row[lay]["best_us"] or math.inf for lay in LAYOUTS}
            row["faster"] = min(times, key=times.get)
            row["speedup"] = max(times.values()) / min(times.values())
            progress(f"  NHWC {times['NHWC']:.0f} us, NCHW16c {times['NCHW16c']:.0f} us: "
                     f"{row['faster']} faster by {row['speedup']:.2f}x")
            rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"trials": trials, "rows": rows}, indent=2) + "\n")
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table of the rows, weighted totals last."""
    lines = ["| layer | x | NHWC us (GFLOP/s) | NCHW16c us (GFLOP/s) | faster |",
             "|---|---|---|---|---|"]
    totals = dict.fromkeys(LAYOUTS, 0.0)
    for r in rows:
        cells = []
        for lay in LAYOUTS:
            best, rate = r[lay]["best_us"], r[lay]["gflops"]
            cells.append(f"{best:.0f} ({rate:.0f})" if best else "no valid record")
            totals[lay] += r["count"] * (best or math.inf)
        lines.append(f"| {r['label']} | {r['count']} | {cells[0]} | {cells[1]} | "
                     f"{r['faster']} ({r['speedup']:.2f}x) |")
    lines.append(f"| weighted total | | {totals['NHWC']:.0f} | {totals['NCHW16c']:.0f} | "
                 f"{min(totals, key=totals.get)} |")
    return "\n".join(lines)
