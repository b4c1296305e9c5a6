"""A built artifact as validate and bench see it: the packaged app and its reference ONNX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core.project import ArtifactPaths
    from pipeline.core.spec import ModelSpec, VariantSpec
    from pipeline.core.targets import TargetSpec


@dataclass(frozen=True)
class ArtifactUnderTest:
    """One built artifact and the ONNX models it is checked against.

    ``inputs`` are ``(name, shape, dtype)`` in the order the model's ``main`` takes them;
    ``qdq_onnx`` is None for an fp32 variant.
    """

    name: str  # e.g. "tiny_int8"
    model: str
    variant: str
    target: str
    is_gpu: bool
    fp32_onnx: Path
    qdq_onnx: Path | None
    package_dir: Path
    io_json: Path
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def quantized(self) -> bool:
        return self.qdq_onnx is not None

    @classmethod
    def from_spec(cls, spec: ModelSpec, variant: VariantSpec, target: TargetSpec,
                  paths: ArtifactPaths) -> ArtifactUnderTest:
        """The artifact a build of ``spec``/``variant`` for ``target`` leaves at ``paths``.

        Parameters
        ----------
        spec, variant : ModelSpec, VariantSpec
            The model spec and the variant that was built.
        target : TargetSpec
            The target it was built for.
        paths : ArtifactPaths
            Its stage folders, from :func:`pipeline.tasks.artifact_paths`.

        Returns
        -------
        ArtifactUnderTest
        """
        return cls(name=f"{spec.name}_{variant.name}", model=spec.name, variant=variant.name,
                   target=target.name, is_gpu=target.is_gpu,
                   fp32_onnx=paths.source / "model.onnx",
                   qdq_onnx=paths.quantize / "model.onnx" if paths.quantize else None,
                   package_dir=paths.package, io_json=paths.compile / "io.json",
                   inputs=tuple((i.name, tuple(i.shape), i.dtype) for i in spec.inputs))

    def header(self) -> dict[str, Any]:
        return {"artifact": self.name, "model": self.model, "variant": self.variant,
                "target": self.target}
