"""``doit nightly``: the workflow file, doit-output parsing, regression checks, and real runs.

The real runs share one tiny project built once (cpu + one CUDA cross-compile): the second
run must rebuild nothing; a baseline with a much smaller ratio, a tightened validation gate
and a perturbed weight must each fail the run naming artifact, metric, value and threshold.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from doit_runner import REPO, doit
from onnx import numpy_helper

from models import make_project, tiny_convnet
from pipeline import nightly
from pipeline.core.errors import ConfigError
from pipeline.core.project import Project
from pipeline.core.targets import host_machine_class

PNG = b"\x89PNG\r\n\x1a\n"
WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"
TARGETS = "targets=cpu,rtx4090"  # the host and one CUDA cross-compile: all a test can afford
STAGE_GROUPS = set(nightly.STAGES)


# ----------------------------------------------------------------------------- fast

def _steps() -> list[dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    return [s for job in workflow["jobs"].values() for s in job["steps"]]


def test_workflow_is_scheduled_and_runs_the_readme_commands():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers["schedule"] and all("cron" in s for s in triggers["schedule"])
    assert "workflow_dispatch" in triggers
    readme_installs = {part.strip() for line in (REPO / "README.md").read_text().splitlines()
                       for part in line.split("&&") if part.strip().startswith("pip install")}
    commands = [s["run"].strip() for s in _steps() if "run" in s]
    assert len(commands) == 2, commands
    install, run = commands
    assert install in readme_installs, (install, readme_installs)
    assert run.split()[:2] == ["doit", "nightly"], run
    setup = next(s for s in _steps() if s.get("uses", "").startswith("actions/setup-python"))
    assert str(setup["with"]["python-version"]) == "3.11"


def test_workflow_caches_artifacts_and_uploads_report_and_bundles():
    steps = _steps()
    cache = [s for s in steps if s.get("uses", "").startswith("actions/cache")]
    assert cache and all(s["with"]["path"] == "artifacts" for s in cache)
    assert any(s.get("if") == "always()" for s in cache if "save" in s["uses"])
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    paths = upload["with"]["path"].split()
    assert "artifacts/reports/nightly/" in paths and any(p.endswith(".tar.gz") for p in paths)


def test_doit_lists_nightly_with_its_docstring(tmp_path):
    run = doit(make_project(tmp_path), "list")
    assert run.returncode == 0, run.output
    assert re.search(r"^nightly\s+Rebuild every model x variant x target", run.output, re.M)


def test_committed_baseline_loads():
    data = nightly.load_baseline(REPO / nightly.BASELINE_FILE)
    assert data["format"] == 1 and isinstance(data["entries"], list)
    assert data["threshold"] == nightly.DEFAULT_THRESHOLD


def test_options_report_every_bad_value_at_once():
    with pytest.raises(ConfigError) as e:
        nightly.NightlyOptions.from_vars({"targets": "cpu,tpu", "baseline": "update",
                                          "threshold": "0.5", "repeat": "x"})
    msg = str(e.value)
    assert all(s in msg for s in ("tpu", "baseline=update", "threshold=0.5", "repeat=x"))
    options, targets = nightly.NightlyOptions.from_vars({"target": "h100", "threshold": "2"})
    assert targets == ["h100"] and options.threshold == 2.0 and options.baseline == "check"


def test_cuda_targets_are_skipped_with_a_reason_without_nvcc(monkeypatch):
    from pipeline.nightly import runner

    monkeypatch.setattr(runner, "_find_nvcc", lambda: None)
    chosen, skipped = nightly.buildable_targets()
    assert chosen == ["cpu"] and set(skipped) == {"rtx4090", "h100"}
    assert "nvcc not found" in skipped["h100"]


DOIT_OUTPUT = """\
-- source:tiny
.  compile:tiny_fp32@cpu
compile: built 0123456789ab in 0.8 s -> {art}/tiny_fp32/cpu/compile
.  package:tiny_fp32@cpu
package: reusing verified output 89abcdef0123 -> {art}/tiny_fp32/cpu/package
.  build:tiny_fp32
.  validate:tiny_fp32@cpu
validate: built fedcba987654 in 0.1 s, peak RSS 512 MiB -> {art}/tiny_fp32/cpu/validate
ERROR: validation failed
TaskFailed - taskid:validate:tiny_fp32@cpu
validation failed:
  - tiny_fp32 ...: max_abs_err = 1e-07, threshold <= 1e-09

UnmetDependency - taskid:validate:report
validate:tiny_fp32@cpu

