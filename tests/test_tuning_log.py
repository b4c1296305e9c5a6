"""Tests for pipeline.tuning.logs on real MetaSchedule JSON databases written by TVM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tvm
from tvm import s_tir, te
from tvm.s_tir import meta_schedule as ms

from pipeline.tuning import logs as tuning_log

TARGET = {"kind": "llvm", "num-cores": 2}
FAILED = 1e10  # what MetaSchedule writes for a failed build or run


def matmul(n: int):
    """An n x n matmul as a one-function IRModule (one tuning workload)."""
    a = te.placeholder((n, n), name="a")
    b = te.placeholder((n, n), name="b")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def make_db(db_dir: Path, workloads: list[int], records: list[tuple[int, int, list[float]]]):
    """Write a real database through JSONDatabase.

    ``workloads`` are matmul sizes, committed in that order (their line index); each record
    ``(n, outer, run_secs)`` is a real trace splitting loop i of the n-matmul into
    ``outer x n/outer``, so its trace differs with ``outer``.
    """
    db_dir.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    target = tvm.target.Target(TARGET)
    committed = {n: db.commit_workload(matmul(n)) for n in workloads}
    for n, outer, run_secs in records:
        mod = matmul(n)
        sch = s_tir.Schedule(mod)
        i, _, _ = sch.get_loops(sch.get_sblock("C"))
        sch.split(i, sch.sample_perfect_tile(i, n=2, decision=[outer, n // outer]))
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, committed[n], run_secs, target,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return db_dir


def best_in_tvm(db_dir: Path, n: int) -> list[float] | None:
    """run_secs of the record JSONDatabase itself returns for the n-matmul (None if none)."""
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    mod = matmul(n)
    if not db.has_workload(mod):
        return None
    record = db.query_tuning_record(mod, tvm.target.Target(TARGET), "main")
    return None if record is None else [float(s) for s in record.run_secs]


def top_k_in_tvm(db_dir: Path, n: int) -> list[float]:
    """Mean run_secs of the n-matmul's records, in JSONDatabase's own (best-first) order."""
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    records = db.get_top_k(db.commit_workload(matmul(n)), 100)
    return [sum(float(s) for s in r.run_secs) / len(r.run_secs) for r in records]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_load_reads_what_tvm_wrote(tmp_path):
    db = make_db(tmp_path / "a", [16, 8], [(16, 4, [3e-6, 1e-6]), (8, 2, [5e-6]),
                                           (16, 2, [FAILED])])
    contents = tuning_log.load(db)
    assert contents.warnings == []
    assert [w.index for w in contents.workloads] == [0, 1]
    assert [r.workload_index for r in contents.records] == [0, 1, 0]
    assert contents.records[0].mean_secs == pytest.approx(2e-6)
    assert contents.records[2].valid is False
    assert contents.records[0].args == "float32[16,16], float32[16,16], float32[16,16]"


def test_missing_database_is_empty(tmp_path):
    contents = tuning_log.load(tmp_path / "nothing here")
    assert (contents.workloads, contents.records, contents.warnings) == ([], [], [])


def test_merge_keeps_best_first_and_drops_duplicates(tmp_path):
    a = make_db(tmp_path / "a", [16], [(16, 4, [3e-6]), (16, 2, [2e-6])])
    # The same schedule (outer=4) measured again, faster; plus a failed candidate.
    b = make_db(tmp_path / "b", [16], [(16, 4, [1e-6]), (16, 8, [FAILED])])
    report = tuning_log.merge([a, b], tmp_path / "out")
    assert (report.workloads, report.records_in, report.duplicates_dropped,
            report.records_out, report.skipped) == (1, 4, 1, 3, [])
    assert best_in_tvm(tmp_path / "out", 16) == pytest.approx([1e-6])
    # JSONDatabase leaves failed records out of its top-k; the file keeps them, last.
    assert top_k_in_tvm(tmp_path / "out", 16) == pytest.approx([1e-6, 2e-6])
    # Our own file order is best first too, failed last.
    secs = [json.loads(line)[1][1][0] for line in lines(tmp_path / "out" / tuning_log.RECORD_FILE)]
    assert secs == pytest.approx([1e-6, 2e-6, FAILED])


def test_merge_keep_top_k(tmp_path):
    a = make_db(tmp_path / "a", [16], [(16, 1, [4e-6]), (16, 2, [2e-6]), (16, 4, [3e-6]),
                                       (16, 8, [FAILED])])
    report = tuning_log.merge([a], tmp_path / "out", keep_top_k=2)
    assert (report.records_out, report.dropped_by_top_k) == (2, 2)
    assert top_k_in_tvm(tmp_path / "out", 16) == pytest.approx([2e-6, 3e-6])


def test_merge_reindexes_workloads_listed_in_different_orders(tmp_path):
    a = make_db(tmp_path / "a", [16, 8], [(16, 4, [4e-6]), (8, 4, [9e-6])])
    b = make_db(tmp_path / "b", [8, 16], [(8, 2, [7e-6]), (16, 2, [6e-6])])
    # Concatenation would point b's records at a's workloads; re-indexing must not.
    assert lines(a / tuning_log.WORKLOAD_FILE) != lines(b / tuning_log.WORKLOAD_FILE)
    report = tuning_log.merge([a, b], tmp_path / "out")
    assert (report.workloads, report.records_out) == (2, 4)
    assert len(lines(tmp_path / "out" / tuning_log.WORKLOAD_FILE)) == 2
    # JSONDatabase replays every trace on its workload while loading: a record under the
    # wrong workload (a 16-split on an 8-loop) would fail here.
    assert top_k_in_tvm(tmp_path / "out", 16) == pytest.approx([4e-6, 6e-6])
    assert top_k_in_tvm(tmp_path / "out", 8) == pytest.approx([7e-6, 9e-6])


def test_merge_is_deterministic(tmp_path):
    a = make_db(tmp_path / "a", [16, 8], [(16, 4, [4e-6]), (8, 4, [9e-6]), (16, 2, [4e-6])])
    b = make_db(tmp_path / "b", [8, 16], [(8, 2, [7e-6]), (16, 4, [5e-6])])
    outs = []
    for name, srcs in (("ab", [a, b]), ("ab2", [a, b]), ("ba", [b, a])):
        tuning_log.merge(srcs, tmp_path / name)
        outs.append(tmp_path / name)
    for f in (tuning_log.WORKLOAD_FILE, tuning_log.RECORD_FILE):
        data = [(out / f).read_bytes() for out in outs]
        assert data[0] == data[1] == data[2], f
    # Merging a merged database with itself changes nothing.
    tuning_log.merge([outs[0], outs[0]], tmp_path / "again")
    for f in (tuning_log.WORKLOAD_FILE, tuning_log.RECORD_FILE):
        assert (tmp_path / "again" / f).read_bytes() == (outs[0] / f).read_bytes()


def test_truncated_and_garbage_record_lines_are_skipped(tmp_path, caplog):
    db = make_db(tmp_path / "a", [16, 8], [(16, 1, [5e-6]), (16, 2, [4e-6]), (8, 2, [3e-6]),
                                           (16, 4, [2e-6])])
    rec_path = db / tuning_log.RECORD_FILE
    rec = lines(rec_path)
    # A killed run: the last line is cut off mid-way, with no newline. And a garbage line.
    rec_path.write_text("\n".join(rec[:2] + ["#garbage{"] + rec[2:3]) + "\n" + rec[3][:40])
    contents = tuning_log.load(db)
    assert contents.warnings == [
        f"{rec_path}:3: skipped: " + contents.warnings[0].split(": skipped: ")[1],
        f"{rec_path}:5: skipped: " + contents.warnings[1].split(": skipped: ")[1],
    ]
    assert all("bad JSON" in w for w in contents.warnings)
    assert all(w in caplog.text for w in contents.warnings)  # logged too
    assert sorted(r.mean_secs for r in contents.records) == pytest.approx([3e-6, 4e-6, 5e-6])

    report = tuning_log.merge([db], tmp_path / "out")
    assert report.skipped == contents.warnings
    assert report.records_out == 3
    assert top_k_in_tvm(tmp_path / "out", 16) == pytest.approx([4e-6, 5e-6])
    assert best_in_tvm(tmp_path / "out", 8) == pytest.approx([3e-6])


def test_bad_workload_line_skips_only_its_records(tmp_path):
    db = make_db(tmp_path / "a", [16, 8], [(16, 2, [4e-6]), (8, 2, [3e-6])])
    wl_path = db / tuning_log.WORKLOAD_FILE
    wl = lines(wl_path)
    wl_path.write_text(wl[0] + "\n" + wl[1][: len(wl[1]) // 2] + "\n")  # second one cut
    rec_path = db / tuning_log.RECORD_FILE
    rec_path.write_text(rec_path.read_text() + "[7,[[[],[]],[1e-6],null,null]]\n")
    contents = tuning_log.load(db)
    assert len(contents.warnings) == 3
    assert contents.warnings[0].startswith(f"{wl_path}:2: skipped: bad JSON")
    assert contents.warnings[1].startswith(f"{rec_path}:2: skipped: refers to workload line 2")
    assert contents.warnings[2].startswith(f"{rec_path}:3: skipped: workload index 7 out of")
    assert [r.mean_secs for r in contents.records] == pytest.approx([4e-6])

    tuning_log.merge([db], tmp_path / "out")
    assert best_in_tvm(tmp_path / "out", 16) == pytest.approx([4e-6])
    assert best_in_tvm(tmp_path / "out", 8) is None


def test_merge_into_a_source_keeps_its_other_files(tmp_path):
    a = make_db(tmp_path / "a", [16], [(16, 2, [4e-6])])
    b = make_db(tmp_path / "b", [8], [(8, 2, [3e-6])])
    (a / "logs").mkdir()
    (a / "logs" / "task.log").write_text("kept")
    report = tuning_log.merge([a, b], a)
    assert report.records_out == 2
    assert (a / "logs" / "task.log").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left
    assert best_in_tvm(a, 16) == pytest.approx([4e-6])
    assert best_in_tvm(a, 8) == pytest.approx([3e-6])


def test_mixed_targets_are_reported(tmp_path):
    a = make_db(tmp_path / "a", [16], [(16, 2, [4e-6])])
    rec_path = a / tuning_log.RECORD_FILE
    rec_path.write_text(rec_path.read_text().replace('"num-cores":2', '"num-cores":8'))
    b = make_db(tmp_path / "b", [16], [(16, 4, [3e-6])])
    report = tuning_log.merge([a, b], tmp_path / "out")
    assert len(report.warnings) == 1 and "2 different targets" in report.warnings[0]


def test_stats(tmp_path):
    db = make_db(tmp_path / "a", [16, 8], [(16, 4, [3e-6, 1e-6]), (16, 2, [FAILED]),
                                           (16, 8, [4e-6])])
    s = tuning_log.stats(db)
    assert (s["workloads"], s["records"], s["valid_records"], s["warnings"]) == (2, 3, 2, [])
    w16, w8 = s["per_workload"]
    assert (w16["records"], w16["valid_records"]) == (3, 2)
    assert w16["best_us"] == pytest.approx(2.0)
    assert w16["args"] == "float32[16,16], float32[16,16], float32[16,16]"
    assert (w8["records"], w8["best_us"]) == (0, None)
    json.dumps(s)  # plain data, ready for a report


def test_committed_form_is_gzipped_reproducible_and_readable(tmp_path):
    make_db(tmp_path / "a", [16, 32], [(16, 4, [3e-6]), (16, 2, [2e-6]), (32, 4, [5e-6])])
    first = tuning_log.export_compressed([tmp_path / "a"], tmp_path / "logs1", keep_top_k=1)
    tuning_log.export_compressed([tmp_path / "a"], tmp_path / "logs2", keep_top_k=1)
    names = sorted(p.name for p in (tmp_path / "logs1").iterdir())
    assert names == ["database_tuning_record.json.gz", "database_workload.json.gz"]
    for name in names:
        assert (tmp_path / "logs1" / name).read_bytes() == (tmp_path / "logs2" / name).read_bytes()
    assert first.records_out == 2  # top-1 per workload
    contents = tuning_log.load(tmp_path / "logs1")
    assert len(contents.workloads) == 2 and len(contents.records) == 2
    # a gzipped log seeds a plain database TVM can query: the best record survives
    tuning_log.merge([tmp_path / "logs1"], tmp_path / "plain")
    assert best_in_tvm(tmp_path / "plain", 16) == [2e-6]


def _matmul_with_block(n: int, block: str):
    a = te.placeholder((n, n), name="a")
    b = te.placeholder((n, n), name="b")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name=block)
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def test_a_record_that_does_not_replay_is_dropped_and_the_rest_opens(tmp_path, caplog):
    """A trace built on block "D" filed under the structurally equal workload whose block
    is "C" (what MetaSchedule did when a task's block names differed from the stored
    workload's): TVM cannot open the database at all; open_database drops that record."""
    db_dir = make_db(tmp_path / "db", [16], [(16, 4, [2e-6])])
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    renamed = _matmul_with_block(16, "D")
    sch = s_tir.Schedule(renamed)
    i, _, _ = sch.get_loops(sch.get_sblock("D"))
    sch.split(i, [2, 8])
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(renamed), [1e-6], tvm.target.Target(TARGET),
        ms.arg_info.ArgInfo.from_prim_func(renamed["main"])))
    with pytest.raises(RuntimeError, match="parallel_for"):  # all TVM says
        ms.database.JSONDatabase(work_dir=str(db_dir))

    original = {name: (db_dir / name).read_bytes()
                for name in (tuning_log.WORKLOAD_FILE, tuning_log.RECORD_FILE)}
    said: list[str] = []
    reopened = tuning_log.open_database(db_dir, report=said.append)
    assert len(reopened) == 1
    assert best_in_tvm(db_dir, 16) == [2e-6]  # the good record survived, on disk too
    assert f"{db_dir / tuning_log.RECORD_FILE}:2: ScheduleError" in caplog.text
    # the original is kept beside the repaired copy, byte for byte, and the report says so
    for name, data in original.items():
        assert (db_dir / f"{name}.orig").read_bytes() == data
    (line,) = said
    assert "dropped 1 record(s)" in line and f"{tuning_log.RECORD_FILE}:2" in line
    assert f"{tuning_log.RECORD_FILE}.orig" in line
    # the repaired database loads and merges without the backups getting in the way
    assert len(tuning_log.load(db_dir).records) == 1


