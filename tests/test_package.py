"""Tests for the package stage: rendered sources, the C++ app it builds, and the bundle."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, CorruptInputError, StageFailed
from pipeline.core.targets import get_target
from pipeline.runtime import app
from pipeline.stages import package

GOLDEN_DIR = Path(__file__).parent / "golden" / "package"
RUNTIME_CPP = Path(__file__).resolve().parent.parent / "runtime_cpp"
HAVE_BUILD_TOOLS = shutil.which("cmake") is not None and shutil.which("g++") is not None
needs_build_tools = pytest.mark.skipif(not HAVE_BUILD_TOOLS, reason="cmake and g++ are needed")

TINY_IO = {"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
           "outputs": [{"name": "y", "shape": [1, 4], "dtype": "float32"}]}


# --------------------------------------------------------------------------------------------
# Models built in code


def _tiny_convnet():
    """Conv + Relu + GlobalAveragePool + Flatten on [1, 3, 8, 8] -> [1, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]),
         helper.make_node("Flatten", ["g"], ["y"])],
        "tiny_convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    # IR version 8: what onnxruntime accepts (the installed onnx would write a newer one)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _two_in_two_out():
    """s = a + float(b), m = max(a, axis=1): two inputs (float32, int64), two outputs."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "bf"], ["s"]),
         helper.make_node("ReduceMax", ["a"], ["m"], axes=[1], keepdims=0)],
        "two_in_two_out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [2])])
    # IR version 8: what onnxruntime accepts (the installed onnx would write a newer one)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _import(model, shapes):
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(model, shape_dict=shapes, keep_params_in_input=False)


def _compile_cpu(model, shapes):
    import tvm

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    return tvm.compile(_import(model, shapes), target=target)


def _vm_outputs(executable, inputs):
    """Outputs of the TVM Python VM: the reference the C++ app must match bit for bit."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in outs]


