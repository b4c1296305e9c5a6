"""Stage ``validate``: onnxruntime vs TVM in Python vs the shipped C++ binary, on the same inputs.

Every artifact runs the same validation inputs (seeded synthetic, or ``.npy`` files) through
onnxruntime (the fp32 model, and the QDQ model for a quantized variant), through the Relax VM
in Python on the packaged ``model.so``, and through the packaged ``bin/infer``. Each pair of
results is one *comparison* with its metrics and, where DESIGN.md sets one, its gates:

=========================  =========================================================  =======
comparison                 gates                                                      when
=========================  =========================================================  =======
``tvm_fp32_vs_ort_fp32``   max abs err <= fp32_rel_tol * max(1, max abs ref); top-1    fp32
``tvm_int8_vs_ort_int8``   cosine >= int8_cosine_min; top-1 agreement >=              int8
                           int8_top1_min; max error <= int8_max_steps output steps
``tvm_int8_vs_ort_dynamic``  as ``tvm_int8_vs_ort_int8``; the output step is the     int8_dynamic
                           reference output's own dynamic step (see
                           :func:`dynamic_step`): its outputs are float
``tvm_int8_vs_ort_fp32``   cosine >= int8_fp32_cosine_min (quantization quality as    int8,
                           the artifact delivers it: a ruined model fails)            int8_dynamic
``ort_int8_vs_ort_fp32``   none (quantization quality of the quantized model itself)  quantized
``tvm_vs_ort_quantized``   max abs err <= quantized_rel_tol * max(1, max abs ref)     w4g32...
                           (TVM and onnxruntime run the same quantized ONNX; a model
                           with int8 activations, mixed: within int8_max_steps steps)
``tvm_vs_ort_fp32_quality``  cosine >= quality_cosine_min (quantization quality as    w4g32...
                           the artifact delivers it)
``tvm_fp16_vs_ort_fp16``   max abs err <= fp16_rel_tol * max(1, max abs ref)          fp16
``tvm_bf16_vs_ort_bf16``   as ``tvm_fp32_vs_ort_fp32`` (float32 compute on the same   bf16
                           bfloat16-valued weights)
``tvm_<f>_vs_ort_fp32``    cosine >= <f>_fp32_cosine_min (f: fp16, bf16)              f
``ort_<f>_vs_ort_fp32``    none (the converted model's own quality)                   f
``cpp_vs_tvm_python``      bit-identical on CPU; on GPU max abs err <= gpu_rel_tol *   always
                           max(1, max abs ref)
=========================  =========================================================  =======

Metric definitions (``reference`` is the right-hand side of the comparison name):

- ``max_abs_err``: max |actual - reference| over the elements.
- ``max_rel_err``: ``max_abs_err / max(1, max |reference|)``, the normalisation of the fp32
  gate; an elementwise ratio would blow up on the near-zero logits every classifier has.
- ``cosine``: cosine similarity of the flattened tensors (1 when both are all zero).
- ``top1_agreement`` / ``top5_agreement``: rows are the tensor reshaped to (-1, last axis),
  i.e. one row per sample of a classifier's (batch, classes) output. Top-1: fraction of rows
  whose argmax agrees. Top-5: mean overlap of the two top-5 index sets (|A & B| / 5).
- ``sqnr_db``: 10 log10(sum reference^2 / sum (actual - reference)^2); ``"inf"`` if equal.
- ``max_err_steps``: ``max_abs_err`` in output quantization steps (see :func:`output_steps`;
  for dynamic quantization, whose outputs are float, :func:`dynamic_step`).
- ``mismatched_elements``: elements whose bytes differ (C++ vs Python only).

Aggregates over inputs are worst cases (max errors, min cosine/SQNR), except the top-k
agreements, which pool every row of every input. A failed gate names the input index.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ConfigError, ValidationFailed
from pipeline.core.hashing import jsonable
from pipeline.core.spec import ValidationSpec
from pipeline.runtime import kit_check, ort_reference
from pipeline.runtime.artifact import ArtifactUnderTest

if TYPE_CHECKING:
    pass

STAGE = "validate"
NO_CUDA = "not validated: no CUDA device"
KIT_REPORT = "kit_report.json"  # where validate looks for a kit's report: artifacts/<a>/<t>/

FP32 = "tvm_fp32_vs_ort_fp32"
INT8 = "tvm_int8_vs_ort_int8"
INT8_QUALITY = "tvm_int8_vs_ort_fp32"
DYNAMIC = "tvm_int8_vs_ort_dynamic"  # int8_dynamic: the same quantize_dynamic model
ORT_QUALITY = "ort_int8_vs_ort_fp32"  # name kept from int8: any quantized ONNX vs fp32
QUANTIZED = "tvm_vs_ort_quantized"
QUALITY = "tvm_vs_ort_fp32_quality"
FP16, FP16_QUALITY, ORT_FP16_QUALITY = ("tvm_fp16_vs_ort_fp16", "tvm_fp16_vs_ort_fp32",
                                        "ort_fp16_vs_ort_fp32")
BF16, BF16_QUALITY, ORT_BF16_QUALITY = ("tvm_bf16_vs_ort_bf16", "tvm_bf16_vs_ort_fp32",
                                        "ort_bf16_vs_ort_fp32")
CPP = "cpp_vs_tvm_python"
# comparisons whose reference is onnxruntime on the quantize stage's model; the int8 ones
# run it in the session pipeline.runtime.ort_reference picks for this CPU
_ON_QUANTIZED = {INT8: True, DYNAMIC: True, INT8_QUALITY: True, ORT_QUALITY: True, QUANTIZED: True,
                 QUALITY: True, FP16: False, ORT_FP16_QUALITY: False, BF16: False,
                 ORT_BF16_QUALITY: False}
# the gate key of each "TVM vs onnxruntime fp32" quality comparison
_QUALITY_GATES = {INT8_QUALITY: "int8_fp32_cosine_min", QUALITY: "quality_cosine_min",
                  FP16_QUALITY: "fp16_fp32_cosine_min", BF16_QUALITY: "bf16_fp32_cosine_min"}

_TITLES = {FP32: "TVM fp32 vs onnxruntime fp32", INT8: "TVM int8 vs onnxruntime int8 (QDQ)",
           DYNAMIC: "TVM int8 vs onnxruntime int8 (dynamic quantization)",
           INT8_QUALITY: "TVM int8 vs onnxruntime fp32 (quality)",
           ORT_QUALITY: "onnxruntime quantized vs onnxruntime fp32 (reported)",
           QUANTIZED: "TVM vs onnxruntime on the same quantized ONNX",
           QUALITY: "TVM quantized vs onnxruntime fp32 (quality)",
           FP16: "TVM fp16 vs onnxruntime fp16", BF16: "TVM bf16 vs onnxruntime bf16",
           FP16_QUALITY: "TVM fp16 vs onnxruntime fp32 (quality)",
           BF16_QUALITY: "TVM bf16 vs onnxruntime fp32 (quality)",
           ORT_FP16_QUALITY: "onnxruntime fp16 vs onnxruntime fp32 (reported)",
           ORT_BF16_QUALITY: "onnxruntime bf16 vs onnxruntime fp32 (reported)",
           CPP: "C++ binary vs TVM in Python"}
QUALITY_HINT = (" (quantization lost too much against fp32: quantize fewer ops, e.g. "
                "op_types = [\"MatMul\", \"Gemm\"] for a transformer, exclude the nodes that "
                "suffer with exclude_nodes, calibrate on real data, or set "
                "int8_fp32_cosine_min in [variants.<v>.validation] if this quality is "
                "acceptable)")
WEIGHT_ONLY_HINT = (" (quantization lost too much against fp32: keep the sensitive layers in "
                    "float with exclude_nodes (often the first and last MatMul), use a "
                    "smaller group (w4g32) or 8 bits (w8g128), or set quality_cosine_min in "
                    "[variants.<v>.validation] if this quality is acceptable)")
_HINTS = {INT8_QUALITY: QUALITY_HINT, QUALITY: WEIGHT_ONLY_HINT}
_OPS: dict[str, Callable[[Any, Any], bool]] = {"<=": operator.le, ">=": operator.ge,
                                               "==": operator.eq}
_METRICS = ("max_abs_err", "max_rel_err", "cosine", "top1_agreement", "top5_agreement",
            "sqnr_db", "max_err_steps", "mismatched_elements")


def resolve_gates(gates: Mapping[str, Any] | ValidationSpec | None) -> dict[str, Any]:
    """The spec's defaults overridden by ``gates``; an unknown key is a :class:`ConfigError`."""
    if isinstance(gates, ValidationSpec):
        return asdict(gates)
    resolved = asdict(ValidationSpec())
    unknown = sorted(set(gates or {}) - set(resolved))
    if unknown:
        raise ConfigError(f"unknown validation setting(s) {', '.join(unknown)}; known: "
                          f"{', '.join(f.name for f in fields(ValidationSpec))}")
    resolved.update(gates or {})
    return resolved


