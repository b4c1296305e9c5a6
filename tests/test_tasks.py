"""doit task dicts: names, the file_dep chain between stages, configs, options. No doit run."""

import re
from pathlib import Path

import pytest

from models import TINY_SPEC as TINY_SPEC_TEXT
from models import make_project
from pipeline.core.errors import ConfigError
from pipeline.core.project import Project
from pipeline.core.targets import get_target
from pipeline.tasks.graph import all_tasks
from pipeline.tasks.options import Options


@pytest.fixture
def groups(tmp_path):
    project = Project.load(make_project(tmp_path))
    return all_tasks(project, get_target("cpu"), Options())


def _by_name(groups):
    return {f"{g}:{t['name']}": t for g, tasks in groups.items() for t in tasks}


def test_every_stage_has_a_documented_task(groups):
    names = set(_by_name(groups))
    assert {"source:tiny", "quantize:tiny_int8", "import:tiny_int8", "import:tiny_fp32",
            "tune:tiny_int8@cpu", "compile:tiny_int8@cpu", "package:tiny_int8@cpu",
            "smoke:tiny_int8@cpu", "build:tiny_int8", "build:tiny_fp32"} <= names
    assert "quantize:tiny_fp32" not in names  # fp32 skips quantization
    assert all(t["doc"] for t in _by_name(groups).values())


def test_stages_chain_through_files(groups):
    t = _by_name(groups)
    chain = ["source:tiny", "quantize:tiny_int8", "import:tiny_int8", "tune:tiny_int8@cpu",
             "compile:tiny_int8@cpu", "package:tiny_int8@cpu", "smoke:tiny_int8@cpu",
             "build:tiny_int8"]
    for up, down in zip(chain, chain[1:]):
        produced = set(t[up]["targets"])
        consumed = set(t[down]["file_dep"])
        if up.startswith("tune"):  # compile also reads the workload table next to the records
            produced = {str(Path(p).parent / "database_workload.json") for p in produced} | \
                produced
        assert produced & consumed, f"{down} does not depend on {up}'s output"
    assert t["import:tiny_fp32"]["file_dep"] == t["source:tiny"]["targets"]


def test_package_depends_on_templates(groups):
    deps = _by_name(groups)["package:tiny_int8@cpu"]["file_dep"]
    assert any(d.endswith("main.cc.j2") for d in deps)


def test_config_reaches_uptodate(tmp_path):
    project = Project.load(make_project(tmp_path))
    base = _by_name(all_tasks(project, get_target("cpu"), Options()))
    more = _by_name(all_tasks(project, get_target("cpu"), Options(trials=99)))

    def cfg(task):
        return task["uptodate"][0].config["config"]

    assert cfg(base["tune:tiny_int8@cpu"]) != cfg(more["tune:tiny_int8@cpu"])
    assert cfg(base["compile:tiny_int8@cpu"]) == cfg(more["compile:tiny_int8@cpu"])
    assert cfg(base["quantize:tiny_int8"])["samples"] == 4


def test_gpu_target_tasks_are_named_per_target(tmp_path):
    project = Project.load(make_project(tmp_path))
    names = _by_name(all_tasks(project, get_target("rtx4090"), Options(target="rtx4090")))
    assert "compile:tiny_int8@rtx4090" in names
    cfg = names["compile:tiny_int8@rtx4090"]["uptodate"][0].config["config"]
    assert cfg["target"]["arch"] == "sm_89"


def test_bad_options_all_reported():
    with pytest.raises(ConfigError) as e:
        Options(target="tpu", tune="always", trials=0, rpc="nohost", layout="NCHW").validate()
    msg = str(e.value)
    for needle in ("target=tpu", "tune=always", "trials=0", "rpc=nohost",
                   "layout=NCHW: use one of NHWC, NCHW16c, NHWC-winograd"):
        assert needle in msg
    with pytest.raises(ConfigError, match="known targets: cpu, rtx4090, h100"):
        get_target("tpu")


def test_tool_upgrade_reruns_only_the_stages_using_it(tmp_path, monkeypatch):
    from pipeline.core import hashing

    project = Project.load(make_project(tmp_path))
    before = _by_name(all_tasks(project, get_target("cpu"), Options()))
    real = hashing.tool_version
    monkeypatch.setattr(hashing, "tool_version",
                        lambda dist: "99.0" if dist == "apache-tvm" else real(dist))
    after = _by_name(all_tasks(project, get_target("cpu"), Options()))
    changed = {n for n in before
               if before[n].get("uptodate") and
               before[n]["uptodate"][0].config != after[n]["uptodate"][0].config}
    assert {"import:tiny_int8", "tune:tiny_int8@cpu", "compile:tiny_int8@cpu",
            "package:tiny_int8@cpu", "validate:tiny_int8@cpu"} <= changed
    assert "source:tiny" not in changed and "quantize:tiny_int8" not in changed


