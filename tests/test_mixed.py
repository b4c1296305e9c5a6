"""The mixed scheme: a format per layer, searched under an accuracy budget
(pipeline.schemes.mixed, the quantize stage's ``mixed`` recipe) and built end to end."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from doit_runner import doit

from models import (
    MIXED_CNN_SPEC,
    MIXED_SPEC,
    make_project,
    two_sensitivities_cnn,
    two_sensitivities_mlp,
)
from pipeline.core.errors import ConfigError
from pipeline.core.spec import parse_spec, variant_validation
from pipeline.schemes import mixed
from pipeline.stages import quantize

BUDGET = 0.98
# formats whose grid is relative to each weight's magnitude: they keep the sensitive layer's
# small weights next to its 100x ones, which integer grids (w4*, w8g128) round away
FLOAT_LIKE = ("fp8_e4m3", "posit8", "bf16", "fp32")


def _feeds(n: int = 4) -> list[dict]:
    return [{"x": np.random.default_rng(i).standard_normal((1, 128)).astype(np.float32)}
            for i in range(n)]


def _config(**kw) -> quantize.QuantizeConfig:
    base = dict(method="minmax", samples=4, seed=0, data_dir="", activation_type="uint8",
                weight_type="int8", per_channel=True, inputs=(("x", (1, 128), "float32"),),
                recipe="mixed", symmetric=True, budget_min=BUDGET)
    base.update(kw)
    return quantize.QuantizeConfig(**base)


def _bytes(assignment: dict[str, str], model) -> int:
    return sum(layer.bytes(assignment[layer.node], True) for layer in mixed.layers_of(model))


def test_the_search_keeps_the_sensitive_layer_precise_and_packs_the_other():
    model = two_sensitivities_mlp()
    found = mixed.search(model, _feeds(), mixed.DEFAULT_FORMATS, BUDGET, True, log=lambda _: None)
    assert found.assignment["benign"].startswith("w4"), found.assignment
    assert found.assignment["sensitive"] in FLOAT_LIKE, found.assignment
    sensitivity = {layer.node: layer.sensitivity for layer in found.layers}
    assert sensitivity["sensitive"]["w4g32"] > 10 * sensitivity["benign"]["w4g32"]
    # the real quantized model (MatMulNBits + bfloat16 Casts) meets the budget, as estimated
    real = mixed.model_cosine(mixed.apply(model, found.assignment, True), model, _feeds())
    assert real >= BUDGET and real == pytest.approx(found.cosine_estimated, abs=1e-5)
    # no single format that is cheaper meets the budget, and the mix is cheaper than
    # every single format that does
    # (int8 is no candidate here: the search was given no calibrated int8 quantizer)
    for fmt in [f for f in mixed.DEFAULT_FORMATS
                if "MatMul" in mixed.FORMATS[f].ops and not mixed.FORMATS[f].int8]:
        uniform = {layer.node: fmt for layer in found.layers}
        meets = mixed.model_cosine(mixed.apply(model, uniform, True), model, _feeds()) >= BUDGET
        if meets:
            assert _bytes(found.assignment, model) < _bytes(uniform, model), fmt
        else:
            assert fmt in ("w4g32", "w4g128", "w8g128"), fmt


@pytest.mark.parametrize("fmt", ["w4g32", "w8g128", "fp8_e4m3", "posit8", "bf16"])
def test_decoded_weights_are_the_ones_the_quantized_model_computes_with(fmt):
    """The search's trial weights come from each format's own quantizer and decoder: running
    the fp32 graph with them gives what onnxruntime gives on the real quantized model
    (MatMulNBits, FP8 DequantizeLinear, the posit table, bf16 Casts)."""
    model = two_sensitivities_mlp()
    layers = mixed.layers_of(model)
    decoded = mixed.decoded_weights(model, layers, fmt, True)
    x = _feeds(1)[0]["x"]
    hidden = np.maximum(x @ decoded["benign"], 0)
    import onnxruntime as ort

    real = mixed.apply(model, {"benign": fmt, "sensitive": fmt}, True)
    session = ort.InferenceSession(real.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, hidden @ decoded["sensitive"], rtol=1e-4, atol=1e-4)


def test_the_recipe_writes_the_assignment_and_a_pinned_one_is_used(tmp_path: Path):
    source = tmp_path / "fp32.onnx"
    onnx.save(two_sensitivities_mlp(), str(source))
    (tmp_path / "searched").mkdir()
    report = quantize.run(source, _config(), tmp_path / "searched")
    written = json.loads((tmp_path / "searched" / "assignment.json").read_text())
    assert written["format"] == mixed.ASSIGNMENT_FORMAT and written["budget"]["min"] == BUDGET
    assert written["layers"]["sensitive"] in FLOAT_LIKE
    assert report["meets_budget"] and report["cosine_vs_fp32"] >= BUDGET
    assert [row["node"] for row in report["layers"]] == ["benign", "sensitive"]
    assert report["weight_bytes"]["chosen"] < report["weight_bytes"]["fp32"]
    # a reviewed copy, edited to put everything in 8 bits, is taken as it is
    pinned = tmp_path / "reviewed.json"
    pinned.write_text(json.dumps({**written, "layers": {"benign": "w8g128",
                                                        "sensitive": "w8g128"}}))
    (tmp_path / "pinned").mkdir()
    report = quantize.run(source, _config(assignment=str(pinned)), tmp_path / "pinned")
    assert report["formats"] == {"w8g128": 2} and report["assignment"].startswith("pinned")
    assert not report["meets_budget"]  # said, not hidden: validate's gate will fail it
    nbits = [n for n in onnx.load(str(tmp_path / "pinned" / "model.onnx")).graph.node
             if n.op_type == "MatMulNBits"]
    assert [a.i for n in nbits for a in n.attribute if a.name == "bits"] == [8, 8]


@pytest.mark.parametrize("layers, message", [
    ({"benign": "w4g32"}, "sensitive: missing"),
    ({"benign": "w4g32", "sensitive": "int3"}, "unknown format 'int3'"),
    ({"benign": "w4g32", "sensitive": "fp32", "other": "fp32"}, "other: no such MatMul"),
])
def test_a_pinned_assignment_that_does_not_fit_the_model_is_refused(tmp_path, layers, message):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"format": mixed.ASSIGNMENT_FORMAT, "layers": layers}))
    with pytest.raises(ConfigError) as e:
        mixed.read_assignment(path, two_sensitivities_mlp())
    assert message in str(e.value)


def test_spec_checks_the_budget_and_formats_and_the_budget_is_the_quality_gate():
    import tomllib

    data = tomllib.loads(MIXED_SPEC)
    spec = parse_spec(data, "tiny.toml")
    gates = variant_validation(spec, spec.variants["mixed"])
    assert gates.quality_cosine_min == BUDGET
    bad = json.loads(json.dumps(data))
    bad["variants"]["mixed"]["budget"] = {"metric": "top1", "min": 2}
    bad["variants"]["mixed"]["formats"] = ["w4g32", "int3"]
    with pytest.raises(ConfigError) as e:
        parse_spec(bad, "tiny.toml")
    assert "budget" in str(e.value) and "unknown format 'int3'" in str(e.value)
    del bad["variants"]["mixed"]["budget"]
    bad["variants"]["mixed"]["formats"] = ["w4g32"]
    with pytest.raises(ConfigError, match="accuracy budget"):
        parse_spec(bad, "tiny.toml")


@pytest.mark.slow
def test_mixed_builds_validates_and_benches_end_to_end(tmp_path: Path):
    """Searched, built (MatMulNBits and bf16 layers in one model, each in its own kernel),
    validated against onnxruntime on the same model and against fp32 with the budget as the
    gate, run by the C++ app; a rebuild reuses the search."""
    project = make_project(tmp_path / "p", two_sensitivities_mlp(), MIXED_SPEC)
    run = doit(project, "build:tiny_mixed", "validate:tiny_mixed@cpu", "bench:tiny_mixed@cpu",
               "tune=off", "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output
    art = project / "artifacts" / "tiny_mixed"
    report = json.loads((art / "cpu" / "validate" / "validation.json").read_text())
    assert report["status"] == "pass", report
    quality = next(r for r in report["records"] if r["comparison"] == "tvm_vs_ort_fp32_quality")
    assert quality["metrics"]["cosine"] >= BUDGET
    imported = json.loads((art / "import" / "import_report.json").read_text())
    assignment = json.loads((art / "quantize" / "assignment.json").read_text())["layers"]
    assert assignment["sensitive"] in FLOAT_LIKE
    packed = [4] + ([8] if mixed.FORMATS[assignment["sensitive"]].code8 else [])
    assert sorted(x["bits"] for x in imported["blockwise_layers"]) == packed
    assert len(imported["bf16_weights"]["rewritten"]) == int(assignment["sensitive"] == "bf16")
    again = doit(project, "build:tiny_mixed", "tune=off")
    assert again.returncode == 0 and "mixed search" not in again.output, again.output


def test_layer_times_come_from_the_tuning_logs_else_from_bytes():
    """The committed CPU logs hold records of mlp4k's 4096x4096 kernels in every format: a
    4096x4096 layer is timed by them; a shape no record has is estimated from its bytes at
    the format's measured seconds per byte."""
    logs_dir = Path(__file__).resolve().parent.parent / "models" / "tuning_logs" / \
        "cpu-x86_64-avx512-vnni"
    big = mixed.Layer("big", "w", "MatMul", (4096, 4096), 4096, 4096)
    odd = mixed.Layer("odd", "v", "MatMul", (4096, 2048), 4096, 2048)
    times = mixed.layer_seconds([big, odd], mixed.DEFAULT_FORMATS, logs_dir, True)
    matmul_formats = [f for f in mixed.DEFAULT_FORMATS if "MatMul" in mixed.FORMATS[f].ops]
    # no 4096x4096 records of the 8-bit codes or of int8 yet
    recorded = [f for f in matmul_formats if not mixed.FORMATS[f].code8 and f != "int8"]
    decoded = [f for f in recorded if f in mixed.KERNEL_FAMILIES]  # block-wise: recorded
    for fmt in matmul_formats:
        expected = ("tuning record" if fmt in recorded else
                    "record of a sibling format" if fmt in mixed.KERNEL_FAMILIES else
                    "estimated from bytes")
        assert times[("big", fmt)][1] == expected, fmt
        assert times[("odd", fmt)][1] == "estimated from bytes", fmt
    # the 8-bit code kernels compute like the block-wise ones: timed by their best record
    assert times[("big", "fp8_e4m3")][0] == min(times[("big", f)][0] for f in decoded)
    for fmt in recorded:
        # the estimate uses the format's own rate: half the bytes, half the time
        assert times[("odd", fmt)][0] == pytest.approx(
            times[("big", fmt)][0] * odd.bytes(fmt, True) / big.bytes(fmt, True), rel=1e-6)
    assert times[("big", "w4g32")][0] < times[("big", "fp32")][0]
    # no logs at all: every time is a bytes estimate, and the formats keep the bytes order
    blind = mixed.layer_seconds([big], mixed.DEFAULT_FORMATS, None, True)
    assert ("big", "int8") in blind  # int8 takes MatMuls too (packed for VNNI)
    order = sorted(matmul_formats, key=lambda f: blind[("big", f)][0])
    assert order == sorted(matmul_formats, key=lambda f: big.bytes(f, True))


