"""Before ``ConvertLayout``: rewrite what TVM 0.27's layout rules crash on, fence off the rest.

TVM's ONNX frontend leaves two constructs whose ``FRelaxInferLayout`` rules fail as soon as
a convolution before them is converted (to NHWC, say); both are in common model-zoo exports:

* ``Dropout`` imports as ``R.nn.dropout(x)``, which returns a tuple ``(output, mask)``; its
  layout rule answers one (non-nested) layout for it, and ``ConvertLayout`` stops with
  ``Check failed: (msgs[i].IsNested()) is false: Expected nested to match tuple``
  (squeezenet, alexnet, vgg19, inception_v1 before onnxruntime's folding removes it, and any
  Dropout whose mask output is used). At inference it is the identity, with a mask of ones
  (exactly what its legalization computes): :func:`remove_inference_dropout`.
* ``Sum``, ``Mean``, ``Max`` and ``Min`` (n-ary) import as ``broadcast_to`` of every input,
  ``R.stack(..., axis=0)`` (a 5-D tensor for 4-D activations) and a reduction over axis 0;
  the layout rule of ``stack`` does not add the new axis to the layout (``Index -1 out of
  bounds 5``, or ``Invalid SLayout: can't find S in source layout ABCDE`` from the reduction
  after it: resnet50, shufflenet). :func:`unstack_nary` folds them into binary ops
  (``add``, ``maximum``, ``minimum``; ``Mean`` divides the sum by n), whose layout rules are
  sound, so a residual ``Sum`` stays in the conv's layout and fuses into its epilogue.

Whatever else uses an op with a known-broken rule (``stack`` not made by an n-ary op,
``rms_norm``; :data:`UNCONVERTED_OPS`) is legalized before ``ConvertLayout`` runs
(:func:`fence_unconverted_ops`): a ``call_tir`` has no layout rule, so ``ConvertLayout``
gives it its inputs in the original layout, converting at the edges of that op, and leaves
the rest of the graph converted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._qdq import op_name, rewrite_calls

__all__ = ["LayoutPrep", "UNCONVERTED_OPS", "fence_unconverted_ops", "prepare_for_layout",
           "remove_inference_dropout", "unstack_nary"]

# Ops whose FRelaxInferLayout fails (or would be wrong) in TVM 0.27: they stay in the
# imported layout. Checked op by op after an NHWC conv (tests/test_lowering.py); a missing
# entry only costs a fallback, a wrong one a crash, so add one only with a failing case.
# relax.stack: the new axis is missing from its layout (above). relax.nn.rms_norm: its rule
# keeps the normalized axes and weight as they were, so an NHWC input fails to legalize
# ("Tensor dimension mismatch in read ndim = 3, indices.size=2") or worse.
UNCONVERTED_OPS = ("relax.nn.dropout", "relax.nn.rms_norm", "relax.stack")

# the frontend's n-ary reduction over the stacked axis -> the binary op it folds into
_NARY = {"relax.sum": "add", "relax.mean": "add", "relax.max": "maximum",
         "relax.min": "minimum"}


@dataclass
class LayoutPrep:
    """What :func:`prepare_for_layout` rewrote (plain data, for the compile report)."""

    dropouts_removed: int = 0
    nary_unstacked: dict = field(default_factory=dict)  # reduce op -> count
    unconverted: dict = field(default_factory=dict)  # op -> count left in the imported layout

    def as_dict(self) -> dict:
        return {"dropouts_removed": self.dropouts_removed,
                "nary_unstacked": dict(sorted(self.nary_unstacked.items())),
                "unconverted_ops": dict(sorted(self.unconverted.items()))}


def remove_inference_dropout(mod, prep: LayoutPrep | None = None):
    """``R.nn.dropout(x)`` -> ``(x, ones_like(x))``; the tuple's items then resolve to ``x``
    and the mask (computed only where it is used). Inference-time semantics, bit-exact."""
    from tvm import relax

    prep = prep if prep is not None else LayoutPrep()
    before = prep.dropouts_removed

    def identity(_, call):
        if op_name(call) != "relax.nn.dropout":
            return None
        prep.dropouts_removed += 1
        x = call.args[0]
        return relax.Tuple([x, relax.op.ones_like(x)])

    out = rewrite_calls(mod, identity)
    return _cleanup(out) if prep.dropouts_removed > before else mod


def unstack_nary(mod, prep: LayoutPrep | None = None):
    """``reduce(stack([broadcast_to(a, S), ...], axis=0), axis=[0])`` -> a chain of binary
    ops on ``a, b, ...`` (they broadcast to ``S`` themselves), broadcast to ``S`` only if
    the chain's shape differs. Left to right, as the reduction adds, so fp32 sums agree."""
    from tvm import relax

    prep = prep if prep is not None else LayoutPrep()
    before = sum(prep.nary_unstacked.values())

    def bound(mutator, expr):
        """The value bound to ``expr`` if it is a var of this function, else expr."""
        if isinstance(expr, relax.Var):
            value = mutator.lookup_binding(expr)
            if value is not None:
                return value
        return expr

    def unbroadcast(mutator, expr):
        """``a`` for a ``broadcast_to(a, S)`` (binary ops broadcast themselves)."""
        value = bound(mutator, expr)
        return value.args[0] if op_name(value) == "relax.broadcast_to" else expr

    def unstack(mutator, call):
        name = op_name(call)
        if name not in _NARY or not _reduces_stacked_axis(call):
            return None
        stacked = bound(mutator, call.args[0])
        if (op_name(stacked) != "relax.stack" or int(stacked.attrs.axis) != 0
                or not isinstance(stacked.args[0], relax.Tuple)):
            return None
        items = [unbroadcast(mutator, item) for item in stacked.args[0].fields]
        binary = getattr(relax.op, _NARY[name])
        normalize = mutator.builder_.normalize
        out = items[0]
        for item in items[1:]:
            out = normalize(binary(out, item))
        if name == "relax.mean":
            out = normalize(relax.op.divide(out, relax.const(len(items), str(call.ty.dtype))))
        if not _same_shape(out.ty.shape, call.ty.shape):
            out = normalize(relax.op.broadcast_to(out, call.ty.shape))
        prep.nary_unstacked[name] = prep.nary_unstacked.get(name, 0) + 1
        return out

    out = rewrite_calls(mod, unstack)
    return _cleanup(out) if sum(prep.nary_unstacked.values()) > before else mod


