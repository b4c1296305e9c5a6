"""Tiny models for the float formats (fp16, bf16): a weight-dominated MatMul stack, and a way
to run the quantize -> import -> compile chain in-process on one of them."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.schemes import get_scheme

MLP_HIDDEN = 128


def tiny_mlp(seed: int = 0, hidden: int = MLP_HIDDEN, layers: int = 3,
             gemm_last: bool = True) -> onnx.ModelProto:
    """``x`` [1, hidden] -> (MatMul + bias + Relu) x layers -> Gemm(transB) -> ``y`` [1, 10].

    Weights are nearly all of the bytes: what a weight format halves."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(hidden))
                                          .astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    if gemm_last:
        inits += [numpy_helper.from_array((rng.standard_normal((10, hidden)) * 0.2)
                                          .astype(np.float32), "fc.w"),
                  numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc.b")]
        nodes.append(helper.make_node("Gemm", [x, "fc.w", "fc.b"], ["y"], transB=1, name="fc"))
    else:
        nodes.append(helper.make_node("Identity", [x], ["y"]))
    out_dim = 10 if gemm_last else hidden
    graph = helper.make_graph(
        nodes, "tiny_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def spec_text(shape=(1, 3, 8, 8)) -> str:
    """A tiny model spec with fp32, fp16 and bf16 variants (input ``x`` of ``shape``)."""
    return textwrap.dedent(f"""\
        name = "tiny"
        description = "tiny model for the float formats"

        [source]
        path = "models/tiny.onnx"

        [[inputs]]
        name = "x"
        shape = {list(shape)}
        dtype = "float32"

        [[outputs]]
        name = "y"
        class_scores = true

        [variants.fp32]
        scheme = "fp32"

        [variants.fp16]
        scheme = "fp16"

        [variants.bf16]
        scheme = "bf16"

        [tuning]
        trials_per_task = 4
        wall_seconds = 60
        """)


def build_in_process(model: onnx.ModelProto, scheme_name: str, shape: tuple[int, ...],
                     work: Path, target: str = "cpu") -> dict:
    """quantize (the scheme's recipe) -> import (its passes) -> compile, untuned, in this
    process. Returns the paths (``onnx``: what onnxruntime runs, ``so``) and the reports."""
    from pipeline.stages import compile_model, import_model, quantize

    scheme = get_scheme(scheme_name)
    inputs = (("x", tuple(shape), "float32"),)
    fp32 = work / "fp32.onnx"
    work.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(fp32))
    result: dict = {"fp32": fp32, "onnx": fp32}
    if scheme.quantize:
        qdir = work / "quantize"
        qdir.mkdir(exist_ok=True)
        config = quantize.QuantizeConfig(method="minmax", samples=1, seed=0, data_dir="",
                                         activation_type="uint8", weight_type="int8",
                                         per_channel=True, inputs=inputs)
        result["quantize"] = quantize.run(
            fp32, replace(config, recipe=scheme.quantize, **scheme.quantize_params), qdir)
        result["onnx"] = qdir / "model.onnx"
    idir, cdir = work / "import", work / "compile"
    idir.mkdir(exist_ok=True)
    cdir.mkdir(exist_ok=True)
    result["import"] = import_model.run(
        result["onnx"], import_model.ImportConfig(inputs=inputs, passes=scheme.import_passes),
        idir)
    compile_model.run(idir / "module.json", None,
                      compile_model.CompileConfig(target={"name": target},
                                                  compute_dtype=scheme.compute_dtype), cdir)
    result["so"] = cdir / "model.so"
    return result
