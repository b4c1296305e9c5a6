"""The BERT-style encoder (models/bert_gen.py, "tiny") in fp16 and bf16 through every stage:
the transformer ops a conv net lacks (LayerNorm, Softmax, Gather, Erf, the int64 mask cast)
under onnxruntime and TVM."""

from __future__ import annotations

import json

import onnx
import pytest
from doit_runner import doit
from test_bert import SPEC

from models import tiny_bert_project


@pytest.fixture(scope="module")
def bert_project(tmp_path_factory):
    pytest.importorskip("transformers")
    int8 = SPEC[SPEC.index("[variants.int8]"):SPEC.index("[validation]")]
    spec = SPEC.replace(int8, '[variants.fp16]\nscheme = "fp16"\n\n'
                              '[variants.bf16]\nscheme = "bf16"\n\n')
    root = tiny_bert_project(tmp_path_factory.mktemp("bert"), spec)
    run = doit(root, "build:bert_fp16", "build:bert_bf16", "validate:bert_fp16@cpu",
               "validate:bert_bf16@cpu", "bench:bert_fp16@cpu", "bench:bert_bf16@cpu",
               "tune=off", "repeat=3", "warmup=1", timeout=1500)
    return root, run


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_bert_validates_and_benches(bert_project, variant):
    root, run = bert_project
    assert run.returncode == 0, run.output[-6000:]
    art = root / "artifacts" / f"bert_{variant}" / "cpu"
    report = json.loads((art / "validate" / "validation.json").read_text())
    assert report["status"] == "pass", json.dumps(report["records"], indent=1)[-4000:]
    quality = next(r for r in report["records"]
                   if r["comparison"] == f"tvm_{variant}_vs_ort_fp32")
    assert quality["metrics"]["cosine"] >= 0.999  # sentence-embedding cosine to fp32
    assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_the_float16_mask_cast_is_consistent(bert_project):
    """onnxconverter-common declares the int64 mask's Cast(to=FLOAT) output float16; the
    recipe retargets it, or onnxruntime refuses the model and TVM's import fails."""
    root, run = bert_project
    assert run.returncode == 0, run.output[-3000:]
    quantize = root / "artifacts" / "bert_fp16" / "quantize"
    info = json.loads((quantize / "manifest.json").read_text())["info"]
    assert info["casts_retargeted"] == ["/Cast"] and info["float32_ops"] == []
    model = onnx.load(str(quantize / "model.onnx"))
    cast = next(n for n in model.graph.node if n.name == "/Cast")
    assert cast.attribute[0].i == onnx.TensorProto.FLOAT16


@pytest.mark.slow
def test_bf16_rounds_every_matmul_weight_and_embedding_of_the_encoder(bert_project):
    root, run = bert_project
    assert run.returncode == 0, run.output[-3000:]
    imported = json.loads((root / "artifacts" / "bert_bf16" / "import" /
                           "import_report.json").read_text())
    # 2 layers x (Q, K, V, output, two feed-forward) and the word and token-type embeddings
    # (the position embedding's lookup has constant indices: folded before quantize)
    rewritten = imported["bf16_weights"]["rewritten"]
    assert sum(r.startswith("matmul") for r in rewritten) == 12
    assert sum(r.startswith("take") for r in rewritten) == 2
    assert imported["bf16_weights"]["kept"] == []
