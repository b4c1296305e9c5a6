"""What code each stage runs, found from its imports, so a recipe cannot go stale.

A stage's output depends on every module of this package the stage imports, directly or
through others, at the top of a module or inside a function (the heavy imports are lazy).
:func:`import_closure` walks those imports statically (``ast``: nothing is executed, so
``doit list`` stays instant) and :func:`code_digest` hashes the files found, plus the
non-Python files a stage reads (the package stage's templates and C++ helpers). A hand-kept
list of files went stale twice (tune did not list the kernel check that picks its records).
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# The module that implements each doit stage (stage name -> module under pipeline.stages).
STAGE_MODULES: dict[str, str] = {
    "source": "pipeline.stages.source",
    "quantize": "pipeline.stages.quantize",
    "import": "pipeline.stages.import_model",
    "tune": "pipeline.stages.tune",
    "compile": "pipeline.stages.compile_model",
    "package": "pipeline.stages.package",
    "smoke": "pipeline.stages.smoke",
    "validate": "pipeline.stages.validate",
    # the validation kit is validate's other product (same comparisons, gates, references)
    "kit": "pipeline.stages.validate",
    "bench": "pipeline.stages.bench",
}

# Folders of the checkout (beside the package) whose files a stage reads at run time.
STAGE_DATA_DIRS: dict[str, tuple[str, ...]] = {"package": ("templates", "runtime_cpp")}


def module_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The file of ``pipeline.a.b`` (``a/b.py`` or ``a/b/__init__.py``), None if not ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``pipeline/a/b.py`` -> ``pipeline.a.b`` (a package's ``__init__.py`` -> its name)."""
    rel = path.relative_to(package_dir).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Modules of this package that ``path`` imports anywhere in its body (lazy ones too).

    ``from pipeline.x import y`` names module ``pipeline.x.y`` when that is a module, else
    ``pipeline.x``; relative imports are resolved against the importing module's package.
    ``if TYPE_CHECKING:`` imports count too: cheap over-approximation, never a miss.
    """
    name = module_name(path, package_dir)
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names
                         if module_path(f"{base}.{a.name}", package_dir) is not None)
    return {m for m in found if module_path(m, package_dir) is not None}


def _with_parents(module: str) -> list[str]:
    """Importing ``pipeline.a.b`` runs ``pipeline/__init__`` and ``pipeline/a/__init__`` too."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(module: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every file of this package that importing ``module`` can run, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for m in _with_parents(current):
            if m in seen:
                continue
            path = module_path(m, package_dir)
            if path is None:
                continue
            seen.add(m)
            todo.extend(imported_modules(path, package_dir) - seen)
    paths = {module_path(m, package_dir) for m in seen}
    return sorted(p for p in paths if p is not None)


@cache
def code_digest(stage: str, package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 (16 hex) of the code ``stage`` runs: its import closure and its data folders."""
    h = hashlib.sha256()
    module = STAGE_MODULES.get(stage)
    files = import_closure(module, package_dir) if module else []
    for f in files:
        h.update(f.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    repo = package_dir.parent
    for folder in STAGE_DATA_DIRS.get(stage, ()):
        for f in sorted(p for p in (repo / folder).rglob("*") if p.is_file()):
            h.update(f.relative_to(repo).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