def test_a_second_repair_keeps_the_first_backup(tmp_path):
    db_dir = make_db(tmp_path / "db", [16], [(16, 4, [2e-6])])
    (db_dir / f"{tuning_log.RECORD_FILE}.orig").write_text("earlier backup\n")
    with open(db_dir / tuning_log.RECORD_FILE, "a") as f:
        f.write("[0, not json\n")  # a truncated last line: load skips it, so it is dropped
    dropped, backup = tuning_log.drop_unreplayable(db_dir)
    assert len(dropped) == 1 and "skipped: bad JSON" in dropped[0]
    assert (db_dir / f"{tuning_log.RECORD_FILE}.orig").read_text() == "earlier backup\n"
    assert db_dir / f"{tuning_log.RECORD_FILE}.orig.1" in backup
    assert "[0, not json" in (db_dir / f"{tuning_log.RECORD_FILE}.orig.1").read_text()
    assert "not json" not in (db_dir / tuning_log.RECORD_FILE).read_text()


def test_nothing_to_drop_rewrites_nothing(tmp_path):
    db_dir = make_db(tmp_path / "db", [16], [(16, 4, [2e-6])])
    assert tuning_log.drop_unreplayable(db_dir) == ([], [])
    assert sorted(p.name for p in db_dir.iterdir()) == [tuning_log.RECORD_FILE,
                                                       tuning_log.WORKLOAD_FILE]