def _ort_outputs(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny convnet compiled for the CPU: model.so, an input, and reference outputs."""
    work = tmp_path_factory.mktemp("tiny")
    model = _tiny_convnet()
    executable = _compile_cpu(model, {"x": [1, 3, 8, 8]})
    executable.export_library(str(work / "model.so"))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.save(work / "x.npy", x)
    return {"dir": work, "model_so": work / "model.so", "x": x, "x_npy": work / "x.npy",
            "vm": _vm_outputs(executable, [x])[0], "ort": _ort_outputs(model, {"x": x})[0]}


@pytest.fixture(scope="module")
def cpu_package(tiny, tmp_path_factory):
    """The tiny convnet packaged for the CPU (one CMake build shared by several tests)."""
    if not HAVE_BUILD_TOOLS:
        pytest.skip("cmake and g++ are needed")
    config = package.PackageConfig.for_target("tiny", get_target("cpu"), **TINY_IO)
    out = tmp_path_factory.mktemp("pkg_cpu")
    return package.run(tiny["model_so"], config, out), out, config


# --------------------------------------------------------------------------------------------
# Config and rendering (fast)


def test_config_accepts_plain_data_and_round_trips():
    config = package.PackageConfig.for_target("tiny", get_target("cpu"), **TINY_IO)
    assert config.inputs == (package.TensorSpec("x", (1, 3, 8, 8), "float32"),)
    assert config.target_kind == "llvm" and config.cuda_arch == ""
    assert package.PackageConfig(**config.to_dict()) == config
    assert config.bundle_name == "tiny-cpu.tar.gz"
    cuda = package.PackageConfig.for_target("tiny", get_target("rtx4090"), **TINY_IO)
    assert (cuda.target_kind, cuda.cuda_arch) == ("cuda", "sm_89")
    # The form the pipeline's stage uses: keywords, TensorSpec(**io.json entry), SM looked up.
    specs = [package.TensorSpec(**t) for t in TINY_IO["inputs"]]
    assert specs[0].shape == (1, 3, 8, 8)
    h100 = package.PackageConfig(model="tiny", target="h100", target_kind="cuda",
                                 inputs=tuple(specs), outputs=TINY_IO["outputs"])
    assert h100.cuda_arch == "sm_90" and h100.bundle_name == "tiny-h100.tar.gz"


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        package.PackageConfig(
            "bad name", "cpu", "vulkan",
            inputs=[{"name": "x", "shape": [1, 0], "dtype": "float64"},
                    {"name": "x", "shape": [2], "dtype": "float32"}],
            outputs=[], build_type="Fast")
    message = str(err.value)
    for expected in ("model 'bad name'", "target_kind 'vulkan'", "build_type 'Fast'",
                     "shape [1, 0]", "dtype 'float64'", "duplicate input names: x",
                     "at least one output"):
        assert expected in message
    with pytest.raises(ConfigError, match="cuda_arch"):
        package.PackageConfig("m", "gpu", "cuda", **TINY_IO)  # not in the targets table
    with pytest.raises(ConfigError, match="mapping with the keys"):
        package.PackageConfig("m", "cpu", "llvm", inputs=[{"name": "x"}],
                              outputs=TINY_IO["outputs"])


def _golden_configs():
    return {
        "cpu": package.PackageConfig.for_target("tiny", get_target("cpu"), **TINY_IO),
        # Several tensors, odd names and every dtype family, on a CUDA target.
        "cuda": package.PackageConfig.for_target(
            "detector", get_target("rtx4090"),
            inputs=[{"name": "images", "shape": [1, 3, 224, 224], "dtype": "float16"},
                    {"name": 'scale/0:"q"', "shape": [1], "dtype": "int64"},
                    {"name": "input_ids", "shape": [1, 8], "dtype": "int64",
                     "range": [0, 30521], "onnx_name": "input.ids"}],
            outputs=[{"name": "logits", "shape": [1, 1000], "dtype": "float16"},
                     {"name": "index", "shape": [1], "dtype": "int32"},
                     {"name": "mask", "shape": [1, 8], "dtype": "uint8"}],
            params=12),
    }


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_rendered_sources_match_golden(name):
    """Golden files; run with UPDATE_GOLDEN=1 to rewrite them after an intended change."""
    rendered = package.render_sources(_golden_configs()[name])
    assert sorted(rendered) == ["CMakeLists.txt", "main.cc"]
    golden_dir = GOLDEN_DIR / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden_dir.mkdir(parents=True, exist_ok=True)
        for file, text in rendered.items():
            (golden_dir / file).write_text(text, encoding="utf-8")
    for file, text in rendered.items():
        golden = golden_dir / file
        assert golden.exists(), f"missing {golden}; create it with UPDATE_GOLDEN=1"
        assert text == golden.read_text(encoding="utf-8"), (
            f"{file} differs from {golden}; if the change is intended, rerun with UPDATE_GOLDEN=1")


def test_rendering_is_deterministic_and_escapes_names():
    config = _golden_configs()["cuda"]
    assert package.render_sources(config) == package.render_sources(config)
    main_cc = package.render_sources(config)["main.cc"]
    assert '{ "scale/0:\\"q\\"", { 1 }, npy::DType::kInt64, false' in main_cc
    assert "kDLCUDA" in main_cc and "tvm_callback_cuda_compile" in main_cc
    cpu_cc = package.render_sources(_golden_configs()["cpu"])["main.cc"]
    for cuda_only in ("kDLCUDA", "cuda_runtime_api.h", "tvm_callback_cuda_compile", "dlopen"):
        assert cuda_only not in cpu_cc


def test_c_string_escapes_everything_unsafe():
    assert package._c_string('a"b\\c') == '"a\\"b\\\\c"'
    assert package._c_string("é\n?") == '"\\303\\251\\012\\077"'


def test_run_rejects_a_model_that_is_not_a_library(tmp_path):
    bogus = tmp_path / "model.so"
    bogus.write_text("not a library")
    config = package.PackageConfig.for_target("tiny", get_target("cpu"), **TINY_IO)
    with pytest.raises(CorruptInputError, match="not a shared library"):
        package.run(bogus, config, tmp_path / "out")
    with pytest.raises(CorruptInputError, match="cannot read"):
        package.run(tmp_path / "missing.so", config, tmp_path / "out")


def test_run_refuses_a_model_compiled_for_another_target(tiny, tmp_path):
    config = package.PackageConfig.for_target("tiny", get_target("rtx4090"), **TINY_IO)
    with pytest.raises(ConfigError, match="has no CUDA kernels, but target 'rtx4090' is cuda"):
        package.run(tiny["model_so"], config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# runtime_cpp headers, through a small driver program (no TVM needed)

_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "npy.h"
#include "timing.h"
int main(int argc, char** argv) {
  try {
    const std::string cmd = argv[1];
    if (cmd == "copy") {
      npy::Array a = npy::load(argv[2]);
      npy::save(argv[3], a);
      std::printf("%s %s\n", npy::dtype_name(a.dtype), npy::shape_str(a.shape).c_str());
      return 0;
    }
    std::vector<double> v;
    for (int i = 2; i < argc; ++i) v.push_back(std::atof(argv[i]));
    const timing::Stats s = timing::summarize(v);
    std::printf("%.17g %.17g %.17g %.17g\n", s.min_ms, s.median_ms, s.p90_ms, s.mean_ms);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed")
    work = tmp_path_factory.mktemp("driver")
    (work / "driver.cc").write_text(_DRIVER)
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{RUNTIME_CPP}",
                    "driver.cc", "-o", "driver"], cwd=work, check=True)
    return work / "driver"


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_npy_round_trip_is_byte_identical_to_numpy(driver, tmp_path, dtype, shape):
    array = (np.random.default_rng(2).standard_normal(shape) * 100).astype(dtype)
    src, dst = tmp_path / "in.npy", tmp_path / "out.npy"
    np.save(src, array)
    proc = subprocess.run([driver, "copy", src, dst], capture_output=True, text=True, check=True)
    assert proc.stdout.split()[0] == dtype
    # The writer lays out its header exactly as numpy does, padding included.
    assert dst.read_bytes() == src.read_bytes()


def test_npy_reads_version_2_headers(driver, tmp_path):
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    src, dst = tmp_path / "v2.npy", tmp_path / "out.npy"
    with open(src, "wb") as f:
        np.lib.format.write_array(f, array, version=(2, 0))
    subprocess.run([driver, "copy", src, dst], check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(dst), array)


def test_npy_errors_name_the_file_and_the_problem(driver, tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 3), np.float32))
    cases = {
        "truncated.npy": (good.read_bytes()[:-5], "truncated data"),
        "short_header.npy": (good.read_bytes()[:30], "truncated header"),
        "text.npy": (b"just some text, no magic", "not a .npy file"),
        "empty.npy": (b"", "not a .npy file"),
        "trailing.npy": (good.read_bytes() + b"xx", "unexpected bytes after the data"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((2, 3), np.float32)))
    cases["fortran.npy"] = (None, "Fortran-ordered")
    np.save(tmp_path / "float64.npy", np.zeros(3))
    cases["float64.npy"] = (None, "dtype '<f8' is not supported")
    np.save(tmp_path / "big_endian.npy", np.zeros(3, ">i4"))
    cases["big_endian.npy"] = (None, "big-endian")
    cases["missing.npy"] = (None, "cannot open")
    for name, (_, expected) in cases.items():
        proc = subprocess.run([driver, "copy", tmp_path / name, tmp_path / "out.npy"],
                              capture_output=True, text=True)
        assert proc.returncode == 1, name
        assert name in proc.stderr and expected in proc.stderr, (name, proc.stderr)


def _npy_v2(header: bytes, declared_len: int | None = None) -> bytes:
    """A v2.0 .npy prefix + header, its length field possibly lying."""
    length = len(header) if declared_len is None else declared_len
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", length) + header


def test_npy_refuses_what_is_no_regular_file_or_claims_more_than_it_holds(driver, tmp_path):
    """Nothing is read from a device, and nothing allocated for a size only the header claims."""
    os.mkfifo(tmp_path / "fifo")  # opening it must not wait for a writer
    (tmp_path / "folder.npy").mkdir()
    huge_shape = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }\n"
    (tmp_path / "huge_shape.npy").write_bytes(_npy_v2(huge_shape) + b"\0" * 16)
    (tmp_path / "huge_header.npy").write_bytes(_npy_v2(b"{", declared_len=0xFFFFFFF0))
    (tmp_path / "header_over_limit.npy").write_bytes(_npy_v2(b" " * 70000))
    cases = [
        (tmp_path / "folder.npy", "is a directory"),
        (Path("/dev/zero"), "is not a regular file"),
        (tmp_path / "fifo", "is not a regular file"),
        (tmp_path / "huge_shape.npy",
         "truncated data: shape (1099511627776,) float32 needs 4398046511104 bytes, file has 16"),
        (tmp_path / "huge_header.npy", "header length 4294967280 bytes is over the limit"),
        (tmp_path / "header_over_limit.npy", "header length 70000 bytes is over the limit"),
    ]
    for path, expected in cases:
        proc = subprocess.run([driver, "copy", path, tmp_path / "out.npy"], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1, (path, proc.stderr)
        assert f"npy file '{path}': {expected}" in proc.stderr, proc.stderr


@pytest.mark.parametrize("samples", [[3.0], [4.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0],
                                     list(np.random.default_rng(3).exponential(2.0, 101))])
def test_latency_stats_agree_with_numpy(driver, samples):
    proc = subprocess.run([driver, "stats", *[repr(float(s)) for s in samples]],
                          capture_output=True, text=True, check=True)
    got = [float(v) for v in proc.stdout.split()]
    expected = [min(samples), np.median(samples), np.percentile(samples, 90), np.mean(samples)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The built app (CPU)


@pytest.mark.slow
def test_app_output_matches_tvm_vm_and_onnxruntime(cpu_package, tiny, tmp_path):
    result, out, _ = cpu_package
    for key in ("bundle", "binary", "model", "lib_dir", "src_dir", "readme", "build_log"):
        assert result[key].exists(), key
    libs = sorted(p.name for p in result["lib_dir"].iterdir())
    assert libs == ["libtvm_ffi.so", "libtvm_runtime.so"]
    assert package.cuda_kernel_sources(result["model"]) == []

    y_path, stats_path = tmp_path / "y.npy", tmp_path / "stats.json"
    threads = min(2, os.cpu_count())  # --threads may not exceed the cores
    proc = app.run_binary(out, tiny["x_npy"], y_path, warmup=1, repeat=5, threads=threads,
                              json_path=stats_path)
    assert proc.returncode == 0, proc.stderr
    y = np.load(y_path)
    assert y.dtype == np.float32 and y.shape == (1, 4)
    # Same compiled code, same inputs: the C++ app and the Python VM agree bit for bit.
    assert y.tobytes() == tiny["vm"].tobytes()
    np.testing.assert_allclose(y, tiny["ort"], rtol=1e-5, atol=1e-5)

    assert f"threads: {threads} of {os.cpu_count()} cores" in proc.stdout
    assert re.search(r"latency \(exclude-copies\): median [\d.]+ ms, p90 [\d.]+ ms, min [\d.]+ ms, "
                     r"mean [\d.]+ ms", proc.stdout)
    top = re.search(r"top-5 of output 'y' row 0: (.*)", proc.stdout).group(1).split()
    assert [int(item.split("=")[0]) for item in top] == list(np.argsort(-y[0], kind="stable"))
    stats = json.loads(stats_path.read_text())
    assert stats["repeat"] == 5 and stats["device"] == "cpu" and stats["threads"] == threads
    assert stats["latency_ms"] == stats["exclude_copies_ms"]
    for key in ("min", "median", "p90", "mean"):  # each run's compute time is part of its total
        assert 0 < stats["exclude_copies_ms"][key] <= stats["include_copies_ms"][key]
    assert stats["latency_ms"]["count"] == 5
    assert stats["latency_ms"]["min"] <= stats["latency_ms"]["median"] <= stats["latency_ms"]["p90"]
    # the timed runs themselves, for pooling across runs: the summary is theirs
    samples = stats["samples_ms"]
    assert len(samples) == 5 and min(samples) == pytest.approx(stats["latency_ms"]["min"])
    assert float(np.median(samples)) == pytest.approx(stats["latency_ms"]["median"], abs=2e-6)

    proc = app.run_binary(out, tiny["x_npy"], device_timing="include-copies", threads=1)
    assert proc.returncode == 0 and "threads: 1 of" in proc.stdout
    assert proc.stdout.index("(include-copies)") < proc.stdout.index("(exclude-copies)")


@pytest.mark.slow
def test_app_uses_all_cores_by_default(cpu_package, tiny):
    """The default is every core, whatever TVM_NUM_THREADS the caller's environment holds."""
    _, out, _ = cpu_package
    cores = os.cpu_count()
    env = {**os.environ, "TVM_NUM_THREADS": "1" if cores > 1 else "2"}
    proc = subprocess.run([out / "bin" / "infer", "--input", tiny["x_npy"]], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"threads: (\d+) of (\d+) cores", proc.stdout).groups() == (str(cores),) * 2
    assert "warning" not in proc.stderr
    help_text = subprocess.run([out / "bin" / "infer", "--help"], capture_output=True,
                               text=True).stdout
    assert "1 to the number of CPU cores" in help_text and "(default: all of them" in help_text


@pytest.mark.slow
def test_app_rejects_bad_input_files_and_arguments(cpu_package, tiny, tmp_path):
    _, out, _ = cpu_package
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 32, 32), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((1, 3, 8, 8), np.int64))
    (tmp_path / "notes.npy").write_text("this is not an array")
    (tmp_path / "cut.npy").write_bytes(tiny["x_npy"].read_bytes()[:-7])
    (tmp_path / "cut_header.npy").write_bytes(tiny["x_npy"].read_bytes()[:40])
    (tmp_path / "folder").mkdir()
    cases = [
        (tmp_path / "small.npy", "shape (1,3,8,8) expected, got (1,3,32,32)"),
        (tmp_path / "ints.npy", "dtype float32 expected, got int64"),
        (tmp_path / "notes.npy", "not a .npy file"),
        (tmp_path / "cut.npy", "truncated data"),
        (tmp_path / "cut_header.npy", "truncated header"),
        (tmp_path / "absent.npy", "cannot open"),
        # Once an uncaught exception (SIGABRT, exit 134) and a read that never ended.
        (tmp_path / "folder", "is a directory; pass the path of a .npy file"),
        (Path("/dev/zero"), "is not a regular file"),
        ({"x": Path("/dev/zero")}, "is not a regular file"),  # the NAME=PATH form
    ]
    for path, expected in cases:
        proc = app.run_binary(out, path, timeout=60)
        assert proc.returncode == 2, (path, proc.returncode, proc.stdout, proc.stderr)
        shown = str(path["x"] if isinstance(path, dict) else path)
        assert proc.stderr.startswith("infer: input ") and proc.stderr.count("\n") == 2
        assert shown in proc.stderr and expected in proc.stderr, proc.stderr
        assert proc.stdout == ""

    binary = str(out / "bin" / "infer")
    x = str(tiny["x_npy"])
    cores = os.cpu_count()
    bad_args = [
        ([], "--input is required"),
        (["--input", x, "--repeat", "0"], "--repeat needs an integer >= 1"),
        (["--input", x, "--threads", "two"], "--threads needs an integer >= 1"),
        (["--input", x, "--frobnicate"], "unknown argument '--frobnicate'"),
        (["--input", x, "--device-timing", "sometimes"], "--device-timing must be"),
        (["--input", x, "--model", str(tmp_path / "nope.so")], "model file"),
        (["--input", x, "--input", x], "--input given twice"),
        (["--input"], "--input needs a value"),
        (["--input", x, "--threads", "256"], "--threads 256 is more than the"),
        (["--input", x, "--threads", str(cores + 1)],
         f"is more than the {cores} CPU cores of this machine; pass 1 to {cores}"),
        (["--input", x, "--model", str(tmp_path)], "is a directory; pass --model"),
        (["--input", x, "--model", "/dev/zero"], "is not a regular file; pass --model"),
        # Output paths are checked before the model runs.
        (["--input", x, "--output", str(tmp_path)], "is a directory; pass a file path"),
        (["--input", x, "--output", str(tmp_path / "no" / "y.npy")], "does not exist; create it"),
        # The .npy writer renames a temporary file into place: never over a device.
        (["--input", x, "--output", "/dev/null"], "exists and is not a regular file"),
        (["--input", x, "--json", str(tmp_path)], "is a directory; pass a file path"),
    ]
    for args, expected in bad_args:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and expected in proc.stderr, (args, proc.stderr)
        assert proc.stdout == "", args
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")

    # A file that exists but is no model: a runtime failure (1), one line, no crash.
    proc = subprocess.run([binary, "--input", x, "--model", x], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("infer: "), proc.stderr
    help_proc = subprocess.run([binary, "--help"], capture_output=True, text=True)
    assert help_proc.returncode == 0 and "--device-timing" in help_proc.stdout


@pytest.mark.slow
def test_bundle_runs_unpacked_elsewhere_and_rebuilds_from_its_sources(cpu_package, tiny, tmp_path):
    result, _, _ = cpu_package
    with tarfile.open(result["bundle"]) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "tiny-cpu"
    assert {p.name for p in root.iterdir()} == {"README.txt", "bin", "lib", "model.so", "src"}
    assert "bin/infer --input" in (root / "README.txt").read_text()
    # Run from an unrelated working directory: lib/ is found through the RPATH alone.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([root / "bin" / "infer", "--input", tiny["x_npy"], "--output", "y.npy"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "y.npy").tobytes() == tiny["vm"].tobytes()
    assert os.path.realpath(root / "model.so") in proc.stdout

    # src/ is self-contained: CMake finds the TVM wheel on its own and rebuilds the same binary.
    build = tmp_path / "rebuild"
    for cmd in (["cmake", "-S", root / "src", "-B", build], ["cmake", "--build", build]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (build / "infer").read_bytes() == (root / "bin" / "infer").read_bytes()


@pytest.mark.slow
def test_bundle_is_byte_identical_across_builds(cpu_package, tiny, tmp_path):
    result, _, config = cpu_package
    again = package.run(tiny["model_so"], config, tmp_path / "again")
    with tarfile.open(result["bundle"]) as a, tarfile.open(again["bundle"]) as b:
        assert a.getnames() == b.getnames() == sorted(a.getnames())
        assert {m.mtime for m in a.getmembers()} == {0}
        assert {(m.uid, m.gid, m.uname, m.gname) for m in a.getmembers()} == {(0, 0, "", "")}
    # The compiled binary is reproducible too (-ffile-prefix-map), so the whole bundle is.
    assert again["binary"].read_bytes() == result["binary"].read_bytes()
    assert again["bundle"].read_bytes() == result["bundle"].read_bytes()


@pytest.mark.slow
def test_failed_build_raises_stage_failed_quoting_the_log(tiny, tmp_path, monkeypatch):
    if not HAVE_BUILD_TOOLS:
        pytest.skip("cmake and g++ are needed")
    real_render = package.render_sources

    def broken(config):
        sources = real_render(config)
        sources["main.cc"] += "\nthis_is_not_cpp;\n"
        return sources

    monkeypatch.setattr(package, "render_sources", broken)
    config = package.PackageConfig.for_target("tiny", get_target("cpu"), **TINY_IO)
    with pytest.raises(StageFailed) as err:
        package.run(tiny["model_so"], config, tmp_path / "out")
    assert err.value.stage == "package"
    assert err.value.log_path == (tmp_path / "out" / "build.log").resolve()
    assert "cmake build failed" in str(err.value) and "this_is_not_cpp" in str(err.value)
    assert not (tmp_path / "out" / config.bundle_name).exists()


@pytest.mark.slow
def test_app_with_several_inputs_and_outputs(tmp_path):
    if not HAVE_BUILD_TOOLS:
        pytest.skip("cmake and g++ are needed")
    model = _two_in_two_out()
    executable = _compile_cpu(model, {"a": [2, 3], "b": [2, 3]})
    executable.export_library(str(tmp_path / "model.so"))
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.integers(-5, 5, (2, 3)).astype(np.int64)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    config = package.PackageConfig.for_target(
        "pair", get_target("cpu"),
        inputs=[{"name": "a", "shape": [2, 3], "dtype": "float32"},
                {"name": "b", "shape": [2, 3], "dtype": "int64"}],
        outputs=[{"name": "s", "shape": [2, 3], "dtype": "float32"},
                 {"name": "m", "shape": [2], "dtype": "float32"}])
    result = package.run(tmp_path / "model.so", config, tmp_path / "pkg")

    def infer(*args):
        return subprocess.run([result["binary"], *args], capture_output=True, text=True)

    a_npy, b_npy = tmp_path / "a.npy", tmp_path / "b.npy"
    proc = infer("--input", f"b={b_npy}", "--input", f"a={a_npy}",
                 "--output", f"m={tmp_path / 'm.npy'}", "--output", f"s={tmp_path / 's.npy'}")
    assert proc.returncode == 0, proc.stderr
    vm_s, vm_m = _vm_outputs(executable, [a, b])
    assert np.load(tmp_path / "s.npy").tobytes() == vm_s.tobytes()
    assert np.load(tmp_path / "m.npy").tobytes() == vm_m.tobytes()
    ort_s, ort_m = _ort_outputs(model, {"a": a, "b": b})
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), ort_s, rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), ort_m, rtol=1e-6)
    # Top-5 is for 2-D float outputs (score tables), with at most as many entries as columns.
    assert re.search(r"top-5 of output 's' row 1: \d=\S+ \d=\S+ \d=\S+\n", proc.stdout)
    assert "output 'm'" not in proc.stdout

    proc = app.run_binary(tmp_path / "pkg", {"a": a_npy, "b": b_npy})
    assert proc.returncode == 0, proc.stderr
    proc = infer("--input", str(a_npy))
    assert proc.returncode == 2 and "pass --input NAME=PATH" in proc.stderr
    proc = infer("--input", f"a={a_npy}")
    assert proc.returncode == 2 and "no --input for model input 'b'" in proc.stderr
    proc = infer("--input", f"a={b_npy}", "--input", f"b={b_npy}")
    assert proc.returncode == 2
    assert "(model input 'a'): dtype float32 expected, got int64" in proc.stderr


