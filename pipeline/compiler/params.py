"""Weights out of the IR and back: ``main``'s constants <-> trailing function parameters.

An IRModule whose weights are ``relax.Constant`` s serialises them into its JSON (base64,
several copies in memory while saving or loading: a 2 GiB model would need ~10 GiB), and an
executable built from it carries them inside ``model.so``. :func:`lift_constants` turns
every constant of ``main`` into a parameter appended after the model's inputs (attribute
``num_input`` says how many inputs come first) and returns the tensors, in order, to save
with :mod:`pipeline.runtime.params`; :func:`bind_params` puts them back as constants, giving
a module structurally equal to the one lifted (so lowering, tuning records and kernels are
exactly those of a module that never left memory).
"""

from __future__ import annotations

from pipeline.runtime.params import param_name

NUM_INPUT = "num_input"


def num_inputs(func) -> int:
    """How many of ``func``'s parameters are model inputs (the rest are lifted weights)."""
    if func.attrs is not None and NUM_INPUT in func.attrs:
        return int(func.attrs[NUM_INPUT])
    return len(func.params)


def lift_constants(mod, func_name: str = "main"):
    """``(mod', tensors)``: every tensor constant of ``func_name`` made a parameter.

    The parameters are named ``param_0000``... (:func:`pipeline.runtime.params.param_name`)
    and follow the inputs; a constant used in several places (a tied weight) is one
    parameter. The tensors are the constants' own data (no copy).
    """
    import tvm
    from tvm import relax

    func = mod[func_name]
    if num_inputs(func) != len(func.params):
        raise ValueError(f"{func_name} already takes lifted weights ({NUM_INPUT} is "
                         f"{num_inputs(func)} of {len(func.params)} parameters)")
    taken = {p.name for p in func.params}

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def __init__(self) -> None:
            super().__init__()
            self.vars: list = []
            self.tensors: list = []
            self.by_node: dict = {}

        def visit_generic_const_(self, op):  # TVM 0.27's name for relax.Constant's visitor
            if not isinstance(op.ty, relax.TensorType):
                return op
            var = self.by_node.get(op)
            if var is None:
                name = param_name(len(self.vars))
                if name in taken:
                    raise ValueError(f"input {name!r} clashes with the lifted weights' names")
                var = relax.Var(name, op.ty)
                self.by_node[op] = var
                self.vars.append(var)
                self.tensors.append(op.value)
            return var

    lifter = _Lift()
    body = lifter.visit_expr(func.body)
    lifted = func
    if lifter.vars:
        lifted = relax.Function([*func.params, *lifter.vars], body, func.ret_ty,
                                func.is_pure, func.attrs, func.span)
    # (TVM's ONNX importer sets it too, to the same count)
    lifted = lifted.with_attr(NUM_INPUT, len(func.params))
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs,
                       global_infos=mod.global_infos)
    out[func_name] = lifted
    return out, lifter.tensors


def bind_params(mod, tensors, func_name: str = "main"):
    """Undo :func:`lift_constants`: ``tensors`` (``main``'s order) bound as constants.

    ``num_input`` stays (it then counts every parameter, as TVM's importer sets it)."""
    import tvm
    from tvm import relax

    func = mod[func_name]
    n_in = num_inputs(func)
    weights = func.params[n_in:]
    if len(weights) != len(tensors):
        raise ValueError(f"{func_name} takes {len(weights)} weights, the params file holds "
                         f"{len(tensors)}: they are not from the same build")
    bound = func.bind_params({v: relax.const(t) for v, t in zip(weights, tensors, strict=True)}) \
        if weights else func
    bound = bound.with_attr(NUM_INPUT, n_in)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs,
                       global_infos=mod.global_infos)
    out[func_name] = bound
    return out