def _gzip_copy(path: Path) -> None:
    import gzip

    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))


def test_plain_and_gzipped_with_equal_contents_read_once(tmp_path):
    # what `gunzip -k` leaves: both forms, same lines
    db_dir = make_db(tmp_path / "db", [16], [(16, 4, [2e-6]), (16, 2, [3e-6])])
    for name in (tuning_log.WORKLOAD_FILE, tuning_log.RECORD_FILE):
        _gzip_copy(db_dir / name)
    contents = tuning_log.load(db_dir)
    assert len(contents.records) == 2 and contents.warnings == []


def test_plain_and_gzipped_that_differ_is_an_error(tmp_path):
    from pipeline.core.errors import CorruptInputError

    db_dir = make_db(tmp_path / "db", [16], [(16, 4, [2e-6])])
    _gzip_copy(db_dir / tuning_log.RECORD_FILE)
    make_db(db_dir, [16], [(16, 2, [3e-6])])  # the plain file gains a record, the .gz not
    with pytest.raises(CorruptInputError) as err:
        tuning_log.load(db_dir)
    msg = str(err.value)
    assert f"{db_dir / tuning_log.RECORD_FILE}" in msg and "different contents" in msg
    assert "delete the .gz" in msg
    with pytest.raises(CorruptInputError):  # merging (how the tune stage seeds) refuses too
        tuning_log.merge([db_dir], tmp_path / "merged")


