"""Model specs: one TOML file per model under models/, validated at the boundary.

A spec names the model's source (a generator in models/ or a local ONNX file), its inputs,
calibration, variants, tuning budget and validation gates. Every problem in a spec is
collected and reported at once, with the key, the bad value and what is allowed.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError

DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")
QUANT_TYPES = ("uint8", "int8")
CPU_FP32_LAYOUTS = ("NHWC", "NCHW16c", "NHWC-winograd")  # the choices of pipeline.compiler.lowering
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    # [lo, hi], both included: the values this input takes (token ids: [0, vocab - 1]).
    # Synthetic data draws from it, data files and the C++ app are checked against it.
    range: tuple = ()


@dataclass(frozen=True)
class OutputSpec:
    """An ONNX graph output the spec says something about."""

    name: str
    class_scores: bool = False  # rows are class scores: top-1/top-5 agreement is gated


@dataclass(frozen=True)
class SourceSpec:
    generator: str = ""  # module in models/ exposing generate(out_path, seed)
    path: str = ""  # or a local .onnx file, relative to the project dir
    seed: int = 0


@dataclass(frozen=True)
class CalibrationSpec:
    method: str = "minmax"
    samples: int = 16
    seed: int = 0
    data_dir: str = ""  # folder of .npy files (one sample each); empty: seeded synthetic


@dataclass(frozen=True)
class VariantSpec:
    name: str
    scheme: str = ""  # a name in pipeline.schemes.SCHEMES; parse_spec always fills it in
    quantize: bool = False  # deprecated alias: true means scheme = "int8"
    activation_type: str = "uint8"  # u8 x s8 is what VNNI multiplies
    weight_type: str = "int8"
    per_channel: bool = True
    # ONNX op types to quantize (empty: every op onnxruntime quantizes) and node names to
    # keep in float: a transformer quantizes ["MatMul", "Gemm"], never its mask arithmetic
    op_types: tuple = ()
    exclude_nodes: tuple = ()
    # fp32 convs on CPUs: "NHWC", "NCHW16c" or "NHWC-winograd"; empty: the pipeline's default
    layout: str = ""
    # block-wise weight-only schemes (w4g32, ...): zero points per group (false) or none
    symmetric: bool = False
    # MatMulNBits accuracy_level written into the quantized ONNX: what onnxruntime computes
    # in (0: as the inputs, float32; 4: int8 activations, its fastest CPU path). TVM always
    # computes in float32, so 0 keeps the two bit-for-bit comparable.
    accuracy_level: int = 0
    # scheme mixed: candidate formats per layer (empty: pipeline.schemes.mixed's default),
    # the accuracy budget ({metric = "cosine", min = 0.999}: vs fp32, worst calibration
    # sample) and a pinned assignment file (relative to the project; empty: search)
    formats: tuple = ()
    budget: dict = field(default_factory=dict)
    assignment: str = ""
    # [variants.<name>.validation]: gate thresholds for this variant only (see GATE_KEYS)
    validation: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TuningSpec:
    trials_per_task: int = 32
    max_trials: int = 2000
    # A model whose spec sets no budget tunes for at most 15 minutes: a newcomer's first
    # build should not silently take an hour (resnet50.toml asks for the hour it needs).
    wall_seconds: float = 900.0
    seed: int = 0


@dataclass(frozen=True)
class ValidationSpec:
    samples: int = 4
    seed: int = 1
    data_dir: str = ""
    fp32_rel_tol: float = 1e-4  # max abs err <= tol * max(1, max abs ref)
    int8_cosine_min: float = 0.999
    int8_top1_min: float = 0.99
    int8_max_steps: float = 1.0  # elementwise, in output quantization steps
    int8_fp32_cosine_min: float = 0.99  # int8 artifact vs onnxruntime fp32: quality kept
    # other quantized schemes: TVM vs onnxruntime on the same quantized ONNX (max abs err <=
    # tol * max(1, max abs ref)) and the artifact vs onnxruntime fp32 (quality kept)
    quantized_rel_tol: float = 1e-4
    quality_cosine_min: float = 0.99
    # TVM fp16 vs onnxruntime fp16: max abs err <= tol * max(1, max abs ref), ~10 float16
    # ulps (2^-10 each). onnxruntime's CPU EP runs a float16 model in float32 (casts around
    # its ops, cast pairs cancelled, weights upcast at load): only the weights are rounded.
    # TVM also rounds each op's output to float16, about one ulp per op on the way.
    fp16_rel_tol: float = 1e-2
    fp16_fp32_cosine_min: float = 0.99  # fp16 artifact vs onnxruntime fp32: quality kept
    bf16_fp32_cosine_min: float = 0.99  # bf16 artifact vs onnxruntime fp32: quality kept
    gpu_rel_tol: float = 1e-2  # CUDA compiles with fast-math


# The thresholds of ValidationSpec (the rest says which inputs to run): a scheme's defaults,
# a model's [validation] and a variant's [variants.<v>.validation] set them, in that order.
GATE_KEYS = ("fp32_rel_tol", "int8_cosine_min", "int8_top1_min", "int8_max_steps",
             "int8_fp32_cosine_min", "quantized_rel_tol", "quality_cosine_min", "gpu_rel_tol",
             "fp16_rel_tol", "fp16_fp32_cosine_min", "bf16_fp32_cosine_min")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    source: SourceSpec
    inputs: tuple[InputSpec, ...]
    calibration: CalibrationSpec
    variants: dict[str, VariantSpec]
    tuning: TuningSpec = field(default_factory=TuningSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    spec_path: str = ""
    outputs: tuple[OutputSpec, ...] = ()  # [[outputs]]: only those the spec marks
    validation_set: tuple[str, ...] = ()  # keys the spec's [validation] table gave
    warnings: tuple[str, ...] = ()  # deprecated spellings, said once per load

    def artifact_names(self) -> list[str]:
        return [f"{self.name}_{v}" for v in self.variants]

    def as_dict(self) -> dict:
        return asdict(self)


def _check_keys(table: dict, allowed: set[str], where: str, problems: list[str]) -> None:
    for key in sorted(set(table) - allowed):
        problems.append(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def _typed(cls, table: dict, where: str, problems: list[str], **extra):
    """Build dataclass ``cls`` from a TOML table, collecting unknown keys and bad types."""
    names = {f.name for f in fields(cls)} - set(extra)
    _check_keys(table, names, where, problems)
    kwargs = dict(extra)
    for f in fields(cls):
        if f.name not in table:
            continue
        value = table[f.name]
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(str(f.type))
        if expected and (not isinstance(value, expected) or
                         (expected is int and isinstance(value, bool))):
            problems.append(f"{where}.{f.name}: {value!r} is not a {f.type}")
            continue
        kwargs[f.name] = float(value) if str(f.type) == "float" else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        problems.append(f"{where}: {e}")
        return None


def _value_range(value, dtype: str, where: str, problems: list[str]) -> tuple:
    """``[lo, hi]`` of an input's values: numbers, lo <= hi, integers for integer inputs."""
    integer = not dtype.startswith("float")
    number = int if integer else (int, float)
    if (not isinstance(value, list) or len(value) != 2 or
            not all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
        kind = "integers" if integer else "numbers"
        problems.append(f"{where}: {value!r} must be [lo, hi], two {kind} (both included; "
                        "token ids of a 30522-word vocabulary: [0, 30521])")
        return ()
    lo, hi = value
    if lo > hi:
        problems.append(f"{where}: {value!r}: lo must not exceed hi")
        return ()
    if integer:
        info = np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            problems.append(f"{where}: {value!r} does not fit {dtype} "
                            f"([{info.min}, {info.max}])")
            return ()
    return (lo, hi)


def input_ranges(spec: ModelSpec) -> dict[str, tuple]:
    """``{input name: (lo, hi)}`` for the inputs whose spec gives a range."""
    return {i.name: tuple(i.range) for i in spec.inputs if i.range}


def parse_spec(data: dict, spec_path: str = "<memory>") -> ModelSpec:
    """Validate a spec's plain data and return the typed :class:`ModelSpec`."""
    problems: list[str] = []
    top = {"name", "description", "source", "inputs", "outputs", "calibration", "variants",
           "tuning", "validation"}
    _check_keys(data, top, "spec", problems)
    name = data.get("name", "")
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        problems.append(f"name: {name!r} must be a non-empty identifier (letters, digits, _)")
    source = _typed(SourceSpec, data.get("source", {}), "source", problems)
    if source and bool(source.generator) == bool(source.path):
        problems.append("source: give exactly one of 'generator' (a module in models/) "
                        "or 'path' (a local .onnx file)")
    inputs = []
    raw_inputs = data.get("inputs", [])
    if not raw_inputs:
        problems.append("inputs: at least one [[inputs]] entry with name, shape, dtype")
    for i, table in enumerate(raw_inputs):
        inp = _typed(InputSpec, {k: v for k, v in table.items() if k not in ("shape", "range")},
                     f"inputs[{i}]", problems, shape=(), range=())
        shape = table.get("shape")
        if (not isinstance(shape, list) or not shape or
                not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            problems.append(f"inputs[{i}].shape: {shape!r} must be a list of positive ints "
                            "(static shapes only; fix batch and image size)")
        elif inp:
            inp = InputSpec(inp.name, tuple(shape), inp.dtype)
        if inp and inp.dtype not in DTYPES:
            problems.append(f"inputs[{i}].dtype: {inp.dtype!r} not one of {', '.join(DTYPES)}")
        elif inp and "range" in table:
            value_range = _value_range(table["range"], inp.dtype, f"inputs[{i}].range",
                                       problems)
            inp = replace(inp, range=value_range)
        if inp:
            inputs.append(inp)
    outputs = []
    for i, table in enumerate(data.get("outputs", [])):
        out = _typed(OutputSpec, table, f"outputs[{i}]", problems) if isinstance(table, dict) \
            else problems.append(f"outputs[{i}]: must be a table with name (and class_scores)")
        if out is not None and not out.name:
            problems.append(f"outputs[{i}].name: give the ONNX graph output's name")
        elif out is not None:
            outputs.append(out)
    calibration = _typed(CalibrationSpec, data.get("calibration", {}), "calibration", problems)
    if calibration and calibration.method not in CALIBRATION_METHODS:
        problems.append(f"calibration.method: {calibration.method!r} not one of "
                        f"{', '.join(CALIBRATION_METHODS)}")
    if calibration and calibration.samples < 1:
        problems.append("calibration.samples: must be >= 1")
    variants = {}
    warnings: list[str] = []
    raw_variants = data.get("variants", {"fp32": {}})
    for vname, table in raw_variants.items():
        variant = _parse_variant(vname, table, problems, warnings)
        if variant:
            variants[vname] = variant
    tuning = _typed(TuningSpec, data.get("tuning", {}), "tuning", problems)
    validation = _typed(ValidationSpec, data.get("validation", {}), "validation", problems)
    if problems:
        raise ConfigError(f"model spec {spec_path} is invalid:\n  - " + "\n  - ".join(problems)
                          + "\nFix the spec (see models/resnet50.toml and the README).")
    return ModelSpec(name=name, description=data.get("description", ""), source=source,
                     inputs=tuple(inputs), calibration=calibration, variants=variants,
                     tuning=tuning, validation=validation, spec_path=spec_path,
                     validation_set=tuple(sorted(data.get("validation", {}))),
                     outputs=tuple(outputs),
                     warnings=tuple(f"{spec_path}: {w}" for w in warnings))


def _parse_variant(vname: str, table, problems: list[str],
                   warnings: list[str]) -> VariantSpec | None:
    """One ``[variants.<name>]`` table: its scheme, the scheme's options, its own gates."""
    from pipeline.schemes import COMMON_OPTIONS, SCHEMES

    where = f"variants.{vname}"
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table, e.g. [variants.{vname}] scheme = \"fp32\"")
        return None
    gates = table.get("validation", {})
    variant = _typed(VariantSpec, {k: v for k, v in table.items() if k != "validation"},
                     where, problems, name=vname)
    if variant is None:
        return None
    scheme_name = variant.scheme
    if "quantize" in table:
        alias = "int8" if variant.quantize else "fp32"
        if scheme_name and scheme_name != alias:
            problems.append(f"{where}: quantize = {str(variant.quantize).lower()} contradicts "
                            f"scheme = {scheme_name!r}; drop quantize (it is deprecated)")
        elif not scheme_name:
            warnings.append(f"{where}: `quantize = {str(variant.quantize).lower()}` is "
                            f"deprecated; write `scheme = \"{alias}\"`")
        scheme_name = scheme_name or alias
    scheme_name = scheme_name or "fp32"
    scheme = SCHEMES.get(scheme_name)
    if scheme is None:
        problems.append(f"{where}.scheme: unknown scheme {scheme_name!r}; known schemes: "
                        f"{', '.join(SCHEMES)}")
        return None
    allowed = set(COMMON_OPTIONS) | set(scheme.options)
    for key in sorted(set(table) - allowed):
        problems.append(f"{where}.{key}: does not apply to scheme {scheme_name!r} (its "
                        f"options: {', '.join(scheme.options) or 'none'}; every scheme: "
                        f"{', '.join(COMMON_OPTIONS)})")
    if variant.activation_type not in QUANT_TYPES or variant.weight_type not in QUANT_TYPES:
        problems.append(f"{where}: activation_type/weight_type must be one of "
                        f"{', '.join(QUANT_TYPES)}")
    for key in ("op_types", "exclude_nodes"):
        value = getattr(variant, key)
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            problems.append(f"{where}.{key}: {value!r} must be a list of names, e.g. "
                            + ('["MatMul", "Gemm"]' if key == "op_types" else
                               '["/bert/embeddings/Add"]'))
        else:
            variant = replace(variant, **{key: tuple(value)})
    if variant.accuracy_level not in (0, 1, 2, 3, 4):
        problems.append(f"{where}.accuracy_level: {variant.accuracy_level!r} not one of 0 "
                        "(unset: float32), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)")
    if scheme_name == "mixed":
        variant = _check_mixed(variant, where, problems)
    if variant.layout and variant.layout not in CPU_FP32_LAYOUTS:
        problems.append(f"{where}.layout: {variant.layout!r} not one of "
                        f"{', '.join(CPU_FP32_LAYOUTS)} (or leave it out)")
    if not isinstance(gates, dict):
        problems.append(f"{where}.validation: must be a table of gate thresholds")
        gates = {}
    for key, value in sorted(gates.items()):
        if key not in GATE_KEYS:
            problems.append(f"{where}.validation: unknown gate {key!r} (gates: "
                            f"{', '.join(GATE_KEYS)})")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}.validation.{key}: {value!r} is not a number")
    return replace(variant, scheme=scheme_name, quantize=scheme.quantized,
                   validation={k: float(v) for k, v in gates.items() if k in GATE_KEYS})


