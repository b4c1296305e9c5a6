"""Stage validate, float formats: which gates the fp16 and bf16 comparisons apply, and that
they fail where they should (the end-to-end run is in test_e2e_float_formats.py)."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.spec import parse_spec, variant_validation
from pipeline.runtime.artifact import ArtifactUnderTest
from pipeline.schemes import SCHEMES
from pipeline.stages import validate


def _art(tmp: Path, variant: str) -> ArtifactUnderTest:
    return ArtifactUnderTest(name=f"t_{variant}", model="t", variant=variant, target="cpu",
                             is_gpu=False, fp32_onnx=tmp, qdq_onnx=tmp, package_dir=tmp,
                             io_json=tmp, inputs=(("x", (1, 10), "float32"),),
                             scheme=variant, computes=SCHEMES[variant].summary)


def _judge(tmp, variant, comparison, shift, gates=None):
    ref = np.linspace(-2, 3, 10, dtype=np.float32).reshape(1, 10)
    actual = ref + np.float32(shift) * np.eye(1, 10, 9, dtype=np.float32)  # top-1 kept
    g = validate.resolve_gates({**SCHEMES[variant].default_gates, **(gates or {})})
    return validate._record(_art(tmp, variant), comparison, [[actual]], [[ref]], g)


@pytest.mark.parametrize("shift,passed", [(0.02, True), (0.04, False)])
def test_fp16_same_model_gate_is_about_ten_float16_ulps(tmp_path, shift, passed):
    # max |ref| = 3: the gate is 1e-2 * 3 = 0.03
    rec = _judge(tmp_path, "fp16", validate.FP16, shift)
    assert rec["pass"] is passed, rec["gates"]
    assert [g["metric"] for g in rec["gates"]] == ["max_abs_err"]


def test_bf16_same_model_gate_is_the_fp32_one(tmp_path):
    assert _judge(tmp_path, "bf16", validate.BF16, 1e-4)["pass"] is True
    rec = _judge(tmp_path, "bf16", validate.BF16, 1e-3)  # fine for fp16, not for bf16
    assert rec["pass"] is False
    assert [g["metric"] for g in rec["gates"]] == ["max_abs_err", "top1_agreement"]


@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_quality_against_fp32_is_gated_by_the_scheme_cosine(tmp_path, variant):
    comparison = f"tvm_{variant}_vs_ort_fp32"
    assert _judge(tmp_path, variant, comparison, 0.1)["pass"] is True
    rec = _judge(tmp_path, variant, comparison, 5.0)  # cosine ~0.87
    assert rec["pass"] is False and rec["gates"][0]["metric"] == "cosine"
    assert rec["gates"][0]["threshold"] == 0.99
    loose = _judge(tmp_path, variant, comparison, 5.0, {f"{variant}_fp32_cosine_min": 0.8})
    assert loose["pass"] is True
    # onnxruntime's own converted model is reported, never gated
    assert _judge(tmp_path, variant, f"ort_{variant}_vs_ort_fp32", 5.0)["pass"] is None


def test_variant_gates_for_the_float_formats():
    spec = parse_spec({"name": "m", "source": {"path": "a"},
                       "inputs": [{"name": "x", "shape": [1]}],
                       "variants": {"h": {"scheme": "fp16",
                                          "validation": {"fp16_rel_tol": 0.05}},
                                    "b": {"scheme": "bf16"}}})
    assert variant_validation(spec, spec.variants["h"]).fp16_rel_tol == 0.05
    assert variant_validation(spec, spec.variants["b"]).bf16_fp32_cosine_min == 0.99
    with pytest.raises(ConfigError, match="weight_type: does not apply to scheme 'bf16'"):
        parse_spec({"name": "m", "source": {"path": "a"}, "inputs": [{"name": "x",
                                                                       "shape": [1]}],
                    "variants": {"b": {"scheme": "bf16", "weight_type": "int8"}}})
