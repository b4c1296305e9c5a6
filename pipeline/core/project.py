"""Where a project keeps things: its model specs, artifacts and tuning logs, and the stable
paths of every artifact's stage outputs (the names doit tasks, stages and reports share).
"""

from __future__ import annotations

from dataclasses import dataclass
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

    @classmethod
    def load(cls, root: Path) -> Project:
        return cls(root, load_specs(root / "models"))

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def tuning_logs(self) -> Path:
        return self.root / "models" / "tuning_logs"


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
