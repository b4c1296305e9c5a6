"""Source normalisation: weight inputs, IR/opset, folding, names, determinism, the light zoo."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import tiny_convnet
from pipeline.frontend import onnx_normalize

REPO = Path(__file__).resolve().parent.parent
X = "input.1"  # a dotted name, as PyTorch exports it: it must survive unchanged
Y = "out/prob"
X_SHAPE = (1, 3, 8, 8)
LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


def ir3_export(seed: int = 0) -> onnx.ModelProto:
    """A model-zoo-style IR 3 / opset 9 export: every weight is also a graph input.

    Conv bias, Gemm bias and a channel scale and shift are made by ``ConstantOfShape`` from
    ``__SHAPE`` initializers (two of them equal, which is what trips onnxruntime's quantizer),
    the flatten shape by ``Shape -> Gather -> Unsqueeze -> Concat``, there is a Dropout and,
    as in zfnet512, an unused weight listed as an input.
    """
    rng = np.random.default_rng(seed)

    def w(name, a):
        return numpy_helper.from_array(np.asarray(a), name)

    inits = [
        w("conv_w", (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)),
        w("conv_b__SHAPE", np.array([4], np.int64)),
        w("scale__SHAPE", np.array([1, 4, 1, 1], np.int64)),
        w("shift__SHAPE", np.array([1, 4, 1, 1], np.int64)),
        w("fc_w", (rng.standard_normal((5, 4 * 8 * 8)) * 0.1).astype(np.float32)),
        w("fc_b__SHAPE", np.array([5], np.int64)),
        w("zero", np.array(0, np.int64)),
        w("minus_one", np.array([-1], np.int64)),
        w("unused_blob", np.zeros((1, 1), np.float32)),
    ]

    def const_of_shape(shape_in, out, value):
        return helper.make_node("ConstantOfShape", [shape_in], [out],
                                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))

    nodes = [
        const_of_shape("conv_b__SHAPE", "conv_b", 0.05),
        const_of_shape("fc_b__SHAPE", "fc_b", -0.02),
        const_of_shape("scale__SHAPE", "scale", 1.1),
        const_of_shape("shift__SHAPE", "shift", 0.1),
        helper.make_node("Conv", [X, "conv_w", "conv_b"], ["conv"], pads=[1] * 4),
        helper.make_node("Mul", ["conv", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "shift"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["relu"]),
        helper.make_node("Dropout", ["relu"], ["drop"], ratio=0.5),
        helper.make_node("Shape", ["drop"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["drop", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], [Y], axis=1),
    ]
    inputs = [helper.make_tensor_value_info(X, TensorProto.FLOAT, list(X_SHAPE))]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "ir3", inputs,
                              [helper.make_tensor_value_info(Y, TensorProto.FLOAT, [1, 5])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)],
                              producer_name="caffe2-style")
    model.ir_version = 3
    return model


def dynamic_export() -> onnx.ModelProto:
    """A PyTorch-style opset 17 graph with a symbolic batch dim and a shape subgraph.

    ``ConstantOfShape(Shape(x))`` makes a mask-like tensor (what TVM's importer fails on in
    the BERT export); there are also a Conv+BatchNormalization, a MatMul+Add, an erf-GELU and
    a LayerNorm pattern: onnxruntime's basic level would fuse those, normalisation must not.
    """
    rng = np.random.default_rng(1)

    def w(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    def c(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        w("conv.w", (4, 3, 3, 3)), w("bn.s", (4,)), w("bn.b", (4,)), w("bn.m", (4,)),
        c("bn.v", (1 + rng.random(4)).astype(np.float32)),
        w("mm.w", (8, 8)), w("mm.b", (8,)),
        c("sqrt2", np.float32(np.sqrt(2))), c("one", np.float32(1)), c("half", np.float32(0.5)),
        c("two", np.float32(2)), c("eps", np.float32(1e-5)),
        c("ln.g", (1 + rng.random(8)).astype(np.float32)), w("ln.b", (8,)),
    ]
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["x_shape"], name="/shape"),
        n("ConstantOfShape", ["x_shape"], ["ones"], name="/ConstantOfShape",
          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])),
        n("Mul", ["x", "ones"], ["scaled"], name="/mask_mul"),
        n("Conv", ["scaled", "conv.w"], ["conv"], pads=[1] * 4, name="/conv"),
        n("BatchNormalization", ["conv", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"], name="/bn"),
        n("MatMul", ["bn", "mm.w"], ["mm"], name="/matmul"),
        n("Add", ["mm", "mm.b"], ["mm_b"], name="/matmul_add"),
        # erf-GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
        n("Div", ["mm_b", "sqrt2"], ["g_div"], name="/gelu/div"),
        n("Erf", ["g_div"], ["g_erf"], name="/gelu/erf"),
        n("Add", ["g_erf", "one"], ["g_add"], name="/gelu/add"),
        n("Mul", ["mm_b", "g_add"], ["g_mul"], name="/gelu/mul"),
        n("Mul", ["g_mul", "half"], ["gelu"], name="/gelu/mul_half"),
        # LayerNorm over the last axis
        n("ReduceMean", ["gelu"], ["ln_mean"], axes=[-1], name="/ln/mean"),
        n("Sub", ["gelu", "ln_mean"], ["ln_sub"], name="/ln/sub"),
        n("Pow", ["ln_sub", "two"], ["ln_pow"], name="/ln/pow"),
        n("ReduceMean", ["ln_pow"], ["ln_var"], axes=[-1], name="/ln/var"),
        n("Add", ["ln_var", "eps"], ["ln_vareps"], name="/ln/add_eps"),
        n("Sqrt", ["ln_vareps"], ["ln_std"], name="/ln/sqrt"),
        n("Div", ["ln_sub", "ln_std"], ["ln_norm"], name="/ln/div"),
        n("Mul", ["ln_norm", "ln.g"], ["ln_scaled"], name="/ln/mul"),
        n("Add", ["ln_scaled", "ln.b"], ["y"], name="/ln/add"),
    ]
    graph = helper.make_graph(
        nodes, "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def normalise(model, inputs, tmp_path, **kw):
    model = onnx.ModelProto.FromString(model.SerializeToString())  # leave the caller's alone
    dropped = onnx_normalize.drop_weight_inputs(model, {n for n, _, _ in inputs})
    model, info = onnx_normalize.normalize(model, inputs, 13, tmp_path, **kw)
    return model, {**dropped, **info}


def ort_run(model, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return session, session.run(None, feeds)


def x_feed(shape=X_SHAPE, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


IR3_INPUTS = ((X, X_SHAPE, "float32"),)


def test_ir3_export_runs_with_only_the_declared_input(tmp_path):
    original = ir3_export()
    model, info = normalise(original, IR3_INPUTS, tmp_path)
    assert info["initializer_inputs_dropped"] == 9
    assert info["ir_version"] == [3, 7] and info["opset"] == [9, 13]
    assert [i.name for i in model.graph.input] == [X]
    assert [o.name for o in model.graph.output] == [Y]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"ConstantOfShape", "Shape", "Gather", "Unsqueeze", "Concat", "Dropout"}
    assert "unused_blob" not in {t.name for t in model.graph.initializer}
    assert [o.domain for o in model.opset_import] == [""]
    onnx.checker.check_model(model, full_check=True)
    session, (got,) = ort_run(model, {X: x_feed()})
    assert [i.name for i in session.get_inputs()] == [X]
    _, (want,) = ort_run(original, {X: x_feed()})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert "dropped 9 initializer inputs" in onnx_normalize.summary(info)
    assert "ConstantOfShape" in onnx_normalize.summary(info)


def test_normalised_bytes_are_deterministic(tmp_path):
    a, _ = normalise(ir3_export(), IR3_INPUTS, tmp_path)
    b, _ = normalise(ir3_export(), IR3_INPUTS, tmp_path)
    assert a.SerializeToString() == b.SerializeToString()
    assert list(tmp_path.iterdir()) == []  # onnxruntime's scratch copy is gone
    # and in a fresh process (onnxruntime's own hashing and threads start over)
    onnx.save(ir3_export(), str(tmp_path / "in.onnx"))
    code = ("import onnx, sys; from pathlib import Path; "
            "from pipeline.frontend import onnx_normalize as n;"
            "m = onnx.load(sys.argv[1]); n.drop_weight_inputs(m, {'input.1'});"
            "m, _ = n.normalize(m, (('input.1', (1, 3, 8, 8), 'float32'),), 13, Path(sys.argv[2]));"
            "sys.stdout.buffer.write(m.SerializeToString())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.onnx"), str(tmp_path)],
                         cwd=REPO, capture_output=True, check=True).stdout
    assert out == a.SerializeToString()


def test_symbolic_dims_are_fixed_and_shape_subgraphs_folded(tmp_path):
    original = dynamic_export()
    inputs = (("x", (2, 3, 8, 8), "float32"),)
    model, info = normalise(original, inputs, tmp_path)
    assert info["fixed_dims"] == {"x": [["batch", 3, 8, 8], [2, 3, 8, 8]]}
    assert info["removed_ops"] == {"ConstantOfShape": 1, "Shape": 1}
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]
    _, (got,) = ort_run(model, {"x": x_feed((2, 3, 8, 8))})
    _, (want,) = ort_run(original, {"x": x_feed((2, 3, 8, 8))})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fusions_stay_off_and_ops_stay_standard(tmp_path):
    """Basic level would fuse Conv+BN, MatMul+Add, GELU and LayerNorm: the network must stay."""
    original = dynamic_export()
    model, _ = normalise(original, (("x", (1, 3, 8, 8), "float32"),), tmp_path)
    folded = {"/shape", "/ConstantOfShape"}
    assert [n.name for n in model.graph.node] == [n.name for n in original.graph.node
                                                  if n.name not in folded]
    assert {n.domain for n in model.graph.node} == {""}
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_a_clean_model_passes_through_unchanged(tmp_path):
    model = tiny_convnet()
    out, info = normalise(model, (("x", (1, 3, 8, 8), "float32"),), tmp_path)
    assert out.SerializeToString() == model.SerializeToString()
    assert onnx_normalize.summary(info) == "nothing to normalise"


def test_a_declared_initializer_input_becomes_a_plain_input(tmp_path):
    inputs = IR3_INPUTS + (("conv_w", (4, 3, 3, 3), "float32"),)
    model, info = normalise(ir3_export(), inputs, tmp_path)
    assert info["initializer_inputs_kept"] == ["conv_w"]
    assert [i.name for i in model.graph.input] == [X, "conv_w"]
    assert "conv_w" not in {t.name for t in model.graph.initializer}
    w = np.ones((4, 3, 3, 3), np.float32)
    ort_run(model, {X: x_feed(), "conv_w": w})  # it is fed now


def test_a_model_past_the_limit_folds_through_files_to_the_same_result(tmp_path):
    """Past ``max_bytes`` (protobuf's 2 GiB by default) onnxruntime gets the model as a file
    with external data; the result is the one the in-memory path gives."""
    want, want_info = normalise(ir3_export(), IR3_INPUTS, tmp_path)
    got, got_info = normalise(ir3_export(), IR3_INPUTS, tmp_path, max_bytes=100)
    assert got.SerializeToString() == want.SerializeToString() and got_info == want_info
    # nothing to fold: the model as given, its tensors read back from the scratch file
    plain = tiny_convnet(with_bn=False)
    model, _ = normalise(plain, (("x", (1, 3, 8, 8), "float32"),), tmp_path)
    again, _ = normalise(tiny_convnet(with_bn=False), (("x", (1, 3, 8, 8), "float32"),),
                         tmp_path, max_bytes=100)
    assert again.SerializeToString() == model.SerializeToString()


def _light_models():
    return sorted(LIGHT.glob("light_*.onnx")) if LIGHT.is_dir() else []


def _with_outputs(model, names):
    """A copy of ``model`` that also returns the tensors ``names``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names)
    return model


@pytest.mark.slow
@pytest.mark.skipif(not _light_models(), reason=f"onnx's light model zoo not found at {LIGHT}")
@pytest.mark.parametrize("path", _light_models(), ids=lambda p: p.stem)
def test_light_zoo_exports_normalise_and_match(path, tmp_path):
    """Each light export normalises, runs with only its data input and computes the same.

    Their weights are ConstantOfShape fills (one value per tensor), so the final softmax is
    the same uniform vector for any input: the comparison also covers every Conv output,
    which does depend on the input.
    """
    original = onnx.load(str(path))
    weights = {t.name for t in original.graph.initializer}
    (gi,) = [i for i in original.graph.input if i.name not in weights]
    shape = tuple(d.dim_value for d in gi.type.tensor_type.shape.dim)
    model, info = normalise(original, ((gi.name, shape, "float32"),), tmp_path)
    assert info["initializer_inputs_dropped"] == len(original.graph.input) - 1
    assert [i.name for i in model.graph.input] == [gi.name]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert "ConstantOfShape" not in {n.op_type for n in model.graph.node}
    assert {n.domain for n in model.graph.node} == {""}
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    feed = {gi.name: x_feed(shape)}
    _, got = ort_run(_with_outputs(model, convs), feed)
    _, want = ort_run(_with_outputs(original, convs), feed)
    assert len(got) == len(want) == 1 + len(convs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert np.ptp(got[1]) > 0  # the first Conv output varies: the comparison is not vacuous


def test_stored_size_counts_external_data(tmp_path):
    model = tiny_convnet()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.data", size_threshold=0)
    stored = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert onnx_normalize.has_external_data(stored)
    model = tiny_convnet()  # (onnx.save moved the first one's tensors out)
    assert not onnx_normalize.has_external_data(model)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    assert weights <= onnx_normalize.stored_size(stored, tmp_path) <= weights + 10_000
    assert onnx_normalize.tensor_bytes(model) >= weights


def test_an_ir_version_newer_than_onnxruntime_reads_is_lowered(tmp_path):
    """onnx 1.23's make_model writes IR 14; onnxruntime 1.31 reads up to 13."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 14
    model, info = onnx_normalize.upgrade(model, 13)
    assert info["ir_version"] == [14, onnx_normalize.ORT_MAX_IR_VERSION]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-1, 2, -3, 4]], np.float32)
    assert session.run(None, {"x": x})[0].tolist() == [[0, 2, 0, 4]]