ZEN4, XEON = "AMD EPYC 25/17", "Intel(R) Xeon(R) Platinum 8480+ 6/143"


def _measured_on(db_dir: Path, cpu: str) -> Path:
    """Tag every record of ``db_dir`` as measured on ``cpu`` (as the tuner does)."""
    assert tuning_log.tag_measured_on(db_dir, 0, cpu) == len(tuning_log.load(db_dir).records)
    return db_dir


def test_the_same_schedule_measured_on_two_cpus_is_two_records(tmp_path):
    zen = _measured_on(make_db(tmp_path / "zen", [16], [(16, 4, [1e-6]), (16, 2, [2e-6])]),
                       ZEN4)
    xeon = _measured_on(make_db(tmp_path / "xeon", [16], [(16, 4, [3e-6])]), XEON)
    report = tuning_log.merge([zen, xeon], tmp_path / "out")
    assert (report.records_out, report.duplicates_dropped) == (3, 0)
    merged = tuning_log.load(tmp_path / "out")
    assert sorted(merged.cpu_of(r) for r in merged.records) == [ZEN4, ZEN4, XEON]
    # measured elsewhere only: a record keeps its CPU through a second merge
    tuning_log.merge([tmp_path / "out"], tmp_path / "again")
    assert tuning_log.load(tmp_path / "again").measured_on == merged.measured_on