def fence_unconverted_ops(mod, prep: LayoutPrep | None = None, ops=UNCONVERTED_OPS):
    """Legalize every call to one of ``ops`` now (run inside ``with target:``), so that
    ``ConvertLayout`` sees a ``call_tir`` without a layout rule and keeps it in the
    imported layout, converting only its inputs and outputs."""
    import tvm

    prep = prep if prep is not None else LayoutPrep()
    before = sum(prep.unconverted.values())
    legalize = {name: tvm.ir.Op.get(name).get_attr("FLegalize") for name in ops}

    def fence(mutator, call):
        name = op_name(call)
        if legalize.get(name) is None:
            return None
        prep.unconverted[name] = prep.unconverted.get(name, 0) + 1
        return legalize[name](mutator.builder_, call)

    out = rewrite_calls(mod, fence)
    return out if sum(prep.unconverted.values()) > before else mod


def prepare_for_layout(mod, prep: LayoutPrep | None = None):
    """All three, in order; returns ``(mod, prep)``. Run inside ``with target:``. A module
    with nothing to rewrite is returned as it is (its kernels, and so its tuning records,
    are unchanged)."""
    prep = prep if prep is not None else LayoutPrep()
    mod = remove_inference_dropout(mod, prep)
    mod = unstack_nary(mod, prep)
    mod = fence_unconverted_ops(mod, prep)
    return mod, prep


# ---- helpers ------------------------------------------------------------------------------
def _cleanup(mod):
    """Resolve ``(a, b)[0]`` to ``a`` and drop what became unused."""
    from tvm import relax, transform

    return transform.Sequential([relax.transform.CanonicalizeBindings(),
                                 relax.transform.DeadCodeElimination()])(mod)


def _reduces_stacked_axis(call) -> bool:
    axis = call.attrs.axis
    return (axis is not None and [int(a) for a in axis] == [0]
            and not bool(call.attrs.keepdims))


def _same_shape(a, b) -> bool:
    """Two ``ShapeExpr`` with the same dims (None, an unknown shape, equals nothing)."""
    if a is None or b is None:
        return False
    return [str(x) for x in a.values] == [str(x) for x in b.values]
