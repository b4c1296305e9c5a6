"""Peak memory of one stage, for its manifest.

doit runs every stage in one process, whose lifetime peak (``ru_maxrss``) would carry one
stage's peak into the next; on Linux the peak (``VmHWM``) is reset at the start of each stage
by writing 5 to ``/proc/self/clear_refs``. Child processes (the C++ app, CMake, compilers)
are reported through ``RUSAGE_CHILDREN``: the largest child that ended during the stage,
when it was larger than every earlier child of this process (else unknown: None).
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


@contextlib.contextmanager
def measure() -> Iterator[dict]:
    """Fill the yielded dict with ``peak_rss_mib`` (this process, during the block),
    ``rss_at_start_mib`` (what the process held already: doit runs every stage in one
    process, and memory an earlier stage freed is not always returned to the system),
    ``children_peak_rss_mib`` and ``method``."""
    result: dict = {}
    reset = _reset_peak()
    start = _status_kib("VmRSS")
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        yield result
    finally:
        peak = _status_kib("VmHWM") if reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result.update(
            peak_rss_mib=_mib(peak), rss_at_start_mib=_mib(start),
            children_peak_rss_mib=_mib(children) if children > children_before else None,
            method=("VmHWM, reset at the stage's start" if reset else
                    "ru_maxrss of the whole process (an upper bound: not resettable here)")
            + "; children: RUSAGE_CHILDREN, if a child of this stage beat earlier ones")
