"""Fault injection on a real build: kill -9 inside each stage, truncated logs and ONNX files.

Builds the tiny test model (``tests/models.py``) in a temp project with the real dodo.py and,
for each case, breaks something, builds again and checks that the build recovered and that
nothing finished before the fault was lost:

- ``kill -9 in <stage>``: the build is killed (SIGKILL to doit's process group) the moment
  doit starts that stage's task; the next build must pass, every stable link must point at a
  verified store entry, and no stage finished before the kill may be built again.
- ``truncated tuning cache``: the local tuning cache's record file loses half of its last
  line (what a killed tuner leaves); the build must pass and say it skipped the line.
- ``truncated ONNX``: the model file is cut in half; the build must fail with a message (no
  Python traceback) and leave every earlier artifact intact; restored, it builds again.

Usage: ``python scripts/fault_injection.py [--keep DIR]`` (about 5-10 minutes on 2 cores).
Prints one line per case and exits non-zero if any case did not recover.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from models import make_project  # noqa: E402  (tests/models.py: the tiny model and spec)
from pipeline.core.store import verify  # noqa: E402

ARTIFACT = "tiny_int8"
BUILD = (f"build:{ARTIFACT}", "tune=off")
STAGES = ("source", "quantize", "import", "tune", "compile", "package", "smoke")


def _cmd(project: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project),
            *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def build(project: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run(_cmd(project, *(args or BUILD)), capture_output=True, text=True,
                          env=_env(), timeout=1800)
    return proc.returncode, proc.stdout + proc.stderr


def built_stages(output: str) -> set[str]:
    return set(re.findall(r"^(\w+): built ", output, re.M))


def links_verified(project: Path) -> list[str]:
    """Stable stage links whose store entry does not verify (empty: all good)."""
    bad = []
    for link in sorted((project / "artifacts").rglob("*")):
        # stage links point at store entries (.store/<stage>/<id>); deliverable links at
        # files inside one, which the entry's manifest covers
        if link.is_symlink() and link.resolve().parent.parent.name == ".store":
            problem = verify(link.resolve(), quick=False)
            if problem:
                bad.append(f"{link.relative_to(project)}: {problem}")
    return bad


def kill_in_stage(project: Path, stage: str) -> tuple[bool, str]:
    """Start a build, SIGKILL its process group when doit starts ``stage``; rebuild."""
    proc = subprocess.Popen(_cmd(project, *BUILD), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    finished: set[str] = set()
    started = re.compile(rf"^\.  {stage}:")
    killed = False
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.match(r"^(\w+): (built|reusing verified output) ", line)
        if m:
            finished.add(m.group(1))
        if started.match(line):
            time.sleep(0.5 if stage in ("source", "smoke") else 2.0)  # into the stage's work
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait()
    if not killed:
        return False, f"the build never reached {stage} (rc {proc.returncode})"
    rc, output = build(project)
    rebuilt_early = built_stages(output) & finished
    bad_links = links_verified(project)
    ok = rc == 0 and not rebuilt_early and not bad_links and "Traceback" not in output
    detail = (f"rebuild rc {rc}; stages done before the kill: {sorted(finished) or 'none'}; "
              f"rebuilt after: {sorted(built_stages(output)) or 'none'}")
    if rebuilt_early:
        detail += f"; LOST (built again): {sorted(rebuilt_early)}"
    if bad_links:
        detail += f"; bad links: {bad_links}"
    return ok, detail


def truncated_tuning_cache(project: Path) -> tuple[bool, str]:
    """The local tuning cache ends in half a record line, as a killed tuner leaves it."""
    from pipeline.core.targets import get_target, target_key

    cache = project / "artifacts" / "tuning_cache" / target_key(get_target("cpu"))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "database_workload.json").touch()
    records = cache / "database_tuning_record.json"
    lines = records.read_text().splitlines() if records.exists() else []
    cut = lines[-1][: len(lines[-1]) // 2] if lines else '[0, [["b0", "SampleCategorical"'
    records.write_text("".join(f"{line}\n" for line in lines) + cut)
    # the tune stage must run again to read it: a new budget changes its recipe
    rc, output = build(project, *BUILD, "trials=7")
    said = "WARNING" in output
    ok = rc == 0 and said and "Traceback" not in output
    warning = next((ln for ln in output.splitlines() if "WARNING" in ln), "")
    return ok, f"rebuild rc {rc}; warned: {warning.strip()[:120] or 'no'}"


def truncated_onnx(project: Path) -> tuple[bool, str]:
    model = project / "models" / "tiny.onnx"
    original = model.read_bytes()
    before = _links(project)
    model.write_bytes(original[: len(original) // 2])
    rc, output = build(project)
    clear = rc != 0 and "Traceback" not in output and "truncated" in output.lower()
    after = _links(project)
    changed = sorted(str(p.relative_to(project)) for p in set(before) | set(after)
                     if before.get(p) != after.get(p))
    kept = not changed and not links_verified(project)
    model.write_bytes(original)
    rc2, output2 = build(project)
    ok = clear and kept and rc2 == 0
    return ok, (f"broken build rc {rc}, clear message (no traceback): {clear}; earlier "
                f"artifacts unchanged: {kept}{f' (changed: {changed})' if changed else ''}; "
                f"restored build rc {rc2}")


def _links(project: Path) -> dict[Path, str]:
    """Every link of the project's artifacts outside the store, and where it points."""
    return {p: os.readlink(p) for p in (project / "artifacts").rglob("*")
            if p.is_symlink() and ".store" not in p.relative_to(project).parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build in this dir and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="fault_injection_"))
    project = make_project(root / "project")
    results = []
    for stage in STAGES:
        shutil.rmtree(project / "artifacts", ignore_errors=True)
        results.append((f"kill -9 in {stage}", *kill_in_stage(project, stage)))
        print(f"{'RECOVERED' if results[-1][1] else 'FAILED   '}  {results[-1][0]}: "
              f"{results[-1][2]}", flush=True)
    for name, case in (("truncated tuning cache", truncated_tuning_cache),
                       ("truncated ONNX", truncated_onnx)):
        results.append((name, *case(project)))
        print(f"{'RECOVERED' if results[-1][1] else 'FAILED   '}  {results[-1][0]}: "
              f"{results[-1][2]}", flush=True)
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} cases recovered with nothing lost"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
