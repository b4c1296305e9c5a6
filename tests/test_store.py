"""The artifact store: recipe ids, atomic publish, verification, reuse, locking, gc."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import hashing, store
from pipeline.core.errors import PipelineError, StageFailed


def _produce(text: str, calls: list):
    def produce(out: Path):
        calls.append(out)
        (out / "a.txt").write_text(text)
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"\x00\x01")
        return {"note": "hi"}
    return produce


def test_recipe_id_is_canonical_and_sensitive():
    a = hashing.recipe_id("s", {"x": 1, "y": [1, 2]}, {"in": "abc"})
    assert a == hashing.recipe_id("s", {"y": [1, 2], "x": 1}, {"in": "abc"})
    assert a != hashing.recipe_id("s", {"x": 2, "y": [1, 2]}, {"in": "abc"})
    assert a != hashing.recipe_id("s", {"x": 1, "y": [1, 2]}, {"in": "abd"})
    assert a != hashing.recipe_id("t", {"x": 1, "y": [1, 2]}, {"in": "abc"})


def test_tool_version_is_part_of_recipe(monkeypatch):
    before = hashing.recipe_id("compile", {}, {})
    monkeypatch.setitem(hashing.TOOLS_BY_STAGE, "compile", ("apache-tvm", "pretend-tool"))
    assert hashing.recipe_id("compile", {}, {}) != before


def test_publish_reuse_and_manifest(tmp_path):
    calls = []
    stable = tmp_path / "art" / "stage"
    r1 = store.run_stage(tmp_path, "s", {"k": 1}, {}, stable, _produce("one", calls))
    assert not r1.reused and len(calls) == 1
    assert stable.is_symlink() and (stable / "a.txt").read_text() == "one"
    manifest = json.loads((stable / "manifest.json").read_text())
    assert manifest["recipe_id"] == r1.recipe_id
    assert set(manifest["outputs"]) == {"a.txt", "sub/b.bin"}
    assert manifest["info"] == {"note": "hi"}
    r2 = store.run_stage(tmp_path, "s", {"k": 1}, {}, stable, _produce("one", calls))
    assert r2.reused and len(calls) == 1  # the verified output was reused, nothing re-ran
    r3 = store.run_stage(tmp_path, "s", {"k": 2}, {}, stable, _produce("two", calls))
    assert not r3.reused and (stable / "a.txt").read_text() == "two"
    # switching back to the first recipe is a store hit
    r4 = store.run_stage(tmp_path, "s", {"k": 1}, {}, stable, _produce("one", calls))
    assert r4.reused and (stable / "a.txt").read_text() == "one" and len(calls) == 2


def test_upstream_bytes_are_part_of_recipe(tmp_path):
    up = tmp_path / "in.txt"
    up.write_text("a")
    calls = []
    stable = tmp_path / "x"
    r1 = store.run_stage(tmp_path, "s", {}, {"in": up}, stable, _produce("1", calls))
    os.utime(up, (time.time() + 5, time.time() + 5))  # touched, same bytes
    assert store.run_stage(tmp_path, "s", {}, {"in": up}, stable, _produce("1", calls)).reused
    up.write_text("b")
    r3 = store.run_stage(tmp_path, "s", {}, {"in": up}, stable, _produce("1", calls))
    assert not r3.reused and r3.recipe_id != r1.recipe_id


def test_corrupted_output_is_detected_and_rebuilt(tmp_path):
    calls = []
    stable = tmp_path / "x"
    store.run_stage(tmp_path, "s", {}, {}, stable, _produce("good", calls))
    target = stable / "a.txt"
    target.write_text("evil")  # same size? no matter: mtime and bytes both change
    assert not store.intact(stable)
    assert "corrupted" in store.verify(stable)
    r = store.run_stage(tmp_path, "s", {}, {}, stable, _produce("good", calls))
    assert not r.reused and len(calls) == 2 and target.read_text() == "good"
    assert store.intact(stable)


def test_failed_stage_leaves_nothing_that_looks_complete(tmp_path):
    stable = tmp_path / "x"

    def boom(out: Path):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("tool crashed")

    with pytest.raises(RuntimeError):
        store.run_stage(tmp_path, "s", {}, {}, stable, boom)
    assert not stable.exists()
    assert list((tmp_path / ".store" / "s").iterdir()) == []


def test_dir_without_manifest_is_not_an_artifact(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "model.so").write_bytes(b"x")
    assert "no valid manifest" in store.verify(d)


KILLED_CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipeline.core import store
def produce(out):
    (out / "half").write_text("x")
    print("started", flush=True)
    time.sleep(60)
store.run_stage(Path({root!r}), "s", {{}}, {{}}, Path({root!r}) / "x", produce)
"""