def test_int8_matmuls_are_timed_by_their_packed_kernels_records():
    """An int8 MatMul's kernel holds its weight packed in vpdpbusd blocks: the committed logs'
    records of the BERT encoder's (minilm) int8 layers time a layer of that shape."""
    logs_dir = Path(__file__).resolve().parent.parent / "models" / "tuning_logs" / \
        "cpu-x86_64-avx512-vnni"
    ffn = mixed.Layer("ffn_in", "w", "MatMul", (384, 1536), 384, 1536)
    odd = mixed.Layer("odd", "v", "MatMul", (384, 1000), 384, 1000)  # N not a multiple of 16
    times = mixed.layer_seconds([ffn, odd], ["int8", "fp32"], logs_dir, True)
    assert times[("ffn_in", "int8")][1] == "tuning record"
    assert times[("ffn_in", "int8")][0] < times[("ffn_in", "fp32")][0]
    assert times[("odd", "int8")][1] == "estimated from bytes"
    # at 128 rows w4g128 (no record at this shape) is timed by w4g32's record, not by its
    # bytes (one-row records would make it look 8x faster than fp32)
    both = mixed.layer_seconds([ffn], ["w4g32", "w4g128"], logs_dir, True)
    assert both[("ffn_in", "w4g128")] == (both[("ffn_in", "w4g32")][0],
                                          "record of a sibling format")


