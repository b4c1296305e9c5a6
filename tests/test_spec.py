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
                   "variants.fp32.layout: 'NC4HW' not one of NHWC, NCHW16c", "m.toml"):
        assert needle in msg, needle


def test_wrong_types_named():
    with pytest.raises(ConfigError, match=r"tuning.trials_per_task: 'many' is not a int"):
        parse_spec({"name": "m", "source": {"path": "a"},
                    "inputs": [{"name": "x", "shape": [1]}],
                    "tuning": {"trials_per_task": "many"}})


def test_unknown_artifact_lists_known():
    specs = load_specs(REPO / "models")
    with pytest.raises(ConfigError, match="known: resnet50_fp32, resnet50_int8"):
        find_artifact(specs, "resnet51_int8")
