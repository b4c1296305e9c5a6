"""The block-wise weight-only schemes (w4g32, w4g128, w8g128) through the stages."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from doit_runner import doit
from onnx import numpy_helper

from models import MLP_SPEC, make_project, tiny_mlp_rows
from pipeline.core.errors import ConfigError
from pipeline.schemes import SCHEMES, get_scheme
from pipeline.stages import quantize


def _config(**kw) -> quantize.QuantizeConfig:
    base = dict(method="minmax", samples=2, seed=0, data_dir="", activation_type="uint8",
                weight_type="int8", per_channel=True, inputs=(("x", (1, 3, 96), "float32"),),
                recipe="matmul_nbits", bits=4, block_size=32, symmetric=True)
    base.update(kw)
    return quantize.QuantizeConfig(**base)


def test_weight_only_schemes_are_registered_with_their_parameters():
    for name, bits, block in (("w4g32", 4, 32), ("w4g128", 4, 128), ("w8g128", 8, 128)):
        scheme = get_scheme(name)
        assert scheme.quantize == "matmul_nbits" and scheme.quantize in quantize.RECIPES
        assert dict(scheme.quantize_params) == {"bits": bits, "block_size": block}
        assert "tvm_vs_ort_quantized" in scheme.comparisons
        assert "tvm_vs_ort_fp32_quality" in scheme.comparisons
    assert {"w4g32", "w4g128", "w8g128"} <= set(SCHEMES)


def test_quantize_writes_matmul_nbits_with_float16_valued_scales(tmp_path: Path):
    onnx.save(tiny_mlp_rows(), str(tmp_path / "m.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    info = quantize.run(tmp_path / "m.onnx", _config(), out)
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and info["quantized_matmuls"] == 2
    assert info["float_matmuls_left"] == []
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in nodes:
        scales = inits[node.input[2]]
        assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
        assert len(node.input) == 3  # symmetric: no zero points


def test_quantize_keeps_excluded_matmuls_in_float(tmp_path: Path):
    onnx.save(tiny_mlp_rows(), str(tmp_path / "m.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    info = quantize.run(tmp_path / "m.onnx", _config(exclude_nodes=("fc2/MatMul",)), out)
    assert info["quantized_matmuls"] == 1 and info["float_matmuls_left"] == ["fc2/MatMul"]


def test_quantize_refuses_a_model_without_matmul_weights(tmp_path: Path):
    from models import tiny_convnet

    onnx.save(tiny_convnet(), str(tmp_path / "m.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match="no MatMul with a constant weight"):
        quantize.run(tmp_path / "m.onnx", _config(), out)


def test_spec_options_of_weight_only_variants_are_checked(tmp_path: Path):
    from pipeline.core.spec import parse_spec

    base = {"name": "m", "source": {"path": "m.onnx"},
            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}]}
    spec = parse_spec({**base, "variants": {"w4": {"scheme": "w4g32", "symmetric": True,
                                                  "accuracy_level": 4}}}, "m.toml")
    assert spec.variants["w4"].symmetric and spec.variants["w4"].accuracy_level == 4
    with pytest.raises(ConfigError, match="accuracy_level"):
        parse_spec({**base, "variants": {"w4": {"scheme": "w4g32", "accuracy_level": 7}}},
                   "m.toml")
    with pytest.raises(ConfigError, match="per_channel: does not apply to scheme 'w4g32'"):
        parse_spec({**base, "variants": {"w4": {"scheme": "w4g32", "per_channel": True}}},
                   "m.toml")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc is needed to cross-compile CUDA")
def test_w4g32_cross_compiles_for_rtx4090(tmp_path: Path):
    """The fused dequantize-matmul builds for the RTX 4090 (sm_89) here, with no GPU: DLight
    schedules it and nvcc compiles it; the kernel unpacks nibbles from the uint8 codes."""
    from float_models import build_in_process, tiny_mlp

    from pipeline.stages import package

    built = build_in_process(tiny_mlp(), "w4g32", (1, 128), tmp_path, target="rtx4090")
    assert len(built["import"]["blockwise_layers"]) == 3  # the Gemm stays float32
    sources = package.cuda_kernel_sources(built["so"])
    assert any("dequant_matmul" in s and ">> " in s for s in sources), sources[:1]


@pytest.mark.slow
def test_weight_only_variants_build_validate_and_bench_end_to_end(tmp_path: Path):
    """fp32, w4g32 (symmetric) and w8g128 of a tiny MLP through every stage, the C++ app
    included: onnxruntime runs the same MatMulNBits model; the artifact stores packed codes."""
    project = make_project(tmp_path / "p", tiny_mlp_rows(), MLP_SPEC)
    run = doit(project, "build:tiny_fp32", "build:tiny_w4g32", "build:tiny_w8g128",
               "validate", "bench", "tune=off", "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output
    arts = project / "artifacts"
    for variant, bits in (("w4g32", 4), ("w8g128", 8)):
        art = arts / f"tiny_{variant}" / "cpu"
        report = json.loads((art / "validate" / "validation.json").read_text())
        assert report["status"] == "pass", report
        same = next(r for r in report["records"] if r["comparison"] == "tvm_vs_ort_quantized")
        assert same["metrics"]["max_rel_err"] <= 1e-4
        imported = json.loads((arts / f"tiny_{variant}" / "import" /
                               "import_report.json").read_text())
        assert [x["bits"] for x in imported["blockwise_layers"]] == [bits, bits]
        assert bits < imported["blockwise_bits_per_weight"] < bits + 1.5
        compiled = json.loads((art / "compile" / "compile_report.json").read_text())
        assert compiled["rule_scheduled"], compiled
        assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"
    w4 = json.loads((arts / "tiny_w4g32" / "import" / "import_report.json").read_text())
    assert w4["blockwise_bits_per_weight"] == pytest.approx(4.5)
