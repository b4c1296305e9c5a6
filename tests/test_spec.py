"""Model specs: the committed ones load; every kind of mistake is reported at once."""

from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.spec import find_artifact, load_specs, parse_spec

REPO = Path(__file__).resolve().parent.parent


def test_committed_specs_load():
    specs = load_specs(REPO / "models")
    spec, variant = find_artifact(specs, "resnet50_int8")
    assert spec.inputs[0].shape == (1, 3, 224, 224)
    assert variant.quantize and variant.activation_type == "uint8"
    assert not find_artifact(specs, "resnet50_fp32")[1].quantize


def test_all_problems_reported_together():
    bad = {"name": "m", "bogus": 1, "source": {"path": "a.onnx", "generator": "g"},
           "inputs": [{"name": "x", "shape": [1, -3], "dtype": "float64"}],
           "calibration": {"method": "magic", "samples": 0},
           "variants": {"int8": {"activation_type": "int4", "colour": "red"},
                        "fp32": {"layout": "NC4HW"}}}
    with pytest.raises(ConfigError) as e:
        parse_spec(bad, "m.toml")
    msg = str(e.value)
    for needle in ("unknown key 'bogus'", "exactly one of 'generator'", "positive ints",
                   "'float64' not one of", "'magic' not one of", "samples: must be >= 1",
                   "activation_type/weight_type", "unknown key 'colour'",
                   "variants.fp32.layout: 'NC4HW' not one of NHWC, NCHW16c, NHWC-winograd",
                   "m.toml"):
        assert needle in msg, needle


def test_wrong_types_named():
    with pytest.raises(ConfigError, match=r"tuning.trials_per_task: 'many' is not a int"):
        parse_spec({"name": "m", "source": {"path": "a"},
                    "inputs": [{"name": "x", "shape": [1]}],
                    "tuning": {"trials_per_task": "many"}})


def test_unknown_artifact_lists_known():
    specs = load_specs(REPO / "models")
    with pytest.raises(ConfigError) as e:
        find_artifact(specs, "resnet51_int8")
    known = [f"{name}_{variant}" for name, spec in specs.items() for variant in spec.variants]
    assert "resnet50_int8" in known and len(known) > 10
    assert str(e.value).endswith("known: " + ", ".join(known))


MINIMAL = {"name": "m", "source": {"path": "a.onnx"}, "inputs": [{"name": "x", "shape": [1]}]}


def _with_variants(variants: dict, **extra) -> dict:
    return {**MINIMAL, "variants": variants, **extra}


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        parse_spec(_with_variants({"q": {"scheme": "nope"}}), "m.toml")
    msg = str(e.value)
    assert "variants.q.scheme: unknown scheme 'nope'" in msg
    assert "known schemes: fp32, int8" in msg


def test_scheme_names_the_variant_and_quantize_is_a_deprecated_alias():
    spec = parse_spec(_with_variants({"a": {"scheme": "int8"}, "b": {"quantize": True},
                                      "c": {}}), "m.toml")
    assert [spec.variants[v].scheme for v in "abc"] == ["int8", "int8", "fp32"]
    assert spec.variants["b"].quantize and not spec.variants["c"].quantize
    assert spec.warnings == ('m.toml: variants.b: `quantize = true` is deprecated; '
                             'write `scheme = "int8"`',)


def test_quantize_contradicting_scheme_and_foreign_options_are_errors():
    with pytest.raises(ConfigError) as e:
        parse_spec(_with_variants({"a": {"scheme": "fp32", "quantize": True},
                                   "b": {"scheme": "fp32", "weight_type": "int8"}}))
    msg = str(e.value)
    assert "contradicts scheme = 'fp32'" in msg
    assert "variants.b.weight_type: does not apply to scheme 'fp32'" in msg


def test_gates_come_from_scheme_then_model_then_variant():
    from pipeline.core.spec import variant_validation

    spec = parse_spec(_with_variants(
        {"int8": {"scheme": "int8"},
         "int8_loose": {"scheme": "int8", "validation": {"int8_cosine_min": 0.95}},
         "fp32": {"scheme": "fp32"}},
        validation={"int8_max_steps": 2, "samples": 3}))
    strict = variant_validation(spec, spec.variants["int8"])
    loose = variant_validation(spec, spec.variants["int8_loose"])
    assert strict.int8_cosine_min == 0.999  # the int8 scheme's default
    assert loose.int8_cosine_min == 0.95  # the variant's own
    assert strict.int8_max_steps == loose.int8_max_steps == 2.0  # the model's
    assert loose.samples == 3
    assert variant_validation(spec, spec.variants["fp32"]).fp32_rel_tol == 1e-4


