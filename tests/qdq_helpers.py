"""Tiny float ONNX models built in code, quantized by onnxruntime, and a TVM-vs-ORT check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 17
IR_VERSION = 9  # onnxruntime 1.31 loads IR <= 13; onnx's default is newer


def _init(rng, name, shape, std):
    from onnx import numpy_helper

    return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)


class _Graph:
    """A small helper to write a graph node by node."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def node(self, op, inputs, **attrs):
        from onnx import helper

        self.n += 1
        out = f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def conv(self, x, cin, cout, k=3, stride=1, pad=1, relu=True, bias=True, groups=1):
        w = f"w{self.n}"
        fan_in = cin // groups * k * k
        self.inits.append(_init(self.rng, w, (cout, cin // groups, k, k), 1.0 / np.sqrt(fan_in)))
        inputs = [x, w]
        if bias:
            self.inits.append(_init(self.rng, f"b{self.n}", (cout,), 0.1))
            inputs.append(f"b{self.n}")
        y = self.node("Conv", inputs, pads=[pad] * 4, strides=[stride] * 2, group=groups)
        return self.node("Relu", [y]) if relu else y

    def gemm(self, x, cin, cout):
        self.inits.append(_init(self.rng, f"g{self.n}", (cout, cin), 1.0 / np.sqrt(cin)))
        self.inits.append(_init(self.rng, f"gb{self.n}", (cout,), 0.1))
        return self.node("Gemm", [x, f"g{self.n}", f"gb{self.n}"], transB=1)

    def model(self, x_shape, y, y_shape):
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                 ir_version=IR_VERSION)


def conv_model(relu: bool = True, cin: int = 4, cout: int = 16, hw: int = 8):
    """x[1,cin,hw,hw] -> conv 3x3 pad 1 (+relu) -> [1,cout,hw,hw]."""
    g = _Graph(1)
    y = g.conv("x", cin, cout, relu=relu)
    return g.model([1, cin, hw, hw], y, [1, cout, hw, hw])


def depthwise_model():
    """conv-relu -> depthwise 3x3 stride 2 -> relu -> pointwise 1x1: a MobileNet block."""
    g = _Graph(5)
    a = g.conv("x", 4, 16)
    d = g.conv(a, 16, 16, stride=2, groups=16)
    y = g.conv(d, 16, 32, k=1, pad=0, relu=False)
    return g.model([1, 4, 8, 8], y, [1, 32, 4, 4])


def residual_model():
    """conv-relu -> conv-relu -> conv, + skip, relu: a ResNet basic block."""
    g = _Graph(2)
    a = g.conv("x", 4, 16)
    b = g.conv(a, 16, 16)
    c = g.conv(b, 16, 16, relu=False)
    y = g.node("Relu", [g.node("Add", [c, a])])
    return g.model([1, 4, 8, 8], y, [1, 16, 8, 8])


def maxpool_model():
    """conv-relu -> maxpool 3x3/2 pad 1 -> conv-relu."""
    g = _Graph(3)
    a = g.conv("x", 4, 16)
    p = g.node("MaxPool", [a], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y = g.conv(p, 16, 16)
    return g.model([1, 4, 8, 8], y, [1, 16, 4, 4])


def classifier_model():
    """conv-relu -> global average pool -> flatten -> gemm: a classifier head."""
    g = _Graph(4)
    a = g.conv("x", 4, 16)
    f = g.node("Flatten", [g.node("GlobalAveragePool", [a])])
    y = g.gemm(f, 16, 10)
    return g.model([1, 4, 8, 8], y, [1, 10])


def attention_model(seq: int = 16, hidden: int = 32, heads: int = 2):
    """One self-attention block as a BERT exports it: x[1,seq,hidden] -> MatMul + bias for
    Q, K, V -> heads (Reshape, Transpose) -> Q x K^T / sqrt(d) -> Softmax -> x V -> merge
    heads -> output MatMul + bias. Quantized with ``op_types=["MatMul"]``, two of its
    MatMuls multiply two activations."""
    from onnx import numpy_helper

    g = _Graph(6)
    d = hidden // heads

    def const(name, values):
        g.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def linear(x):
        w, b = f"w{g.n}", f"b{g.n}"
        g.inits.append(_init(g.rng, w, (hidden, hidden), 1.0 / np.sqrt(hidden)))
        g.inits.append(_init(g.rng, b, (hidden,), 0.1))
        return g.node("Add", [g.node("MatMul", [x, w]), b])

    split = const("split_shape", np.array([1, seq, heads, d], np.int64))
    merge = const("merge_shape", np.array([1, seq, hidden], np.int64))

    def heads_of(x, perm):
        return g.node("Transpose", [g.node("Reshape", [x, split])], perm=perm)

    q = heads_of(linear("x"), [0, 2, 1, 3])
    k = heads_of(linear("x"), [0, 2, 3, 1])
    v = heads_of(linear("x"), [0, 2, 1, 3])
    scores = g.node("Div", [g.node("MatMul", [q, k]),
                            const("sqrt_d", np.array(np.sqrt(d), np.float32))])
    context = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
    merged = g.node("Reshape", [g.node("Transpose", [context], perm=[0, 2, 1, 3]), merge])
    y = linear(merged)
    return g.model([1, seq, hidden], y, [1, seq, hidden])


def add_model(hw: int = 256):
    """x + y, two inputs: quantized, a lone QLinearAdd in onnxruntime."""
    from onnx import TensorProto, helper

    shape = [1, 1, hw, hw]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])], "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def avgpool_model(kernel: int = 2, stride: int = 2, pad: int = 0, count_include_pad: int = 0,
                  channels: int = 8, hw: int = 16):
    """x[1,channels,hw,hw] -> AveragePool: a lone QLinearAveragePool in onnxruntime once
    quantized with ``ForceQuantizeNoInputCheck`` (its quantizer leaves a pooling op whose
    input nothing else quantizes in float)."""
    from onnx import TensorProto, helper

    out = (hw + 2 * pad - kernel) // stride + 1
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=[pad] * 4,
                            count_include_pad=count_include_pad)
    graph = helper.make_graph(
        [node], "avgpool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def inputs(shape, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def input_shapes(model) -> dict[str, list[int]]:
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


def _feed(x) -> dict:
    return x if isinstance(x, dict) else {"x": x}


def quantize_qdq(model, workdir: Path, per_channel: bool = True, activation: str = "QUInt8",
                 calib_count: int = 4, calib: list[dict] | None = None,
                 op_types: list[str] | None = None, extra_options: dict | None = None):
    """Quantize like the pipeline does: QDQ, u8 activations, s8 per-channel weights.

    Calibrates on ``calib`` (feed dicts), or on ``calib_count`` seeded normal inputs;
    ``op_types`` limits the ops quantized (onnxruntime's ``op_types_to_quantize``);
    ``extra_options`` go to ``quantize_static``.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None:
        shapes = input_shapes(model)
        calib = [{name: x for name in shapes}
                 for x in inputs(input_shape(model), calib_count, seed=123)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    fp32, pre, qdq = workdir / "fp32.onnx", workdir / "pre.onnx", workdir / "qdq.onnx"
    onnx.save(model, fp32)
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation),
                    weight_type=QuantType.QInt8, per_channel=per_channel,
                    op_types_to_quantize=op_types, extra_options=extra_options)
    return onnx.load(qdq)


def output_scale(qdq_model) -> float:
    """Scale of the QuantizeLinear feeding the graph output."""
    out = qdq_model.graph.output[0].name
    for node in qdq_model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == out:
            return float(_initializers(qdq_model)[node.input[1]])
    raise AssertionError("graph output is not dequantized")


def input_qparams(qdq_model, name: str) -> tuple[float, int]:
    """(scale, zero point) of the QuantizeLinear of graph input ``name``."""
    for node in qdq_model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == name:
            inits = _initializers(qdq_model)
            return float(inits[node.input[1]]), int(inits[node.input[2]])
    raise AssertionError(f"input {name} is not quantized")


def _initializers(model) -> dict:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def run_ort(qdq_model, xs, fused: bool = False):
    """onnxruntime's int8 output, from the reference session for this CPU (exact kernels
    with VNNI, the QDQ arithmetic without: see pipeline.runtime.ort_reference); ``fused``
    always runs its fused integer kernels (exact where no u8 x s8 product is involved)."""
    import onnxruntime as ort

    from pipeline.runtime import ort_reference

    opts = ort_reference.session_options(quantized=not fused, threads=2)
    sess = ort.InferenceSession(qdq_model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return [sess.run(None, _feed(x))[0] for x in xs]


def import_qdq(qdq_model, fold: bool = True):
    """from_onnx, then the generic cleanup the pipeline runs (FoldConstant)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(qdq_model, shape_dict=input_shapes(qdq_model), keep_params_in_input=False)
    return relax.transform.FoldConstant()(mod) if fold else mod


