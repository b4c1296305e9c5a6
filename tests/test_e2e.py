"""End to end: a tiny model through every stage with the real doit, CMake and binary."""

import json
import subprocess

import numpy as np
import pytest
from doit_runner import doit
from oracle import ort_run

from models import make_project


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("proj"))
    # tune=off: the tune stage still runs (seeds from logs, plans tasks, writes the database)
    # but measures nothing; real tuning is covered by test_tune.py.
    run = doit(project, "build:tiny_int8", "tune=off")
    assert run.returncode == 0, run.output
    return project, run


@pytest.mark.slow
def test_every_stage_ran(built):
    _, run = built
    assert {"source", "quantize", "import", "tune", "compile", "package", "smoke"} <= run.built


@pytest.mark.slow
def test_artifact_dir_holds_the_deliverables(built):
    project, _ = built
    art = project / "artifacts" / "tiny_int8" / "cpu"
    for rel in ("model.so", "bin/infer", "src/main.cc", "src/CMakeLists.txt",
                "tiny_int8-cpu.tar.gz", "compile/manifest.json", "package/manifest.json",
                "tune/database_tuning_record.json", "smoke/smoke.json"):
        assert (art / rel).exists(), rel


@pytest.mark.slow
def test_binary_matches_onnxruntime(built, tmp_path):
    project, _ = built
    art = project / "artifacts" / "tiny_int8" / "cpu"
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([str(art / "bin" / "infer"), "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy"), "--repeat", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "median" in proc.stdout and "top-5" in proc.stdout.lower()
    got = np.load(tmp_path / "y.npy")
    ref = ort_run(project / "artifacts" / "tiny_int8" / "quantize" / "model.onnx", {"x": x},
                  quantized=True)
    # int8 artifact vs onnxruntime int8 on the same QDQ model: close, same top-1
    assert np.argmax(got) == np.argmax(ref)
    assert np.abs(got - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_second_build_does_nothing(built):
    project, _ = built
    again = doit(project, "build:tiny_int8", "tune=off")
    assert again.returncode == 0, again.output
    assert again.executed == set(), again.output


@pytest.mark.slow
def test_bad_input_to_binary_fails_clearly(built, tmp_path):
    project, _ = built
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 9, 9), np.float32))
    proc = subprocess.run([str(project / "artifacts" / "tiny_int8" / "cpu" / "bin" / "infer"),
                           "--input", str(tmp_path / "bad.npy")], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "(1,3,8,8) expected" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_three_input_int64_model_builds_validates_and_benches(tmp_path):
    """Three int64 inputs (token ids, mask, token types), one TVM renames, fp32 and int8:
    smoke feeds all three, validate and bench match them by name, and every stage draws
    ids over the spec's range (not just 0/1) and never outside it; the app refuses an id
    outside the range instead of reading out of bounds."""
    import json

    import numpy as np

    from models import TOKEN_SPEC, tiny_token_model

    project = make_project(tmp_path / "p", tiny_token_model(), TOKEN_SPEC)
    run = doit(project, "build:tiny_fp32", "build:tiny_int8", "validate", "bench",
               "tune=off", "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output
    for variant in ("fp32", "int8"):
        art = project / "artifacts" / f"tiny_{variant}" / "cpu"
        io = json.loads((art / "compile" / "io.json").read_text())
        assert [t["name"] for t in io["inputs"]] == ["input_ids", "attention_mask",
                                                     "token_type_ids"]
        report = json.loads((art / "validate" / "validation.json").read_text())
        assert report["status"] == "pass", report
        assert report["scheme"] == variant and f"(scheme {variant}:" in \
            (art / "validate" / "validation.md").read_text()
        assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"
        smoke = sorted(p.name for p in (art / "smoke").glob("input_*.npy"))
        assert smoke == ["input_attention_mask.npy", "input_input_ids.npy",
                         "input_token_type_ids.npy"]
        ids = np.load(art / "smoke" / "input_input_ids.npy")
        assert ids.min() >= 0 and ids.max() <= 10 and len(set(ids.ravel())) > 2
    fp32 = json.loads((project / "artifacts" / "tiny_fp32" / "cpu" / "validate" /
                       "validation.json").read_text())
    record = next(r for r in fp32["records"] if r["comparison"] == "tvm_fp32_vs_ort_fp32")
    assert [g["metric"] for g in record["gates"]] == ["max_abs_err"]  # no class scores marked

    # The app refuses an id past the embedding (11 rows: 0..10) with a usage error
    art = project / "artifacts" / "tiny_fp32" / "cpu"
    bad = np.load(art / "smoke" / "input_input_ids.npy")
    bad[0, 3] = 11
    np.save(tmp_path / "bad_ids.npy", bad)
    proc = subprocess.run(
        [str(art / "bin" / "infer"), "--input", f"input_ids={tmp_path / 'bad_ids.npy'}",
         "--input", f"attention_mask={art / 'smoke' / 'input_attention_mask.npy'}",
         "--input", f"token_type_ids={art / 'smoke' / 'input_token_type_ids.npy'}"],
        capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "element 3 is 11, outside the model's range [0, 10]" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_model_with_external_data_goes_through_every_stage(tmp_path):
    """ONNX external data in, through every stage: the source and quantize stages keep it
    (model.onnx + model.onnx.data), import and compile keep the weights out of module.json
    and model.so (module.params, model.params), the app loads them from the unpacked
    bundle, validate and bench pass, and every manifest records the stage's peak memory."""
    import json
    import tarfile

    import onnx

    from models import TINY_SPEC, tiny_convnet

    project = make_project(tmp_path / "p")
    onnx.save(tiny_convnet(), str(project / "models" / "tiny.onnx"), save_as_external_data=True,
              location="tiny.onnx.data", size_threshold=0)
    assert (project / "models" / "tiny.onnx.data").stat().st_size > 1000
    assert "tiny.onnx" in TINY_SPEC
    run = doit(project, "build:tiny_fp32", "build:tiny_int8", "validate", "bench", "tune=off",
               "repeat=3", "warmup=1")
    assert run.returncode == 0, run.output
    root = project / "artifacts"
    for stage in ("source", "quantize"):
        folder = root / "tiny" / "source" if stage == "source" else root / "tiny_int8" / stage
        assert (folder / "model.onnx.data").stat().st_size > 100, stage
        stored = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        assert all(len(t.raw_data) < 64 for t in stored.graph.initializer), stage
    for variant in ("fp32", "int8"):
        art = root / f"tiny_{variant}" / "cpu"
        module = json.loads((art.parent / "import" / "module.json").read_text())
        assert not module.get("b64ndarrays"), "weights left in module.json"
        assert (art.parent / "import" / "module.params").stat().st_size > 1000
        io = json.loads((art / "compile" / "io.json").read_text())
        assert io["params"]["count"] > 0 and io["params"]["bytes"] > 1000
        assert (art / "model.params").resolve() == (art / "package" / "model.params").resolve()
        report = json.loads((art / "validate" / "validation.json").read_text())
        assert report["status"] == "pass", report
        assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"
        for stage in ("import", "compile", "package", "smoke", "validate", "bench"):
            folder = art.parent / stage if stage == "import" else art / stage
            memory = json.loads((folder / "manifest.json").read_text())["memory"]
            assert memory["peak_rss_mib"] > 10, (stage, memory)

    # The bundle, unpacked elsewhere, runs with its weights file and gives the smoke output
    art = root / "tiny_fp32" / "cpu"
    with tarfile.open(art / "tiny_fp32-cpu.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    bundle = tmp_path / "unpacked" / "tiny_fp32-cpu"
    assert (bundle / "model.params").is_file() and "model.params" in \
        (bundle / "README.txt").read_text()
    infer = [str(bundle / "bin" / "infer"), "--input", str(art / "smoke" / "input.npy"),
             "--output", str(tmp_path / "y.npy")]
    proc = subprocess.run(infer, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "y.npy").tobytes() == \
        np.load(art / "smoke" / "output_cpp.npy").tobytes()
    (bundle / "model.params").unlink()  # without its weights: a clear error, not a crash
    proc = subprocess.run(infer, capture_output=True, text=True)
    assert proc.returncode == 2 and "weights file" in proc.stderr and \
        "model.params" in proc.stderr, proc.stderr


SLASHED_SPEC = """\
name = "tiny"

[source]
path = "models/tiny.onnx"

[[inputs]]
name = "gpu_0/data_0"
shape = [1, 8]
dtype = "float32"

[[inputs]]
name = "in:1"
shape = [1, 8]
dtype = "float32"

[variants.fp32]
scheme = "fp32"
"""


@pytest.mark.slow
def test_tensor_names_with_slashes_go_through_every_stage(tmp_path):
    """The zoo's ``gpu_0/data_0``: smoke, validate and bench write each tensor to a file named
    after it; a ``/`` or ``:`` must not point into a folder that does not exist."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", ["gpu_0/data_0", "in:1"], ["out/sum"]),
             helper.make_node("Mul", ["gpu_0/data_0", "in:1"], ["out:prod"])]
    graph = helper.make_graph(
        nodes, "slashed",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8])
         for n in ("gpu_0/data_0", "in:1")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8])
         for n in ("out/sum", "out:prod")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    project = make_project(tmp_path / "p", model, SLASHED_SPEC)
    run = doit(project, "build:tiny_fp32", "validate:tiny_fp32@cpu", "bench:tiny_fp32@cpu",
               "tune=off", "repeat=2", "warmup=1")
    assert run.returncode == 0, run.output
    art = project / "artifacts" / "tiny_fp32" / "cpu"
    assert json.loads((art / "validate" / "validation.json").read_text())["status"] == "pass"
    assert json.loads((art / "bench" / "bench.json").read_text())["status"] == "ok"