VALIDATION_DATA_SPEC = """
name = "tiny"
[source]
path = "models/tiny.onnx"
[[inputs]]
name = "x"
shape = [1, 3, 8, 8]
[validation]
data_dir = "data/val"
[variants.fp32]
scheme = "fp32"
[variants.int8]
scheme = "int8"
[variants.int8.validation]
int8_cosine_min = 0.9
"""


def test_validation_data_files_are_inputs_of_validate_and_the_kit_only(tmp_path):
    import numpy as np

    root = make_project(tmp_path, spec_text=VALIDATION_DATA_SPEC)
    (root / "data" / "val" / "sub").mkdir(parents=True)
    for name in ("a.npy", "sub/a.npy"):  # same file name in two folders: both tracked
        np.save(root / "data" / "val" / name, np.zeros((1, 3, 8, 8), np.float32))
    tasks = _by_name(all_tasks(Project.load(root), get_target("cpu"), Options()))
    reading = sorted(name for name, t in tasks.items()
                     if any("data/val" in d for d in t.get("file_dep", [])))
    # the validation kit carries the same inputs to the device
    assert reading == ["kit:tiny_fp32@cpu", "kit:tiny_int8@cpu", "validate:tiny_fp32@cpu",
                       "validate:tiny_int8@cpu"]
    deps = [d for d in tasks["validate:tiny_int8@cpu"]["file_dep"] if "data/val" in d]
    assert len(deps) == 2


def test_per_variant_gates_reach_the_validate_recipe(tmp_path):
    root = make_project(tmp_path, spec_text=VALIDATION_DATA_SPEC)
    tasks = _by_name(all_tasks(Project.load(root), get_target("cpu"), Options()))

    def gates(name):
        return tasks[name]["uptodate"][0].config["config"]["gates"]

    assert gates("validate:tiny_int8@cpu")["int8_cosine_min"] == 0.9
    assert gates("validate:tiny_fp32@cpu")["int8_cosine_min"] == 0.999


def test_a_broken_spec_fails_only_its_own_model(tmp_path, capsys):
    root = make_project(tmp_path)
    (root / "models" / "bad.toml").write_text('name = "bad"\n[[inputs]]\nshape = [0]\n')
    (root / "models" / "gone.toml").write_text(
        TINY_SPEC_TEXT.replace('"tiny"', '"gone"').replace("tiny.onnx", "gone.onnx"))
    project = Project.load(root)
    assert list(project.specs) == ["tiny"]
    assert "source.path: 'models/gone.onnx': no such file" in \
        project.broken[str(root / "models" / "gone.toml")]
    tasks = _by_name(all_tasks(project, get_target("cpu"), Options()))
    assert {"build:tiny_int8", "build:bad", "build:gone"} <= set(tasks)
    action, args = tasks["build:bad"]["actions"][0]
    failed = action(*args)
    assert "bad.toml is invalid" in str(failed) and "shape" in str(failed)
    assert "bad.toml is invalid" in capsys.readouterr().err
    build = [name for name in tasks if name.startswith("build:")]
    assert build.index("build:tiny_int8") < build.index("build:bad")  # good ones first


def test_parse_options_names_every_bad_value():
    from pipeline.tasks.options import parse_options

    given = {"trials": "abc", "tune_minutes": "-1", "rpc": "host:port:key", "threads": "0",
             "warmup": "x", "repeat": "0", "rounds": "0"}
    with pytest.raises(ConfigError) as e:
        parse_options(given.get, argv=["build:tiny_int8", "trails=3", "trials=abc"],
                      other_vars=("baseline",))
    msg = str(e.value)
    for needle in ("trials=abc: not a whole number (allowed: >= 1)",
                   "tune_minutes=-1: must be a number of minutes > 0",
                   "rpc=host:port:key: port 'port' must be a number 1..65535",
                   "threads=0: must be 1..", "warmup=x: not a whole number (allowed: >= 0)",
                   "repeat=0: must be a whole number >= 1",
                   "rounds=0: must be a whole number >= 1",
                   "trails=3: unknown option 'trails' (options: baseline, kit_report, layout"):
        assert needle in msg
    assert "trials=abc" in msg and "build:tiny_int8" not in msg


