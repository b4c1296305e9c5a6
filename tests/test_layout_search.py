"""Layout search pieces that need no tuning: shapes found in a model, one-layer modules."""

from __future__ import annotations

import pytest

from pipeline.tuning import layout_search
from pipeline.tuning.layout_search import ConvShape


def test_conv_shapes_of_a_model_heaviest_first():
    from tvm.relax.frontend.onnx import from_onnx

    from models import tiny_convnet
    from pipeline.compiler.lowering import graph_cleanup

    mod = graph_cleanup()(from_onnx(tiny_convnet(), keep_params_in_input=False))
    shapes = layout_search.conv_shapes(mod)
    assert [(s.in_channels, s.out_channels, s.size, s.kernel, s.stride, s.pad, s.count)
            for s in shapes] == [(8, 8, 8, 3, 1, 1, 1), (3, 8, 8, 3, 1, 1, 1)]
    assert shapes[0].flops == 2 * 8 * 8 * 8 * 8 * 9
    assert shapes[0].label == "3x3/1 8->8 @8x8"


@pytest.mark.parametrize("layout", layout_search.LAYOUTS)
def test_layer_module_is_one_fused_conv_task_in_each_layout(layout):
    from pipeline.compiler.workloads import plan_tasks
    from pipeline.core.targets import get_target, tvm_target

    target = tvm_target(get_target("cpu"))
    shape = ConvShape(32, 16, 10, 3, 2, 1, count=1)
    plans = plan_tasks(layout_search.layer_module(shape, layout, target), target)
    convs = [p for p in plans if "conv2d" in p.name]
    assert len(convs) == 1, [p.name for p in plans]
    assert "relu" in convs[0].name, convs[0].name
    # same arithmetic in both layouts: conv FLOPs plus the bias add and ReLU
    assert convs[0].flops >= shape.flops
    # the rest converts the layer's NCHW input and output
    assert all("transform" in p.name or "transpose" in p.name for p in plans if p not in convs)


def test_summary_table_names_the_faster_layout():
    row = {"label": "1x1/1 64->64 @56x56", "count": 3, "faster": "NHWC", "speedup": 1.5,
           "NHWC": {"best_us": 100.0, "gflops": 250.0},
           "NCHW16c": {"best_us": 150.0, "gflops": 170.0}}
    table = layout_search.summary([row])
    assert "| 1x1/1 64->64 @56x56 | 3 | 100 (250) | 150 (170) | NHWC (1.50x) |" in table
    assert "| weighted total | | 300 | 450 | NHWC |" in table
