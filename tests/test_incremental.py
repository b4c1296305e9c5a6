"""Incremental builds through the real doit: what re-runs, what does not, and recovery.

Each test could fail: it names the stages that must (not) run and checks doit's own
report of executed tasks and the store's report of built vs reused outputs.
"""

import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from doit_runner import REPO, doit, doit_cmd

from models import make_project

pytestmark = pytest.mark.slow
FP32 = ("build:tiny_fp32", "tune=off")


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("template"))
    first = doit(project, *FP32)
    assert first.returncode == 0, first.output
    return project


@pytest.fixture
def project(built_once, tmp_path):
    """A private copy of a built project (its store symlinks are relative). doit's state
    keys on absolute paths, so one run re-syncs it: every stage reuses its stored output."""
    project = tmp_path / "project"
    shutil.copytree(built_once, project, symlinks=True)
    sync = doit(project, *FP32)
    assert sync.returncode == 0 and sync.built == set(), sync.output
    return project


def test_noop_rebuild_runs_nothing(project):
    run = doit(project, *FP32)
    assert run.returncode == 0 and run.executed == set(), run.output


def test_touch_without_change_runs_nothing(project):
    later = time.time() + 10
    os.utime(project / "models" / "tiny.onnx", (later, later))
    run = doit(project, *FP32)
    assert run.executed == set(), run.output


def test_identical_bytes_stop_the_rebuild(project):
    # A new budget makes the tune stage run again; with nothing to tune it writes the same
    # database bytes, so compile and everything after it stay up to date.
    run = doit(project, "build:tiny_fp32", "tune=off", "trials=9")
    assert run.returncode == 0, run.output
    assert "tune:tiny_fp32@cpu" in run.executed
    assert not {"compile:tiny_fp32@cpu", "package:tiny_fp32@cpu"} & run.executed, run.output


def test_config_change_fans_out_from_its_stage(project):
    spec = project / "models" / "tiny.toml"
    spec.write_text(spec.read_text().replace("[calibration]\nsamples = 4",
                                             "[calibration]\nsamples = 5"))
    assert doit(project, "build:tiny_int8", "tune=off").returncode == 0
    spec.write_text(spec.read_text().replace("samples = 5", "samples = 6"))
    run = doit(project, "build:tiny_int8", "tune=off")
    assert run.returncode == 0, run.output
    assert "quantize" in run.built and "import" in run.built
    assert "source:tiny" not in run.executed


def test_gate_change_reruns_only_validation(project):
    assert doit(project, "validate:tiny_fp32@cpu", "tune=off").returncode == 0
    spec = project / "models" / "tiny.toml"
    spec.write_text(spec.read_text() + "\n[validation]\nfp32_rel_tol = 2e-4\n")
    run = doit(project, "validate:tiny_fp32@cpu", "tune=off")
    assert run.returncode == 0, run.output
    assert run.executed == {"validate:tiny_fp32@cpu"}, run.output


def test_deleted_state_redoes_nothing_expensive(project):
    (project / "artifacts" / ".doit.sqlite3").unlink()
    run = doit(project, *FP32)
    assert run.returncode == 0, run.output
    assert run.built == set(), run.output  # every stage found its verified output
    assert {"import", "compile", "package"} <= run.reused


def test_corrupted_output_is_rebuilt_not_shipped(project):
    model_so = project / "artifacts" / "tiny_fp32" / "cpu" / "compile" / "model.so"
    data = bytearray(model_so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_so.write_bytes(bytes(data))
    run = doit(project, *FP32)
    assert run.returncode == 0, run.output
    assert "compile" in run.built and "rejected" in run.output
    assert model_so.read_bytes() != bytes(data)


def test_kill_9_mid_build_then_resume(tmp_path):
    project = make_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(doit_cmd(project, *FP32), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    seen = ""
    for line in proc.stdout:  # kill as soon as the package stage starts (after compile)
        seen += line
        if line.startswith(".  package:"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert "compile: built" in seen, seen
    assert not (project / "artifacts" / "tiny_fp32" / "cpu" / "package").exists()
    run = doit(project, *FP32)
    assert run.returncode == 0, run.output
    assert "package" in run.built and "smoke" in run.built
    assert not {"import", "compile"} & run.built, run.output  # not redone


def test_two_builds_at_once(tmp_path):
    project = make_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(doit_cmd(project, *FP32), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # each output was built once; the other runner waited and then reused it
    for stage in ("import", "compile", "package"):
        assert sum(len(re.findall(rf"^{stage}: built", o, re.M)) for o in outs) == 1, outs
    assert any("waiting for it to finish" in o for o in outs)
    assert doit(project, *FP32).executed == set()


# ----------------------------------------------------------------------------- deliverables

DELIVERABLE_DIR = ("artifacts", "tiny_fp32", "cpu")


def _code_copy(dest: Path) -> Path:
    """The tool's code (dodo.py, pipeline/, templates/, runtime_cpp/) in a temp dir."""
    dest.mkdir()
    shutil.copy2(REPO / "dodo.py", dest / "dodo.py")
    for folder in ("pipeline", "templates", "runtime_cpp"):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_a_template_change_reaches_the_deliverable_binary_and_bundle(project, tmp_path):
    code = _code_copy(tmp_path / "code")
    template = code / "templates" / "main.cc.j2"
    marker = "usage (edited template): infer --input PATH"
    text = template.read_text()
    assert '"usage: infer --input PATH' in text
    template.write_text(text.replace('"usage: infer --input PATH', f'"{marker}', 1))
    run = doit(project, *FP32, repo=code)
    assert run.returncode == 0, run.output
    assert "package" in run.built and "build:tiny_fp32" in run.executed, run.output
    artifact = project.joinpath(*DELIVERABLE_DIR)
    shown = subprocess.run([str(artifact / "bin" / "infer"), "--help"], capture_output=True,
                           text=True, timeout=60)
    assert marker in shown.stdout + shown.stderr
    with tarfile.open(artifact / "tiny_fp32-cpu.tar.gz") as bundle:
        sources = [m for m in bundle.getnames() if m.endswith("main.cc")]
        assert sources, bundle.getnames()
        assert marker in bundle.extractfile(sources[0]).read().decode()
    assert marker in (artifact / "src" / "main.cc").read_text()


def test_a_deleted_deliverable_link_is_restored_by_a_plain_build(project):
    artifact = project.joinpath(*DELIVERABLE_DIR)
    (artifact / "bin").unlink()
    (artifact / "tiny_fp32-cpu.tar.gz").unlink()
    run = doit(project, *FP32)
    assert run.returncode == 0, run.output
    assert run.executed == {"build:tiny_fp32"}, run.output  # only the links, nothing rebuilt
    assert (artifact / "bin").is_symlink() and (artifact / "bin" / "infer").is_file()
    assert (artifact / "tiny_fp32-cpu.tar.gz").is_symlink()
    again = doit(project, *FP32)
    assert again.executed == set(), again.output


def test_validate_after_a_tune_off_build_does_not_tune(project):
    """tune=off is remembered: a plain `doit validate` checks what was built."""
    run = doit(project, "validate:tiny_fp32@cpu")
    assert run.returncode == 0, run.output
    assert "tune=off from an earlier command" in run.output
    assert not {"tune:tiny_fp32@cpu", "compile:tiny_fp32@cpu"} & run.executed, run.output
