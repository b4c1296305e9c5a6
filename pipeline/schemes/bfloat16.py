"""The bfloat16 codec: float32 <-> bfloat16 bit patterns (uint16), in numpy.

bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits), so decoding
is a 16-bit shift and exact; encoding rounds to nearest, ties to even, as ``ml_dtypes`` (the
reference the tests compare against, every float32 class included) and hardware
(``vcvtneps2bf16``) do. NaN stays NaN (quieted); infinities and signed zeros are kept;
float32 subnormals round like any other value (bfloat16 has the same exponent range).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    # a NaN could round into the infinity pattern: keep its top bits and force a quiet NaN
    rounded = np.where(nan, (bits >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)


def decode(codes: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(codes, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """The float32 value each element has after a round trip through bfloat16."""
    return decode(encode(values))


def is_bfloat16_exact(values: np.ndarray) -> bool:
    """Whether every element of a float32 array is a bfloat16 value (low 16 bits zero)."""
    values = np.ascontiguousarray(values)
    return values.dtype == np.float32 and not np.any(values.view(np.uint32) & 0xFFFF)


def store_bfloat16(model, weights: Sequence[str]) -> int:
    """Each named float32 initializer rounded to bfloat16, stored as ``<name>.bf16`` and
    decoded by a ``Cast(to=FLOAT)`` named ``<name>`` (in place). Returns how many."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    casts = []
    for name in weights:
        codes = encode(numpy_helper.to_array(inits[name]))
        stored = helper.make_tensor(f"{name}.bf16", TensorProto.BFLOAT16, codes.shape,
                                    codes.tobytes(), raw=True)
        graph.initializer.remove(inits[name])
        graph.initializer.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [name], to=TensorProto.FLOAT,
                                      name=f"{name}.decode"))
    for i, node in enumerate(casts):  # before every consumer: the graph stays sorted
        graph.node.insert(i, node)
    return len(casts)
