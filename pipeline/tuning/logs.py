"""Tuning-log cache: read, check, merge and summarize MetaSchedule JSON databases."""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# MetaSchedule stores a failed build or run as a huge latency (1e10 s); anything this slow is
# a failure, never a measurement.
FAILED_RUN_SECS = 1e9

# Which CPU measured each record, ``{"<record digest>": "<cpu identity>"}``
# (core.targets.cpu_identity). A record line has no room for it, so it lives beside the
# database; a record not listed was measured on an unknown CPU (logs from before this file).
MEASURED_ON_FILE = "measured_on.json"
UNKNOWN_CPU = "unknown CPU"

# A record line is ``[workload_index,[trace,run_secs,target,args_info]]``. The body is kept as
# the exact text TVM wrote (its floats carry 20 digits that a Python round trip would change),
# so only the index in front is rewritten when merging.
_RECORD_LINE = re.compile(r"\A\[\s*(-?\d+)\s*,(.*)\]\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class WorkloadEntry:
    """One line of ``database_workload.json``: ``[shash, base64 of the serialized IRModule]``."""

    index: int  # line index in its file: what tuning records refer to
    shash: str
    mod_b64: str
    key: tuple[str, str]  # (shash, digest of the serialized module): identity across databases

    def line(self) -> str:
        """The line as MetaSchedule writes it (compact JSON)."""
        return json.dumps([self.shash, self.mod_b64], separators=(",", ":"))


@dataclass(frozen=True)
class RecordEntry:
    """One line of ``database_tuning_record.json``."""

    workload_index: int
    body: str  # raw JSON text of [trace, run_secs, target, args_info]
    trace_key: str  # canonical JSON of the trace: two records with it equal are one schedule
    run_secs: tuple[float, ...] | None
    target: str | None  # canonical JSON of the target the record was measured on
    args: str | None  # "float32[16,16], ..." from args_info, for reports
    where: str  # "path:line", for messages
    line_index: int = 0  # 0-based line in its record file

    @property
    def valid(self) -> bool:
        """Whether the record holds a real measurement (not a failed build or run)."""
        return bool(self.run_secs) and all(
            math.isfinite(s) and s < FAILED_RUN_SECS for s in self.run_secs)

    @property
    def mean_secs(self) -> float:
        """Mean measured latency in seconds; ``inf`` for a failed record."""
        return sum(self.run_secs) / len(self.run_secs) if self.valid else math.inf

    def sort_key(self) -> tuple:
        """Best first: valid before failed, then lowest mean latency; ties broken by text."""
        return (not self.valid, self.mean_secs, self.trace_key, self.body)

    def line(self, workload_index: int) -> str:
        """The record line pointing at ``workload_index``."""
        return f"[{workload_index},{self.body}]"

    @property
    def digest(self) -> str:
        """Identity of this measurement (trace, times, target): its key in MEASURED_ON_FILE."""
        return hashlib.sha256(self.body.encode()).hexdigest()[:24]


@dataclass
class LogContents:
    """What :func:`load` could read from one database directory."""

    db_dir: Path
    workloads: list[WorkloadEntry] = field(default_factory=list)
    records: list[RecordEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    measured_on: dict[str, str] = field(default_factory=dict)  # record digest -> CPU

    def cpu_of(self, record: RecordEntry) -> str:
        """The CPU ``record`` was measured on (UNKNOWN_CPU if not recorded)."""
        return self.measured_on.get(record.digest, UNKNOWN_CPU)

    def workload_at(self, index: int) -> WorkloadEntry | None:
        """The workload on line ``index`` (0-based), or None if that line was skipped."""
        return self._by_index().get(index)

    def _by_index(self) -> dict[int, WorkloadEntry]:
        return {w.index: w for w in self.workloads}


@dataclass
class MergeReport:
    """Counts of what :func:`merge` read, dropped and wrote."""

    dest: Path
    sources: list[Path]
    workloads: int = 0  # distinct workloads written
    records_in: int = 0  # readable records over all sources
    records_out: int = 0
    duplicates_dropped: int = 0  # same workload, trace and CPU as a better record
    dropped_by_top_k: int = 0
    other_cpus_dropped: int = 0  # prefer_cpu: records of workloads measured there too
    skipped: list[str] = field(default_factory=list)  # corrupt lines, "path:line: why"
    warnings: list[str] = field(default_factory=list)  # e.g. records from several targets


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _module_digest(mod_b64: str) -> str:
    """sha256 of a workload's serialized module, insensitive to JSON whitespace.

    TVM stores base64 of a length-prefixed (8-byte little-endian) JSON graph; parsing it
    means two databases that serialized the same module differently still agree. A payload
    in another layout is hashed as it is.
    """
    raw = base64.b64decode(mod_b64, validate=True)
    payload = raw
    if len(raw) >= 8 and int.from_bytes(raw[:8], "little") == len(raw) - 8:
        try:
            payload = _canonical(json.loads(raw[8:])).encode()
        except ValueError:
            pass
    return hashlib.sha256(payload).hexdigest()


def workload_key(workload) -> tuple[str, str]:
    """The key :func:`load` gives a workload, of a TVM ``ms.database.Workload``."""
    shash, mod_b64 = workload.as_json()
    return str(shash), _module_digest(str(mod_b64))


def _parse_workload(text: str, index: int) -> WorkloadEntry:
    obj = json.loads(text)
    if not (isinstance(obj, list) and len(obj) == 2
            and all(isinstance(x, str) for x in obj) and obj[0].isdigit()):
        raise ValueError("expected [\"<structural hash>\", \"<base64 module>\"]")
    shash, mod_b64 = obj
    try:
        digest = _module_digest(mod_b64)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"module is not valid base64 ({e})") from None
    return WorkloadEntry(index, shash, mod_b64, (shash, digest))


def _args_text(args_info) -> str | None:
    try:
        return ", ".join(f"{a[1]}[{','.join(str(d) for d in a[2])}]" for a in args_info)
    except (TypeError, IndexError):
        return None


def _parse_record(text: str, n_workload_lines: int, where: str,
                  line_index: int = 0) -> RecordEntry:
    obj = json.loads(text)  # a bad line fails here, reported as "bad JSON"
    match = _RECORD_LINE.match(text)
    if not (match and isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
        raise ValueError("expected [<workload index>, [trace, run_secs, target, args_info]]")
    index, body = int(match.group(1)), match.group(2).strip()
    rec = obj[1]
    if not (isinstance(rec, list) and len(rec) == 4 and isinstance(rec[0], list)
            and len(rec[0]) == 2):
        raise ValueError("tuning record is not [trace, run_secs, target, args_info]")
    trace, run_secs, target, args_info = rec
    if run_secs is not None and not (
            isinstance(run_secs, list)
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in run_secs)):
        raise ValueError("run_secs is not a list of numbers")
    if target is not None and not isinstance(target, dict):
        raise ValueError("target is not a JSON object")
    if args_info is not None and not isinstance(args_info, list):
        raise ValueError("args_info is not a list")
    if not 0 <= index < n_workload_lines:
        raise ValueError(f"workload index {index} out of range (the workload file has "
                         f"{n_workload_lines} lines)")
    return RecordEntry(
        workload_index=index, body=body, trace_key=_canonical(trace),
        run_secs=None if run_secs is None else tuple(float(s) for s in run_secs),
        target=None if target is None else _canonical(target),
        args=None if args_info is None else _args_text(args_info), where=where,
        line_index=line_index)


def _gz(path: Path) -> Path:
    return path.with_name(path.name + ".gz")


def check_one_form(db_dir: Path | str) -> None:
    """Refuse a directory holding a log file both plain and gzipped with different contents.

    After ``gunzip -k`` both forms exist with equal contents, and either is read. When
    they differ (one was edited, re-tuned or re-exported), neither can be trusted to be
    "the" log and reading one would silently ignore the other, so this raises instead.

    Raises
    ------
    CorruptInputError
        Naming every such pair and what to delete.
    """
    from pipeline.core.errors import CorruptInputError, collect

    problems = []
    for name in (WORKLOAD_FILE, RECORD_FILE):
        plain = Path(db_dir) / name
        if not (plain.is_file() and _gz(plain).is_file()):
            continue
        try:
            same = gzip.decompress(_gz(plain).read_bytes()) == plain.read_bytes()
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError
            problems.append(f"{plain} and {_gz(plain).name} both exist, and the .gz is "
                            f"unreadable ({e})")
            continue
        if not same:
            problems.append(f"{plain} ({plain.stat().st_size} bytes) and {_gz(plain).name} "
                            "both exist with different contents")
    collect(problems, CorruptInputError,
            f"tuning log {db_dir}: a file is there both plain and gzipped, and the two "
            "differ, so which one is the log is ambiguous. Keep one form: delete the .gz "
            "files to use the plain ones (or the plain files to use the .gz); to combine "
            "both, move one form to another directory and merge the two "
            "(pipeline.tuning.logs.merge):")


def _read_lines(path: Path, warnings: list[str]) -> list[str]:
    """Lines of ``path`` as TVM counts them (``\\n``-separated); [] if it is missing.

    A committed log may be stored gzipped (``<file>.gz``): it is read the same way. When
    both forms exist they hold the same lines (:func:`check_one_form` ran first).
    """
    try:
        if not path.exists() and _gz(path).exists():
            data = gzip.decompress(_gz(path).read_bytes())
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        _warn(warnings, f"{path}: unreadable, treated as empty: {e}")
        return []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last complete line
    return [line.decode("utf-8", errors="replace") for line in lines]


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    log.warning("%s", message)


def load(db_dir: Path | str) -> LogContents:
    """Read a MetaSchedule JSON database, skipping what is damaged.

    Parameters
    ----------
    db_dir : Path or str
        Directory holding ``database_workload.json`` and ``database_tuning_record.json``.
        A missing directory or file reads as an empty log.

    Returns
    -------
    LogContents
        The readable workloads (with their original line index) and records. Each skipped
        line (bad JSON such as a truncated last line, wrong shape, workload index out of
        range, or a record whose workload line was skipped) gives one entry in ``warnings``,
        ``"<path>:<line number>: skipped: <why>"``, also logged at WARNING. Never raises on
        file content.

    Raises
    ------
    CorruptInputError
        If a file exists both plain and gzipped with different contents
        (:func:`check_one_form`): reading either alone would drop the other's records.
    """
    db_dir = Path(db_dir)
    check_one_form(db_dir)
    out = LogContents(db_dir)
    wl_path, rec_path = db_dir / WORKLOAD_FILE, db_dir / RECORD_FILE
    wl_lines = _read_lines(wl_path, out.warnings)
    for i, text in enumerate(wl_lines):
        try:
            out.workloads.append(_parse_workload(text, i))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            _warn(out.warnings, f"{wl_path}:{i + 1}: skipped: {_why(e)}")
    by_index = out._by_index()
    for i, text in enumerate(_read_lines(rec_path, out.warnings)):
        where = f"{rec_path}:{i + 1}"
        try:
            record = _parse_record(text, len(wl_lines), where, line_index=i)
            if record.workload_index not in by_index:
                raise ValueError(f"refers to workload line {record.workload_index + 1}, "
                                 f"which was skipped")
        except ValueError as e:
            _warn(out.warnings, f"{where}: skipped: {_why(e)}")
            continue
        out.records.append(record)
    out.measured_on = _read_measured_on(db_dir, out.warnings)
    return out


def _read_measured_on(db_dir: Path, warnings: list[str]) -> dict[str, str]:
    """MEASURED_ON_FILE of ``db_dir`` (plain or gzipped); {} when absent or unreadable."""
    path = db_dir / MEASURED_ON_FILE
    try:
        data = (gzip.decompress(_gz(path).read_bytes()) if not path.exists()
                and _gz(path).exists() else path.read_bytes())
        table = json.loads(data)
    except FileNotFoundError:
        return {}
    except (OSError, EOFError, ValueError) as e:
        _warn(warnings, f"{path}: unreadable, every record's CPU is unknown: {e}")
        return {}
    if not (isinstance(table, dict) and all(isinstance(v, str) for v in table.values())):
        _warn(warnings, f"{path}: not a {{record digest: CPU}} object; ignored")
        return {}
    return table


def tag_measured_on(db_dir: Path | str, first_line: int, cpu: str) -> int:
    """Record that the records from line ``first_line`` (0-based) of ``db_dir``'s record
    file on were measured on ``cpu``. Returns how many were tagged."""
    db_dir = Path(db_dir)
    contents = load(db_dir)
    new = [r for r in contents.records if r.line_index >= first_line
           and r.digest not in contents.measured_on]
    if not new:
        return 0
    table = {**contents.measured_on, **{r.digest: cpu for r in new}}
    tmp = db_dir / f".{MEASURED_ON_FILE}.tmp"
    tmp.write_text(json.dumps(table, sort_keys=True, indent=0) + "\n", encoding="utf-8")
    os.replace(tmp, db_dir / MEASURED_ON_FILE)
    return len(new)


def _why(e: ValueError) -> str:
    return f"bad JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)


def _target_class(target_json: str) -> str:
    """A record's target without ``mcpu``: CPU logs are shared per ISA class on purpose, so
    records measured on Zen 4 and Zen 5 (``znver4``/``znver5``) belong together."""
    try:
        target = json.loads(target_json)
    except ValueError:
        return target_json
    if isinstance(target, dict):
        target.pop("mcpu", None)
    return _canonical(target)


def merge(sources: list[Path], dest: Path, keep_top_k: int | None = None,
          prefer_cpu: str | tuple[str, ...] | None = None) -> MergeReport:
    """Merge MetaSchedule JSON databases into one, re-indexed, deduplicated and sorted.

    Workloads are identified by content (structural hash + serialized module), never by
    line index, so databases listing them in different orders merge correctly. Records of
    one workload with the same trace are one schedule: only the best is kept. Output is
    canonical (workloads sorted by key; records by workload, mean latency, trace text), so
    the same inputs always give identical bytes. Workloads without records are kept.

    A record carries the CPU it was measured on (MEASURED_ON_FILE): the same schedule
    measured on two CPUs is two records, since one CPU's times say little of another's.

    All databases merged should come from one target: MetaSchedule ignores the target when
    it looks a record up. Records from several targets are merged but reported in
    ``warnings``.

    Parameters
    ----------
    sources : list of Path
        Database directories; missing ones count as empty. ``dest`` may be one of them.
    dest : Path
        Directory to write. Both files are written to a temporary directory beside it and
        swapped in with ``os.replace``: a reader (or a crash) never sees a workload file
        from one merge with the record file of another. Other entries already in ``dest``
        (e.g. tuning logs) are carried over.
    keep_top_k : int, optional
        Keep at most this many records per workload and CPU, best first (failed ones are
        dropped first).
    prefer_cpu : str or tuple of str, optional
        A CPU identity (or several, most wanted first): for every workload with a valid
        record measured on it, records measured elsewhere are left out, so the fastest
        record is the fastest *here* (MetaSchedule ranks by time alone). A workload with no
        valid record of the first identity tries the next; one with none of any keeps all.

    Returns
    -------
    MergeReport
        Counts, plus every corrupt line that was skipped.
    """
    if keep_top_k is not None and keep_top_k < 1:
        raise ValueError(f"keep_top_k must be >= 1 or None, got {keep_top_k}")
    report = MergeReport(dest=Path(dest), sources=[Path(s) for s in sources])
    preferred = (prefer_cpu,) if isinstance(prefer_cpu, str) else tuple(prefer_cpu or ())
    workloads: dict[tuple[str, str], WorkloadEntry] = {}
    best: dict[tuple, RecordEntry] = {}  # (workload, trace, CPU) -> record
    targets: set[str] = set()
    cpu_of: dict[str, str] = {}  # record digest -> CPU
    for source in report.sources:
        contents = load(source)
        report.skipped += contents.warnings
        cpu_of.update(contents.measured_on)
        by_index = contents._by_index()
        for w in contents.workloads:
            # Same module, two spellings: keep the smallest text, whatever the input order.
            if w.key not in workloads or w.mod_b64 < workloads[w.key].mod_b64:
                workloads[w.key] = w
        for r in contents.records:
            report.records_in += 1
            if r.target is not None:
                targets.add(_target_class(r.target))
            k = (by_index[r.workload_index].key, r.trace_key,
                 cpu_of.get(r.digest, UNKNOWN_CPU))
            if k in best:
                report.duplicates_dropped += 1
                if r.sort_key() >= best[k].sort_key():
                    continue
            best[k] = r
    if len(targets) > 1:
        _warn(report.warnings, f"records from {len(targets)} different targets were merged; "
              "MetaSchedule ignores the target on lookup, keep one database per target: "
              + "; ".join(sorted(targets)))

    keys = sorted(workloads)
    new_index = {k: i for i, k in enumerate(keys)}
    per_workload: dict[tuple[str, str], list[RecordEntry]] = {k: [] for k in keys}
    for (wkey, _, _), r in best.items():
        per_workload[wkey].append(r)
    record_lines, measured_on = [], {}
    for k in keys:
        ranked = sorted(per_workload[k], key=RecordEntry.sort_key)
        cpus = [cpu_of.get(r.digest, UNKNOWN_CPU) for r in ranked]
        for wanted in preferred:
            if any(c == wanted and r.valid for c, r in zip(cpus, ranked)):
                report.other_cpus_dropped += sum(c != wanted for c in cpus)
                ranked = [r for c, r in zip(cpus, ranked) if c == wanted]
                break
        if keep_top_k is not None:
            kept, per_cpu = [], {}
            for r in ranked:
                cpu = cpu_of.get(r.digest, UNKNOWN_CPU)
                per_cpu[cpu] = per_cpu.get(cpu, 0) + 1
                if per_cpu[cpu] <= keep_top_k:
                    kept.append(r)
            report.dropped_by_top_k += len(ranked) - len(kept)
            ranked = kept
        record_lines += [r.line(new_index[k]) for r in ranked]
        measured_on.update({r.digest: cpu_of[r.digest] for r in ranked if r.digest in cpu_of})
    report.workloads, report.records_out = len(keys), len(record_lines)
    _publish(report.dest, [workloads[k].line() for k in keys], record_lines, measured_on)
    log.info("merged %d databases into %s: %d workloads, %d -> %d records (%d duplicates, "
             "%d beyond top-k, %d corrupt lines skipped)", len(report.sources), report.dest,
             report.workloads, report.records_in, report.records_out,
             report.duplicates_dropped, report.dropped_by_top_k, len(report.skipped))
    return report


def _record_text(db_dir: Path) -> str:
    """The record file's text ("" when absent or unreadable): which targets it names."""
    try:
        return (db_dir / RECORD_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def open_database(db_dir: Path | str, report=None):
    """``ms.database.JSONDatabase`` on ``db_dir``, after setting aside records it cannot replay.

    TVM opens a database by replaying every record's trace on its workload, and one record
    that does not replay (a trace built on a block name the stored workload spells
    otherwise) makes the whole database fail to open with only "parallel_for_dynamic
    error". So when opening fails, each record is replayed on its own, the database is
    rewritten without the ones that fail, and the original files are kept beside it
    (:func:`drop_unreplayable`). ``report`` (default: the log, at WARNING) receives one line
    saying how many records were dropped, which, and where the original is.
    """
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics

    intrinsics.register_for_records(_record_text(Path(db_dir)))  # tensorized records name them
    try:
        return ms.database.JSONDatabase(work_dir=str(db_dir))
    except Exception:  # noqa: BLE001 -- TVM gives no detail worth keeping here
        dropped, backup = drop_unreplayable(db_dir)
        message = (f"{db_dir}: TVM could not open the tuning database; dropped {len(dropped)} "
                   f"record(s) whose trace does not replay: "
                   + "; ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "")
                   + (f". The original files are kept as {', '.join(p.name for p in backup)}"
                      " beside it" if backup else ""))
        log.warning("%s", message)
        if report is not None:
            report(f"tune: WARNING {message}")
        return ms.database.JSONDatabase(work_dir=str(db_dir))


def _backup(db_dir: Path) -> list[Path]:
    """Copy both database files to ``<name>.orig`` (``.orig.1``, ... if taken) in ``db_dir``;
    never overwrites an earlier backup. Returns the copies made."""
    for n in range(1000):
        suffix = ".orig" if n == 0 else f".orig.{n}"
        names = [db_dir / f"{name}{suffix}" for name in (WORKLOAD_FILE, RECORD_FILE)]
        if not any(p.exists() for p in names):
            break
    else:
        raise FileExistsError(f"{db_dir}: 1000 backups already; remove old *.orig* files")
    made = []
    for name, copy in zip((WORKLOAD_FILE, RECORD_FILE), names):
        for src, dst in ((db_dir / name, copy), (_gz(db_dir / name), _gz(copy))):
            if src.is_file():
                shutil.copy2(src, dst)
                made.append(dst)
    return made


def drop_unreplayable(db_dir: Path | str) -> tuple[list[str], list[Path]]:
    """Rewrite ``db_dir`` without the records whose trace fails on their workload.

    The files as they were are copied first to ``database_*.json.orig`` in ``db_dir`` (an
    earlier backup is never overwritten: ``.orig.1``, ...), so a dropped record is never
    lost: from the local cache it would be gone from every log exported later.

    Returns ``(dropped, backup)``: one ``"<path>:<line>: <why>"`` per dropped record (lines
    already unreadable are dropped too, as :func:`load` skips them) and the backup files
    (none when nothing was dropped: then nothing is rewritten). Replaying ~2000 ResNet-50
    records took 30 s.
    """
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import intrinsics

    db_dir = Path(db_dir)
    intrinsics.register_for_records(_record_text(db_dir))  # or tensorized ones "fail"
    contents = load(db_dir)
    by_index = contents._by_index()
    workloads: dict[int, object] = {}
    kept, dropped = [], list(contents.warnings)
    for r in contents.records:
        w = by_index[r.workload_index]
        try:
            if w.index not in workloads:
                workloads[w.index] = ms.database.Workload.from_json([w.shash, w.mod_b64])
            ms.database.TuningRecord.from_json(json.loads(r.body), workloads[w.index])
        except Exception as e:  # noqa: BLE001 -- any failure means TVM cannot load it
            dropped.append(f"{r.where}: {type(e).__name__}")
            continue
        kept.append(r)
    if not dropped:
        return [], []
    backup = _backup(db_dir)
    indices = sorted(by_index)
    new_index = {old: new for new, old in enumerate(indices)}
    _publish(db_dir, [by_index[i].line() for i in indices],
             [r.line(new_index[r.workload_index]) for r in kept],
             {r.digest: contents.measured_on[r.digest] for r in kept
              if r.digest in contents.measured_on})
    return dropped, backup


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _publish(dest: Path, workload_lines: list[str], record_lines: list[str],
             measured_on: dict[str, str] | None = None) -> None:
    """Write both files (and MEASURED_ON_FILE when ``measured_on`` names a CPU) into a fresh
    directory and swap it in place of ``dest``.

    Replacing the two files one after the other would leave a window where the record file
    indexes into the wrong workload file; swapping whole directories never does (between
    the two renames ``dest`` is absent, which reads as an empty log).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.merge-", dir=dest.parent))
    try:
        _write_lines(tmp / WORKLOAD_FILE, workload_lines)
        _write_lines(tmp / RECORD_FILE, record_lines)
        if measured_on:
            _write_lines(tmp / MEASURED_ON_FILE,
                         [json.dumps(measured_on, sort_keys=True, indent=0)])
        if not dest.exists():
            os.replace(tmp, dest)
            return
        for entry in dest.iterdir():
            if entry.name not in (WORKLOAD_FILE, RECORD_FILE, MEASURED_ON_FILE,
                                  f"{MEASURED_ON_FILE}.gz"):
                os.replace(entry, tmp / entry.name)
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old)  # onto an empty directory: allowed by rename(2)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stats(db_dir: Path | str) -> dict:
    """Per-workload summary of a database, for reports.

    Parameters
    ----------
    db_dir : Path or str
        Database directory (see :func:`load`).

    Returns
    -------
    dict
        ``{"db_dir", "workloads", "records", "valid_records", "warnings", "per_workload"}``;
        ``per_workload`` lists, in file order, ``{"index", "shash", "args", "records",
        "valid_records", "best_us"}`` (``best_us`` is None when no record is valid; ``args``
        describes the kernel's buffers, e.g. ``"float32[16,16], float32[16,16]"``).
        Plain JSON-serializable data.
    """
    contents = load(db_dir)
    rows = {w.index: {"index": w.index, "shash": w.shash, "args": None, "records": 0,
                      "valid_records": 0, "best_us": None} for w in contents.workloads}
    for r in contents.records:
        row = rows[r.workload_index]
        row["records"] += 1
        row["args"] = row["args"] or r.args
        if r.valid:
            row["valid_records"] += 1
            us = r.mean_secs * 1e6
            row["best_us"] = us if row["best_us"] is None else min(row["best_us"], us)
    per_workload = [rows[i] for i in sorted(rows)]
    return {
        "db_dir": str(db_dir),
        "workloads": len(per_workload),
        "records": len(contents.records),
        "valid_records": sum(row["valid_records"] for row in per_workload),
        "warnings": list(contents.warnings),
        "per_workload": per_workload,
    }


def export_compressed(sources: list[Path], dest: Path, keep_top_k: int = 8) -> MergeReport:
    """Merge ``sources`` into ``dest`` as gzipped files, the form tuning logs are committed in.

    MetaSchedule's workload lines carry base64 of pretty-printed JSON (~85 KB each); gzip
    makes a ResNet-50 log about ten times smaller. ``mtime=0`` keeps the bytes reproducible.
    """
    with tempfile.TemporaryDirectory() as scratch:
        report = merge([*sources, dest], Path(scratch) / "db", keep_top_k=keep_top_k)
        dest.mkdir(parents=True, exist_ok=True)
        names = [WORKLOAD_FILE, RECORD_FILE]
        if (Path(scratch) / "db" / MEASURED_ON_FILE).exists():
            names.append(MEASURED_ON_FILE)
        for name in names:
            data = (Path(scratch) / "db" / name).read_bytes()
            tmp = dest / f".{name}.gz.tmp"
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                        mtime=0) as gz:
                gz.write(data)
            os.replace(tmp, dest / f"{name}.gz")
            (dest / name).unlink(missing_ok=True)
    report.dest = dest
    return report
