"""Source normalisation: make a real-world ONNX export valid input for every later stage.

Old exports (IR 3, opset 9, model-zoo style) list their weights as graph inputs and compute
weights or shapes with ``ConstantOfShape`` / ``Shape -> Gather -> ...`` subgraphs.
onnxruntime's quantizer then asks for those "inputs" in the feed, and TVM's importer trips
over the shape arithmetic. This module drops weight inputs, raises the IR version and the
opset, fixes the declared inputs' shapes, and constant-folds with onnxruntime's *basic*
graph optimisation (portable, standard ops only) with its fusions turned off, so that what
comes out is the same network, with the same input and output names, only without the
constant plumbing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from pipeline.core.errors import PipelineError, UnsupportedModelError

MIN_IR_VERSION = 7  # the IR version of opset 13 (initializers need not be graph inputs)
# The newest IR the pinned onnxruntime (1.31) reads ("max supported IR version: 13"); onnx
# 1.23's helpers write IR 14, so a model saved with them would not even load for folding.
ORT_MAX_IR_VERSION = 13
# Element types newer than IR 13 (onnx TensorProto numbers from 25 up): such a model keeps
# its IR version (and onnxruntime says what it cannot read).
_FIRST_TYPE_AFTER_IR13 = 25
PROTOBUF_LIMIT = 2**31 - 1  # one serialised ModelProto cannot be larger (no external data)
# A model whose tensors add up to more goes through files with ONNX external data when it is
# folded, and is written with external data (the stages after source keep the format):
# protobuf cannot serialise 2 GiB in one message, and folding may grow a model.
EXTERNAL_DATA_ABOVE = 2**30
# Tensors from this size on go to the external data file (smaller ones, scalars and shape
# vectors, stay in the proto).
EXTERNAL_TENSOR_MIN_BYTES = 64
# model.onnx's metadata entry holding the sha256 of its external data file: the bytes of
# model.onnx alone then change whenever the weights do (doit's file_dep and the recipe ids
# downstream hash model.onnx).
DATA_DIGEST_KEY = "onnx2deploy.external_data_sha256"
STANDARD_DOMAINS = ("", "ai.onnx")

# onnxruntime level-1 ("basic") optimisers that rewrite the network rather than fold or
# drop constant plumbing: fusing Conv+BatchNorm or MatMul+Add changes the operators later
# stages (quantize ranges, TVM workloads, tuning records) see, and GeluFusionL1 /
# LayerNormFusionL1 can emit newer or contrib ops. Names as onnxruntime 1.2x-1.31 registers
# them; an unknown name is ignored silently, so normalize() also checks that folding added
# no operator type and no domain (tests/test_onnx_normalize.py checks the fusions stay off).
DISABLED_OPTIMIZERS = (
    "ConstantSharing", "CommonSubexpressionElimination", "MatMulAddFusion", "ReshapeFusion",
    "GeluFusionL1", "GeluFusionL2", "LayerNormFusionL1", "LayerNormFusionL2",
    "TransposeOptimizer", "DoubleQDQPairsRemover", "QDQPropagationTransformer",
    "WeightBiasQuantization", "EnsureUniqueDQForNodeUnit",
    # rewrite rules of Level1_RuleBasedTransformer
    "DivMulFusion", "FuseReluClip", "GemmSumFusion", "GemmTransposeFusion", "NotWhereFusion",
    "ConvAddFusion", "ConvMulFusion", "ConvBNFusion", "PadFusion", "MatmulBNFusion",
    "LabelEncoderFusion",
)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _tensors(graph):
    """Every TensorProto of ``graph``: initializers and attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else []:
                yield from _tensors(sub)
            for sub in attr.graphs:
                yield from _tensors(sub)


def stored_size(model, base_dir: Path) -> int:
    """Bytes of ``model`` with its external data (loaded with ``load_external_data=False``;
    each externally stored tensor counts its ``length``, or the rest of its file)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    total = model.ByteSize()
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            ext = ExternalDataInfo(tensor)
            where = base_dir / ext.location
            size = where.stat().st_size if where.is_file() else 0
            total += ext.length if ext.length else max(size - (ext.offset or 0), 0)
    return total


def tensor_bytes(model) -> int:
    """Bytes of ``model``'s tensors as loaded (the part external data would hold); cheap,
    and valid past protobuf's 2 GiB, where ``ByteSize`` is not."""
    return sum(t.ByteSize() for t in _tensors(model.graph))