def test_kill_9_mid_stage_then_resume(tmp_path):
    repo = str(Path(__file__).resolve().parent.parent)
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD.format(repo=repo,
                                                                         root=str(tmp_path))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    child.kill()
    child.wait()
    temps = list((tmp_path / ".store" / "s").glob(".tmp-*"))
    assert temps and not (tmp_path / "x").exists()  # half-built, but not published
    calls = []
    r = store.run_stage(tmp_path, "s", {}, {}, tmp_path / "x", _produce("ok", calls))
    assert not r.reused and (tmp_path / "x" / "a.txt").read_text() == "ok"
    assert not list((tmp_path / ".store" / "s").glob(".tmp-*"))  # dead temp cleaned


HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipeline.core import store
with store.file_lock(Path({root!r}) / "x.lock", "thing"):
    print("locked", flush=True)
    time.sleep(2)
"""


def test_second_builder_waits_with_a_message(tmp_path, capsys):
    repo = str(Path(__file__).resolve().parent.parent)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=repo,
                                                                   root=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    with store.file_lock(tmp_path / "x.lock", "thing"):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.5
    assert "waiting for it to finish" in capsys.readouterr().out


def test_gc_removes_only_unreferenced(tmp_path):
    calls = []
    stable = tmp_path / "x"
    old = store.run_stage(tmp_path, "s", {"v": 1}, {}, stable, _produce("1", calls))
    new = store.run_stage(tmp_path, "s", {"v": 2}, {}, stable, _produce("2", calls))
    (tmp_path / "mine.txt").write_text("user file")
    removed = store.gc(tmp_path)
    assert removed == [old.path]
    assert new.path.exists() and (tmp_path / "mine.txt").exists()


@pytest.mark.parametrize("code, needle", [(errno.ENOSPC, "disk is full"),
                                          (errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission denied")])
def test_disk_errors_publish_nothing_and_say_what_to_do(tmp_path, code, needle):
    """The OS refusing a write (disk full, read-only, not ours) is one StageFailed that says
    where and what to do; the half-written temp dir goes, the earlier output stays."""
    stable = tmp_path / "art" / "stage"
    good = store.run_stage(tmp_path, "s", {"k": 1}, {}, stable, _produce("one", []))

    def produce(out: Path):
        (out / "a.txt").write_text("half")
        raise OSError(code, os.strerror(code), str(out / "a.txt"))

    with pytest.raises(StageFailed) as e:
        store.run_stage(tmp_path, "s", {"k": 2}, {}, stable, produce)
    msg = str(e.value)
    assert "stage 's' failed" in msg and needle in msg and "a.txt" in msg
    assert "Nothing was published" in msg and "run the task again" in msg
    assert ("doit gc" in msg) == (code == errno.ENOSPC)
    assert list((tmp_path / ".store" / "s").iterdir()) == [good.path]  # no temp dir left
    assert stable.resolve() == good.path and (stable / "a.txt").read_text() == "one"


def test_other_os_errors_are_not_rewritten(tmp_path):
    def produce(out: Path):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError) as e:
        store.run_stage(tmp_path, "s", {}, {}, tmp_path / "stable", produce)
    assert not isinstance(e.value, StageFailed)


def test_missing_upstream_file_is_a_stage_failure(tmp_path):
    with pytest.raises(StageFailed, match=r"input file\(s\) missing: onnx \(.*gone.onnx\)"):
        store.run_stage(tmp_path, "source", {}, {"onnx": tmp_path / "gone.onnx"},
                        tmp_path / "stable", _produce("x", []))


def test_check_writable(tmp_path, monkeypatch):
    store.check_writable(tmp_path / "artifacts")  # made if missing
    assert (tmp_path / "artifacts").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(PipelineError, match="file/ is not writable: .*not a directory"):
        store.check_writable(tmp_path / "file")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "artifacts"))

    monkeypatch.setattr(store.tempfile, "TemporaryFile", refuse)
    with pytest.raises(PipelineError) as e:
        store.check_writable(tmp_path / "artifacts")
    assert str(e.value).startswith("artifacts/ is not writable: ")
    assert "Permission denied" in str(e.value) and "chmod -R u+w" in str(e.value)