@pytest.mark.parametrize("name, value, needle", [
    ("rpc", "h:70000:k", "port '70000' must be a number 1..65535"),
    ("rpc", ":9190:k", "use host:port:device_key"),
    ("rpc", "h:9190:k:soon", "session timeout 'soon' must be a positive number"),
    ("rpc", "h:9190:k:1:2", "use host:port:device_key"),
    ("tune_minutes", "nan", "must be a number of minutes > 0"),
    ("tune_minutes", "inf", "must be a number of minutes > 0"),
    ("threads", "100000", "must be 1.."),
    ("tune_tasks", ",,", "name kernels, comma-separated"),
])
def test_parse_options_ranges(name, value, needle):
    from pipeline.tasks.options import parse_options

    with pytest.raises(ConfigError, match=re.escape(f"{name}={value}: ") + ".*" +
                       re.escape(needle)):
        parse_options({name: value}.get)


def test_tune_tasks_needs_a_tuning_mode():
    from pipeline.tasks.options import parse_options

    with pytest.raises(ConfigError, match=re.escape("tune_tasks=*conv2d18*: tune=off tunes "
                                                    "nothing; use tune=extend")):
        parse_options({"tune": "off", "tune_tasks": "*conv2d18*"}.get)
    options = parse_options({"tune": "extend", "tune_tasks": " a_b ,*conv2d2*,"}.get)
    assert options.tune_task_patterns() == ("a_b", "*conv2d2*")


def test_parse_options_good_values():
    import os

    from pipeline.tasks.options import parse_options

    given = {"trials": "8", "tune_minutes": "1.5", "rpc": "127.0.0.1:9190:rtx4090",
             "threads": str(os.cpu_count()), "warmup": "0", "repeat": "1", "layout": "NHWC",
             "tune": "off", "target": ""}
    options = parse_options(given.get, target="h100")
    assert options == Options(target="h100", tune="off", trials=8, tune_minutes=1.5,
                              rpc="127.0.0.1:9190:rtx4090", layout="NHWC",
                              threads=os.cpu_count(), warmup=0, repeat=1)
    assert parse_options({"trials": ""}.get) == Options()  # empty: the default


def test_unknown_task_args_list_the_known_names():
    from pipeline.tasks.options import unknown_task_args

    tasks = {"build": ["tiny_fp32", "tiny_int8"], "tune": ["tiny_fp32@cpu", "tiny_int8@cpu"],
             "validate": ["tiny_int8@cpu", "report"]}
    argv = ["-v", "2", "build:tiny_int8", "build:resnet51_int8", "tune:tiny_int8",
            "validate:x@cpu", "build:tiny_*", "build:nomatch*", "other:x", "trials=3",
            "validate:report"]
    found = unknown_task_args(argv, tasks)
    assert [name for name, _ in found] == ["resnet51_int8", "tiny_int8", "x@cpu", "nomatch*"]
    msgs = [m for _, m in found]
    assert msgs[0] == ("unknown artifact 'resnet51_int8' in `doit build:resnet51_int8`; "
                       "known: tiny_fp32, tiny_int8")
    assert "`doit tune:tiny_int8@cpu`" in msgs[1]
    assert msgs[2].endswith("known: tiny_int8@cpu")  # the report task is not an artifact


def test_build_shaping_options_are_remembered_until_reset(tmp_path, monkeypatch):
    from pipeline.tasks.options import NO_REMEMBER_ENV, remembering

    monkeypatch.delenv(NO_REMEMBER_ENV, raising=False)

    def argv(**given):
        return lambda name, default=None: given.get(name, default)

    said: list[str] = []
    get = remembering(argv(tune="off", layout="NCHW16c"), tmp_path, said.append)
    assert get("tune") == "off" and said == []  # given now: nothing to say
    get = remembering(argv(), tmp_path, said.append)
    assert get("tune") == "off" and get("layout") == "NCHW16c" and get("trials") is None
    assert "tune=off" in said[-1] and "layout=NCHW16c" in said[-1]
    get = remembering(argv(tune=""), tmp_path, said.append)  # tune= : the default again
    assert get("tune") == "" and remembering(argv(), tmp_path, said.append)("tune") is None
    # A top-up is a one-off: tune=extend is not remembered (its trials are), the earlier
    # mode stays.
    remembering(argv(tune="off"), tmp_path, said.append)
    get = remembering(argv(tune="extend", trials="256"), tmp_path, said.append)
    assert get("tune") == "extend"
    get = remembering(argv(), tmp_path, said.append)
    assert get("tune") == "off" and get("trials") == "256"
    remembering(argv(tune="", trials=""), tmp_path, said.append)
    remembering(argv(tune="extend"), tmp_path, said.append)
    assert remembering(argv(), tmp_path, said.append)("tune") is None
    monkeypatch.setenv(NO_REMEMBER_ENV, "1")  # doit nightly: its options are its own
    remembering(argv(tune="off"), tmp_path, said.append)
    assert remembering(argv(), tmp_path, said.append)("tune") is None