"""


def test_doit_output_is_classified_with_reasons(tmp_path):
    art = tmp_path / "artifacts"
    store = art / ".store" / "compile"
    for rid, opt in (("old", "O2"), ("new", "O3")):
        (store / rid).mkdir(parents=True)
        (store / rid / "manifest.json").write_text(json.dumps(
            {"config": {"opt": opt}, "upstream": {"module": rid}, "tools": {"tvm": "0.27"}}))
    (art / "tiny_fp32" / "cpu").mkdir(parents=True)
    link = art / "tiny_fp32" / "cpu" / "compile"
    link.symlink_to(store / "old")
    before = nightly.snapshot_links(art)
    link.unlink()
    link.symlink_to(store / "new")
    tasks = nightly.parse_doit_output(DOIT_OUTPUT.format(art=art))
    rows = {r["task"]: r for r in nightly.classify(tasks, before)}
    assert rows["source:tiny"]["status"] == nightly.UP_TO_DATE
    assert rows["compile:tiny_fp32@cpu"]["status"] == nightly.BUILT
    assert rows["compile:tiny_fp32@cpu"]["why"] == "changed: config opt; input module"
    assert rows["package:tiny_fp32@cpu"]["status"] == nightly.REUSED
    assert rows["build:tiny_fp32"]["kind"] == "bookkeeping"
    assert rows["validate:tiny_fp32@cpu"]["status"] == nightly.FAILED
    assert "threshold <= 1e-09" in rows["validate:tiny_fp32@cpu"]["why"]
    assert rows["validate:tiny_fp32@cpu"]["recipe"] == "fedcba987654"  # its report is current
    assert rows["validate:report"]["status"] == nightly.NOT_RUN


def _result(ratio: float | None, sqnr: float = 36.0) -> dict:
    bench = {"status": "ok", "threads": 2, "ratio": ratio,
             "cpp": {"median_ms": ratio, "p90_ms": ratio}, "onnxruntime": {"median_ms": 1.0,
                                                                           "p90_ms": 1.0}}
    validation = {"status": "pass", "records": [
        {"comparison": "tvm_int8_vs_ort_fp32", "metrics": {"sqnr_db": sqnr}, "gates": []}]}
    return {"artifact": "m_int8", "model": "m", "variant": "int8", "target": "cpu",
            "machine_class": "x86_64-avx2", "build": "ok", "build_error": "",
            "validation": validation, "validate_error": "", "bench": bench, "bench_error": "",
            "ratio": ratio, "validation_status": "pass"}


def test_check_names_artifact_metric_value_and_threshold():
    entry = {**{k: v for k, v in _result(1.0).items() if k in ("model", "variant", "target",
                                                                 "machine_class")},
             "ratio": 1.0, "validation": {"tvm_int8_vs_ort_fp32": {"sqnr_db": 36.0}}}
    baseline = {"entries": [entry]}
    failures, warnings = nightly.check([_result(1.2, 34.0)], baseline, 1.25, 3.0)
    assert failures == [] and warnings == []
    failures, _ = nightly.check([_result(1.3, 30.0)], baseline, 1.25, 3.0)
    assert failures[0].startswith("m_int8 on cpu [x86_64-avx2]: latency ratio")
    assert "= 1.3, threshold <= 1.25 (1.25 x baseline 1)" in failures[0]
    assert "tvm_int8_vs_ort_fp32 sqnr_db = 30, threshold >= 33 (baseline 36 - 3 dB)" in \
        failures[1]
    failures, warnings = nightly.check([_result(9.0)], {"entries": []}, 1.25, 3.0)
    assert failures == [] and "no baseline entry" in warnings[0]


def test_history_chart_skips_a_truncated_line(tmp_path):
    history = tmp_path / "history.jsonl"
    for i, ratio in enumerate((1.0, 1.1)):
        nightly.append_history(history, {"kind": "run", "time": f"2026-01-0{i + 1}T00:00:00",
                                         "artifacts": [{"artifact": "a", "target": "cpu",
                                                        "machine_class": "x", "ratio": ratio,
                                                        "ratio_limit": 1.5}]})
        nightly.append_history(history, {"kind": "baseline_refresh", "time": "t"})
    with open(history, "a") as f:
        f.write('{"kind": "ru')  # a run killed mid-write
    runs = nightly.read_history(history)
    assert len(runs) == 4
    assert nightly.history_chart(runs, tmp_path / "h.png").read_bytes()[:8] == PNG


def test_a_failed_stage_fails_the_run_and_leads_the_report(tmp_path):
    project = make_project(tmp_path)
    output = ("-- source:tiny\n.  compile:tiny_fp32@cpu\nTaskError - taskid:compile:tiny_fp32@cpu"
              "\nTraceback (most recent call last):\nRuntimeError: LLVM said no\n\n"
              "UnmetDependency - taskid:package:tiny_fp32@cpu\ncompile:tiny_fp32@cpu\n\n")
    calls = []

    def fake_doit(cmd, cwd, timeout):
        calls.append(cmd)
        return 1, output

    summary = nightly.run(project, ["cpu"], run_doit=fake_doit)
    assert len(calls) == 1 and "tune=off" in calls[0] and "target=cpu" in calls[0]
    assert summary["status"] == "fail"
    assert any(f.startswith("tiny_fp32 on cpu") and "build failed at compile:tiny_fp32@cpu" in f
               and "LLVM said no" in f for f in summary["failures"]), summary["failures"]
    md = (project / nightly.REPORT_DIR / "nightly.md").read_text()
    assert md.startswith("# Nightly: FAIL") and "LLVM said no" in md.split("## Artifacts")[0]


def test_models_option_runs_only_the_named_artifacts(tmp_path):
    project = make_project(tmp_path)
    options, _ = nightly.NightlyOptions.from_vars({"models": " tiny_int8 ,"})
    assert options.models == ("tiny_int8",)
    calls = []

    def fake_doit(cmd, cwd, timeout):
        calls.append(cmd)
        return 0, ""

    summary = nightly.run(project, ["cpu"], options, run_doit=fake_doit)
    tasks = [a for a in calls[0] if ":" in a]
    assert tasks == ["build:tiny_int8", "validate:tiny_int8@cpu", "bench:tiny_int8@cpu"]
    assert [a["artifact"] for a in summary["artifacts"]] == ["tiny_int8"]
    # a model name selects every variant; the whole-project groups are not asked for
    whole = nightly.select_artifacts(Project.load(project), ["tiny"])
    assert sorted(f"{s.name}_{v.name}" for s, v in whole) == ["tiny_fp32", "tiny_int8"]
    assert "build" not in calls[0] and "validate" not in calls[0]


def test_unknown_model_name_fails_before_building_and_lists_the_known_ones(tmp_path):
    project = make_project(tmp_path)
    options, _ = nightly.NightlyOptions.from_vars({"models": "tiny_int8,resnet51"})
    with pytest.raises(ConfigError) as e:
        nightly.run(project, ["cpu"], options,
                    run_doit=lambda *a: pytest.fail("doit must not run"))
    msg = str(e.value)
    assert "unknown resnet51" in msg and "tiny_fp32" in msg and "models tiny" in msg


# ----------------------------------------------------------------------------- real runs

def _report(project: Path) -> dict:
    return json.loads((project / nightly.REPORT_DIR / "nightly.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny project after its first nightly, which also recorded the baseline."""
    project = make_project(tmp_path_factory.mktemp("nightly"))
    run = doit(project, "nightly", TARGETS, "baseline=refresh")
    return project, run