# --------------------------------------------------------------------------------------------
# CUDA: cross-built here, run only where there is a GPU

CUDA_TARGET = {"kind": "cuda", "arch": "sm_89", "max_threads_per_block": 1024,
               "max_shared_memory_per_block": 49152, "thread_warp_size": 32}


def _has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _cuda_elf_archs(fatbin: bytes) -> set[int]:
    """SM versions of the cubins (ELF, e_machine EM_CUDA = 190) inside a fatbin."""
    archs = set()
    for match in re.finditer(rb"\x7fELF", fatbin):
        start = match.start()
        if struct.unpack_from("<H", fatbin, start + 18)[0] == 190:
            archs.add((struct.unpack_from("<I", fatbin, start + 48)[0] >> 8) & 0xFF)
    return archs


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or not HAVE_BUILD_TOOLS,
                    reason="nvcc, cmake and g++ are needed to cross-build the CUDA app")
def test_cuda_app_cross_builds_with_sm89_kernels(tiny, tmp_path):
    import tvm
    import tvm.s_tir.dlight as dl
    from tvm import relax

    model = _tiny_convnet()
    mod = relax.transform.LegalizeOps()(_import(model, {"x": [1, 3, 8, 8]}))
    target = tvm.target.Target(CUDA_TARGET, host={"kind": "llvm"})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    tvm.compile(mod, target=target).export_library(str(tmp_path / "model.so"))

    # Compiled without a GPU, model.so carries CUDA source that the runtime would compile
    # at load time with a Python-only callback; the package compiles it ahead of time.
    sources = package.cuda_kernel_sources(tmp_path / "model.so")
    assert len(sources) == 1 and "__global__" in sources[0]
    cpu_config = package.PackageConfig.for_target("tiny", get_target("cpu"), **TINY_IO)
    with pytest.raises(ConfigError, match="has CUDA kernels, but target 'cpu' is llvm"):
        package.run(tmp_path / "model.so", cpu_config, tmp_path / "wrong")

    config = package.PackageConfig.for_target("tiny", get_target("rtx4090"), **TINY_IO)
    result = package.run(tmp_path / "model.so", config, tmp_path / "pkg")
    libs = sorted(p.name for p in result["lib_dir"].iterdir())
    assert [n for n in libs if not n.startswith("libcudart.so.")] == [
        "libtvm_ffi.so", "libtvm_runtime.so", "libtvm_runtime_cuda.so"]
    cudart = [n for n in libs if n.startswith("libcudart.so.")]
    assert len(cudart) == 1
    kernels = result["kernels_dir"]
    assert (kernels / "cuda0.cu").read_text() == sources[0]
    fatbin = (kernels / "cuda0.fatbin").read_bytes()
    assert _cuda_elf_archs(fatbin) == {89} and b"sm_89" in fatbin
    readme = result["readme"].read_text()
    assert f"CUDA {cudart[0].rsplit('.', 1)[1]}" in readme and "driver" in readme
    with tarfile.open(result["bundle"]) as tar:
        names = tar.getnames()
    assert "tiny-rtx4090/kernels/cuda0.fatbin" in names and "tiny-rtx4090/lib/" + cudart[0] in names

    proc = app.run_binary(result["binary"].parent.parent, tiny["x_npy"], tmp_path / "y.npy",
                              repeat=3, device_timing="include-copies")
    if not _has_gpu():
        # No driver here: one clear message, not a loader crash.
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "NVIDIA driver" in proc.stderr or "CUDA device" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "device: cuda:0" in proc.stdout
    # CUDA kernels are compiled with fast math: compare with a tolerance.
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny["ort"], rtol=1e-3, atol=1e-3)
