"""The package's shape: no import cycles, no stage importing another stage, recipes that
follow the code each stage really runs (pipeline.core.code_digest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.core import code_digest
from pipeline.core.code_digest import PACKAGE_DIR, STAGE_MODULES, import_closure

STAGES_PACKAGE = "pipeline.stages."


def _all_modules() -> list[str]:
    return [code_digest.module_name(path) for path in sorted(PACKAGE_DIR.rglob("*.py"))]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in _all_modules():
        path = code_digest.module_path(name)
        assert path is not None, name
        graph[name] = code_digest.imported_modules(path) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_module_graph_has_no_cycles():
    graph = _graph()
    # A package's __init__ importing its own submodules is how Python packages work; it
    # is a cycle only if the submodule also imports the package back, which we still catch.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (name in _parents(d) and
                                                name not in graph.get(d, set()))}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lazy_imports_are_seen(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "x").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x" / "__init__.py").write_text("")
    (pkg / "x" / "a.py").write_text("def f():\n    from pipeline.x import b\n    from . import c\n")
    (pkg / "x" / "b.py").write_text("")
    (pkg / "x" / "c.py").write_text("")
    found = code_digest.imported_modules(pkg / "x" / "a.py", pkg)
    assert {"pipeline.x.b", "pipeline.x.c"} <= found


def test_no_stage_imports_another_stage():
    graph = _graph()
    offenders = [f"{name} imports {dep}" for name, deps in graph.items()
                 if name.startswith(STAGES_PACKAGE)
                 for dep in deps if dep.startswith(STAGES_PACKAGE) and dep != name]
    assert offenders == []


def test_every_stage_has_a_module():
    for stage, module in STAGE_MODULES.items():
        assert code_digest.module_path(module) is not None, stage


# ----------------------------------------------------------------------------- recipes

@pytest.fixture()
def package_copy(tmp_path) -> Path:
    """A temp copy of the package (and the folders beside it the package stage reads)."""
    repo = PACKAGE_DIR.parent
    shutil.copytree(PACKAGE_DIR, tmp_path / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for folder in code_digest.STAGE_DATA_DIRS["package"]:
        shutil.copytree(repo / folder, tmp_path / folder)
    return tmp_path / "pipeline"


def _digests(package_dir: Path) -> dict[str, str]:
    code_digest.code_digest.cache_clear()
    return {stage: code_digest.code_digest(stage, package_dir) for stage in STAGE_MODULES}


def _edit(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_editing_any_module_a_stage_imports_changes_its_recipe(package_copy, stage):
    def digest() -> str:
        code_digest.code_digest.cache_clear()
        return code_digest.code_digest(stage, package_copy)

    before = digest()
    closure = import_closure(STAGE_MODULES[stage], package_copy)
    assert closure, stage
    for path in closure:
        _edit(path)
        after = digest()
        assert after != before, f"{stage} ignores {path.name}"
        before = after


def test_the_tune_recipe_follows_the_kernel_check(package_copy):
    """The hand-kept list this replaced missed it: the check picks the published record."""
    before = _digests(package_copy)
    _edit(package_copy / "tuning" / "kernel_check.py")
    after = _digests(package_copy)
    assert after["tune"] != before["tune"]
    # compile checks the schedules it transfers to kernels without a record
    assert after["compile"] != before["compile"]
    assert after["import"] == before["import"]


def test_editing_a_module_no_stage_imports_changes_no_recipe(package_copy):
    before = _digests(package_copy)
    _edit(package_copy / "nightly" / "__init__.py")
    assert _digests(package_copy) == before


def test_a_template_change_reruns_package_only(package_copy):
    before = _digests(package_copy)
    _edit(package_copy.parent / "templates" / "main.cc.j2")
    after = _digests(package_copy)
    assert [s for s in STAGE_MODULES if after[s] != before[s]] == ["package"]