def test_a_variant_gate_that_does_not_exist_is_named():
    with pytest.raises(ConfigError, match=r"variants.a.validation: unknown gate 'cosine'"):
        parse_spec(_with_variants({"a": {"scheme": "int8", "validation": {"cosine": 1}}}))


def test_every_scheme_names_known_comparisons_and_passes():
    from pipeline.compiler.passes import IMPORT_PASSES
    from pipeline.schemes import SCHEMES
    from pipeline.stages import quantize, validate

    for scheme in SCHEMES.values():
        assert set(scheme.comparisons) <= set(validate._TITLES) - {validate.CPP}, scheme.name
        assert set(scheme.import_passes) <= set(IMPORT_PASSES), scheme.name
        assert scheme.quantize is None or scheme.quantize in quantize.RECIPES, scheme.name


def test_load_specs_can_collect_broken_specs(tmp_path):
    good = 'name = "{}"\n[source]\npath = "m.onnx"\n[[inputs]]\nname = "x"\nshape = [1, 3]\n'
    (tmp_path / "a.toml").write_text(good.format("a"))
    (tmp_path / "b.toml").write_text("name = [")  # not TOML
    (tmp_path / "c.toml").write_text(good.format("c").replace("[1, 3]", "[1, -3]"))
    (tmp_path / "d.toml").write_text(good.format("a"))  # a's name again
    with pytest.raises(ConfigError, match="cannot read model spec .*b.toml"):
        load_specs(tmp_path)
    broken: dict[str, str] = {}
    specs = load_specs(tmp_path, broken)
    assert list(specs) == ["a"]
    assert sorted(Path(p).name for p in broken) == ["b.toml", "c.toml", "d.toml"]
    assert "positive ints" in broken[str(tmp_path / "c.toml")]
    assert "used by two specs" in broken[str(tmp_path / "d.toml")]


def test_outputs_marked_as_class_scores():
    spec = parse_spec({**MINIMAL, "outputs": [{"name": "logits", "class_scores": True},
                                              {"name": "emb"}]})
    assert [(o.name, o.class_scores) for o in spec.outputs] == [("logits", True),
                                                                ("emb", False)]
    with pytest.raises(ConfigError, match=r"outputs\[0\]: unknown key 'scores'"):
        parse_spec({**MINIMAL, "outputs": [{"name": "y", "scores": True}]})


def test_input_ranges_parsed_and_checked():
    spec = parse_spec({**MINIMAL, "inputs": [
        {"name": "ids", "shape": [1, 8], "dtype": "int64", "range": [0, 30521]},
        {"name": "x", "shape": [1], "dtype": "float32", "range": [-1.5, 2]},
        {"name": "mask", "shape": [1, 8], "dtype": "int64"}]})
    assert [i.range for i in spec.inputs] == [(0, 30521), (-1.5, 2), ()]
    bad = [{"name": "a", "shape": [1], "dtype": "int64", "range": [5, 1]},
           {"name": "b", "shape": [1], "dtype": "int32", "range": [0, 0.5]},
           {"name": "c", "shape": [1], "dtype": "uint8", "range": [0, 300]},
           {"name": "d", "shape": [1], "dtype": "int64", "range": 7}]
    with pytest.raises(ConfigError) as e:
        parse_spec({**MINIMAL, "inputs": bad})
    msg = str(e.value)
    for needle in ("inputs[0].range: [5, 1]: lo must not exceed hi",
                   "inputs[1].range: [0, 0.5] must be [lo, hi], two integers",
                   "inputs[2].range: [0, 300] does not fit uint8",
                   "inputs[3].range: 7 must be [lo, hi]"):
        assert needle in msg, needle


def test_int8_op_selection_is_a_list_of_names():
    spec = parse_spec({**MINIMAL, "variants": {"int8": {
        "scheme": "int8", "op_types": ["MatMul", "Gemm"], "exclude_nodes": ["/mask/Mul"]}}})
    variant = spec.variants["int8"]
    assert variant.op_types == ("MatMul", "Gemm") and variant.exclude_nodes == ("/mask/Mul",)
    with pytest.raises(ConfigError, match=r"variants.int8.op_types: 'MatMul' must be a list"):
        parse_spec({**MINIMAL, "variants": {"int8": {"scheme": "int8", "op_types": "MatMul"}}})
    with pytest.raises(ConfigError, match=r"variants.fp32.op_types: does not apply to scheme"):
        parse_spec({**MINIMAL, "variants": {"fp32": {"scheme": "fp32", "op_types": ["Conv"]}}})