def input_shape(model) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def build_and_run(mod, xs, target=None):
    import tvm
    from tvm import relax

    target = target or tvm.target.Target({"kind": "llvm", "num-cores": 2})
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    names = [p.name for p in mod["main"].params]
    return [vm["main"](*(tvm.runtime.tensor(_feed(x)[n]) for n in names)).numpy() for x in xs]


def max_steps(got: list[np.ndarray], ref: list[np.ndarray], scale: float) -> float:
    """Largest elementwise difference in output quantization steps."""
    return max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref)) / scale


def count_ops(mod, name: str) -> int:
    """Calls to Relax op ``name`` (e.g. ``"relax.dequantize"``) in ``main``."""
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if _is_call(e, name) else None)
    return len(found)


def _is_call(expr, name):
    from tvm import ir

    return isinstance(expr, ir.Call) and isinstance(expr.op, ir.Op) and expr.op.name == name


def dequantize_feeds(mod, consumers=("relax.nn.conv2d", "relax.matmul")) -> int:
    """How many ``consumers`` calls take an operand computed by ``R.dequantize``."""
    from tvm import ir, relax

    values = {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            values[b.var] = b.value
    n = 0
    for value in values.values():
        if _is_call(value, consumers[0]) or any(_is_call(value, c) for c in consumers):
            for arg in value.args:
                src = values.get(arg, arg) if isinstance(arg, relax.Var) else arg
                if isinstance(src, ir.Call) and _is_call(src, "relax.dequantize"):
                    n += 1
    return n
