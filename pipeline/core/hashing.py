"""Content hashing: recipe ids from canonical JSON, file digests cached by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import cache
from importlib import metadata
from pathlib import Path

from pipeline import __version__
from pipeline.core.code_digest import code_digest

# Distributions whose version changes what a stage produces. Part of every recipe, so an
# upgrade of TVM (say) rebuilds exactly the stages that use TVM.
TOOLS_BY_STAGE: dict[str, tuple[str, ...]] = {
    "source": ("onnx", "onnxruntime"),
    "quantize": ("onnx", "onnxruntime"),
    "import": ("onnx", "apache-tvm", "apache-tvm-ffi"),
    "tune": ("apache-tvm", "apache-tvm-ffi"),
    "compile": ("apache-tvm", "apache-tvm-ffi"),
    "package": ("apache-tvm", "apache-tvm-ffi", "jinja2"),
    "smoke": ("apache-tvm",),
    "validate": ("onnxruntime", "apache-tvm"),
    "kit": ("onnx", "onnxruntime"),
    "bench": ("onnxruntime", "apache-tvm"),
}


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and fixed separators: equal data, equal text, equal hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def recipe_of(config) -> dict:
    """A stage's typed config as the plain data its recipe hashes (tuples become lists)."""
    from dataclasses import asdict

    return json.loads(canonical_json(asdict(config)))


def jsonable(value):
    """Plain data for strict JSON: infinities and NaN become "inf"/"-inf"/"nan", paths str."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@cache
def tool_version(dist: str) -> str:
    """Installed version of a distribution (cheap: reads metadata, imports nothing)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not-installed"


def tool_versions(stage: str) -> dict[str, str]:
    """Versions that matter to ``stage``, the pipeline's own version included."""
    versions = {dist: tool_version(dist) for dist in TOOLS_BY_STAGE.get(stage, ())}
    versions["onnx2deploy"] = f"{__version__}+{code_digest(stage)}"
    return versions


def recipe_id(stage: str, config: dict, upstream: dict[str, str]) -> str:
    """The id of a stage output, known before anything runs.

    sha256 over the stage name, its config, the sha256 of every upstream input and the tool
    versions: the same recipe always names the same output, a different one never does.
    """
    return sha256_text(canonical_json({
        "stage": stage, "config": config, "upstream": upstream,
        "tools": tool_versions(stage)}))


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, memoised on (real path, size, mtime_ns) within a process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def forget_digests() -> None:
    """Drop memoised digests (tests that flip bytes without changing size or mtime)."""
    _DIGESTS.clear()
