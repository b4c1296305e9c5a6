"""The project's own Relax passes: QDQ fake quantization to integer arithmetic, and its layout.

:data:`IMPORT_PASSES` names the passes a scheme's ``import_passes`` may list (see
:mod:`pipeline.schemes`); the layout passes are chosen by :mod:`pipeline.compiler.lowering`.
"""

from __future__ import annotations


def _qdq_to_integer(mod):
    """QDQ fake quantization -> integer compute; returns (mod, report fields)."""
    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer

    mod, report = quantize_to_integer(mod)
    print(f"import: {report.summary()}", flush=True)
    for entry in report.unmatched:
        print(f"import:   stays in fake-quant form: {entry}", flush=True)
    return mod, {"integer_pass": True, "summary": report.summary(),
                 "matched": list(report.matched), "unmatched": list(report.unmatched)}


# name -> function(mod) -> (mod, report fields), run in the order a scheme lists them
IMPORT_PASSES = {
    "qdq_to_integer": _qdq_to_integer,
}
