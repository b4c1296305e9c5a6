"""Stage ``source``: the fp32 ONNX model, from a generator in models/ or a local file.

The model is checked, the declared inputs must match the graph's, and it is normalised
(:mod:`pipeline.onnx_normalize`): weights listed as inputs dropped, IR version and opset
raised (onnxruntime's quantizer and TVM's importer want opset >= 13), declared input shapes
fixed, constant and shape subgraphs folded. A bad file fails here with a message saying
what to do, before any expensive stage runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError, CorruptInputError
from pipeline.frontend import onnx_normalize

MIN_OPSET = 13
ONNX_DTYPES = {1: "float32", 10: "float16", 3: "int8", 2: "uint8", 6: "int32", 7: "int64"}


@dataclass(frozen=True)
class SourceConfig:
    model: str
    seed: int  # of a generator's weights
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    kind: str = "file"  # "generator" (a module in models/) or "file" (a local ONNX file)


def load_onnx(path: Path, keep_big_data_outside: bool = False):
    """``(model, external, data_dir)``: an ONNX file loaded and checked, its external data
    read in (``external``: it had some; ``data_dir`` None). A corrupt or truncated file, or
    missing external data, gets a clear error.

    ``keep_big_data_outside``: a model whose tensors exceed
    :data:`~pipeline.frontend.onnx_normalize.EXTERNAL_DATA_ABOVE` is returned without its
    external data, ``data_dir`` naming where it lies (read later, once: see
    ``onnx_normalize.normalize(data_dir=...)``).
    """
    import onnx

    if not path.is_file():
        raise ConfigError(f"ONNX file {path} does not exist; fix [source] path in the spec")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, others on truncation
        raise CorruptInputError(
            f"cannot parse ONNX file {path}: {type(e).__name__}: {e}. The file is corrupt or "
            "truncated; re-export the model (or re-copy the file) and build again.") from None
    external = onnx_normalize.has_external_data(model)
    if (keep_big_data_outside and external and onnx_normalize.stored_size(model, path.parent)
            > onnx_normalize.EXTERNAL_DATA_ABOVE):
        try:
            onnx.checker.check_model(str(path))  # by path: also checks the data files
        except Exception as e:
            raise CorruptInputError(f"ONNX file {path} fails onnx.checker: {e}. Copy its "
                                    "external data next to it (or re-export it) and build "
                                    "again.") from None
        return model, external, path.parent
    try:
        onnx_normalize.inline_external_data(model, path.parent)
    except Exception as e:
        raise CorruptInputError(f"cannot read the external data of ONNX file {path}: "
                                f"{type(e).__name__}: {e}. Copy the data files next to it "
                                "(or re-export the model) and build again.") from None
    try:
        onnx_normalize.check(model, path)
    except Exception as e:
        raise CorruptInputError(f"ONNX file {path} fails onnx.checker: {e}. Re-export it with "
                                "a current exporter.") from None
    return model, external, None


def _generate(generator: Path, seed: int, out: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"_gen_{generator.stem}", generator)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load generator {generator}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(str(out), seed=seed)


def check_inputs(model, declared, where: str) -> None:
    """The spec's inputs must be graph inputs with compatible shape and dtype."""
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    problems = []
    for name, shape, dtype in declared:
        gi = graph_inputs.get(name)
        if gi is None:
            problems.append(f"input {name!r} is not a graph input (graph inputs: "
                            f"{', '.join(sorted(graph_inputs)) or 'none'})")
            continue
        t = gi.type.tensor_type
        gdtype = ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}")
        if gdtype != dtype:
            problems.append(f"input {name!r}: spec says {dtype}, model has {gdtype}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) != len(shape) or any(g is not None and g != s for g, s in zip(dims, shape)):
            shown = tuple(d if d is not None else "?" for d in dims)
            problems.append(f"input {name!r}: spec shape {tuple(shape)} does not fit the "
                            f"model's {shown}")
    missing = sorted(set(graph_inputs) - {n for n, _, _ in declared})
    if missing:
        used = {i for n in model.graph.node for i in n.input}
        shown = ", ".join(m if m in used else f"{m} (not used by any node)" for m in missing)
        problems.append(
            f"graph inputs not declared in the spec: {shown}. They are not weights "
            "(no initializer): give each an [[inputs]] entry with its name, shape and dtype "
            "(and calibration data for it: one data_dir subfolder per input), or, if it is "
            "a constant, store it in the model as an initializer (or remove it if unused) "
            "and re-export")
    if problems:
        raise ConfigError(f"{where}: the spec's [[inputs]] do not match the model:\n  - "
                          + "\n  - ".join(problems))


def run(config: SourceConfig, given: Path, out_dir: Path) -> dict:
    """Write ``out_dir/model.onnx``: checked, normalised, inputs exactly as declared.

    A model given with ONNX external data, or whose tensors exceed
    :data:`~pipeline.frontend.onnx_normalize.EXTERNAL_DATA_ABOVE`, is written with external
    data too: ``model.onnx`` plus ``model.onnx.data`` (every later stage reads and writes
    that format; ``model.onnx`` records the data file's sha256, so its own bytes change with
    the weights). Weights are never held twice in memory (generated models come through a
    scratch file, read back, then deleted).
    """
    import tempfile

    out = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        path = Path(given)
        if config.kind == "generator":
            path = Path(scratch) / "model.onnx"
            _generate(Path(given), config.seed, path)
        model, external, data_dir = load_onnx(path, keep_big_data_outside=True)
        declared = {name for name, _, _ in config.inputs}
        dropped = onnx_normalize.drop_weight_inputs(model, declared)
        check_inputs(model, config.inputs, config.model)
        model, norm = onnx_normalize.normalize(model, config.inputs, MIN_OPSET, out_dir,
                                               data_dir=data_dir)
    norm = {**dropped, **norm}
    norm["summary"] = onnx_normalize.summary(norm)
    weights = onnx_normalize.tensor_bytes(model)
    external = external or weights > onnx_normalize.EXTERNAL_DATA_ABOVE
    ops = sorted({n.op_type for n in model.graph.node})
    nodes = len(model.graph.node)
    onnx_normalize.save_model(model, out, external)
    del model
    if external:
        import onnx

        onnx.checker.check_model(str(out))  # by path: the proto may be past 2 GiB
    opset_before, opset = norm["opset"]
    return {"opset": opset, "upgraded_from": opset_before if opset_before < opset else None,
            "nodes": nodes, "op_types": ops, "normalisation": norm,
            "tensor_bytes": weights, "external_data": external}