def has_external_data(model) -> bool:
    """Whether some tensor of ``model`` (loaded without its data) is stored externally."""
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in _tensors(model.graph))


def data_path(model_path: Path) -> Path:
    """Where :func:`save_model` puts a model's external data: ``model.onnx.data``."""
    return Path(model_path).with_name(Path(model_path).name + ".data")


def save_model(model, path: Path, external: bool) -> None:
    """Write ``model`` to ``path``; with ``external``, its tensors of at least
    :data:`EXTERNAL_TENSOR_MIN_BYTES` go to :func:`data_path` (ONNX external data, one file,
    in graph order: equal models give equal bytes), and ``model.onnx`` records that file's
    sha256 under :data:`DATA_DIGEST_KEY`.

    With ``external`` the tensors of ``model`` are moved out (onnx clears them in place):
    do not use ``model`` afterwards. Never more than one copy of the weights in memory.
    """
    import onnx

    from pipeline.core.hashing import sha256_file

    path = Path(path)
    _strip_digest(model)
    if not external:
        onnx.save_model(model, str(path))
        return
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    data = data_path(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    for tensor in model.graph.initializer:  # in graph order: reproducible offsets
        # integer index/shape tensors stay inline: shape inference cannot read them outside
        if (tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES
                and tensor.data_type not in (TensorProto.INT64, TensorProto.INT32)):
            set_external_data(tensor, data.name)
    write_external_data_tensors(model, str(path.parent))  # appends each, clears raw_data
    if not data.exists():  # no tensor was large enough: an empty file, so the pair exists
        data.touch()
    entry = model.metadata_props.add()
    entry.key, entry.value = DATA_DIGEST_KEY, sha256_file(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())  # the tensors now point into the data file
    os.replace(tmp, path)


def check(model, path: Path | None = None) -> None:
    """``onnx.checker`` on ``model``, or, past protobuf's limit, on the file at ``path``
    (which then holds it with external data)."""
    import onnx

    if path is not None and (tensor_bytes(model) > EXTERNAL_DATA_ABOVE or
                             has_external_data(model)):
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)


def inline_external_data(model, base_dir: Path) -> None:
    """Read external tensor data into ``model`` (in place), as if it had been stored inline.

    onnx leaves ``data_location`` explicitly set to DEFAULT; it is cleared so the bytes are
    those of the same model saved in one file.
    """
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(base_dir))
    for tensor in _tensors(model.graph):
        if tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")


