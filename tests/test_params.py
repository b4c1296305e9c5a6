"""Weights out of the IR and back (pipeline.compiler.params, pipeline.runtime.params)."""

from pathlib import Path

import numpy as np
import pytest

from models import tiny_convnet
from pipeline.compiler.params import bind_params, lift_constants, num_inputs
from pipeline.runtime.params import load_params, param_name, params_path, save_params


def _module():
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.lowering import graph_cleanup

    mod = from_onnx(tiny_convnet(), shape_dict={"x": [1, 3, 8, 8]}, keep_params_in_input=False)
    return graph_cleanup()(mod)


def test_lift_then_bind_gives_the_same_module_and_a_light_json(tmp_path):
    import tvm

    mod = _module()
    lifted, weights = lift_constants(mod)
    main = lifted["main"]
    assert num_inputs(main) == 1 and len(main.params) == 1 + len(weights) > 1
    assert [p.name for p in main.params[1:]] == [param_name(i) for i in range(len(weights))]
    assert '"b64ndarrays": []' in tvm.ir.save_json(lifted).replace(" ", "").replace(
        '"b64ndarrays":[]', '"b64ndarrays": []') or "b64ndarrays" not in tvm.ir.save_json(lifted)
    tvm.ir.assert_structural_equal(bind_params(lifted, weights), mod)
    with pytest.raises(ValueError, match="already takes lifted weights"):
        lift_constants(lifted)
    with pytest.raises(ValueError, match="not from the same build"):
        bind_params(lifted, weights[:-1])


def test_a_tied_weight_is_lifted_once():
    import tvm
    from tvm import relax

    w = relax.const(np.arange(6, dtype=np.float32).reshape(2, 3))
    x = relax.Var("x", relax.TensorType([2, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(x, w))
            out = bb.emit_output(relax.op.multiply(a, w))
        bb.emit_func_output(out)
    lifted, weights = lift_constants(bb.get())
    assert len(weights) == 1 and len(lifted["main"].params) == 2
    tvm.ir.assert_structural_equal(bind_params(lifted, weights)["main"].body,
                                   bb.get()["main"].body, map_free_vars=True)


def test_param_files_round_trip_byte_identically(tmp_path):
    import tvm

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,), (2, 2, 2)]]
    arrays.append(np.arange(7, dtype=np.int64))
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    assert save_params(tensors, tmp_path / "a.params") == sum(a.nbytes for a in arrays)
    save_params(tensors, tmp_path / "b.params")
    assert (tmp_path / "a.params").read_bytes() == (tmp_path / "b.params").read_bytes()
    back = load_params(tmp_path / "a.params")
    assert [b.numpy().tobytes() for b in back] == [a.tobytes() for a in arrays]
    assert params_path(tmp_path / "model.so") == tmp_path / "model.params"
    assert params_path(tmp_path / "module.json") == tmp_path / "module.params"


def test_float16_valued_weights_are_stored_narrow_and_load_as_float32(tmp_path):
    """narrow_float16: a float32 tensor float16 holds exactly is stored as float16
    (``.widen``) and loads back as the same float32 bytes; one it does not hold exactly, and
    any other dtype, is stored as it is."""
    import tvm

    rng = np.random.default_rng(0)
    exact = rng.standard_normal((64, 3)).astype(np.float16).astype(np.float32)
    exact[0, :] = [np.float32(2.0 ** -24), -0.0, 65504.0]  # subnormal, -0, float16's max
    inexact = exact.copy()
    inexact[5, 1] += np.float32(1e-6)
    ints = np.arange(9, dtype=np.int8)
    arrays = [exact, inexact, ints]
    written = save_params([tvm.runtime.tensor(a) for a in arrays], tmp_path / "w.params",
                          narrow_float16=True)
    assert written == exact.nbytes // 2 + inexact.nbytes + ints.nbytes
    stored = tvm.runtime.load_param_dict_from_file(str(tmp_path / "w.params"))
    assert {k: str(v.dtype) for k, v in stored.items()} == {
        "param_0000.widen": "float16", "param_0001": "float32", "param_0002": "int8"}
    back = load_params(tmp_path / "w.params")
    assert [str(b.dtype) for b in back] == ["float32", "float32", "int8"]
    assert [b.numpy().tobytes() for b in back] == [a.tobytes() for a in arrays]
    # without narrow_float16 nothing changes
    assert save_params([tvm.runtime.tensor(exact)], tmp_path / "p.params") == exact.nbytes