def _check_mixed(variant: VariantSpec, where: str, problems: list[str]) -> VariantSpec:
    """The mixed scheme's keys: known formats, a budget ``{metric = "cosine", min = x}``
    (needed unless an assignment is pinned)."""
    from pipeline.schemes.mixed import BUDGET_METRICS, check_formats

    formats = variant.formats
    if not isinstance(formats, (list, tuple)) or not all(isinstance(f, str) for f in formats):
        problems.append(f"{where}.formats: {formats!r} must be a list of format names, e.g. "
                        '["w4g32", "w8g128", "fp32"]')
        formats = ()
    problems += [f"{where}.formats: {p}" for p in check_formats(formats)]
    budget = variant.budget
    if not isinstance(budget, dict):
        budget = {}
    metric, low = budget.get("metric", "cosine"), budget.get("min")
    if metric not in BUDGET_METRICS or isinstance(low, bool) or not isinstance(
            low, (int, float)) or not 0 < low <= 1:
        if budget or not variant.assignment:
            problems.append(f"{where}.budget: {variant.budget!r}; give the accuracy budget as "
                            'budget = {metric = "cosine", min = 0.999} (cosine of the outputs '
                            "to the fp32 model's, worst calibration sample; min in (0, 1])")
    return replace(variant, formats=tuple(formats))


