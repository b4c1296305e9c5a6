"""Generate a faithful ResNet-50 v1.5 ONNX graph with deterministic, seeded weights.

No network is reachable from the build machines, so the model zoo's ResNet-50 cannot be
downloaded; this writes the same architecture (torchvision's resnet50: stride on the 3x3
conv of each bottleneck, Conv + BatchNormalization + Relu, stages 3-4-6-3, MaxPool,
GlobalAveragePool, Gemm; 25,557,032 parameters) with He-initialised weights and BatchNorm
statistics chosen so activations keep a sane range through all 50 layers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
EXPANSION = 4


class _Graph:
    """Accumulates nodes and initializers with stable, readable names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, name: str, cin: int, cout: int, k: int, stride: int,
                relu: bool, gamma_scale: float = 1.0) -> str:
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)
        self.const(f"{name}.weight", w)
        conv_out = f"{name}.conv_out"
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight"], [conv_out], name=f"{name}/Conv",
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        # BatchNorm statistics of a trained-looking net: mean near 0, var near the
        # conv output's variance, so BN re-normalises instead of exploding or vanishing.
        self.const(f"{name}.bn.scale", gamma_scale * (1.0 + 0.1 * self.rng.standard_normal(cout)))
        self.const(f"{name}.bn.bias", 0.1 * self.rng.standard_normal(cout))
        self.const(f"{name}.bn.mean", 0.1 * self.rng.standard_normal(cout))
        self.const(f"{name}.bn.var", 2.0 * (1.0 + 0.1 * self.rng.random(cout)))
        bn_out = f"{name}.bn_out"
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [conv_out, f"{name}.bn.scale", f"{name}.bn.bias", f"{name}.bn.mean", f"{name}.bn.var"],
            [bn_out], name=f"{name}/BatchNormalization", epsilon=1e-5))
        if not relu:
            return bn_out
        out = f"{name}.relu_out"
        self.nodes.append(helper.make_node("Relu", [bn_out], [out], name=f"{name}/Relu"))
        return out

    def bottleneck(self, x: str, name: str, cin: int, width: int, stride: int) -> str:
        cout = width * EXPANSION
        y = self.conv_bn(x, f"{name}.conv1", cin, width, 1, 1, relu=True)
        y = self.conv_bn(y, f"{name}.conv2", width, width, 3, stride, relu=True)
        # The last BN of a residual branch starts small (as in zero-init-residual training),
        # which keeps the identity path dominant and the output range bounded.
        y = self.conv_bn(y, f"{name}.conv3", width, cout, 1, 1, relu=False, gamma_scale=0.3)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.conv_bn(x, f"{name}.downsample", cin, cout, 1, stride, relu=False)
        added = f"{name}.add_out"
        self.nodes.append(helper.make_node("Add", [y, shortcut], [added], name=f"{name}/Add"))
        out = f"{name}.out"
        self.nodes.append(helper.make_node("Relu", [added], [out], name=f"{name}/Relu"))
        return out


def build(seed: int = 0, num_classes: int = 1000, image_size: int = 224,
          opset: int = 17) -> onnx.ModelProto:
    """Return the ResNet-50 v1.5 ModelProto (input ``input`` [1,3,H,W], output ``logits``)."""
    g = _Graph(np.random.default_rng(seed))
    x = g.conv_bn("input", "stem", 3, 64, 7, 2, relu=True)
    g.nodes.append(helper.make_node("MaxPool", [x], ["stem.pool_out"], name="stem/MaxPool",
                                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "stem.pool_out", 64
    for stage_idx, (width, blocks, stride) in enumerate(STAGES, start=1):
        for block in range(blocks):
            x = g.bottleneck(x, f"layer{stage_idx}.{block}", cin, width,
                             stride if block == 0 else 1)
            cin = width * EXPANSION
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool_out"], name="head/GAP"))
    g.nodes.append(helper.make_node("Flatten", ["pool_out"], ["flat"], name="head/Flatten",
                                    axis=1))
    fc_w = g.rng.standard_normal((num_classes, cin)) * np.sqrt(1.0 / cin)
    g.const("fc.weight", fc_w)
    g.const("fc.bias", 0.01 * g.rng.standard_normal(num_classes))
    g.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"],
                                    name="head/Gemm", transB=1))
    graph = helper.make_graph(
        g.nodes, "resnet50_v1_5",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnx2deploy.resnet50_gen")
    model.ir_version = 8
    return model


def generate(out_path: str, seed: int = 0) -> None:
    """Generator entry point used by the ``source`` stage."""
    model = build(seed=seed)
    onnx.checker.check_model(model)
    onnx.save_model(model, out_path)
