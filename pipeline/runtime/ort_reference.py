"""onnxruntime as the reference for a quantized model: the session that computes what the QDQ
model means on this CPU.

onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into its integer kernels
(QLinearConv, QLinearMatMul). On CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX) those compute
u8 x s8 exactly. On CPUs without it (AVX2 only: AMD Zen 3, older Intel) they multiply with
``vpmaddubsw``, whose int16 pair sums saturate: onnxruntime's quantization docs warn of it, and
on a Zen 3 host a small conv came out 34 output steps away from the model's own arithmetic.
There the reference runs the model as written (graph optimisations off: dequantize, fp32
op, quantize), which is what the QDQ model defines; TVM's integer kernels match it exactly.

Block-wise weight-only models: onnxruntime fuses a blocked ``DequantizeLinear -> MatMul`` into
``MatMulNBits`` with ``accuracy_level`` 4 by default (the activations quantized to int8 per
block: 1.5 % off on a tiny MLP). The reference sets that fusion's level to 0, so it computes
what the model defines (float32 activations); a ``MatMulNBits`` node written by the quantize
stage keeps the level the variant asked for.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.core.targets import host_cpu_flags

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_kernels_exact() -> bool:
    """Whether onnxruntime's fused u8 x s8 kernels are exact on this CPU (it has VNNI)."""
    flags = host_cpu_flags()
    return any(f in flags for f in VNNI_FLAGS)


def reference_description(quantized: bool) -> str:
    if not quantized or int8_kernels_exact():
        return "onnxruntime, all graph optimisations (its integer kernels are exact here)"
    return ("onnxruntime with graph optimisations off: the QDQ model's own arithmetic, since "
            "onnxruntime's u8 x s8 kernels saturate on CPUs without VNNI")


def session_options(quantized: bool, threads: int | None = None,
                    config: Mapping[str, str] | None = None):
    """SessionOptions for the reference run of a model (see the module docstring);
    ``config``: session config entries (a scheme's ``ort_session_config``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    if quantized and not int8_kernels_exact():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if quantized:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options
