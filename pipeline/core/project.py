"""Where a project keeps things: its model specs, artifacts and tuning logs, and the stable
paths of every artifact's stage outputs (the names doit tasks, stages and reports share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.spec import ModelSpec, VariantSpec, load_specs
from pipeline.schemes import get_scheme

# The checkout this package runs from: templates/ and runtime_cpp/ (what the package stage
# renders and compiles) live here, and tuning workers put it on their PYTHONPATH.
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Project:
    """Where a build reads specs and writes artifacts (the directory doit runs in)."""

    root: Path
    specs: dict[str, ModelSpec]
    # spec path -> why it cannot be built (invalid, or its source file is missing): such a
    # spec fails only its own model; the others build
    broken: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Project:
        broken: dict[str, str] = {}
        specs = load_specs(root / "models", broken)
        for name, spec in list(specs.items()):
            problem = missing_source(root, spec)
            if problem:
                broken[spec.spec_path] = problem
                del specs[name]
        return cls(root, specs, broken)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def tuning_logs(self) -> Path:
        return self.root / "models" / "tuning_logs"


def missing_source(root: Path, spec: ModelSpec) -> str | None:
    """What is wrong if the spec's source (its ONNX file or generator) is not there."""
    if spec.source.generator:
        key, value = "source.generator", spec.source.generator
        where = root / "models" / f"{value}.py"
        fix = f"add models/{value}.py (with generate(out_path, seed)) or fix {key}"
    else:
        key, value = "source.path", spec.source.path
        where = root / value
        fix = f"put the ONNX model there or fix {key} (relative to the project dir {root})"
    if where.is_file():
        return None
    return (f"model spec {spec.spec_path} is invalid:\n  - {key}: {value!r}: no such file "
            f"{where}\n{fix[0].upper()}{fix[1:]}.")


@dataclass(frozen=True)
class ArtifactPaths:
    """The stable (symlinked) paths of one artifact's stage outputs."""

    source: Path
    quantize: Path | None
    import_: Path
    tune: Path
    compile: Path
    package: Path
    smoke: Path
    artifact_dir: Path  # artifacts/<model>_<variant>/<target>


def artifact_paths(project: Project, spec: ModelSpec, variant: VariantSpec,
                   target: str) -> ArtifactPaths:
    art = project.artifacts
    name = f"{spec.name}_{variant.name}"
    out = art / name / target
    return ArtifactPaths(
        source=art / spec.name / "source",
        quantize=art / name / "quantize" if get_scheme(variant.scheme).quantized else None,
        import_=art / name / "import",
        tune=out / "tune", compile=out / "compile", package=out / "package",
        smoke=out / "smoke", artifact_dir=out)
