"""The project's own Relax passes: QDQ fake quantization and dynamic quantization to integer
arithmetic, and its layout.

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
                 "matched": list(report.matched), "unmatched": list(report.unmatched),
                 "float_ops": list(report.float_ops)}


def _float_format(name: str, rewrite):
    """A pass of :mod:`.float_formats` as an import pass: (mod, report fields)."""

    def run(mod):
        mod, report = rewrite(mod)
        print(f"import: {name}: {len(report.rewritten)} op(s) rewritten, "
              f"{len(report.kept)} kept", flush=True)
        for entry in report.kept:
            print(f"import:   kept as imported: {entry}", flush=True)
        return mod, {name: report.as_dict()}

    return run


def _fp16_accumulate_fp32(mod):
    """float16 matmul/conv2d accumulate in float32; returns (mod, report fields)."""
    from pipeline.compiler.passes.float_formats import accumulate_in_float32

    return _float_format("fp16_accumulate_fp32", accumulate_in_float32)(mod)


def _bf16_weights(mod):
    """bfloat16-valued weights stored as bfloat16, decoded in the consumer's kernel."""
    from pipeline.compiler.passes.float_formats import keep_bfloat16_weights

    return _float_format("bf16_weights", keep_bfloat16_weights)(mod)


def _dynamic_to_integer(mod):
    """onnxruntime dynamic quantization (DynamicQuantizeLinear + MatMulInteger) as u8 x s8
    integer matmuls; returns (mod, report fields)."""
    from pipeline.compiler.passes.dynamic_quant import dynamic_to_integer

    mod, report = dynamic_to_integer(mod)
    print(f"import: {report.summary()}", flush=True)
    for entry in report.kept:
        print(f"import:   stays an int32 x int32 matmul: {entry}", flush=True)
    return mod, {"integer_pass": bool(report.integer), "summary": report.summary(),
                 "dynamic_to_integer": report.as_dict()}


# name -> function(mod) -> (mod, report fields), run in the order a scheme lists them
IMPORT_PASSES = {
    "qdq_to_integer": _qdq_to_integer,
    "fp16_accumulate_fp32": _fp16_accumulate_fp32,
    "bf16_weights": _bf16_weights,
    "dynamic_to_integer": _dynamic_to_integer,
}
