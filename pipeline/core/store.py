"""The content-addressed artifact store: publish atomically, verify by hash, reuse by recipe.

Every stage output lives in ``<root>/.store/<stage>/<recipe id>/`` with a ``manifest.json``
written last (it also records the stage's wall time, its peak memory: :mod:`.memory`, and
the bytes of its outputs); a directory without a valid manifest is not an artifact. Stable,
human paths (``artifacts/resnet50_int8/cpu/compile``) are relative symlinks into the store, swapped
atomically. Because an output is named by its recipe, a stage that doit re-runs (after a
``kill -9`` lost doit's records, or a deleted state file) finds its verified output and
returns at once instead of re-tuning or re-quantizing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import memory
from pipeline.core.errors import PipelineError, StageFailed
from pipeline.core.hashing import canonical_json, recipe_id, sha256_file, tool_versions

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StageResult:
    """What a stage run produced: its store dir and whether it was reused."""

    path: Path
    recipe_id: str
    reused: bool


def _say(msg: str) -> None:
    # Stages report through print so doit shows progress as it happens.
    print(msg, flush=True)


def _output_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST]


def manifest_outputs(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative posix paths), manifest excluded."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in _output_files(directory)}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def verify(directory: Path, rid: str | None = None, quick: bool = False) -> str | None:
    """Return None if ``directory`` is a complete, intact artifact, else what is wrong.

    ``quick`` trusts a file whose size and mtime equal those recorded at publish time (the
    shortcut doit's own checker takes); any other file is re-hashed.
    """
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no valid manifest (incomplete or interrupted build)"
    if rid is not None and manifest.get("recipe_id") != rid:
        return "manifest is for another recipe"
    stats = manifest.get("stats", {})
    for rel, digest in manifest.get("outputs", {}).items():
        path = directory / rel
        if not path.is_file():
            return f"output {rel} is missing"
        if quick and stats.get(rel) == _stat_key(path):
            continue
        if sha256_file(path) != digest:
            return f"output {rel} does not match its recorded sha256 (corrupted)"
    return None


def intact(stable: Path) -> bool:
    """doit ``uptodate`` check: the published artifact behind ``stable`` is unharmed."""
    return stable.is_dir() and verify(stable, quick=True) is None


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on ``path``; a second holder waits, told who holds it and why.

    Locks are per recipe (and per tuning cache), not per artifacts dir: two builds of
    different artifacts proceed side by side; two builds of the same output take turns,
    and the second then finds the first's verified output in the store.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            _say(f"another build ({holder}) is making {what}; waiting for it to finish "
                 "(Ctrl-C to stop waiting; nothing will be lost)")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def link(stable: Path, target_dir: Path) -> None:
    """Point the stable path at a store dir atomically (relative symlink + rename)."""
    stable.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target_dir, stable.parent)
    if stable.is_symlink() and os.readlink(stable) == rel:
        return
    tmp = stable.with_name(f".{stable.name}.link-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(rel, tmp)
    if stable.is_dir() and not stable.is_symlink():
        shutil.rmtree(stable)  # a real dir left by an older layout: ours to replace
    os.replace(tmp, stable)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(stage_dir: Path) -> None:
    """Delete temp dirs of builds whose process is gone (killed mid-stage)."""
    for tmp in stage_dir.glob(".tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


# OSErrors that say the disk cannot take the output (full, read-only, not ours): reported as
# a StageFailed saying what to do, never a traceback.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied"}


def check_writable(artifacts: Path) -> None:
    """Fail early, saying so, if ``artifacts`` (doit's state and every output) cannot be
    written: otherwise doit stops with "attempt to write a readonly database"."""
    try:
        if artifacts.exists() and not artifacts.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(artifacts))
        artifacts.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=artifacts):
            pass
        for state in artifacts.glob(".doit.sqlite3*"):
            if not os.access(state, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(state))
    except OSError as e:
        raise PipelineError(
            f"{artifacts.name}/ is not writable: {e.filename or artifacts}: {e.strerror}. "
            f"doit keeps its state and every build output in {artifacts}: make it a writable "
            f"directory (e.g. `chmod -R u+w {artifacts}`, or run doit as its owner) and run "
            "again") from None


def run_stage(root: Path, stage: str, config: dict, upstream: dict[str, Path],
              stable: Path, produce: Callable[[Path], dict | None]) -> StageResult:
    """Run one stage with content addressing, verification and atomic publish.

    Parameters
    ----------
    root : artifacts root (holds ``.store``, the lock and doit's state).
    stage : stage name (``quantize``, ``compile``, ...).
    config : the stage's plain-data config; part of the recipe id.
    upstream : named input files; their sha256 are part of the recipe id.
    stable : the stable path to point at the result (a symlink).
    produce : writes the outputs into the temp dir it is given; may return extra
        plain-data info recorded in the manifest.

    Raises
    ------
    StageFailed
        An upstream file is missing, the stage produced nothing, or the disk cannot take
        the output (full, read-only, permission denied): nothing is published then, and the
        earlier output behind ``stable`` is untouched.
    """
    missing = [f"{name} ({path})" for name, path in sorted(upstream.items())
               if not Path(path).is_file()]
    if missing:
        raise StageFailed(stage, f"input file(s) missing: {', '.join(missing)}; an earlier "
                          "stage's output was deleted or never built: run the build again "
                          "(`doit build:<artifact>` rebuilds the chain)")
    try:
        return _run_stage(root, stage, config, upstream, stable, produce)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = e.filename or root
        todo = ("free space there (`doit gc` deletes stored outputs no artifact points at)"
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                f"make {root} writable (or run doit as its owner)")
        raise StageFailed(stage, f"cannot write {where}: {DISK_ERRNOS[e.errno]} ({e.strerror}). "
                          f"Nothing was published; earlier outputs are intact. {todo} and run "
                          "the task again") from None


def _run_stage(root: Path, stage: str, config: dict, upstream: dict[str, Path],
               stable: Path, produce: Callable[[Path], dict | None]) -> StageResult:
    digests = {name: sha256_file(path) for name, path in sorted(upstream.items())}
    rid = recipe_id(stage, config, digests)
    stage_dir = root / ".store" / stage
    with file_lock(root / ".locks" / f"{stage}-{rid[:16]}.lock", f"{stage} {rid[:12]}"):
        final = stage_dir / rid
        problem = verify(final, rid, quick=True) if final.exists() else "not built yet"
        if problem is None:
            link(stable, final)
            _say(f"{stage}: reusing verified output {rid[:12]} -> {stable}")
            return StageResult(final, rid, reused=True)
        if final.exists():
            _say(f"{stage}: stored output {rid[:12]} rejected: {problem}; rebuilding")
        stage_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(stage_dir)
        tmp = stage_dir / f".tmp-{rid[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.monotonic()
        try:
            with memory.measure() as peak:
                info = produce(tmp) or {}
            outputs = manifest_outputs(tmp)
            if not outputs:
                raise StageFailed(stage, "produced no output files", artifact_dir=tmp)
            stats = {rel: _stat_key(tmp / rel) for rel in outputs}
            manifest = {"stage": stage, "recipe_id": rid, "config": config,
                        "upstream": digests, "tools": tool_versions(stage),
                        "outputs": outputs, "stats": stats, "info": info,
                        "seconds": round(time.monotonic() - start, 3), "memory": peak,
                        "output_bytes": sum(st[0] for st in stats.values())}
            # The manifest is written last: its presence means every output is complete.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str)
                                        + "\n",
                                        encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        link(stable, final)
        _say(f"{stage}: built {rid[:12]} in {time.monotonic() - start:.1f} s, peak RSS "
             f"{peak['peak_rss_mib']:.0f} MiB -> {stable}")
        return StageResult(final, rid, reused=False)


def referenced_store_dirs(root: Path) -> set[Path]:
    """Store dirs some stable symlink under ``root`` points at (what gc must keep)."""
    keep = set()
    for dirpath, dirnames, _ in os.walk(root):
        if ".store" in Path(dirpath).parts:
            continue
        for name in dirnames:
            p = Path(dirpath) / name
            if p.is_symlink():
                keep.add(p.resolve())
    return keep


def gc(root: Path) -> list[Path]:
    """Remove store entries no stable path points at, and dead temp dirs. Returns removed."""
    removed = []
    keep = referenced_store_dirs(root)
    for stage_dir in sorted((root / ".store").glob("*")):
        remove_stale_temps(stage_dir)
        for entry in sorted(stage_dir.iterdir()):
            if entry.name.startswith(".tmp-"):
                continue
            if entry.resolve() not in keep:
                shutil.rmtree(entry)
                removed.append(entry)
    return removed


__all__ = ["StageResult", "canonical_json", "check_writable", "file_lock", "gc", "intact",
           "link", "read_manifest", "run_stage", "verify"]