def load_inline(path: Path):
    """An ONNX file with its external data read in, as if it had been stored inline (no
    :data:`DATA_DIGEST_KEY` entry either)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inline_external_data(model, Path(path).parent)
    _strip_digest(model)
    return model


def _strip_digest(model) -> None:
    props = [p for p in model.metadata_props if p.key != DATA_DIGEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)


def drop_weight_inputs(model, declared: set[str]) -> dict:
    """Remove initializers from the graph inputs (in place), unless the spec declares them.

    An initializer the spec does declare becomes a plain input: its stored default value is
    removed, so every later stage treats it as data to feed, not as a weight.
    """
    initializers = {t.name for t in model.graph.initializer}
    dropped = [i.name for i in model.graph.input
               if i.name in initializers and i.name not in declared]
    kept = [i.name for i in model.graph.input if i.name in initializers and i.name in declared]
    if dropped:
        remaining = [i for i in model.graph.input if i.name not in set(dropped)]
        del model.graph.input[:]
        model.graph.input.extend(remaining)
    if kept:
        weights = [t for t in model.graph.initializer if t.name not in set(kept)]
        del model.graph.initializer[:]
        model.graph.initializer.extend(weights)
    return {"initializer_inputs_dropped": len(dropped), "initializer_inputs_kept": kept}


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS),
               default=0)


def upgrade(model, min_opset: int):
    """IR version >= MIN_IR_VERSION and default-domain opset >= ``min_opset``."""
    import onnx
    from onnx import version_converter

    ir_before, opset_before = model.ir_version, _opset(model)
    # IR >= 4 first: at IR 3 the converter insists every initializer is a graph input.
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    if opset_before < min_opset:
        try:
            model = version_converter.convert_version(model, min_opset)
        except Exception as e:
            raise UnsupportedModelError(
                f"onnx's version converter cannot upgrade this model from opset {opset_before} "
                f"to {min_opset}: {e}. Re-export it at opset >= {min_opset}.") from None
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed)
    if (model.ir_version > ORT_MAX_IR_VERSION and needed <= ORT_MAX_IR_VERSION
            and max(_element_types(model), default=0) < _FIRST_TYPE_AFTER_IR13):
        model.ir_version = ORT_MAX_IR_VERSION  # nothing in it needs more
    return model, {"ir_version": [ir_before, model.ir_version],
                   "opset": [opset_before, _opset(model)]}


def _element_types(model) -> set[int]:
    graph = model.graph
    types = {i.data_type for i in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            types.add(info.type.tensor_type.elem_type)
    return types


def fix_input_shapes(model, inputs) -> dict:
    """Give the declared inputs the spec's static shapes (in place), so shapes fold.

    The caller has checked that the spec's shapes fit the model's (symbolic dims aside).
    """
    shapes = {name: shape for name, shape, _ in inputs}
    fixed = {}
    for gi in model.graph.input:
        if gi.name not in shapes:
            continue
        dims = gi.type.tensor_type.shape.dim
        before = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        if before == list(shapes[gi.name]):
            continue
        del dims[:]
        for s in shapes[gi.name]:
            dims.add().dim_value = s
        fixed[gi.name] = [before, list(shapes[gi.name])]
    return fixed


def _used_domains(model) -> set[str]:
    return {n.domain for n in model.graph.node}


def _fold(model, scratch: Path, through_files: bool, data_dir: Path | None = None):
    """onnxruntime basic optimisation (constant folding, no fusions) of ``model``.

    ``through_files``: onnxruntime reads ``model`` from a file with external data in
    ``scratch`` (a model past protobuf's limit cannot be handed over serialised); the
    tensors of ``model`` are moved out into that file (see :func:`save_model`).
    ``data_dir``: ``model`` was loaded without its external data, which lies there; the
    data files are linked into ``scratch`` (copied where links cannot be made), so that
    Python never holds the weights while onnxruntime does. Returns the folded model without
    its data (``folded.data`` in ``scratch``: :func:`inline_external_data` reads it).
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(scratch / "folded.onnx")
    # Large initializers go to a side file: a model folding grows past the protobuf limit
    # is written anyway.
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  "folded.data")
    opts.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1  # folding is cheap; one thread cannot reorder a reduction
    opts.inter_op_num_threads = 1
    given = scratch / "given.onnx"
    if data_dir is not None:
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        for name in sorted({ExternalDataInfo(t).location for t in _tensors(model.graph)
                            if uses_external_data(t)}):
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            # a copy, not a link: onnx refuses to read a data file with several hard links
            # ("hardlink attack"), and the copy costs disk and time, not memory
            shutil.copyfile(data_dir / name, scratch / name)
        given.write_bytes(model.SerializeToString())  # the graph: no tensor data in it
        source = str(given)
    elif through_files:
        save_model(model, given, external=True)
        source = str(given)
    else:
        source = model.SerializeToString()
    try:
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as e:
        raise UnsupportedModelError(
            f"onnxruntime cannot load the model to fold its constants: {e}. The model must "
            "run in onnxruntime (CPU) for every later stage; fix or re-export it.") from None
    del session  # its copy of the weights goes before the folded model is read in
    folded = onnx.load(str(scratch / "folded.onnx"), load_external_data=False)
    _strip_digest(folded)  # (onnxruntime keeps the metadata of given.onnx)
    return folded


def _canonical(folded, original):
    """Strip onnxruntime's save artefacts so the bytes depend only on the graph."""
    used = _used_domains(folded) | {""}
    opsets = sorted((o for o in folded.opset_import if o.domain in used),
                    key=lambda o: o.domain)
    del folded.opset_import[:]
    folded.opset_import.extend(opsets)
    for field in (folded.graph.initializer, folded.graph.value_info):
        items = sorted(field, key=lambda t: t.name)
        del field[:]
        field.extend(items)
    folded.ir_version = original.ir_version
    return folded


