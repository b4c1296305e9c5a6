"""Peak memory of one stage, for its manifest.

doit runs every stage in one process, whose lifetime peak (``ru_maxrss``) would carry one
stage's peak into the next; on Linux the peak (``VmHWM``) is reset at the start of each stage
by writing 5 to ``/proc/self/clear_refs``. Child processes (the C++ app, CMake) are not
counted: ``RUSAGE_CHILDREN`` cannot be reset either, and a child forked from a large parent
reports the parent's pages as its own (a 2.4 GiB app showed as 7.4 GiB). The app's own peak
is measured by the bench stage (``peak_rss_mb`` in ``bench.json``, from a small wrapper).
"""

from __future__ import annotations

import contextlib
import gc
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
    process, and memory an earlier stage freed is not always returned to the system) and
    ``method``."""
    result: dict = {}
    # What an earlier stage left to the garbage collector (TVM objects in reference cycles
    # keep a whole module's weights alive) goes first: it is not this stage's memory.
    gc.collect()
    reset = _reset_peak()
    start = _status_kib("VmRSS")
    try:
        yield result
    finally:
        peak = _status_kib("VmHWM") if reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(
            peak_rss_mib=_mib(peak), rss_at_start_mib=_mib(start),
            method=("VmHWM of the doit process, reset at the stage's start (child "
                    "processes not counted)" if reset else
                    "ru_maxrss of the whole process (an upper bound: not resettable here)"))
