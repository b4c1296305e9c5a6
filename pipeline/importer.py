"""Stage ``import``: ONNX -> Relax IRModule with static shapes, cleaned up and, for a QDQ
model, rewritten to integer arithmetic by the project's quantization-aware passes.

The output is ``module.json`` (``tvm.ir.save_json``: deterministic bytes for equal modules)
and ``import_report.json`` (what the passes matched, and what stays in fake-quant form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ImportConfig:
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    integer: bool  # run the QDQ -> integer passes (quantized variants)


def unsupported_ops(model) -> dict[str, list[str]]:
    """Operators TVM's ONNX frontend cannot convert, each with the node names using it."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If", "Constant"}
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in known:
            missing.setdefault(node.op_type, []).append(node.name or f"#{i}")
    return missing


def import_onnx(model_path: Path, config: ImportConfig):
    """from_onnx with the spec's static shapes; every unsupported op named in one error."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(model_path))
    missing = unsupported_ops(model)
    if missing:
        lines = [f"{op} (nodes: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
                 for op, names in sorted(missing.items())]
        hint = ""
        if any(op.startswith("QLinear") for op in missing):
            hint = (" QOperator-format quantized models are not supported: give the fp32 "
                    "model and let the quantize stage produce QDQ.")
        raise UnsupportedModelError(
            f"{model_path}: {len(missing)} operator type(s) are not supported by TVM's ONNX "
            "importer:\n  - " + "\n  - ".join(lines) +
            f"\nReplace them in the exporter or pre-process the graph.{hint}")
    shape_dict = {name: list(shape) for name, shape, _ in config.inputs}
    return from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)


def run(model_path: Path, config: ImportConfig, out_dir: Path) -> dict:
    """Write ``module.json`` and ``import_report.json`` into ``out_dir``."""
    import tvm

    from .lowering import graph_cleanup

    mod = import_onnx(model_path, config)
    mod = graph_cleanup()(mod)
    report: dict = {"integer_pass": False}
    if config.integer:
        from .passes.qdq_to_integer import quantize_to_integer

        mod, integer_report = quantize_to_integer(mod)
        report = {"integer_pass": True, "summary": integer_report.summary(),
                  "matched": list(integer_report.matched),
                  "unmatched": list(integer_report.unmatched)}
        print(f"import: {integer_report.summary()}", flush=True)
    (out_dir / "module.json").write_text(tvm.ir.save_json(mod), encoding="utf-8")
    (out_dir / "import_report.json").write_text(json.dumps(report, indent=2, sort_keys=True)
                                                + "\n", encoding="utf-8")
    return report
