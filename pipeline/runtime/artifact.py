"""A built artifact as validate and bench see it: the packaged app and its reference ONNX."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.spec import input_ranges
from pipeline.schemes import get_scheme

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
    ranges: dict = field(default_factory=dict)  # input name -> (lo, hi), the spec's range
    scheme: str = ""  # the variant's number format (pipeline.schemes), for the reports
    computes: str = ""  # what the scheme says the artifact computes in

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
                   inputs=tuple((i.name, tuple(i.shape), i.dtype) for i in spec.inputs),
                   ranges=input_ranges(spec),
                   scheme=variant.scheme, computes=get_scheme(variant.scheme).summary)

    def feed_names(self, io: dict) -> list[str]:
        """For each input of the compiled model (``io.json``, in ``main``'s order), the name
        of the spec input (the ONNX graph input) that feeds it.

        TVM's ONNX importer renames inputs that are not identifiers (``input.1`` becomes
        ``input_1``, ``0`` becomes ``input_0``), so names are matched as it renames them.
        """
        from pipeline.core.errors import ConfigError

        compiled = [t["name"] for t in io["inputs"]]
        by_tvm_name = {tvm_input_name(name): name for name, _, _ in self.inputs}
        by_tvm_name.update({name: name for name, _, _ in self.inputs})
        missing = [n for n in compiled if n not in by_tvm_name]
        if missing or len(compiled) != len(self.inputs):
            raise ConfigError(
                f"{self.name}: the compiled model's inputs {compiled} (from {self.io_json}) do "
                f"not match the spec's {[n for n, _, _ in self.inputs]} (TVM renames "
                "'input.1' to 'input_1'); declare every graph input of the model in the spec's "
                "[[inputs]], with the names the ONNX file uses")
        return [by_tvm_name[n] for n in compiled]

    def header(self) -> dict[str, Any]:
        head = {"artifact": self.name, "model": self.model, "variant": self.variant,
                "target": self.target}
        if self.scheme:
            head.update(scheme=self.scheme, computes=self.computes)
        return head


def tvm_input_name(onnx_name: str) -> str:
    """The name TVM 0.27's ONNX importer gives a graph input (its ``_sanitize_name``, less the
    numbering it adds only when two inputs would collide)."""
    name = onnx_name.replace(".", "_")
    if name and not (name[0].isalpha() or name[0] == "_"):
        name = f"input_{name}"
    return name