def test_a_widen_tensor_that_is_not_float16_is_a_clear_error(tmp_path):
    import tvm

    from pipeline.core.errors import CorruptInputError

    tvm.runtime.save_param_dict_to_file(
        {"param_0000.widen": tvm.runtime.tensor(np.ones(4, np.float32))},
        str(tmp_path / "w.params"))
    with pytest.raises(CorruptInputError, match="param_0000.widen is float32, not float16"):
        load_params(tmp_path / "w.params")


def test_a_truncated_param_file_is_a_clear_error(tmp_path):
    import tvm

    from pipeline.core.errors import CorruptInputError

    save_params([tvm.runtime.tensor(np.ones(1000, np.float32))], tmp_path / "w.params")
    data = (tmp_path / "w.params").read_bytes()
    (tmp_path / "w.params").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInputError, match="cannot read the weights file .* rebuild"):
        load_params(tmp_path / "w.params")


def test_lifted_weights_run_bit_identically(tmp_path):
    """The compile stage's order: lower, lift, build; main(x, *weights) == the embedded."""
    import tvm
    from tvm import relax

    from pipeline.stages.compile_model import lower_and_schedule

    low, target, _ = lower_and_schedule(_module(), "cpu", "float32", None, "")
    embedded = tvm.compile(low, target=target)
    lifted, weights = lift_constants(low)
    outside = tvm.compile(lifted, target=target)
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, 3, 8, 8))
                           .astype(np.float32))
    want = relax.VirtualMachine(embedded, tvm.cpu())["main"](x).numpy()
    got = relax.VirtualMachine(outside, tvm.cpu())["main"](x, *weights).numpy()
    assert got.tobytes() == want.tobytes()


def test_a_module_with_lifted_weights_needs_its_params_file(tmp_path):
    import tvm

    from pipeline.compiler.workloads import load_module
    from pipeline.core.errors import CorruptInputError

    lifted, weights = lift_constants(_module())
    (tmp_path / "module.json").write_text(tvm.ir.save_json(lifted))
    with pytest.raises(CorruptInputError, match="module.params is missing"):
        load_module(tmp_path / "module.json")
    save_params(weights, tmp_path / "module.params")
    assert num_inputs(load_module(tmp_path / "module.json")["main"]) == 1


def test_cpu_weights_sit_at_staggered_page_offsets():
    """Each weight in its own buffer at its own page offset (never TVM's 0 or 64), values
    unchanged, the file's copies released as they are placed."""
    import tvm

    from pipeline.runtime.params import page_offset, staggered_weights

    rng = np.random.default_rng(0)
    values = [rng.standard_normal((i + 1, 1024)).astype(np.float32) for i in range(70)]
    loaded = [tvm.runtime.tensor(v, tvm.cpu()) for v in values]
    placed = staggered_weights(loaded)
    assert loaded == [None] * 70
    offsets = [t.data_ptr() % 4096 for t in placed]
    assert offsets == [page_offset(i) for i in range(70)]
    assert len(set(offsets[:62])) == 62 and min(offsets) >= 128
    assert all(o % 64 == 0 for o in offsets)
    for v, t in zip(values, placed):
        np.testing.assert_array_equal(t.numpy(), v)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8", "uint8", "int32"])
def test_staggered_weights_keep_every_dtype_bit_exact(dtype):
    """bfloat16 has no numpy dtype DLPack takes: the bytes are copied by TVM, not numpy."""
    import tvm

    from pipeline.runtime.params import page_offset, staggered_weights

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 255, (3, 4 * 64), dtype=np.uint8)
    source = tvm.runtime.tensor(raw, tvm.cpu())._create_view((3, 64 * 4 // tvm.runtime.DataType(
        dtype).itemsize), dtype)
    empty = tvm.runtime.tensor(np.zeros((0, 4), np.float32), tvm.cpu())
    placed = staggered_weights([source, empty])
    assert str(placed[0].dtype) == dtype and placed[0].shape == source.shape
    assert placed[0].data_ptr() % 4096 == page_offset(0)
    back = tvm.runtime.tensor(np.zeros_like(raw), tvm.cpu())
    placed[0].copyto(back._create_view(source.shape, dtype))
    np.testing.assert_array_equal(back.numpy(), raw)
    assert placed[1].shape == (0, 4)