# ----------------------------------------------------------------------------- metrics

def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim == 0 else x.reshape(-1, x.shape[-1])


def compare(actual: np.ndarray, reference: np.ndarray, step: float | None = None,
            bitwise: bool = False) -> dict[str, Any]:
    """Metrics of one output tensor against its reference (definitions: module docstring).

    Parameters
    ----------
    actual, reference : numpy.ndarray
        Same shape; compared in float64.
    step : float, optional
        Output quantization step; adds ``max_err_steps``.
    bitwise : bool
        Add ``mismatched_elements`` (bytes compared, so dtypes must match too).

    Returns
    -------
    dict
        Metric name to value; ``shape_ok`` False (and no metrics) when shapes differ.
        ``top1_agree``/``top5_overlap``/``rows`` are the counts behind the pooled agreements.
    """
    if actual.shape != reference.shape or (bitwise and actual.dtype != reference.dtype):
        return {"shape_ok": False, "actual": f"{list(actual.shape)} {actual.dtype}",
                "reference": f"{list(reference.shape)} {reference.dtype}"}
    from pipeline.runtime.kit_check import error_stats  # the kit's checker computes alike

    a, r = actual.astype(np.float64), reference.astype(np.float64)
    stats = error_stats(a, r)
    ra, rr = _rows(a), _rows(r)
    k = min(5, rr.shape[1])
    # Stable sort: tied scores rank by index, as the C++ app's top-5 listing does.
    top_a = np.argsort(-ra, axis=1, kind="stable")[:, :k]
    top_r = np.argsort(-rr, axis=1, kind="stable")[:, :k]
    top1 = int(np.sum(top_a[:, 0] == top_r[:, 0]))
    pairs = zip(top_a.tolist(), top_r.tolist(), strict=True)
    overlap = sum(len(set(x) & set(y)) / k for x, y in pairs)
    out: dict[str, Any] = {
        "shape_ok": True, **stats,
        "rows": len(rr), "top1_agree": top1, "top5_overlap": overlap,
        "top1_agreement": top1 / len(rr), "top5_agreement": overlap / len(rr)}
    if step is not None:
        out["max_err_steps"] = stats["max_abs_err"] / step
    if bitwise:
        out["mismatched_elements"] = _bytes_differ(actual, reference)
    return out


def _bytes_differ(a: np.ndarray, b: np.ndarray) -> int:
    """Elements of two same-shape, same-dtype arrays whose bytes differ (NaN == NaN here)."""
    if a.size == 0:
        return 0
    as_bytes = [np.ascontiguousarray(x).reshape(-1).view(np.uint8).reshape(x.size, -1)
                for x in (a, b)]
    return int(np.any(as_bytes[0] != as_bytes[1], axis=1).sum())


def _aggregate(rows: list[dict]) -> dict[str, Any]:
    """Worst case over (input, output) rows; top-k agreements pooled over every row."""
    ok = [r for r in rows if r.get("shape_ok")]
    if not ok:
        return {}
    agg: dict[str, Any] = {
        "max_abs_err": max(r["max_abs_err"] for r in ok),
        "max_rel_err": max(r["max_rel_err"] for r in ok),
        "cosine": min(r["cosine"] for r in ok),
        "top1_agreement": sum(r["top1_agree"] for r in ok) / sum(r["rows"] for r in ok),
        "top5_agreement": sum(r["top5_overlap"] for r in ok) / sum(r["rows"] for r in ok),
        "sqnr_db": min(r["sqnr_db"] for r in ok)}
    if "max_err_steps" in ok[0]:
        agg["max_err_steps"] = max(r["max_err_steps"] for r in ok)
    if "mismatched_elements" in ok[0]:
        agg["mismatched_elements"] = sum(r["mismatched_elements"] for r in ok)
    return agg