@pytest.mark.slow
def test_first_run_builds_validates_benches_and_records_the_baseline(built):
    project, run = built
    assert run.returncode == 0, run.output
    assert {"source", "quantize", "import", "compile", "package", "smoke", "validate",
            "bench"} <= run.built, run.output
    report = _report(project)
    assert report["status"] == "pass" and report["failures"] == []
    by_target = {(a["artifact"], a["target"]): a for a in report["artifacts"]}
    assert set(by_target) == {(f"tiny_{v}", t) for v in ("fp32", "int8")
                              for t in ("cpu", "rtx4090")}
    for variant in ("fp32", "int8"):
        cpu, gpu = by_target[(f"tiny_{variant}", "cpu")], by_target[(f"tiny_{variant}",
                                                                      "rtx4090")]
        assert cpu["validation_status"] == "pass" and cpu["ratio"] > 0
        assert gpu["build"] == "ok" and gpu["bundles"]
        assert gpu["validation_status"] == "not validated: no CUDA device"
        assert gpu["bench_status"] == "not run: no CUDA device"
    baseline = nightly.load_baseline(project / nightly.BASELINE_FILE)
    assert {(e["artifact"], e["target"], e["machine_class"]) for e in baseline["entries"]} == \
        {("tiny_fp32", "cpu", host_machine_class()), ("tiny_int8", "cpu", host_machine_class())}
    entry = baseline["entries"][1]
    assert {"cpp_median_ms", "cpp_p90_ms", "onnxruntime_median_ms"} <= set(entry["latency"])
    assert entry["validation"]["tvm_int8_vs_ort_fp32"]["sqnr_db"] > 20
    history = nightly.read_history(project / nightly.REPORT_DIR / "history.jsonl")
    assert [h["kind"] for h in history] == ["baseline_refresh", "run"]
    md = (project / nightly.REPORT_DIR / "nightly.md").read_text()
    assert md.startswith("# Nightly: PASS")
    for png in ("history.png", "latency.png"):
        assert f"({png})" in md
        assert (project / nightly.REPORT_DIR / png).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_second_run_rebuilds_nothing_and_passes(built):
    project, _ = built
    run = doit(project, "nightly", TARGETS)
    assert run.returncode == 0, run.output
    assert run.built == set() and run.reused == set(), run.output
    stages_ran = {t for t in run.executed if t.split(":")[0] in STAGE_GROUPS
                  and not t.endswith(":report")}
    assert stages_ran == set(), run.output
    report = _report(project)
    assert report["status"] == "pass"
    assert set(report["stage_counts"]) == {nightly.UP_TO_DATE}, report["stage_counts"]
    for target in report["targets"]:
        assert all(r["status"] == nightly.UP_TO_DATE for r in target["tasks"]
                   if r["kind"] == "stage")
    assert all(a["baseline_ratio"] == a["ratio"] for a in report["artifacts"]
               if a["target"] == "cpu")  # the stored measurement, compared, unchanged
    md = (project / nightly.REPORT_DIR / "nightly.md").read_text()
    assert "Skipped as up to date" in md and "`compile:tiny_int8@cpu`" in md
    history = nightly.read_history(project / nightly.REPORT_DIR / "history.jsonl")
    assert [h["status"] for h in history if h["kind"] == "run"][-1] == "pass"
    # doit takes the per-artifact task names the models= filter hands it
    one = doit(project, "nightly", "targets=cpu", "models=tiny_int8")
    assert one.returncode == 0 and one.built == set(), one.output
    assert [a["artifact"] for a in _report(project)["artifacts"]] == ["tiny_int8"]