def normalize(model, inputs, min_opset: int, work_dir: Path,
              max_bytes: int = EXTERNAL_DATA_ABOVE, data_dir: Path | None = None):
    """Upgrade, fix the declared input shapes and constant-fold ``model``.

    Call :func:`drop_weight_inputs` and check the inputs first. Deterministic: the same
    model gives the same bytes. Input and output names (and order) are kept.

    Parameters
    ----------
    model : onnx.ModelProto whose graph inputs are exactly the declared ``inputs``.
    inputs : the spec's ``(name, shape, dtype)`` tuples.
    min_opset : default-domain opset to upgrade to.
    work_dir : where onnxruntime writes its scratch copy (removed before returning).
    max_bytes : tensors past this many bytes go to onnxruntime through a file with external
        data (protobuf cannot serialise 2 GiB); ``model`` itself is then consumed.
    data_dir : ``model`` was loaded without its external data, which lies in this folder
        (a big model: its weights are read into Python once, after folding, never while
        onnxruntime holds them too).

    Returns
    -------
    (model, info) : the normalised model, and plain data saying what was done.
    """
    import onnx

    through_files = data_dir is not None or tensor_bytes(model) > max_bytes
    in_names = [i.name for i in model.graph.input]
    out_names = [o.name for o in model.graph.output]
    model, info = upgrade(model, min_opset)
    info["fixed_dims"] = fix_input_shapes(model, inputs)
    before = Counter(n.op_type for n in model.graph.node)
    domains = _used_domains(model)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        folded = _fold(model, Path(scratch), through_files, data_dir)
        after = Counter(n.op_type for n in folded.graph.node)
        new_ops = sorted(set(after) - set(before))
        new_domains = sorted(_used_domains(folded) - domains)
        if new_ops or new_domains:
            raise PipelineError(
                f"onnxruntime's basic optimisation rewrote the network (new operators "
                f"{new_ops}, new domains {new_domains}) instead of only folding constants: "
                "this onnxruntime has an optimiser pipeline/onnx_normalize.py does not "
                "disable; add its name to DISABLED_OPTIMIZERS.")
        removed = {op: before[op] - after[op] for op in sorted(before) if before[op] > after[op]}
        if removed:
            model = _canonical(folded, model)  # (on the graph: its data is still outside)
            inline_external_data(model, Path(scratch))
        else:  # nothing folded: keep the model as given (its bytes, value_info, opsets)
            del folded
            if through_files:  # its tensors were moved out into files: read them back
                model = onnx.load(str(Path(scratch) / "given.onnx"), load_external_data=False)
                _strip_digest(model)
                inline_external_data(model, Path(scratch))
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != in_names or got_out != out_names:
        raise PipelineError(f"normalisation changed the graph's inputs/outputs from "
                            f"{in_names} -> {out_names} to {got_in} -> {got_out}")
    if tensor_bytes(model) <= max_bytes:
        onnx.checker.check_model(model)  # (a larger one is checked by path once saved)
    info.update({"nodes_before": sum(before.values()), "nodes_after": len(model.graph.node),
                 "removed_ops": removed})
    return model, info


def summary(info: dict) -> str:
    """One line for the stage report: what normalisation did."""
    parts = []
    if info.get("initializer_inputs_dropped"):
        parts.append(f"dropped {info['initializer_inputs_dropped']} initializer inputs")
    if info.get("initializer_inputs_kept"):
        parts.append(f"kept declared initializer inputs {info['initializer_inputs_kept']} as "
                     "plain inputs")
    ir, opset = info["ir_version"], info["opset"]
    if ir[0] != ir[1]:
        parts.append(f"ir_version {ir[0]} -> {ir[1]}")
    if opset[0] != opset[1]:
        parts.append(f"opset {opset[0]} -> {opset[1]}")
    for name, (was, now) in sorted(info["fixed_dims"].items()):
        parts.append(f"input {name} shape {was} -> {now}")
    if info["removed_ops"]:
        ops = ", ".join(f"{n} {op}" for op, n in info["removed_ops"].items())
        parts.append(f"folded/removed {info['nodes_before'] - info['nodes_after']} nodes "
                     f"({ops})")
    return "; ".join(parts) or "nothing to normalise"