def test_int8_convs_are_searched_with_their_activations(tmp_path: Path):
    """int8 is a format of convs (activations quantized too, onnxruntime's QDQ calibrated
    once): the conv whose weights int8 cannot hold stays fp32, the other goes int8."""
    model = two_sensitivities_cnn()
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 8, 8)).astype(np.float32)}
             for i in range(4)]
    int8 = mixed.Int8Static(feeds, tmp_path)
    found = mixed.search(model, feeds, mixed.DEFAULT_FORMATS, 0.999, True, None, int8,
                         log=lambda _: None)
    assert found.assignment == {"benign": "int8", "sensitive": "fp32"}
    layers = {layer.node: layer for layer in found.layers}
    assert set(layers["benign"].sensitivity) == {"int8", "fp32"}  # what a conv can take
    assert layers["sensitive"].sensitivity["int8"] > 0.1 > 1e-3 > layers["benign"].sensitivity[
        "int8"]
    assert layers["benign"].positions == 64  # 8x8 output pixels reuse each weight
    both = mixed.apply(model, {"benign": "int8", "sensitive": "int8"}, True, int8)
    assert mixed.model_cosine(both, model, feeds) < 0.999
    chosen = mixed.apply(model, found.assignment, True, int8)
    assert mixed.model_cosine(chosen, model, feeds) >= 0.999
    dequantized = {o for n in chosen.graph.node if n.op_type == "DequantizeLinear"
                   for o in n.output}
    int8_weights = {n.name for n in chosen.graph.node
                    if n.op_type == "Conv" and n.input[1] in dequantized}
    assert int8_weights == {"benign"}


@pytest.mark.slow
def test_mixed_int8_and_fp32_convs_build_and_validate(tmp_path: Path):
    """A CNN's int8 conv computes in integers and its fp32 conv in float32 in one artifact,
    validated against onnxruntime on the same QDQ model and against fp32 with the budget."""
    project = make_project(tmp_path / "p", two_sensitivities_cnn(), MIXED_CNN_SPEC)
    run = doit(project, "build:tiny_mixed", "validate:tiny_mixed@cpu", "tune=off")
    assert run.returncode == 0, run.output
    art = project / "artifacts" / "tiny_mixed"
    assignment = json.loads((art / "quantize" / "assignment.json").read_text())["layers"]
    assert assignment == {"benign": "int8", "sensitive": "fp32"}
    imported = json.loads((art / "import" / "import_report.json").read_text())
    assert imported["integer_pass"], imported
    report = json.loads((art / "cpu" / "validate" / "validation.json").read_text())
    assert report["status"] == "pass", report