def test_prefer_cpu_ranks_by_this_cpus_own_times(tmp_path):
    """MetaSchedule takes the fastest record whatever measured it; on a Xeon, a Zen 4's
    faster time must not outrank the Xeon's own measurement of the workload."""
    zen = _measured_on(make_db(tmp_path / "zen", [16, 32],
                               [(16, 4, [1e-6]), (32, 4, [5e-6])]), ZEN4)
    xeon = _measured_on(make_db(tmp_path / "xeon", [16], [(16, 2, [3e-6])]), XEON)
    report = tuning_log.merge([zen, xeon], tmp_path / "view", prefer_cpu=XEON)
    assert report.other_cpus_dropped == 1
    assert best_in_tvm(tmp_path / "view", 16) == pytest.approx([3e-6])  # the Xeon's own
    assert best_in_tvm(tmp_path / "view", 32) == pytest.approx([5e-6])  # none here: kept
    tuning_log.merge([zen, xeon], tmp_path / "all")
    assert best_in_tvm(tmp_path / "all", 16) == pytest.approx([1e-6])  # without it


def test_prefer_cpu_falls_back_in_order(tmp_path):
    """The tuner ranks by this CPU's cold-weight times first, then by any time taken on this
    CPU, then by all: hot and cold times are not comparable, another CPU's even less."""
    from pipeline.tuning.tuner import COLD_TAG, ranking_cpus

    cold = ZEN4 + COLD_TAG
    assert ranking_cpus(cold) == (cold, ZEN4) and ranking_cpus(ZEN4) == (ZEN4,)
    # records measured on the artifact's thread count rank before those of threads unknown
    # (before THREADS_TAG, a runner measured on half the cores)
    assert ranking_cpus(cold + ", 2 threads") == (cold + ", 2 threads", ZEN4 + ", 2 threads",
                                                  cold, ZEN4)
    hot = _measured_on(make_db(tmp_path / "hot", [16, 32, 64],
                               [(16, 4, [1e-6]), (32, 4, [1e-6])]), ZEN4)
    measured_cold = _measured_on(make_db(tmp_path / "cold", [16], [(16, 2, [5e-6])]), cold)
    xeon = _measured_on(make_db(tmp_path / "xeon", [32, 64],
                                [(32, 2, [0.5e-6]), (64, 2, [7e-6])]), XEON)
    report = tuning_log.merge([hot, measured_cold, xeon], tmp_path / "view",
                              prefer_cpu=ranking_cpus(cold))
    assert report.other_cpus_dropped == 2
    assert best_in_tvm(tmp_path / "view", 16) == pytest.approx([5e-6])  # cold, though slower
    assert best_in_tvm(tmp_path / "view", 32) == pytest.approx([1e-6])  # this CPU, hot
    assert best_in_tvm(tmp_path / "view", 64) == pytest.approx([7e-6])  # only another's