@pytest.mark.slow
def test_latency_regression_fails_naming_artifact_metric_value_threshold(built):
    project, _ = built
    baseline = nightly.load_baseline(project / nightly.BASELINE_FILE)
    for entry in baseline["entries"]:
        entry["ratio"] /= 100  # a baseline 100x faster than reality
    regressed = project / "models" / "baselines" / "regressed.json"
    regressed.write_text(json.dumps(baseline))
    option = f"baseline_file={regressed.relative_to(project)}"
    run = doit(project, "nightly", "targets=cpu", option)
    assert run.returncode != 0, run.output
    m = re.search(r"tiny_int8 on cpu \[[^]]+\]: latency ratio C\+\+/onnxruntime \(median\) = "
                  r"([\d.e+-]+), threshold <= ([\d.e+-]+) \(1.25 x baseline", run.output)
    assert m and float(m.group(1)) > float(m.group(2)), run.output
    assert run.built == set(), run.output  # a failing check rebuilds nothing either
    md = (project / nightly.REPORT_DIR / "nightly.md").read_text()
    assert md.startswith("# Nightly: FAIL") and "latency ratio" in md
    assert doit(project, "nightly", "targets=cpu", option, "threshold=1000").returncode == 0


@pytest.mark.slow
def test_failed_gate_and_perturbed_weight_fail_the_run(built, tmp_path):
    # One fresh build covers both: a gate the fp32 artifact cannot meet, and an int8 artifact
    # whose weights were perturbed so its quantization quality falls far below the baseline.
    model = tiny_convnet()
    fc = next(i for i in model.graph.initializer if i.name == "fc.w")
    weights = numpy_helper.to_array(fc).copy()
    weights.flat[0] *= np.float32(30)
    fc.CopyFrom(numpy_helper.from_array(weights, "fc.w"))
    project = make_project(tmp_path, model=model)
    spec = project / "models" / "tiny.toml"
    spec.write_text(spec.read_text() + "\n[validation]\nfp32_rel_tol = 1e-9\n")
    (project / "models" / "baselines").mkdir()
    shutil.copy(built[0] / nightly.BASELINE_FILE, project / nightly.BASELINE_FILE)
    # A fresh measurement of a 20 us model is noisy on a loaded machine: latency is not the
    # point here (the test above checks it), so its threshold is out of the way.
    run = doit(project, "nightly", "targets=cpu", "threshold=1000")
    assert run.returncode != 0, run.output
    assert re.search(r"tiny_fp32 \(model tiny, variant fp32\) on target cpu: "
                     r"tvm_fp32_vs_ort_fp32: max_abs_err = [\d.e+-]+, threshold <= [\d.e+-]+",
                     run.output), run.output
    m = re.search(r"tiny_int8 on cpu \[[^]]+\]: tvm_int8_vs_ort_fp32 sqnr_db = ([\d.e+-]+), "
                  r"threshold >= ([\d.e+-]+) \(baseline", run.output)
    assert m and float(m.group(1)) < float(m.group(2)), run.output
    report = _report(project)
    assert report["status"] == "fail", report
    # the fp32 gate and the int8 quality drop against the baseline; the int8 variant's own
    # quality gate (cosine to fp32) may fail on the perturbed weights as well
    kinds = ("tvm_fp32_vs_ort_fp32: max_abs_err", "tvm_int8_vs_ort_fp32 sqnr_db",
             "tvm_int8_vs_ort_fp32: cosine")
    assert 2 <= len(report["failures"]) <= 3, report["failures"]
    assert all(any(k in f for k in kinds) for f in report["failures"]), report["failures"]