# what both C++ drivers below start with: weights.h and a plain allocator
_DRIVER_PRELUDE = r"""
#include <cstdio>
#include "weights.h"
namespace ffi = tvm::ffi;
struct Plain {
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, ffi::GetDataSize(*t) + 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};
"""

_PLACEMENT_DRIVER = _DRIVER_PRELUDE + r"""
int main() {
  int64_t shape[2] = {3, 100};
  ffi::Tensor host = ffi::Tensor::FromNDAlloc(Plain{}, ffi::ShapeView(shape, 2),
                                              DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
  for (int i = 0; i < 300; ++i) static_cast<float*>(host.data_ptr())[i] = 0.5f * i;
  for (int64_t k = 0; k < 100; ++k) {
    ffi::Tensor w = weight_memory::staggered_copy(host, k);
    const float* d = static_cast<const float*>(w.data_ptr());
    size_t offset = static_cast<size_t>(reinterpret_cast<uintptr_t>(d) % 4096);
    std::printf("%zu %g %g\n", offset, d[1], d[299]);
  }
}
"""


def test_the_cpp_app_places_weights_by_the_same_rule(tmp_path):
    """runtime_cpp/weights.h against pipeline.runtime.params.page_offset, compiled and run."""
    import subprocess

    from pipeline.runtime.params import page_offset

    driver = _build_driver(tmp_path, _PLACEMENT_DRIVER)
    lines = subprocess.run([driver], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    rows = [line.split() for line in lines if line]
    assert [int(r[0]) for r in rows] == [page_offset(k) for k in range(100)]
    assert all(r[1:] == ["0.5", "149.5"] for r in rows)


_WIDEN_DRIVER = _DRIVER_PRELUDE + r"""
int main() {
  // every float16 code, through the tensor widening the app does for "param_NNNN.widen"
  int64_t shape[1] = {65536};
  ffi::Tensor narrow = ffi::Tensor::FromNDAlloc(Plain{}, ffi::ShapeView(shape, 1),
                                                DLDataType{kDLFloat, 16, 1}, DLDevice{kDLCPU, 0});
  for (uint32_t c = 0; c < 65536; ++c) static_cast<uint16_t*>(narrow.data_ptr())[c] = c;
  ffi::Tensor wide = weight_memory::widened_float32(narrow);
  std::fwrite(wide.data_ptr(), sizeof(float), 65536, stdout);
}
"""


def _build_driver(tmp_path, source: str) -> Path:
    import shutil
    import subprocess

    import tvm_ffi.libinfo as ffi_info

    if shutil.which("g++") is None:
        pytest.skip("g++ is needed")
    (tmp_path / "driver.cc").write_text(source)
    lib = ffi_info.find_libtvm_ffi()
    runtime_cpp = Path(__file__).resolve().parents[1] / "runtime_cpp"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                    f"-I{runtime_cpp}", f"-I{ffi_info.find_include_path()}",
                    f"-I{ffi_info.find_dlpack_include_path()}", "driver.cc", lib,
                    f"-Wl,-rpath,{Path(lib).parent}", "-o", "driver"],
                   cwd=tmp_path, check=True)
    return tmp_path / "driver"


def test_the_cpp_app_widens_every_float16_code_as_numpy_does(tmp_path):
    """runtime_cpp/weights.h's float16 -> float32 (weights stored ``.widen``): all 65536
    codes, subnormals, infinities and NaN payloads included, bit for bit."""
    import subprocess

    out = subprocess.run([_build_driver(tmp_path, _WIDEN_DRIVER)], capture_output=True,
                         check=True).stdout
    got = np.frombuffer(out, dtype=np.uint32)
    want = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    assert got.shape == want.shape
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