# ------------------------------------------------------------------- output quantization step

def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _int8_steps(quantized_onnx: Path) -> list[float] | None:
    """:func:`output_steps` of a model with 8-bit activations (QuantizeLinear nodes: a mixed
    model's int8 layers), None for one without (weight-only formats)."""
    import onnx

    model = onnx.load(str(quantized_onnx), load_external_data=False)
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return None
    return output_steps(quantized_onnx)


def output_steps(qdq_onnx: Path) -> list[float]:
    """Quantization step (scale) of each graph output of a QDQ model.

    An output written by a ``DequantizeLinear`` takes that node's scale. Otherwise (e.g. a
    Gemm whose float output onnxruntime leaves unquantized) the nearest upstream
    ``DequantizeLinear`` of an *activation* (its input is computed, not a constant weight) is
    used: the step of the last quantized tensor, the finest granularity the model commits to.
    A per-channel scale counts by its smallest entry (the strictest reading).

    Parameters
    ----------
    qdq_onnx : Path
        The QDQ model onnxruntime's quantizer wrote.

    Returns
    -------
    list of float
        One step per graph output, in graph order.

    Raises
    ------
    ConfigError
        An output has no quantized tensor upstream (the model is not in QDQ form).
    """
    import onnx

    model = onnx.load(str(qdq_onnx))
    consts = _constants(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    steps = []
    for output in model.graph.output:
        frontier, seen, found = [output.name], set(), None
        while frontier and found is None:  # breadth first: the nearest DQ wins
            nxt = []
            for tensor in frontier:
                node = producer.get(tensor)
                if node is None or id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "DequantizeLinear" and node.input[0] not in consts:
                    found = node
                    break
                nxt += [t for t in node.input if t and t not in consts]
            frontier = nxt
        if found is None or found.input[1] not in consts:
            raise ConfigError(f"{qdq_onnx}: output {output.name!r} has no DequantizeLinear of an "
                              "activation upstream; validate int8 artifacts against the QDQ "
                              "model the quantize stage wrote")
        steps.append(float(np.min(consts[found.input[1]])))
    return steps


def dynamic_step(reference: np.ndarray) -> float:
    """The 8-bit step of a float output as dynamic quantization would quantize it:
    ``(max(y, 0) - min(y, 0)) / 255`` (DynamicQuantizeLinear's scale; 1 for an all-zero
    output). A dynamically quantized model's outputs are float, with no step of their own;
    this one is the output's own granularity at 8 bits, so "within one step" reads as for
    the static int8 gate."""
    hi = max(float(np.max(reference)), 0.0) if reference.size else 0.0
    lo = min(float(np.min(reference)), 0.0) if reference.size else 0.0
    return (hi - lo) / 255.0 if hi != lo else 1.0


# ----------------------------------------------------------------------------- runners

def _ort_outputs(model_path: Path, feeds: list[dict], quantized: bool = False,
                 config: Mapping[str, str] | None = None) -> list[list[np.ndarray]]:
    """onnxruntime's outputs; for a quantized model, from the session
    :mod:`pipeline.runtime.ort_reference` picks for this CPU (``config``: the scheme's
    session config entries)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path),
                                   ort_reference.session_options(quantized, config=config),
                                   providers=["CPUExecutionProvider"])
    return [list(session.run(None, feed)) for feed in feeds]


def _ort_config(art: ArtifactUnderTest) -> Mapping[str, str]:
    """The artifact's scheme's onnxruntime session config for its quantized model."""
    from pipeline.schemes import get_scheme

    return get_scheme(art.scheme).ort_session_config if art.scheme else {}


def _save_inputs(feed: dict, order: list[str], folder: Path, index: int) -> Path | dict:
    from pipeline.runtime.data import file_stems

    folder.mkdir(parents=True, exist_ok=True)
    if len(order) == 1:
        path = folder / f"input{index}.npy"
        np.save(path, feed[order[0]])
        return path
    paths = {}
    stems = file_stems(order)
    for name in order:
        paths[name] = folder / f"input{index}_{stems[name]}.npy"
        np.save(paths[name], feed[name])
    return paths


def _cpp_outputs(art: ArtifactUnderTest, inputs: Path | dict, out_names: list[str],
                 folder: Path, index: int) -> tuple[list[np.ndarray] | None, str]:
    """The binary's outputs for one input, or (None, why) if it failed."""
    from pipeline.runtime.app import run_binary

    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    # One --output per run: with several outputs, the app runs once per output name.
    for k, name in enumerate(out_names):
        path = folder / f"output{index}_{k}.npy"
        path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass
        target: Any = path if len(out_names) == 1 else f"{name}={path}"
        proc = run_binary(art.package_dir, inputs, target)
        if proc.returncode != 0 or not path.is_file():
            return None, f"bin/infer exited {proc.returncode}: " + \
                (proc.stderr or proc.stdout).strip()[-1000:]
        outputs.append(np.load(path))
    return outputs, ""


# ----------------------------------------------------------------------------- gates

@dataclass(frozen=True)
class _Gate:
    metric: str
    op: str
    threshold: float
    scaled: bool = False  # threshold * max(1, max abs ref), per (input, output)
    pooled: bool = False  # judged on the aggregate (top-1 agreement over all rows)


def _judge(gate: _Gate, rows: list[dict], agg: dict) -> dict:
    """Evaluate one gate; the result names the worst (or first failing) input."""
    ok_rows = [r for r in rows if r.get("shape_ok")]

    def limit(row):
        return gate.threshold * max(1.0, row["max_ref"]) if gate.scaled else gate.threshold

    if gate.pooled:
        value, threshold = agg[gate.metric], gate.threshold
        passed = _OPS[gate.op](value, threshold)
        bad = [r for r in ok_rows if r["top1_agree"] < r["rows"]]
        where = bad[0] if bad else None
    else:
        def margin(row):  # how far past the limit: larger is worse
            v, t = row[gate.metric], limit(row)
            return (v - t) / max(abs(t), 1e-300) if gate.op == "<=" else \
                (t - v) / max(abs(t), 1e-300) if gate.op == ">=" else float(v != t)
        where = max(ok_rows, key=margin)
        value, threshold = where[gate.metric], limit(where)
        passed = all(_OPS[gate.op](r[gate.metric], limit(r)) for r in ok_rows)
    return {"metric": gate.metric, "op": gate.op, "value": value, "threshold": threshold,
            "pass": bool(passed),
            "input_index": where["input"] if where else None,
            "output_index": where["output"] if where else None}


def _gates_for(comparison: str, g: dict, is_gpu: bool) -> list[_Gate]:
    if comparison in (FP32, BF16):
        # CUDA kernels are compiled with fast-math (FACTS.md): the GPU tolerance applies
        tol = g["gpu_rel_tol"] if is_gpu else g["fp32_rel_tol"]
        return [_Gate("max_abs_err", "<=", tol, scaled=True),
                _Gate("top1_agreement", "==", 1.0)]
    if comparison == FP16:
        # no top-1 gate: two float16 computations may order near-tied scores differently
        tol = max(g["fp16_rel_tol"], g["gpu_rel_tol"]) if is_gpu else g["fp16_rel_tol"]
        return [_Gate("max_abs_err", "<=", tol, scaled=True)]
    if comparison in (INT8, DYNAMIC):
        return [_Gate("cosine", ">=", g["int8_cosine_min"]),
                _Gate("top1_agreement", ">=", g["int8_top1_min"], pooled=True),
                _Gate("max_err_steps", "<=", g["int8_max_steps"])]
    if comparison == QUANTIZED:
        return [_Gate("max_abs_err", "<=", g["gpu_rel_tol"] if is_gpu else
                      g["quantized_rel_tol"], scaled=True)]
    if comparison in _QUALITY_GATES:
        return [_Gate("cosine", ">=", g[_QUALITY_GATES[comparison]])]
    if comparison == CPP:
        return [_Gate("max_abs_err", "<=", g["gpu_rel_tol"], scaled=True)] if is_gpu else \
            [_Gate("mismatched_elements", "==", 0)]
    return []  # onnxruntime's own quantized model's quality is reported, not gated


def _class_outputs(fp32_onnx: Path, names: Sequence[str] | None) -> set[int] | None:
    """Output indices of the named ONNX outputs (None: every output)."""
    if names is None:
        return None
    import onnx

    graph_outputs = [o.name for o in onnx.load(str(fp32_onnx), load_external_data=False)
                     .graph.output]
    unknown = [n for n in names if n not in graph_outputs]
    if unknown:
        raise ConfigError(f"[[outputs]] name(s) {', '.join(unknown)} are not outputs of "
                          f"{fp32_onnx}; its outputs: {', '.join(graph_outputs)}")
    return {graph_outputs.index(n) for n in names}


def _record(art: ArtifactUnderTest, comparison: str, actual: list, reference: list,
            g: dict, steps: list[float] | Callable[[np.ndarray], float] | None = None,
            class_outputs: set[int] | None = None) -> dict:
    """One artifact x comparison record: per-(input, output) metrics, aggregate, gates."""
    bitwise = comparison == CPP and not art.is_gpu
    rows = []
    for i, (outs_a, outs_r) in enumerate(zip(actual, reference, strict=True)):
        for k in range(max(len(outs_a), len(outs_r))):
            if k >= len(outs_a) or k >= len(outs_r):
                row = {"shape_ok": False, "actual": f"{len(outs_a)} outputs",
                       "reference": f"{len(outs_r)} outputs"}
            else:
                step = (steps(outs_r[k]) if callable(steps) else
                        steps[k] if steps else None)
                row = compare(outs_a[k], outs_r[k], step, bitwise)
            rows.append({"input": i, "output": k, **row})
    agg = _aggregate(rows)
    gates = _gates_for(comparison, g, art.is_gpu)
    if comparison == QUANTIZED and steps is not None:
        # int8 activations in the model (a mixed model's int8 layers): TVM rounds its
        # integer requantization like onnxruntime's kernels, and a float op's last bit before
        # a quantize can flip a tie, so the int8 scheme's gate applies, not a float tolerance
        gates = [_Gate("max_err_steps", "<=", g["int8_max_steps"])]
    judged = []
    bad_shape = next((r for r in rows if not r["shape_ok"]), None)
    if bad_shape is not None and (gates or comparison == CPP):
        judged.append({"metric": "shape", "op": "==", "value": bad_shape["actual"],
                       "threshold": bad_shape["reference"], "pass": False,
                       "input_index": bad_shape["input"], "output_index": bad_shape["output"]})
    elif agg:
        for gate in gates:
            if gate.metric.startswith("top") and class_outputs is not None:
                # top-k agreement means something for class scores only
                scored = [r for r in rows if r["output"] in class_outputs]
                if scored:
                    judged.append(_judge(gate, scored, _aggregate(scored)))
            else:
                judged.append(_judge(gate, rows, agg))
    passed = all(j["pass"] for j in judged) if judged else None
    return {**art.header(), "comparison": comparison, "title": _TITLES[comparison],
            "status": "reported" if passed is None else ("pass" if passed else "fail"),
            "pass": passed, "metrics": agg, "gates": judged,
            "per_input": [{k: v for k, v in r.items()
                           if k not in ("top1_agree", "top5_overlap", "rows")} for r in rows]}


def failure_lines(result: dict) -> list[str]:
    lines = []
    for rec in result.get("records", []):
        for gate in rec["gates"]:
            if gate["pass"]:
                continue
            where = f" at input {gate['input_index']}" if gate["input_index"] is not None else ""
            if gate.get("output_index"):
                where += f" (output {gate['output_index']})"
            lines.append(f"{rec['artifact']} (model {rec['model']}, variant {rec['variant']}) "
                         f"on target {rec['target']}: {rec['comparison']}: {gate['metric']} = "
                         f"{_fmt(gate['value'])}, threshold {gate['op']} "
                         f"{_fmt(gate['threshold'])}{where}"
                         + _HINTS.get(rec["comparison"], ""))
    return lines


# ----------------------------------------------------------------------------- reports

def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def _headline(result: dict) -> str:
    word = {"pass": "PASS", "fail": "FAIL"}.get(result["status"], result["status"].upper())
    art = f"{result['artifact']} on {result['target']}"
    if result.get("validated_on"):
        art += f" (validated on {result['validated_on']})"
    if result["status"] == NO_CUDA:
        return f"- **NOT VALIDATED** {art}: no CUDA device on this machine"
    scheme = (f" (scheme {result['scheme']}: {result['computes']})"
              if result.get("scheme") else "")
    reference = (f"; int8 reference: {result['int8_reference']}"
                 if result.get("int8_reference") else "")
    return f"- **{word}** {art}{scheme}: {result.get('inputs_desc', '')}{reference}"


def _markdown(results: Sequence[dict], title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [_headline(r) for r in results]
    for r in results:
        kit = r.get("kit_report")
        if kit:
            lat = kit.get("latency_ms") or {}
            timing = (f"; bin/infer there: median {_fmt(lat.get('median'))} ms, p90 "
                      f"{_fmt(lat.get('p90'))} ms" if lat else "")
            lines.append(f"  - kit report {kit['report']}: checked on {kit['device']} "
                         f"(host {kit.get('host')}, {kit.get('checked_at')}){timing}")
    failures = [line for r in results for line in failure_lines(r)]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {line}" for line in failures]
    lines += ["", "## Gates", "",
              "| artifact | target | comparison | metric | value | gate | worst input | result |",
              "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for rec in res.get("records", []):
            for gate in rec["gates"]:
                lines.append(f"| {rec['artifact']} | {rec['target']} | {rec['title']} | "
                             f"{gate['metric']} | {_fmt(gate['value'])} | {gate['op']} "
                             f"{_fmt(gate['threshold'])} | {_fmt(gate['input_index'])} | "
                             f"{'pass' if gate['pass'] else '**FAIL**'} |")
            if rec["status"] == NO_CUDA:
                lines.append(f"| {rec['artifact']} | {rec['target']} | {rec['title']} | - | - | "
                             f"- | - | {NO_CUDA} |")
    lines += ["", "## Metrics (worst input; top-k pooled over inputs)", "",
              "| artifact | target | comparison | " + " | ".join(_METRICS) + " |",
              "|---|---|---|" + "---|" * len(_METRICS)]
    for res in results:
        for rec in res.get("records", []):
            lines.append(f"| {rec['artifact']} | {rec['target']} | {rec['title']} | " +
                         " | ".join(_fmt(rec["metrics"].get(m)) for m in _METRICS) + " |")
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, payload: dict, results: Sequence[dict], title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.json").write_text(
        json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "validation.md").write_text(_markdown(results, title), encoding="utf-8")


# ----------------------------------------------------------------------------- entry points

@dataclass(frozen=True)
class ValidateConfig:
    """What validate checks for one artifact (its recipe, as data)."""

    gates: dict  # ValidationSpec fields: inputs (samples, seed, data_dir) and thresholds
    comparisons: tuple[str, ...]  # the scheme's (pipeline.schemes), all keys of _TITLES
    target: dict  # core.targets.target_config()
    # ONNX outputs the spec marks as class scores: top-1/top-5 are gated on those only
    class_scores: tuple[str, ...] = ()


def run(art: ArtifactUnderTest, gates: Mapping[str, Any] | ValidationSpec | None,
        out_dir: Path, *, check: bool = True,
        comparisons: Sequence[str] | None = None,
        class_scores: Sequence[str] | None = None,
        kit_report: Path | None = None, kit_dir: Path | None = None) -> dict:
    """Validate one artifact; write ``validation.json`` and ``validation.md`` into ``out_dir``.

    Parameters
    ----------
    art : ArtifactUnderTest
        The packaged artifact and its reference ONNX models.
    gates : mapping or ValidationSpec
        The model's ``[validation]`` settings (``samples``, ``seed``, ``data_dir`` and the
        thresholds); missing keys take the :class:`~pipeline.core.spec.ValidationSpec` defaults.
        ``data_dir`` is used as given (absolute, or relative to the working directory).
    out_dir : Path
        Receives the reports, the inputs (``inputs/``) and the C++ outputs (``cpp/``).
    check : bool
        Raise :class:`ValidationFailed` when a gate fails (after writing the reports).
    comparisons : sequence of str, optional
        The comparisons to make besides C++ vs Python (the variant's scheme names them);
        default: the int8 ones for an artifact with a QDQ model, else the fp32 one.
    class_scores : sequence of str, optional
        Names of the ONNX outputs whose rows are class scores: the top-1 gates judge those
        outputs only, and none when the sequence is empty (top-k agreement is then only
        reported). Default (None): every output, as for a classifier.
    kit_report, kit_dir : Path, optional
        A report of the validation kit's checker (``check.py``, run where the bundle can run,
        e.g. a GPU machine without TVM) and the kit it was made from: its gates become
        records of this validation, ``validated_on`` names its device, and for a CUDA
        artifact with no device here they alone decide. A report of another build's kit is
        a :class:`ConfigError`.

    Returns
    -------
    dict
        ``status`` ("pass", "fail" or "not validated: no CUDA device"), ``pass`` (None when
        not validated), ``records`` (one per comparison) and the artifact's names.

    Raises
    ------
    ValidationFailed
        A gate failed and ``check`` is true. The message has one line per failed gate
        naming artifact, model, target, comparison, metric, value, threshold and input
        index; the exception's ``result`` attribute holds the returned dict.
    """
    from pipeline.runtime.data import calibration_samples
    from pipeline.runtime.vm import cuda_available, python_vm_outputs

    g = resolve_gates(gates)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Validation of {art.name} on {art.target}"
    result: dict[str, Any] = {**art.header(), "is_gpu": art.is_gpu, "gates": g}
    if comparisons is None:
        comparisons = [INT8, INT8_QUALITY, ORT_QUALITY] if art.quantized else [FP32]
    unknown = [c for c in comparisons if c not in _TITLES or c == CPP]
    if unknown:
        raise ConfigError(f"unknown validation comparison(s) {', '.join(unknown)}; known: "
                          f"{', '.join(c for c in _TITLES if c != CPP)}")
    needs_qdq = set(_ON_QUANTIZED) & set(comparisons)
    if needs_qdq and art.qdq_onnx is None:
        raise ConfigError(f"{art.name}: comparison(s) {', '.join(sorted(needs_qdq))} need the "
                          "quantized ONNX model, and this artifact has none")
    kit_recs, kit_info = (_kit_records(art, Path(kit_report), Path(kit_dir or ""))
                          if kit_report else ([], None))
    if kit_info:
        result.update(validated_on=kit_info["device"], kit_report=kit_info)
    if art.is_gpu and kit_recs and not cuda_available():
        # No device here, but the kit's checker ran the bundle on one: its numbers decide.
        return _finish(art, result, kit_recs, out_dir, title, check,
                       f"{kit_info['samples']} kit inputs, bin/infer on {kit_info['device']}")
    if art.is_gpu and not cuda_available():
        # Checked first: a CUDA artifact cannot even be loaded here, and must not pass.
        records = [{**art.header(), "comparison": c, "title": _TITLES[c], "status": NO_CUDA,
                    "pass": None, "metrics": {}, "gates": [], "per_input": []}
                   for c in [*comparisons, CPP]]
        result.update(status=NO_CUDA, records=records, samples=0)
        result["pass"] = None
        _write(out_dir, result, [result], title)
        print(f"validate: {art.name} on {art.target}: {NO_CUDA}", flush=True)
        return result

    io = json.loads(Path(art.io_json).read_text(encoding="utf-8"))
    order = [t["name"] for t in io["inputs"]]
    spec_names = dict(zip(order, art.feed_names(io), strict=True))
    out_names = [t["name"] for t in io["outputs"]]
    feeds = calibration_samples(art.inputs, g["samples"], g["seed"], g["data_dir"], art.ranges)
    result["inputs_desc"] = (f"{len(feeds)} inputs from {g['data_dir']}" if g["data_dir"] else
                             f"{len(feeds)} seeded synthetic inputs (seed {g['seed']})")
    result["samples"] = len(feeds)
    class_outputs = _class_outputs(Path(art.fp32_onnx), class_scores)
    result["class_score_outputs"] = sorted(class_outputs) if class_outputs is not None else "all"

    ort_fp32 = _ort_outputs(Path(art.fp32_onnx), feeds)
    device = "cuda" if art.is_gpu else "cpu"
    model_so = Path(art.package_dir) / "model.so"
    tvm_py = [python_vm_outputs(model_so, [feed[spec_names[n]] for n in order], device)
              for feed in feeds]
    cpp, cpp_errors = [], []
    for i, feed in enumerate(feeds):
        inputs = _save_inputs({n: feed[spec_names[n]] for n in order}, order,
                              out_dir / "inputs", i)
        outs, why = _cpp_outputs(art, inputs, out_names, out_dir / "cpp", i)
        cpp.append(outs)
        if outs is None:
            cpp_errors.append((i, why))

    records = []
    quantized_session = any(_ON_QUANTIZED[c] for c in needs_qdq)
    ort_quant = (_ort_outputs(Path(art.qdq_onnx), feeds, quantized=quantized_session,
                              config=_ort_config(art)) if needs_qdq else None)
    if INT8 in comparisons or DYNAMIC in comparisons:
        result["int8_reference"] = ort_reference.reference_description(quantized=True)
    # comparison -> (actual, reference, output steps)
    pairs = {FP32: lambda: (tvm_py, ort_fp32, None),
             INT8: lambda: (tvm_py, ort_quant, output_steps(Path(art.qdq_onnx))),
             DYNAMIC: lambda: (tvm_py, ort_quant, dynamic_step),
             ORT_QUALITY: lambda: (ort_quant, ort_fp32, None)}
    for same_model in (FP16, BF16):
        pairs[same_model] = lambda: (tvm_py, ort_quant, None)
    # a mixed model's int8 layers round like the int8 scheme's: judged in their steps
    pairs[QUANTIZED] = lambda: (tvm_py, ort_quant, _int8_steps(Path(art.qdq_onnx)))
    for ort_quality in (ORT_FP16_QUALITY, ORT_BF16_QUALITY):
        pairs[ort_quality] = lambda: (ort_quant, ort_fp32, None)
    for quality in _QUALITY_GATES:
        pairs[quality] = lambda: (tvm_py, ort_fp32, None)
    for comparison in comparisons:
        actual, reference, steps = pairs[comparison]()
        records.append(_record(art, comparison, actual, reference, g, steps, class_outputs))
    if cpp_errors:
        index, why = cpp_errors[0]
        records.append({**art.header(), "comparison": CPP, "title": _TITLES[CPP],
                        "status": "fail", "pass": False, "metrics": {}, "error": why,
                        "gates": [{"metric": "bin/infer runs", "op": "==", "value": why,
                                   "threshold": "exit 0", "pass": False,
                                   "input_index": index, "output_index": None}],
                        "per_input": []})
    else:
        records.append(_record(art, CPP, cpp, tvm_py, g))
    return _finish(art, result, records + kit_recs, out_dir, title, check,
                   result["inputs_desc"])


def _finish(art: ArtifactUnderTest, result: dict, records: list[dict], out_dir: Path,
            title: str, check: bool, inputs_desc: str) -> dict:
    """Status from the records; write the reports; raise if a gate failed and ``check``."""
    passed = all(r["pass"] is not False for r in records)
    result.update(status="pass" if passed else "fail", records=records)
    result["pass"] = passed
    result.setdefault("inputs_desc", inputs_desc)
    _write(out_dir, result, [result], title)
    where = f"; validated on {result['validated_on']}" if result.get("validated_on") else ""
    print(f"validate: {art.name} on {art.target}: {result['status'].upper()} "
          f"({inputs_desc}{where})", flush=True)
    if not passed and check:
        error = ValidationFailed(
            f"validation failed for {art.name} on {art.target}:\n  - "
            + "\n  - ".join(failure_lines(result)) + f"\nSee {out_dir / 'validation.md'}.")
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result


def summarize(results: list[dict], out_dir: Path) -> dict:
    """Write an aggregate ``validation.json`` and ``validation.md`` over many artifacts.

    Parameters
    ----------
    results : list of dict
        What :func:`run` returned (or ``ValidationFailed.result``) per artifact.
    out_dir : Path
        Receives both reports.

    Returns
    -------
    dict
        ``status`` ("pass" when nothing failed and something was validated, "fail" when any
        artifact failed, "not validated" when nothing could run here), per-status
        ``counts``, the ``artifacts`` results and the ``failures`` (one line per failed gate).
    """
    counts: dict[str, int] = {}
    for res in results:
        counts[res["status"]] = counts.get(res["status"], 0) + 1
    failures = [line for res in results for line in failure_lines(res)]
    status = "fail" if counts.get("fail") else "pass" if counts.get("pass") else "not validated"
    summary = {"status": status, "counts": counts, "failures": failures,
               "artifacts": list(results)}
    _write(Path(out_dir), summary, results,
           f"Validation: {status.upper()} ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    return summary


# ----------------------------------------------------------------------------- validation kit
#
# The kit validates a bundle where the pipeline cannot run (a GPU machine without TVM or
# onnxruntime): inputs, onnxruntime's reference outputs computed here, the gates, and the
# numpy-only checker (pipeline/runtime/kit_check.py, copied as check.py). Its report comes
# back to `doit validate ... kit_report=PATH`, read by _kit_records.

# each comparison with a TVM side: the onnxruntime outputs it compares bin/infer's with
_KIT_REFERENCE = {FP32: "ort_fp32", INT8: "ort_quantized", INT8_QUALITY: "ort_fp32",
                  QUANTIZED: "ort_quantized", QUALITY: "ort_fp32", FP16: "ort_quantized",
                  BF16: "ort_quantized", FP16_QUALITY: "ort_fp32", BF16_QUALITY: "ort_fp32"}


@dataclass(frozen=True)
class KitConfig:
    """What goes into one artifact's validation kit (its recipe, as data)."""

    gates: dict  # as ValidateConfig's
    comparisons: tuple[str, ...]  # the scheme's; those with a TVM side go into the kit
    target: dict  # core.targets.target_config()
    class_scores: tuple[str, ...] = ()
    warmup: int = 10  # the checker's timed run of bin/infer
    repeat: int = 50


def _kit_gates(comparison: str, g: dict, is_gpu: bool, n_outputs: int,
               class_outputs: set[int] | None) -> list[dict]:
    """The scheme's gates of ``comparison`` as the checker judges them, per output: a
    threshold scaled by max(1, max |ref|) on max_abs_err is the same gate on max_rel_err."""
    out = []
    for gate in _gates_for(comparison, g, is_gpu):
        metric = "max_rel_err" if gate.scaled and gate.metric == "max_abs_err" else gate.metric
        outputs = list(range(n_outputs))
        if gate.metric.startswith("top") and class_outputs is not None:
            outputs = sorted(class_outputs)  # top-k means something for class scores only
        if outputs:
            out.append({"metric": metric, "op": gate.op, "threshold": gate.threshold,
                        "pooled": gate.pooled, "outputs": outputs})
    return out


def make_kit(art: ArtifactUnderTest, config: KitConfig, out_dir: Path) -> dict:
    """Write the validation kit of ``art`` into ``out_dir``.

    Layout: ``check.py`` (the checker), ``kit.json`` (artifact, bundle and model sha256,
    inputs, outputs, samples, comparisons with their gates, timing), ``README.txt``,
    ``inputs/input<i>_<name>.npy`` and ``reference/<ort_fp32|ort_quantized>/
    input<i>_output<k>.npy``. Deterministic: the same artifact and settings give the same
    bytes (onnxruntime on the same machine).

    Returns
    -------
    dict
        What the manifest records: samples, comparisons, bytes.
    """
    import shutil

    import onnxruntime

    from pipeline.core.hashing import sha256_file
    from pipeline.runtime.data import calibration_samples, file_stems

    g = resolve_gates(config.gates)
    out_dir = Path(out_dir)
    comparisons = [c for c in config.comparisons if c in _KIT_REFERENCE]
    on_qdq = set(_ON_QUANTIZED) & set(config.comparisons)  # as validate runs onnxruntime
    needs_qdq = any(_KIT_REFERENCE.get(c) == "ort_quantized" for c in comparisons)
    if needs_qdq and art.qdq_onnx is None:
        raise ConfigError(f"{art.name}: comparison(s) need the quantized ONNX model, and this "
                          "artifact has none")
    io = json.loads(Path(art.io_json).read_text(encoding="utf-8"))
    order = [t["name"] for t in io["inputs"]]
    spec_names = dict(zip(order, art.feed_names(io), strict=True))
    feeds = calibration_samples(art.inputs, g["samples"], g["seed"], g["data_dir"], art.ranges)
    class_outputs = _class_outputs(Path(art.fp32_onnx), config.class_scores)
    references = {"ort_fp32": _ort_outputs(Path(art.fp32_onnx), feeds)}
    if needs_qdq:
        quantized_session = any(_ON_QUANTIZED[c] for c in on_qdq)
        references["ort_quantized"] = _ort_outputs(Path(art.qdq_onnx), feeds,
                                                   quantized=quantized_session,
                                                   config=_ort_config(art))
    stems = file_stems(order)
    samples = []
    for i, feed in enumerate(feeds):
        sample: dict[str, Any] = {"inputs": {}, "references": {}}
        for name in order:
            rel = f"inputs/input{i}_{stems[name]}.npy"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out_dir / rel, np.ascontiguousarray(feed[spec_names[name]]))
            sample["inputs"][name] = rel
        for ref, outs in references.items():
            sample["references"][ref] = []
            for k, y in enumerate(outs[i]):
                rel = f"reference/{ref}/input{i}_output{k}.npy"
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                np.save(out_dir / rel, y)
                sample["references"][ref].append(rel)
        samples.append(sample)
    n_out = len(io["outputs"])
    kit_comparisons = []
    for c in comparisons:
        kit_comparisons.append({
            "name": c, "title": _TITLES[c], "reference": _KIT_REFERENCE[c],
            "steps": output_steps(Path(art.qdq_onnx)) if c == INT8 else None,
            "gates": _kit_gates(c, g, art.is_gpu, n_out, class_outputs)})
    bundle = Path(art.package_dir) / f"{art.name}-{art.target}.tar.gz"
    params = Path(art.package_dir) / "model.params"
    kit = {"format": kit_check.KIT_FORMAT, "artifact": art.name, "model": art.model,
           "variant": art.variant, "target": art.target,
           "target_kind": config.target.get("kind", "llvm"), "scheme": art.scheme,
           "bundle": {"file": bundle.name, "sha256": sha256_file(bundle),
                      "model_sha256": sha256_file(Path(art.package_dir) / "model.so"),
                      "params_sha256": (sha256_file(params) if params.is_file() else None)},
           "inputs": io["inputs"], "outputs": io["outputs"],
           "inputs_desc": (f"{len(feeds)} inputs from {g['data_dir']}" if g["data_dir"] else
                           f"{len(feeds)} seeded synthetic inputs (seed {g['seed']})"),
           "references": {"ort_fp32": f"onnxruntime {onnxruntime.__version__} on the CPU, "
                                      "fp32 model",
                          **({"ort_quantized": f"onnxruntime {onnxruntime.__version__} on the "
                              "CPU, the quantized model: "
                              + ort_reference.reference_description(quantized=True)}
                             if needs_qdq else {})},
           "samples": samples, "comparisons": kit_comparisons, "gates": g,
           "timing": {"warmup": config.warmup, "repeat": config.repeat}}
    (out_dir / "kit.json").write_text(json.dumps(jsonable(kit), indent=2, sort_keys=True,
                                                 allow_nan=False) + "\n", encoding="utf-8")
    shutil.copyfile(Path(kit_check.__file__), out_dir / "check.py")
    (out_dir / "check.py").chmod(0o755)
    (out_dir / "README.txt").write_text(_kit_readme(kit), encoding="utf-8")
    print(f"kit: {art.name} on {art.target}: {len(samples)} inputs, "
          f"{len(kit_comparisons)} comparison(s) -> {out_dir}", flush=True)
    return {"samples": len(samples), "comparisons": [c["name"] for c in kit_comparisons]}


def _kit_readme(kit: dict) -> str:
    name = f"{kit['artifact']}-{kit['target']}"
    return "\n".join([
        f"Validation kit of {kit['artifact']} for target '{kit['target']}' "
        f"(bundle {kit['bundle']['file']}, sha256 {kit['bundle']['sha256'][:16]}...).",
        "",
        "On the machine that runs the bundle (Python 3 and numpy; no TVM, no onnxruntime):",
        f"  python3 {name}-kit/check.py --bundle {kit['bundle']['file']} --out kit_report.json",
        "It unpacks the bundle, runs bin/infer on every input in inputs/, compares each output",
        "with onnxruntime's (reference/, computed on the build machine) with the gates in",
        "kit.json, times bin/infer and writes the JSON report. Exit 0 pass, 1 fail, 2 cannot",
        "check. Then, on the build machine:",
        f"  doit validate:{kit['artifact']}@{kit['target']} kit_report=kit_report.json",
        "",
        f"Inputs: {kit['inputs_desc']}. Comparisons: "
        + ", ".join(f"{c['name']} (vs {c['reference']})" for c in kit["comparisons"]) + ".",
    ]) + "\n"


def _kit_records(art: ArtifactUnderTest, report_path: Path,
                 kit_dir: Path) -> tuple[list[dict], dict]:
    """Validation records from a kit checker's report, after checking that it is a report of
    this build's kit (same kit.json, the kit's bundle)."""
    from pipeline.core.hashing import sha256_file

    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"kit report {report_path}: cannot read it ({e}); pass the JSON "
                          "file the kit's check.py wrote") from None
    problems = []
    if report.get("format") != kit_check.REPORT_FORMAT:
        problems.append(f"report format {report.get('format')!r}, expected "
                        f"{kit_check.REPORT_FORMAT}")
    if (report.get("artifact"), report.get("target")) != (art.name, art.target):
        problems.append(f"it is a report on {report.get('artifact')} for target "
                        f"{report.get('target')}, not {art.name} for {art.target}")
    kit_json = kit_dir / "kit.json"
    if not problems and (not kit_json.is_file() or
                         report.get("kit_sha256") != sha256_file(kit_json)):
        problems.append("it was made with another kit than this build's (the artifact, its "
                        "gates or its validation inputs changed since): copy the current "
                        f"bundle and kit ({kit_dir}) to the device and run check.py again")
    if not problems and not (report.get("bundle") or {}).get("matches_kit"):
        problems.append("its checker ran another bundle than the kit's (--any-bundle)")
    if problems:
        raise ConfigError(f"kit report {report_path} cannot validate {art.name} on "
                          f"{art.target}: " + "; ".join(problems))
    device = report["device"]["name"]
    records = []
    for comp in report.get("comparisons", []):
        gates = [gate for out in comp["outputs"] for gate in out["gates"]]
        worst: dict[str, Any] = {}
        for out in comp["outputs"]:
            for metric, value in out["metrics"].items():
                if isinstance(value, str):  # "inf"
                    value = float(value)
                low = metric in ("cosine", "sqnr_db", "top1_agreement")
                if metric not in worst or (value < worst[metric] if low else
                                           value > worst[metric]):
                    worst[metric] = value
        passed = all(gate["pass"] for gate in gates) if gates else None
        records.append({**art.header(), "comparison": comp["comparison"], "source": "kit",
                        "title": f"{comp['title']}: bin/infer on {device} (kit)",
                        "status": "reported" if passed is None else
                        ("pass" if passed else "fail"),
                        "pass": passed, "metrics": worst, "gates": gates, "per_input": []})
    for error in report.get("errors", []):
        records.append({**art.header(), "comparison": "kit_run", "source": "kit",
                        "title": f"bin/infer on {device} (kit)", "status": "fail",
                        "pass": False, "metrics": {}, "error": error["message"],
                        "gates": [{"metric": "bin/infer runs", "op": "==",
                                   "value": f"exit {error['exit']}: {error['message'][-300:]}",
                                   "threshold": "exit 0", "pass": False,
                                   "input_index": error["input_index"],
                                   "output_index": None}], "per_input": []})
    if not records:
        records.append({**art.header(), "comparison": "kit_run", "source": "kit",
                        "title": f"kit check on {device}", "status": "fail", "pass": False,
                        "metrics": {}, "gates": [{"metric": "comparisons", "op": ">=",
                                                  "value": 0, "threshold": 1, "pass": False,
                                                  "input_index": None, "output_index": None}],
                        "per_input": []})
    info = {"report": str(report_path), "device": device, "device_info": report["device"],
            "checked_at": report.get("checked_at"), "host": report.get("host"),
            "samples": report.get("samples", 0), "latency_ms": report.get("latency_ms"),
            "latency": report.get("latency"), "status": report.get("status")}
    return records, info
