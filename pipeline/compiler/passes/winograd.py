"""Winograd convolution: 3x3 stride-1 float32 convs in NHWC with fewer multiplications.

F(m, 3) computes an m x m block of outputs from an (m+2) x (m+2) input tile with
(m+2)^2 multiplications per input/output channel pair instead of 9 m^2: 2.25x fewer for
F(2, 3), 4x fewer for F(4, 3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016). A conv becomes three kernels:

1. ``winograd_input``: each input tile ``d`` (zero padded at the borders) to ``B^T d B``,
   written as ``V[(m+2)^2, tiles, Cin]``;
2. a batched matmul ``M = V @ U`` (``U = G g G^T``, the weight transformed here, at compile
   time, ``[(m+2)^2, Cin, Cout]``): the bulk of the work, a plain ``relax.matmul`` that
   MetaSchedule tunes like any other;
3. ``winograd_output``: each tile of ``M`` to ``A^T M A``, the m x m outputs in NHWC; the
   conv's epilogue (bias, residual add, relu) fuses into it (its op pattern says so).

The transforms are written out term by term with literal coefficients (zero terms left out,
the two 1-D passes kept apart), so a kernel does ~(m+2)^2 x 2(m+2) additions per tile and
channel, not the (m+2)^4 multiply-adds of the matrix form.

Numerics: exact in real arithmetic; in float32 the transforms add rounding, growing with m
(F(4, 3): ~1e-6 relative per layer here). The fp32 gate (1e-4 relative against
onnxruntime) is what checks a build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ._qdq import op_name, rewrite_calls, shape_of

__all__ = ["WINOGRAD_TILES", "WinogradReport", "has_candidates", "is_transform_kernel",
           "winograd_conv2d", "tile_for", "transform_weight"]

_F = Fraction
# F(m, 3): (A^T [m, a], G [a, 3], B^T [a, a]), a = m + 2; Lavin and Gray's points 0, +-1,
# (+-2, for m = 4) and infinity
WINOGRAD_TILES = {
    2: ([[1, 1, 1, 0],
         [0, 1, -1, -1]],
        [[1, 0, 0],
         [_F(1, 2), _F(1, 2), _F(1, 2)],
         [_F(1, 2), _F(-1, 2), _F(1, 2)],
         [0, 0, 1]],
        [[1, 0, -1, 0],
         [0, 1, 1, 0],
         [0, -1, 1, 0],
         [0, 1, 0, -1]]),
    4: ([[1, 1, 1, 1, 1, 0],
         [0, 1, -1, 2, -2, 0],
         [0, 1, 1, 4, 4, 0],
         [0, 1, -1, 8, -8, 1]],
        [[_F(1, 4), 0, 0],
         [_F(-1, 6), _F(-1, 6), _F(-1, 6)],
         [_F(-1, 6), _F(1, 6), _F(-1, 6)],
         [_F(1, 24), _F(1, 12), _F(1, 6)],
         [_F(1, 24), _F(-1, 12), _F(1, 6)],
         [0, 0, 1]],
        [[4, 0, -5, 0, 1, 0],
         [0, -4, -4, 1, 1, 0],
         [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0],
         [0, 4, 0, -5, 0, 1]]),
}

# The transforms cost ~(m+2)^2 x 2(m+2) additions per tile and channel whatever the channel
# counts; the matmul saves ~(9 m^2 - (m+2)^2) x Cout multiply-adds per tile and input
# channel. So Winograd pays only with enough channels. Measured inside ResNet-50 (AMD EPYC
# Zen 4, 2 threads, tuned): 3x3 64->64 @56x56 1.45 ms as Winograd (matmul 0.67, input
# transform 0.36, output 0.27, and a pad kernel then: 0.15) against 1.06 ms direct;
# 128 @28x28 0.91 vs 1.02; 256 @14x14 0.97 vs 1.05.
MIN_CHANNELS = 128

# TVM's op pattern kinds (relax AnnotateTIROpPattern keeps one a PrimFunc already has)
_OUT_ELEMWISE_FUSABLE = 4  # the epilogue (bias, add, relu) fuses after it
_OPAQUE = 8  # fuses with nothing: the input transform stays a kernel of its own


def tile_for(height: int, width: int) -> int | None:
    """The output tile m for an H x W output: 4 where both divide by 4 (4x fewer
    multiplications), else 2 where both are even, else None (no Winograd: odd sizes)."""
    for m in (4, 2):
        if height % m == 0 and width % m == 0 and height >= 2 * m and width >= 2 * m:
            return m
    return None


def transform_weight(weight_hwio: np.ndarray, m: int) -> np.ndarray:
    """``U[(m+2)^2, Cin, Cout] = G g G^T`` per channel pair of an HWIO 3x3 weight,
    computed in float64, stored float32."""
    _, g, _ = WINOGRAD_TILES[m]
    G = np.array([[float(v) for v in row] for row in g])
    u = np.einsum("ai,ijco,bj->abco", G, weight_hwio.astype(np.float64), G)
    a = m + 2
    return np.ascontiguousarray(u.reshape(a * a, *weight_hwio.shape[2:]).astype(np.float32))


def _combination(coefficients, names) -> str:
    """``sum(c * name)`` in TVMScript, zero terms left out, +-1 without a multiply."""
    terms = []
    for c, name in zip(coefficients, names):
        if c == 0:
            continue
        value = float(c)
        if value == 1:
            terms.append(f"+ {name}")
        elif value == -1:
            terms.append(f"- {name}")
        else:
            terms.append(f"{'+' if value > 0 else '-'} T.float32({abs(value)!r}) * {name}")
    if not terms:
        return "T.float32(0)"
    text = " ".join(terms)
    return text[2:] if text.startswith("+ ") else f"T.float32(0) {text}"


def _two_passes(left, right, tile) -> list[list[str]]:
    """``left . tile . right^T`` as expressions: the row pass ``t = left . tile`` first, its
    terms then combined by ``right`` over columns (2 a^3 terms, not a^4). Written out whole,
    with no names bound: TIR's vectorizer computed wrong values for blocks whose body binds
    values to names (checked by a test), and LLVM merges the repeated loads and sums."""
    size = len(tile[0])
    t = [[f"({_combination(coefficients, [tile[i][j] for i in range(len(tile))])})"
          for j in range(size)] for coefficients in left]
    return [[_combination(coefficients, row) for coefficients in right] for row in t]


def _dims(*sizes: int) -> str:
    """A shape in TVMScript, in int64 as Relax's legalized kernels have theirs (FuseTIR maps
    one Relax tensor to one buffer type across the kernels it fuses)."""
    return "(" + ", ".join(f"T.int64({s})" for s in sizes) + ")"


def _tile_origin(n: int, h: int, w: int, m: int) -> tuple[str, str, str, int]:
    """For tiles numbered ``vp`` over an N x H x W output in m x m tiles: the TVMScript of a
    tile's batch, first row and first column, and the number of tiles. Written into each
    index rather than bound to names (see :func:`_two_passes`)."""
    th, tw = h // m, w // m
    return f"vp // {th * tw}", f"vp % {th * tw} // {tw} * {m}", f"vp % {tw} * {m}", n * th * tw


def _tile_kernel(name: str, params: str, pattern: int, tiles: int, channels: int,
                 reads: str, writes: str, stores: list[str]) -> str:
    """TVMScript of a PrimFunc with one block over (tile ``vp``, channel ``vc``) that makes
    ``stores`` (``buffer[...] = value`` lines)."""
    return "\n".join([
        "@T.prim_func(private=True, s_tir=True)",
        f"def {name}({params}):",
        f"    T.func_attr({{\"tirx.noalias\": True, \"op_pattern\": {pattern}}})",
        f"    for p, ch in T.grid(T.int64({tiles}), T.int64({channels})):",
        f"        with T.sblock(\"{name}\"):",
        "            vp, vc = T.axis.remap(\"SS\", [p, ch])",
        f"            T.reads({reads})",
        f"            T.writes({writes})",
        *(f"            {line}" for line in stores)]) + "\n"


# Kernel names of the transforms (with their fused epilogues): ``tune`` leaves them to the
# CPU rules' Injective schedule unless ``tune_tasks=`` names them. A search here converged
# to that very shape (tiles x channels fused, a parallel outer loop, a 16-lane vector
# inner one), and their candidates build slowly (a long body, unrolled: ~20-30 s each on
# 2 cores), which a new model's first build would pay for every conv shape.
INPUT_KERNEL, OUTPUT_KERNEL = "winograd_input", "winograd_output"  # names the pass gives them
TRANSFORM_KERNEL_PREFIXES = (INPUT_KERNEL, OUTPUT_KERNEL, f"fused_{OUTPUT_KERNEL}")


def is_transform_kernel(name: str) -> bool:
    return name.startswith(TRANSFORM_KERNEL_PREFIXES)


def _plus(index: str, offset: int) -> str:
    return index if offset == 0 else f"{index} {'+' if offset > 0 else '-'} {abs(offset)}"


def _input_source(n: int, h: int, w: int, c: int, m: int) -> str:
    # Reads the unpadded input (no pad kernel before it). A tile's first and last rows and
    # columns can fall outside the image at its border: those reads are clamped into it
    # and multiplied by a 0/1 mask, a condition on the tile alone. Two forms that failed:
    # - a branch (if_then_else): TIR vectorizes the channel loop only over whole-vector
    #   values, and it scalarized every branchy read: 62 us for 14x14x256 against 42 for a
    #   pad kernel and the transform of the padded input (this form: 10 against 23, Zen 4,
    #   2 threads, alone);
    # - Select(inside, x[clamped], 0): TIR's simplifier, knowing ``inside`` within the
    #   select, dropped the clamps, and a select computes both sides: it read a row before
    #   the input (a segfault in the model; a test now runs it between guard pages).
    # A clamped edge pixel times 0 is 0 unless that pixel is inf or nan, and then its
    # tile's outputs are not finite anyway (every output of a tile mixes all its inputs).
    a = m + 2
    _, _, bt = WINOGRAD_TILES[m]
    b, row, col, tiles = _tile_origin(n, h, w, m)
    th, tw = h // m, w // m
    tile_row, tile_col = f"vp % {th * tw} // {tw}", f"vp % {tw}"

    def bound(index: str, offset: int, tile: str, last_tile: int, size: int):
        """(index expression, condition or None) of row/column ``index + offset``."""
        if offset < 0:  # above/left of the image in the first tile row/column
            return f"T.max({_plus(index, offset)}, 0)", f"{tile} > 0"
        if offset == a - 2:  # below/right of it in the last
            return f"T.min({_plus(index, offset)}, {size - 1})", f"{tile} < {last_tile}"
        return _plus(index, offset), None

    def read(i: int, j: int) -> str:
        r, r_ok = bound(row, i - 1, tile_row, th - 1, h)
        q, q_ok = bound(col, j - 1, tile_col, tw - 1, w)
        value = f"x[{b}, {r}, {q}, vc]"
        inside = [cond for cond in (r_ok, q_ok) if cond]
        if not inside:
            return value
        return (f"{value} * T.Select({' and '.join(inside)}, T.float32(1), "
                "T.float32(0))")

    d = [[read(i, j) for j in range(a)] for i in range(a)]
    stores = [f"v[{e * a + k}, vp, vc] = {value}"
              for e, row_e in enumerate(_two_passes(bt, bt, d)) for k, value in enumerate(row_e)]
    return _tile_kernel(
        INPUT_KERNEL, f"x: T.Buffer({_dims(n, h, w, c)}, \"float32\"), "
        f"v: T.Buffer({_dims(a * a, tiles, c)}, \"float32\")", _OPAQUE, tiles, c,
        f"x[{b}, 0:{h}, 0:{w}, vc]", f"v[0:{a * a}, vp, vc]", stores)


def _output_source(n: int, h: int, w: int, k: int, m: int) -> str:
    a = m + 2
    at, _, _ = WINOGRAD_TILES[m]
    b, row, col, tiles = _tile_origin(n, h, w, m)
    tile = [[f"mm[{i * a + j}, vp, vc]" for j in range(a)] for i in range(a)]
    stores = [f"y[{b}, {row} + {r}, {col} + {c}, vc] = {value}"
              for r, row_r in enumerate(_two_passes(at, at, tile))
              for c, value in enumerate(row_r)]
    return _tile_kernel(
        OUTPUT_KERNEL, f"mm: T.Buffer({_dims(a * a, tiles, k)}, \"float32\"), "
        f"y: T.Buffer({_dims(n, h, w, k)}, \"float32\")", _OUT_ELEMWISE_FUSABLE, tiles, k,
        f"mm[0:{a * a}, vp, vc]", f"y[{b}, {row}:{row} + {m}, {col}:{col} + {m}, vc]", stores)


def _parse(source: str):
    from tvm.script import parser
    from tvm.script import tirx as T

    return parser.parse(source, extra_vars={"T": T})


def input_transform(n: int, h: int, w: int, c: int, m: int):
    """The PrimFunc ``winograd_input(x[N, H, W, C], v[(m+2)^2, tiles, C])``: the tiles of
    ``x`` zero-padded by one on each side, transformed."""
    return _parse(_input_source(n, h, w, c, m))


def output_transform(n: int, h: int, w: int, k: int, m: int):
    """The PrimFunc ``winograd_output(mm[(m+2)^2, tiles, K], y[N, H, W, K])``."""
    return _parse(_output_source(n, h, w, k, m))


@dataclass
class WinogradReport:
    """What :func:`winograd_conv2d` rewrote (plain data, for the compile report)."""

    convs: dict = field(default_factory=dict)  # "HxW Cin->Cout F(m,3)" -> count

    def as_dict(self) -> dict:
        return {"convs": dict(sorted(self.convs.items()))}


def _eligible(call, weight_constant: bool = True) -> int | None:
    """The tile m for a conv2d call Winograd computes, or None: NHWC data, HWIO weight
    given as a constant (unless ``weight_constant`` is False: it may still be an expression
    over one), 3x3, stride 1, dilation 1, padding 1, one group, float32, at least
    :data:`MIN_CHANNELS` input and output channels."""
    from tvm import ir

    a = call.attrs
    if (str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO"
            or str(a.out_layout) not in ("NHWC", "") or int(a.groups) != 1
            or [int(s) for s in a.strides] != [1, 1] or [int(d) for d in a.dilation] != [1, 1]
            or [int(p) for p in a.padding] != [1, 1, 1, 1]):
        return None
    data, weight = call.args
    if (weight_constant and not isinstance(weight, ir.Constant)) or \
            str(weight.ty.dtype) != "float32":
        return None
    if str(data.ty.dtype) != "float32" or str(call.ty.dtype) != "float32":
        return None
    kh, kw, cin, cout = shape_of(weight)
    if (kh, kw) != (3, 3) or min(cin, cout) < MIN_CHANNELS:
        return None
    _, h, w, _ = shape_of(call)
    return tile_for(h, w)


def has_candidates(mod) -> bool:
    """Whether ``mod`` (NHWC) has a conv Winograd would compute once its weights are
    folded to constants: a cheap look, so a model without one skips that folding."""
    from tvm import relax

    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in getattr(func.body, "blocks", ()):
            for binding in block.bindings:
                call = binding.value
                if (op_name(call) == "relax.nn.conv2d"
                        and _eligible(call, weight_constant=False) is not None):
                    return True
    return False


def winograd_conv2d(mod, report: WinogradReport | None = None):
    """Every eligible conv2d of ``mod`` (see :func:`_eligible`) as the three Winograd
    kernels. Run after the NHWC layout conversion, before legalization."""
    from tvm import relax

    report = report if report is not None else WinogradReport()
    funcs: dict[tuple, tuple] = {}

    def rewrite(mutator, call):
        if op_name(call) != "relax.nn.conv2d":
            return None
        m = _eligible(call)
        if m is None:
            return None
        data, weight = call.args
        n, h, w, cin = shape_of(data)
        cout = shape_of(weight)[3]
        key = (n, h, w, cin, cout, m)
        bb = mutator.builder_
        if key not in funcs:
            funcs[key] = (bb.add_func(input_transform(n, h, w, cin, m), INPUT_KERNEL),
                          bb.add_func(output_transform(n, h, w, cout, m), OUTPUT_KERNEL))
        to_tiles, from_tiles = funcs[key]
        a, tiles = m + 2, n * (h // m) * (w // m)
        u = relax.const(transform_weight(weight.value.numpy(), m), "float32")
        v = bb.emit(relax.call_tir(to_tiles, [data],
                                   relax.TensorType([a * a, tiles, cin], "float32")))
        mm = bb.emit(relax.op.matmul(v, u))
        name = f"{h}x{w} {cin}->{cout} F({m},3)"
        report.convs[name] = report.convs.get(name, 0) + 1
        return relax.call_tir(from_tiles, [mm],
                              relax.TensorType([n, h, w, cout], "float32"))

    return rewrite_calls(mod, rewrite), report
