"""Model weights kept outside the compiled module: TVM's param files, in ``main``'s order.

The import stage writes ``module.params`` next to ``module.json`` (the IR then holds no
weights, only their shapes), the compile stage ``model.params`` next to ``model.so`` (the
weights as the compiled ``main`` takes them, after layout conversion and folding). Both are
TVM's own serialisation (``runtime.SaveParamsToFile``), which the TVM runtime library loads
with no Python (``runtime.LoadParamsFromFile``: what the C++ app calls). Tensors are named
``param_0000``, ``param_0001``, ... in the order ``main`` takes them after its inputs, and
written in that order (TVM's map keeps insertion order), so equal weights give equal bytes.
Loading reads each tensor once into its own buffer: peak memory is one copy of the weights.

A float32 weight whose values are all float16 values (a float16 model compiled as float32
compute on a CPU without float16 arithmetic) may be stored as float16 under the name
``param_NNNN.widen``: the loaders (:func:`load_params`, ``load_weights`` in the C++ app)
widen it back to float32, exactly. The file is then half the size, and ``main`` still gets
float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.errors import CorruptInputError

PREFIX = "param_"
WIDEN_SUFFIX = ".widen"  # stored as float16, main takes it as float32


def param_name(index: int) -> str:
    """The name of ``main``'s ``index``-th weight (the C++ app makes the same: ``param_%04d``)."""
    return f"{PREFIX}{index:04d}"


def params_path(module_file: Path) -> Path:
    """The weights file that goes with ``module.json`` or ``model.so``: same stem, ``.params``."""
    module_file = Path(module_file)
    return module_file.with_name(module_file.name.rsplit(".", 1)[0] + ".params")


def save_params(tensors: Sequence, path: Path, narrow_float16: bool = False) -> int:
    """Write ``tensors`` (TVM tensors, ``main``'s order) to ``path``; returns the bytes
    written for them. ``narrow_float16``: each float32 tensor that float16 holds exactly is
    stored as float16 (``param_NNNN.widen``), for the loaders to widen.

    An empty list still writes a (small) file: every stage output exists whatever the model.
    """
    import tvm

    named = {}
    for i, t in enumerate(tensors):
        narrow = _exact_float16(t) if narrow_float16 else None
        if narrow is None:
            named[param_name(i)] = t
        else:
            named[param_name(i) + WIDEN_SUFFIX] = tvm.runtime.tensor(narrow)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tvm.runtime.save_param_dict_to_file(named, str(tmp))
    os.replace(tmp, path)
    return sum(_nbytes(t) for t in named.values())


def _exact_float16(tensor):
    """``tensor`` as a float16 numpy array if it is float32 and float16 holds every value
    exactly, else None."""
    import numpy as np

    if str(tensor.dtype) != "float32":
        return None
    values = tensor.numpy()
    narrow = values.astype(np.float16)
    return narrow if np.array_equal(narrow.astype(np.float32), values) else None


def _nbytes(tensor) -> int:
    n = 1
    for d in tensor.shape:
        n *= int(d)
    return n * tensor.dtype.itemsize


def load_params(path: Path) -> list:
    """The tensors of a param file, in ``main``'s order (CPU tensors)."""
    import tvm

    if not Path(path).is_file():
        raise CorruptInputError(f"the weights file {path} is missing (it belongs next to the "
                                "module or model.so it was written with); rebuild the artifact")
    try:
        loaded = tvm.runtime.load_param_dict_from_file(str(path))
    except Exception as e:  # noqa: BLE001  (TVM raises its own error types)
        raise CorruptInputError(f"cannot read the weights file {path}: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}. "
                                "It is truncated or not a TVM param file; rebuild the "
                                "artifact") from None
    # TVM's reader does not notice a short file (it reads what is there): the tensors
    # cannot hold more bytes than the file.
    held = sum(_nbytes(t) for t in loaded.values())
    if held > os.path.getsize(path):
        raise CorruptInputError(f"cannot read the weights file {path}: its {len(loaded)} "
                                f"tensors need {held} bytes, the file has "
                                f"{os.path.getsize(path)}: it is truncated; rebuild the "
                                "artifact")
    names = [param_name(i) for i in range(len(loaded))]
    missing = [n for n in names if n not in loaded and n + WIDEN_SUFFIX not in loaded]
    if missing:
        raise CorruptInputError(f"weights file {path} does not hold {', '.join(missing[:3])}: "
                                "not written by this pipeline; rebuild the artifact")
    return [loaded[n] if n in loaded else _widened(loaded[n + WIDEN_SUFFIX], path, n)
            for n in names]


def _widened(tensor, path: Path, name: str):
    """A ``.widen`` tensor (float16) as the float32 tensor ``main`` takes (exact)."""
    import numpy as np
    import tvm

    if str(tensor.dtype) != "float16":
        raise CorruptInputError(f"weights file {path}: {name}{WIDEN_SUFFIX} is "
                                f"{tensor.dtype}, not float16: not written by this pipeline; "
                                "rebuild the artifact")
    return tvm.runtime.tensor(tensor.numpy().astype(np.float32))


PAGE = 4096
_ALIGN = 64  # TVM's kernels assume 64-byte aligned data


def page_offset(index: int) -> int:
    """The page offset (bytes) of weight ``index`` on the CPU: a multiple of 64 in [128, 4096),
    never the 0 or 64 of TVM's own tensors; successive weights 17 slots apart, so 62 in a row
    all differ. runtime_cpp/weights.h (``weight_memory::page_offset``) is the same rule."""
    return ((index * 17) % 62 + 2) * _ALIGN


def staggered_weights(tensors: list) -> list:
    """CPU copies of ``tensors``, each in its own buffer at :func:`page_offset` of its index;
    ``tensors`` is emptied as they are made (peak memory: the weights plus one tensor).

    TVM's reader and allocator put every large tensor at page offset 64 (glibc mmaps it);
    kernels that walk a weight and an activation with power-of-two strides then hit the same
    cache sets with both. Measured (Zen 4, 2 threads, ResNet-50 fp32, alternating runs): the
    1x1 stride-2 conv 1024->2048 @7x7 took 4.2 ms in the model with its weight at offset 64
    and 1.9 ms with it moved. The C++ app places its weights by the same rule.
    """
    import numpy as np
    import tvm

    placed = []
    for i in range(len(tensors)):
        source, tensors[i] = tensors[i], None  # the file's copy goes once this one is placed
        nbytes = _nbytes(source)
        if nbytes == 0:  # nothing to place (numpy gives an empty slice no aligned address)
            placed.append(source)
            continue
        buffer = np.empty(nbytes + page_offset(i) + PAGE, np.uint8)
        start = (-buffer.ctypes.data) % PAGE + page_offset(i)
        # raw bytes through DLPack (it keeps ``buffer`` alive), typed as a TVM view: numpy
        # has no bfloat16 or float8 that DLPack takes
        raw = tvm.runtime.from_dlpack(buffer[start:start + nbytes])
        target = raw._create_view(tuple(int(d) for d in source.shape), source.dtype)
        source.copyto(target)
        placed.append(target)
    return placed