def test_top_k_is_per_cpu_and_the_committed_form_keeps_the_cpus(tmp_path):
    zen = _measured_on(make_db(tmp_path / "zen", [16], [(16, 1, [4e-6]), (16, 2, [2e-6])]),
                       ZEN4)
    xeon = _measured_on(make_db(tmp_path / "xeon", [16], [(16, 4, [9e-6]), (16, 8, [8e-6])]),
                        XEON)
    report = tuning_log.export_compressed([zen, xeon], tmp_path / "logs", keep_top_k=1)
    assert (report.records_out, report.dropped_by_top_k) == (2, 2)
    assert (tmp_path / "logs" / f"{tuning_log.MEASURED_ON_FILE}.gz").is_file()
    contents = tuning_log.load(tmp_path / "logs")
    assert {contents.cpu_of(r): r.mean_secs for r in contents.records} == pytest.approx(
        {ZEN4: 2e-6, XEON: 8e-6})


def test_tagging_marks_only_the_new_records(tmp_path):
    db = make_db(tmp_path / "db", [16], [(16, 4, [1e-6])])
    make_db(tmp_path / "db", [16], [(16, 2, [2e-6])])  # appended by a later run
    assert tuning_log.tag_measured_on(db, 1, ZEN4) == 1
    contents = tuning_log.load(db)
    assert [contents.cpu_of(r) for r in contents.records] == [tuning_log.UNKNOWN_CPU, ZEN4]


def test_an_unreadable_cpu_table_is_a_warning_not_a_failure(tmp_path):
    db = make_db(tmp_path / "db", [16], [(16, 4, [1e-6])])
    (db / tuning_log.MEASURED_ON_FILE).write_text("{not json")
    contents = tuning_log.load(db)
    assert len(contents.records) == 1 and contents.measured_on == {}
    assert any("every record's CPU is unknown" in w for w in contents.warnings)
