"""What a new user's mistakes get, through a real doit run: one message that says what to do,
a non-zero exit, never a traceback. Every run here stops before the expensive stages."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
from doit_runner import REPO, doit

from models import TINY_SPEC, make_project

BAD_SPEC = 'name = "bad"\n[source]\npath = "models/tiny.onnx"\n[[inputs]]\nname = "x"\n' \
           'shape = [1, -3]\n'


def _clean_failure(run, code: int = 2) -> str:
    assert run.returncode == code, run.output
    assert "Traceback" not in run.output, run.output
    return run.output


def test_bad_option_values_are_named_with_what_is_allowed(tmp_path):
    root = make_project(tmp_path)
    out = _clean_failure(doit(root, "list", "trials=abc", "tune_minutes=-1", "rpc=h:port:k",
                              "threads=100000", "warmup=-1", "repeat=x", "trails=3"))
    for needle in ("trials=abc: not a whole number", "tune_minutes=-1: must be",
                   "rpc=h:port:k: port 'port' must be a number 1..65535",
                   f"threads=100000: must be 1..{os.cpu_count()}", "warmup=-1: must be",
                   "repeat=x: not a whole number", "trails=3: unknown option 'trails'"):
        assert needle in out
    assert "invalid literal" not in out


def test_unknown_artifact_lists_the_known_ones(tmp_path):
    root = make_project(tmp_path)
    out = _clean_failure(doit(root, "build:resnet51_int8"))
    assert "ERROR: unknown artifact 'resnet51_int8' in `doit build:resnet51_int8`; known: " \
           "tiny_fp32, tiny_int8" in out
    assert "Invalid parameter" not in out
    out = _clean_failure(doit(root, "compile:tiny_int8"))
    assert "`doit compile:tiny_int8@cpu`" in out
    out = _clean_failure(doit(root, "info", "source:tinny"))
    assert "unknown model 'tinny' in `doit source:tinny`; known: tiny" in out


def test_missing_source_file_names_the_spec_and_the_key(tmp_path):
    root = make_project(tmp_path)
    (root / "models" / "tiny.onnx").unlink()
    out = _clean_failure(doit(root, "build:tiny"), code=1)
    assert f"model spec {root / 'models' / 'tiny.toml'} is invalid" in out
    assert "source.path: 'models/tiny.onnx': no such file" in out
    assert "Put the ONNX model there or fix source.path" in out
    out = _clean_failure(doit(root, "source:tiny"))
    assert "source.path: 'models/tiny.onnx': no such file" in out
    assert "FileNotFoundError" not in out


def test_one_bad_spec_fails_only_its_own_model(tmp_path):
    root = make_project(tmp_path)
    (root / "models" / "bad.toml").write_text(BAD_SPEC)
    listed = doit(root, "list", "--all")
    assert listed.returncode == 0, listed.output
    assert "build:tiny_int8" in listed.output and "source:tiny " in listed.output
    assert re.search(r"^ERROR: models/bad.toml is invalid, its model is left out .*"
                     r"inputs\[0\]\.shape: \[1, -3\]", listed.output, re.M)
    good = doit(root, "source:tiny")  # a task of the good model runs
    assert good.returncode == 0 and "source:tiny" in good.executed, good.output
    out = _clean_failure(doit(root, "build:bad"), code=1)
    assert "model spec" in out and "bad.toml is invalid" in out and "positive ints" in out
    out = _clean_failure(doit(root, "validate:bad_int8@cpu"))
    assert "unknown artifact 'bad_int8@cpu'" in out and "positive ints" in out


@pytest.mark.slow
def test_good_model_builds_next_to_a_bad_spec(tmp_path):
    root = make_project(tmp_path, spec_text=TINY_SPEC)
    (root / "models" / "bad.toml").write_text(BAD_SPEC)
    run = doit(root, "build:tiny_fp32", "tune=off")
    assert run.returncode == 0, run.output
    assert (root / "artifacts" / "tiny_fp32" / "cpu" / "model.so").exists()
    assert "build:bad" not in run.executed


def test_artifacts_not_writable_is_said_before_doit_starts(tmp_path):
    root = make_project(tmp_path)
    (root / "artifacts").write_text("not a directory")
    out = _clean_failure(doit(root, "list"))
    assert "ERROR: artifacts/ is not writable: " in out and "make it a writable" in out
    assert "readonly database" not in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_read_only_artifacts_dir(tmp_path):
    root = make_project(tmp_path)
    (root / "artifacts").mkdir()
    (root / "artifacts").chmod(0o555)
    try:
        out = _clean_failure(doit(root, "build:tiny_int8"))
    finally:
        (root / "artifacts").chmod(0o755)
    assert "artifacts/ is not writable: " in out and "Permission denied" in out


# ------------------------------------------------------- commands that messages suggest
DOIT_COMMANDS = {"list", "clean", "forget", "info", "help", "run", "ignore", "dumpdb",
                 "strace", "tabcompletion", "auto", "reset-dep"}
PER_TARGET = {"tune", "compile", "package", "smoke", "validate", "bench"}


def _strings(path: Path) -> list[str]:
    """Every string literal of a Python file (implicitly joined; an f-string's fields are
    ``{}``), docstrings included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}"
                               for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
    return out


def _suggested_commands() -> list[tuple[str, str]]:
    """(file, command) for every ```doit ...``` quoted in pipeline/ and dodo.py."""
    found = []
    for path in [REPO / "dodo.py", *sorted((REPO / "pipeline").rglob("*.py"))]:
        for text in _strings(path):
            quoted = [m.group(1) for m in re.finditer(r"`+(doit(?: [^`]*)?)`", text)]
            # and unquoted ones that name a task: "run doit build:x target=h100"
            quoted += [m.group(0) for m in re.finditer(r"\bdoit [a-z_]+:[^\s`]+", text)]
            found += [(str(path.relative_to(REPO)), " ".join(c.split())) for c in quoted]
    return found


def test_suggested_commands_exist():
    """Every `doit ...` a message names: its task group exists, a per-artifact task is named
    as the graph names it, and every NAME= is an option a task reads."""
    from pipeline.nightly import NIGHTLY_VARS
    from pipeline.tasks.options import OPTION_NAMES

    groups = set(re.findall(r"^def task_(\w+)\(", (REPO / "dodo.py").read_text(), re.M))
    assert {"source", "build", "nightly", "gc", "save_tuning_logs"} <= groups
    commands = _suggested_commands()
    assert any("build:<artifact>" in c for _, c in commands)  # the compile warning's
    bad = []
    for where, command in commands:
        words = command.split()[1:]
        for word in words:
            if word.startswith("-") or word == "..." or "{}" in word or word == "NAME=VALUE":
                continue  # an option, a placeholder, a value filled in at run time
            if "=" in word:
                name = word.split("=", 1)[0]
                if name not in OPTION_NAMES and name not in NIGHTLY_VARS:
                    bad.append(f"{where}: `{command}`: no option {name!r}")
                continue
            group, _, task = word.partition(":")
            if group not in groups and group not in DOIT_COMMANDS:
                bad.append(f"{where}: `{command}`: no task group or doit command {group!r}")
            elif group in PER_TARGET and task and "@" not in task:
                bad.append(f"{where}: `{command}`: {group} tasks are named "
                           "<model>_<variant>@<target>")
            elif group == "source" and task and "_" in task and "<" not in task:
                bad.append(f"{where}: `{command}`: source tasks are named <model>")
    assert not bad, "\n".join(bad)
