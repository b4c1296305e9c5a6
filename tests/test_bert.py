"""A BERT-style encoder exported from PyTorch/transformers, through every stage, fp32, int8
and int8_dynamic.

The export is transformers' BertModel with random weights from a small config
(models/bert_gen.py, "tiny"): three int64 inputs, the raw TorchScript export with its shape
subgraphs (``ConstantOfShape``, ``Shape`` -> ...), which TVM's importer cannot take as
exported; the source stage's normalisation makes it importable.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from doit_runner import doit

from models import tiny_bert_project

SPEC = """\
name = "bert"
description = "tiny BERT sentence encoder from transformers, random weights"

[source]
path = "models/bert.onnx"

[[inputs]]
name = "input_ids"
shape = [1, 16]
dtype = "int64"
range = [0, 99]

[[inputs]]
name = "attention_mask"
shape = [1, 16]
dtype = "int64"
range = [0, 1]

[[inputs]]
name = "token_type_ids"
shape = [1, 16]
dtype = "int64"
range = [0, 1]

[[outputs]]
name = "sentence_embedding"

[calibration]
samples = 8

[variants.fp32]
scheme = "fp32"

[variants.int8]
scheme = "int8"
op_types = ["MatMul", "Gemm"]   # a transformer: never the mask arithmetic

[variants.int8_dynamic]
scheme = "int8_dynamic"

[validation]
samples = 3
"""


@pytest.fixture(scope="module")
def bert_project(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tiny_bert_project(tmp_path_factory.mktemp("bert"), SPEC)
    run = doit(root, "build:bert_fp32", "build:bert_int8", "build:bert_int8_dynamic",
               "validate", "bench", "tune=off",
               "repeat=3", "warmup=1", timeout=1500)
    return root, run


@pytest.mark.slow
def test_bert_builds_validates_and_benches_fp32_and_int8(bert_project):
    root, run = bert_project
    assert run.returncode == 0, run.output[-6000:]
    for variant in ("fp32", "int8", "int8_dynamic"):
        art = root / "artifacts" / f"bert_{variant}" / "cpu"
        report = json.loads((art / "validate" / "validation.json").read_text())
        assert report["status"] == "pass", json.dumps(report["records"], indent=1)[-4000:]
        gated = {r["comparison"]: [g["metric"] for g in r["gates"]] for r in report["records"]}
        # not class scores: no top-1 gate anywhere
        assert not any(m.startswith("top") for ms in gated.values() for m in ms), gated
        if variant != "fp32":
            assert gated["tvm_int8_vs_ort_fp32"] == ["cosine"]  # the quality gate
        if variant == "int8_dynamic":
            # every linear layer's matmul in integers; attention's two per layer in float
            imported = json.loads((root / "artifacts" / "bert_int8_dynamic" / "import" /
                                   "import_report.json").read_text())["dynamic_to_integer"]
            assert (len(imported["integer_matmuls"]), len(imported["float_matmuls"]),
                    imported["kept_int32"]) == (12, 4, []), imported
        assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"
    normalisation = json.loads((root / "artifacts" / "bert" / "source" / "manifest.json")
                               .read_text())["info"]["normalisation"]
    assert normalisation["summary"], normalisation


@pytest.mark.slow
def test_the_app_runs_bert_with_three_named_inputs(bert_project, tmp_path):
    root, run = bert_project
    assert run.returncode == 0, run.output[-3000:]
    art = root / "artifacts" / "bert_fp32" / "cpu"
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(0, 100, (1, 16)),
             "attention_mask": np.r_[np.ones(10), np.zeros(6)].reshape(1, 16),
             "token_type_ids": np.zeros((1, 16))}
    args = []
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value.astype(np.int64))
        args += ["--input", f"{name}={tmp_path / (name + '.npy')}"]
    proc = subprocess.run([str(art / "bin" / "infer"), *args, "--output",
                           str(tmp_path / "emb.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import onnxruntime as ort

    sess = ort.InferenceSession(str(root / "artifacts" / "bert" / "source" / "model.onnx"))
    ref = sess.run(None, {k: v.astype(np.int64) for k, v in feeds.items()})[0]
    got = np.load(tmp_path / "emb.npy")
    assert got.shape == ref.shape == (1, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
