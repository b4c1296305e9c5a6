"""Number formats ("schemes"): what a variant computes in, and everything that follows from it.

A variant in a model spec names a scheme (``scheme = "int8"``). The scheme owns what differs
between formats, so no stage branches on a format's name:

- ``quantize``: the quantize stage's recipe for the ONNX model (a key of
  :data:`pipeline.stages.quantize.RECIPES`), or None to compile the fp32 model as it is;
- ``import_passes``: the project's import passes, by name
  (:data:`pipeline.compiler.passes.IMPORT_PASSES`), that turn the quantized graph into real
  low-precision compute;
- ``compute_dtype``: what the kernels compute in (the lowering's layout rules and the
  tuning workloads are chosen from it);
- ``comparisons``: the validation comparisons (:mod:`pipeline.stages.validate`);
- ``default_gates``: the thresholds of those comparisons (a model's ``[validation]`` and a
  variant's ``[variants.<v>.validation]`` override them, in that order);
- ``options``: the variant keys the scheme reads (anything else in the variant is an error);
- ``summary``: what the reports say the artifact computes;
- ``ort_session_config``: onnxruntime session config entries for running the quantize
  stage's model (the reference and the baseline), where it needs any.

Adding a format is one entry here plus what it needs below (a quantize recipe, import
passes, a codec): see ``pipeline/README.md``. The registry is plain data, cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from pipeline.core.errors import ConfigError

# Variant keys every scheme accepts (the spec reads them itself).
COMMON_OPTIONS = ("scheme", "quantize", "layout", "validation")


@dataclass(frozen=True)
class Scheme:
    """One number format, as a registry entry (see the module docstring)."""

    name: str
    description: str
    quantize: str | None
    import_passes: tuple[str, ...]
    compute_dtype: str
    comparisons: tuple[str, ...]
    default_gates: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    options: tuple[str, ...] = ()
    summary: str = ""
    # what the quantize recipe needs beyond the variant's options (bits, block size...)
    quantize_params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    ort_session_config: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    @property
    def quantized(self) -> bool:
        return self.quantize is not None


SCHEMES: dict[str, Scheme] = {
    "fp32": Scheme(
        name="fp32", description="the model as exported: float32 weights and compute",
        quantize=None, import_passes=(), compute_dtype="float32",
        comparisons=("tvm_fp32_vs_ort_fp32",),
        # max abs err <= fp32_rel_tol * max(1, max abs ref), top-1 equal (DESIGN.md)
        default_gates=MappingProxyType({"fp32_rel_tol": 1e-4}),
        summary="float32 compute"),
    "int8": Scheme(
        name="int8",
        description="static INT8: onnxruntime QDQ (u8 activations x s8 per-channel weights), "
                    "rewritten to integer compute with int32 accumulation",
        quantize="static_qdq", import_passes=("qdq_to_integer",), compute_dtype="int8",
        comparisons=("tvm_int8_vs_ort_int8", "tvm_int8_vs_ort_fp32", "ort_int8_vs_ort_fp32"),
        default_gates=MappingProxyType({"int8_cosine_min": 0.999, "int8_top1_min": 0.99,
                                        "int8_max_steps": 1.0,
                                        "int8_fp32_cosine_min": 0.99}),
        options=("activation_type", "weight_type", "per_channel", "op_types",
                 "exclude_nodes"),
        summary="integer compute: 8-bit activations and weights, int32 accumulation, "
                "requantized with onnxruntime's rounding"),
    # onnxruntime's dynamic quantization, the usual CPU recipe for transformers. Defaults:
    # int8 weights (u8 activations x s8 weights is what VNNI's vpdpbusd multiplies, and what
    # onnxruntime's own dynamic default and its fused DynamicQuantizeMatMul /
    # MatMulIntegerToFloat kernels run fastest on AVX512-VNNI/AVX-VNNI/AMX; on AVX2-only CPUs
    # onnxruntime's u8 x s8 kernels can saturate, and weight_type = "uint8" is its advice
    # there); per-channel weight scales (onnxruntime's default is per tensor, but per channel
    # costs nothing at run time, a scale vector in the float epilogue that onnxruntime fuses
    # the same way, checked on 1.31, and keeps a layer's small-magnitude columns); op_types
    # MatMul and Gemm (the linear layers; mask arithmetic and attention stay float32).
    "int8_dynamic": Scheme(
        name="int8_dynamic",
        description="dynamic INT8: onnxruntime quantize_dynamic, MatMul/Gemm weights s8 per "
                    "channel offline, activations u8 per tensor quantized at run time "
                    "(DynamicQuantizeLinear), u8 x s8 -> int32 matmuls scaled back to float32",
        quantize="dynamic_int8", import_passes=("dynamic_to_integer",),
        compute_dtype="int8",
        comparisons=("tvm_int8_vs_ort_dynamic", "tvm_int8_vs_ort_fp32",
                     "ort_int8_vs_ort_fp32"),
        # vs onnxruntime on the same model: the integer arithmetic is exact on both sides,
        # only a run-time rounding flipped by last-bit differences of the float ops before
        # it can differ: within one step of the output's own dynamic 8-bit range
        # ((max(y, 0) - min(y, 0)) / 255, what DynamicQuantizeLinear would use)
        default_gates=MappingProxyType({"int8_cosine_min": 0.999, "int8_top1_min": 0.99,
                                        "int8_max_steps": 1.0,
                                        "int8_fp32_cosine_min": 0.99}),
        options=("weight_type", "per_channel", "op_types", "exclude_nodes"),
        summary="integer matmuls: activations quantized to u8 at run time (per tensor), s8 "
                "per-channel weights, int32 accumulation, scaled back to float32; every "
                "other op (attention, softmax, layer norm, GELU) float32"),
    "fp16": Scheme(
        name="fp16",
        description="float16 weights and activations (onnxconverter-common conversion, "
                    "float32 inputs/outputs), float32 accumulation in matmul and conv",
        quantize="float16", import_passes=("fp16_accumulate_fp32",), compute_dtype="float16",
        comparisons=("tvm_fp16_vs_ort_fp16", "tvm_fp16_vs_ort_fp32", "ort_fp16_vs_ort_fp32"),
        default_gates=MappingProxyType({"fp16_rel_tol": 1e-2, "fp16_fp32_cosine_min": 0.99}),
        summary="float16 storage and element-wise math, matmul/conv accumulate in float32; "
                "on x86 CPUs without AVX512-FP16, float32 compute on the float16 weights "
                "(widened at load; models mostly of one-row matmuls keep float16 kernels)"),
    "bf16": Scheme(
        name="bf16",
        description="bfloat16 weights (MatMul/Gemm/Conv, Gather tables; round to nearest "
                    "even), float32 activations and compute: weights decoded (exactly) "
                    "inside each kernel",
        quantize="bfloat16_weights", import_passes=("bf16_weights",),
        compute_dtype="float32",
        comparisons=("tvm_bf16_vs_ort_bf16", "tvm_bf16_vs_ort_fp32", "ort_bf16_vs_ort_fp32"),
        # the same float32 arithmetic on the same weights as onnxruntime: the fp32 gate
        default_gates=MappingProxyType({"fp32_rel_tol": 1e-4, "bf16_fp32_cosine_min": 0.99}),
        summary="bfloat16 weight storage, float32 compute (weights decoded in the kernel; "
                "TVM 0.27 has no bfloat16 dot product on x86)",
        # onnxruntime 1.31 folds each decoding Cast into a float32 initializer, and then its
        # MatMulAddFusion fails on a BERT ("AddInitializedOrtValue Attempt to replace the
        # existing tensor"); without that one fusion the model loads and runs
        ort_session_config=MappingProxyType(
            {"optimization.disable_specified_optimizers": "MatMulAddFusion"})),
}


def _blockwise(bits: int, block_size: int) -> Scheme:
    """A block-wise weight-only scheme: MatMul weights in ``bits``-bit integer codes with one
    float16 scale (and, unless symmetric, one zero point) per ``block_size`` input channels;
    activations and everything else float32."""
    name = f"w{bits}g{block_size}"
    return Scheme(
        name=name,
        description=f"weight-only INT{bits}, a scale per group of {block_size} input "
                    "channels (onnxruntime MatMulNBits), float32 activations",
        quantize="matmul_nbits", import_passes=(), compute_dtype="float32",
        comparisons=("tvm_vs_ort_quantized", "tvm_vs_ort_fp32_quality",
                     "ort_int8_vs_ort_fp32"),
        default_gates=MappingProxyType({"quantized_rel_tol": 1e-4,
                                        "quality_cosine_min": 0.99}),
        options=("symmetric", "accuracy_level", "exclude_nodes"),
        summary=f"MatMul weights stored as packed {bits}-bit codes with float16 group scales "
                f"(group {block_size}), unpacked inside a fused dequantize-matmul kernel; "
                "float32 arithmetic; other ops float32",
        quantize_params=MappingProxyType({"bits": bits, "block_size": block_size}))


SCHEMES.update({s.name: s for s in (_blockwise(4, 32), _blockwise(4, 128),
                                    _blockwise(8, 128))})


def _codes8(fmt: str, description: str, summary: str, gpu_gates: dict | None = None) -> Scheme:
    """An 8-bit float-like weight-only scheme (:mod:`pipeline.schemes.codes8`): MatMul
    weights as 8-bit codes with a float32 scale per output channel (``per_channel = false``:
    one per tensor), decoded to float32 inside the fused matmul kernel; activations, compute
    and every other op float32. A storage/bandwidth format on CPUs, not a faster arithmetic."""
    return Scheme(
        name=fmt, description=description,
        quantize="weight_codes8", import_passes=(), compute_dtype="float32",
        comparisons=("tvm_vs_ort_quantized", "tvm_vs_ort_fp32_quality",
                     "ort_int8_vs_ort_fp32"),
        # the same float32 arithmetic on the same weights as onnxruntime (it folds the
        # decode into a float32 weight): the fp32 gate; 8-bit weights keep 0.99 easily
        default_gates=MappingProxyType({"quantized_rel_tol": 1e-4,
                                        "quality_cosine_min": 0.99, **(gpu_gates or {})}),
        options=("per_channel", "exclude_nodes"),
        summary=summary,
        quantize_params=MappingProxyType({"weight_format": fmt}))


SCHEMES.update({
    "fp8_e4m3": _codes8(
        "fp8_e4m3",
        "weight-only FP8 E4M3 (float8e4m3fn, saturating at 448), a float32 scale per output "
        "channel, float32 activations",
        "MatMul weights stored as FP8 E4M3 codes (1 byte) with float32 per-channel scales, "
        "decoded with integer ops inside a fused matmul kernel; float32 arithmetic (no CPU "
        "FP8 math: a storage format, half of fp16's bytes); other ops float32. On CUDA "
        "sm_89/sm_90 the matmuls that tile run on the FP8 tensor cores with FP8 activations "
        "(W8A8, compiler.passes.fp8_tensor_cores)",
        # On CUDA the matmuls quantize their activations to E4M3 too (W8A8), while
        # onnxruntime's reference keeps them float32: the same-model GPU gate allows for it
        # (emulated on llvm: max rel err 0.039, cosine 0.99936 on the tests' 2-layer MLP;
        # 0.0067 / 0.99997 on minilm's embedding);
        # the quality gate against fp32 (cosine >= 0.99) is unchanged
        gpu_gates={"gpu_rel_tol": 0.1}),
    "posit8": _codes8(
        "posit8",
        "weight-only posit<8,1> (max |w| of a channel scaled to 4), a float32 scale per "
        "output channel, float32 activations",
        "MatMul weights stored as posit<8,1> codes (1 byte) with float32 per-channel scales, "
        "decoded with integer ops inside a fused matmul kernel; float32 arithmetic "
        "(a storage format, half of fp16's bytes); other ops float32"),
})


SCHEMES["mixed"] = Scheme(
    name="mixed",
    description="a format per weight layer (block-wise INT4/INT8, fp8, posit8 and bf16 "
                "MatMuls, static INT8 convs, fp32), the fastest set that keeps the model "
                "within the variant's accuracy budget, chosen by search",
    quantize="mixed", import_passes=("qdq_to_integer", "bf16_weights"),
    # "mixed": the CPU lowering packs int8 convs for VNNI and fp32 convs in NCHW16c
    compute_dtype="mixed",
    comparisons=("tvm_vs_ort_quantized", "tvm_vs_ort_fp32_quality", "ort_int8_vs_ort_fp32"),
    # the quality gate is the variant's budget (core.spec.variant_validation)
    # int8_max_steps: the same-model gate where int8 layers quantize activations
    default_gates=MappingProxyType({"quantized_rel_tol": 1e-4, "quality_cosine_min": 0.99,
                                    "int8_max_steps": 1.0}),
    options=("formats", "budget", "assignment", "symmetric", "activation_type",
             "weight_type", "per_channel"),
    # as bf16's, and for the same onnxruntime bug (pipeline.schemes.mixed.SESSION_CONFIG)
    ort_session_config=MappingProxyType(
        {"optimization.disable_specified_optimizers": "MatMulAddFusion"}),
    summary="per-layer formats chosen under an accuracy budget (see assignment.json): "
            "block-wise layers run the fused dequantize-matmul, bf16 layers decode in the "
            "kernel, int8 layers compute in integers as the int8 scheme's, fp32 layers as "
            "fp32's")


def get_scheme(name: str) -> Scheme:
    """Look a scheme up by name; an unknown name fails listing the known ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        known = ", ".join(f"{s.name} ({s.description})" for s in SCHEMES.values())
        raise ConfigError(f"unknown scheme {name!r}; known schemes: {known}") from None