def mixed_budget(variant: VariantSpec) -> float:
    """The mixed scheme's budget: the least cosine to fp32 (0 when none is set)."""
    return float(variant.budget.get("min", 0.0)) if isinstance(variant.budget, dict) else 0.0


def variant_validation(spec: ModelSpec, variant: VariantSpec) -> ValidationSpec:
    """The validation settings of one variant: its scheme's default gates, overridden by the
    model's ``[validation]`` table, overridden by the variant's own. A mixed variant's budget
    is its quality gate unless it sets that gate itself."""
    from pipeline.schemes import get_scheme

    gates = dict(get_scheme(variant.scheme).default_gates)
    if variant.scheme == "mixed" and mixed_budget(variant):
        gates["quality_cosine_min"] = mixed_budget(variant)
    gates.update({k: getattr(spec.validation, k) for k in spec.validation_set
                  if k in GATE_KEYS})
    gates.update(variant.validation)
    return replace(spec.validation, **gates)


def load_spec(path: Path) -> ModelSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read model spec {path}: {e}") from None
    return parse_spec(data, str(path))


def load_specs(models_dir: Path, broken: dict[str, str] | None = None) -> dict[str, ModelSpec]:
    """Every ``*.toml`` spec in ``models_dir``, by model name.

    Without ``broken`` the first invalid spec raises its ConfigError. With it, an invalid
    spec is recorded there (spec path -> its message) and skipped, so one bad spec fails
    only its own model.
    """
    specs: dict[str, ModelSpec] = {}
    for path in sorted(models_dir.glob("*.toml")):
        try:
            spec = load_spec(path)
            if spec.name in specs:
                raise ConfigError(f"model name {spec.name!r} is used by two specs: "
                                  f"{specs[spec.name].spec_path} and {path}; rename one")
        except ConfigError as e:
            if broken is None:
                raise
            broken[str(path)] = str(e)
            continue
        for warning in spec.warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
        specs[spec.name] = spec
    return specs


def find_artifact(specs: dict[str, ModelSpec], artifact: str) -> tuple[ModelSpec, VariantSpec]:
    """Split ``resnet50_int8`` into its spec and variant; unknown names list the known ones."""
    for spec in specs.values():
        for vname, variant in spec.variants.items():
            if artifact == f"{spec.name}_{vname}":
                return spec, variant
    known = [a for s in specs.values() for a in s.artifact_names()]
    raise ConfigError(f"unknown artifact {artifact!r}; known: {', '.join(known) or 'none'}")
