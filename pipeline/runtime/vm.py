"""TVM in Python: run an exported Relax executable on the CPU or a CUDA device.

The reference the C++ app is compared with (smoke, validate) and a bench runner.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.errors import StageFailed


def python_vm_outputs(model_so: Path, feeds: list[np.ndarray], device: str = "cpu"):
    """Run ``main`` of an exported Relax executable in Python; returns numpy outputs.

    The weights (``model.params`` next to ``model.so``, when the compile stage lifted them)
    follow the inputs, as the C++ app passes them.
    """
    import tvm
    from tvm import relax

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    module = _load_cuda_module(model_so, dev) if device == "cuda" else \
        tvm.runtime.load_module(str(model_so))
    vm = relax.VirtualMachine(module, dev)
    out = vm["main"](*[tvm.runtime.tensor(x, dev) for x in feeds], *model_weights(model_so, dev))
    outs = [out] if hasattr(out, "numpy") else list(out)  # one tensor, or a tuple of them
    return [o.numpy() for o in outs]


_WEIGHTS: dict[tuple, list] = {}


def model_weights(model_so: Path, dev) -> list:
    """The weights ``main`` takes after its inputs, on ``dev``: ``model.params`` next to
    ``model.so`` (none if there is no such file: weights inside the executable).

    Kept for the last file loaded (validate runs one model on several inputs; a 2 GiB model
    is read once), keyed by the file's path, size and mtime.
    """
    from pipeline.runtime.params import load_params, params_path, staggered_weights

    path = params_path(model_so)
    if not path.is_file():
        return []
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, str(dev))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # one model's weights at a time
        weights = load_params(path)
        if dev.dlpack_device_type() != 1:  # not the CPU: copy once
            weights = [w.copyto(dev) for w in weights]
        else:  # as the C++ app places them (each at its own page offset)
            weights = staggered_weights(weights)
        _WEIGHTS[key] = weights
    return _WEIGHTS[key]


def cuda_compile_mode() -> str:
    """How the Python VM compiles a CUDA model's kernels when it loads it.

    TVM's ``tvm_callback_cuda_compile`` uses NVRTC unless ``TVM_CUDA_COMPILE_MODE=nvcc``,
    and NVRTC needs the ``cuda-bindings`` package. Where that is missing and ``nvcc`` is on
    PATH (a machine that packages CUDA artifacts has it), nvcc is chosen, as the app's build
    does; an explicit ``TVM_CUDA_COMPILE_MODE`` is always kept.
    """
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE")
    if mode:
        return mode
    if importlib.util.find_spec("cuda") is not None and \
            importlib.util.find_spec("cuda.bindings") is not None:
        return "nvrtc"
    if shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"  # read by TVM's callback at call time
        return "nvcc"
    raise StageFailed("smoke", "the Python VM cannot compile CUDA kernels: neither the "
                      "cuda-bindings package (NVRTC) nor nvcc is available; "
                      "`pip install cuda-bindings` or put the CUDA toolkit's nvcc on PATH")


_CUDA_MODULES: dict[tuple[str, int, int, str], object] = {}


def _load_cuda_module(model_so: Path, dev):
    """Load a CUDA ``model.so`` in Python, compiling its kernels for this GPU's own SM.

    The kernels are compiled inside a CUDA target scope naming the device's ``sm_XY``: TVM's
    callback reads the arch from it, so the flags match the app's fatbins (without it, an
    sm_90 device would get ``sm_90a``). The loaded module is kept per file version: validate
    loads the same model once per input, and each load would compile every kernel again.
    """
    import tvm

    mode = cuda_compile_mode()
    st = os.stat(model_so)
    key = (os.path.realpath(model_so), st.st_size, st.st_mtime_ns, mode)
    if key not in _CUDA_MODULES:
        major, minor = str(dev.compute_version).split(".")[:2]
        with tvm.target.Target({"kind": "cuda", "arch": f"sm_{major}{minor}"}):
            _CUDA_MODULES[key] = tvm.runtime.load_module(str(model_so))
    return _CUDA_MODULES[key]


def cuda_device_name() -> str:
    try:
        import tvm

        dev = tvm.cuda(0)
        return f"{dev.device_name} (sm_{str(dev.compute_version).replace('.', '')})"
    except Exception:  # only a label
        return "cuda:0"


# CUresult codes of the driver API (cuda.h) that mean "no GPU here", not "broken":
# no device, or only the toolkit's stub libcuda (no driver installed).
_CU_NO_DEVICE = {100: "CUDA_ERROR_NO_DEVICE", 34: "CUDA_ERROR_STUB_LIBRARY"}


def _driver_device_count(load=None) -> int:
    """GPUs the NVIDIA driver sees: 0 without a driver (no ``libcuda.so.1``) or device.

    Any other driver error (a driver/kernel-module mismatch, an unsupported GPU, a driver
    too old for the runtime...) raises :class:`StageFailed` naming the CUresult.
    """
    import ctypes

    load = load or ctypes.CDLL
    try:
        lib = load("libcuda.so.1")
    except OSError:
        return 0  # no NVIDIA driver on this machine
    code = lib.cuInit(0)
    if code == 0:
        count = ctypes.c_int(0)
        code = lib.cuDeviceGetCount(ctypes.byref(count))
        if code == 0:
            return int(count.value)
    if code in _CU_NO_DEVICE:
        return 0
    raise StageFailed("cuda", f"the NVIDIA driver (libcuda.so.1) fails with CUresult {code} "
                      f"({_cu_error_name(lib, code)}): the GPU is there but CUDA is broken; "
                      "check `nvidia-smi`, the driver and kernel module versions, and "
                      "`dmesg` (this is not 'no GPU': nothing was skipped)")


def _cu_error_name(lib, code: int) -> str:
    import ctypes

    try:
        name = ctypes.c_char_p()
        if lib.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
            return name.value.decode()
    except (AttributeError, OSError):
        pass
    return "unknown error"


def cuda_available(driver_count=_driver_device_count) -> bool:
    """True if TVM can run on a CUDA device here.

    False only when there is no GPU: no NVIDIA driver, or the driver sees no device. Every
    other failure is reported, never read as "no GPU" (which would turn validation into
    "not validated: no CUDA device" instead of a failure): a driver error, or a driver that
    sees a GPU while TVM's CUDA runtime (``libtvm_runtime_cuda.so``, its ``libcudart``)
    cannot use it, raises :class:`StageFailed` with the cause.
    """
    devices = driver_count()
    if devices == 0:
        return False
    try:
        import tvm

        exists = bool(tvm.cuda(0).exist)
    except Exception as e:  # the runtime is installed but broken: say how
        raise StageFailed("cuda", f"the NVIDIA driver sees {devices} GPU(s) but TVM's CUDA "
                          f"runtime fails: {type(e).__name__}: {e}") from None
    if not exists:
        raise StageFailed("cuda", f"the NVIDIA driver sees {devices} GPU(s) but TVM's CUDA "
                          "runtime does not (libtvm_runtime_cuda.so or the libcudart it needs "
                          "failed to load or to initialise: is the CUDA runtime of the TVM "
                          "wheel's major version on the loader path?)")
    return True
