"""Command-line options of the doit tasks (``doit build:x target=cpu tune=missing ...``).

:func:`parse_options` turns doit's ``NAME=VALUE`` strings into a typed :class:`Options`,
collecting every bad value (the option, the value, what is allowed) into one ConfigError;
:func:`unknown_task_args` finds ``group:name`` arguments that name no task, so dodo.py can
list the known names before doit answers with its generic "Invalid parameter".
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.spec import CPU_FP32_LAYOUTS

TUNE_MODES = ("off", "missing", "extend")
PREPACK_VALUES = ("on",)


def max_threads() -> int:
    """The most threads a bench may ask for: the C++ app refuses more than the cores."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Options:
    """Command-line choices (``doit build:x target=cpu tune=missing trials=32``)."""

    target: str = "cpu"
    tune: str = "missing"  # off | missing | extend
    trials: int | None = None  # overrides the spec's trials_per_task
    tune_minutes: float | None = None  # overrides the spec's wall_seconds
    rpc: str = ""  # host:port:device_key of a TVM RPC tracker for measurement
    # Comma-separated kernel names (fnmatch patterns) the tuner may work on; "" = all. The
    # roofline and tune_report.json name the slow kernels; a top-up can then go to them.
    tune_tasks: str = ""
    # "on": tune the convs and matmuls over constant weights as weight-packing twins
    # (pipeline.compiler.weight_prepack); a one-off, like tune_tasks (not remembered)
    prepack: str = ""
    layout: str = ""  # overrides the spec's fp32 conv layout on CPUs (NHWC | NCHW16c)
    threads: int | None = None  # bench threads (default: every core of this machine)
    warmup: int = 5
    repeat: int = 30
    rounds: int = 3  # bench: interleaved rounds of the C++ app, TVM in Python, onnxruntime
    kit_report: str = ""  # a validation kit checker's report for `doit validate` to read

    def problems(self) -> list[str]:
        """Every option out of range, each naming the option, its value and what is allowed."""
        from pipeline.core.targets import TARGETS

        problems = []
        if self.target not in TARGETS:
            problems.append(f"target={self.target}: known targets are {', '.join(TARGETS)}")
        if self.tune not in TUNE_MODES:
            problems.append(f"tune={self.tune}: use one of {', '.join(TUNE_MODES)}")
        if self.trials is not None and self.trials < 1:
            problems.append(f"trials={self.trials}: must be a whole number >= 1")
        if self.tune_minutes is not None and not (0 < self.tune_minutes < math.inf):
            problems.append(f"tune_minutes={self.tune_minutes:g}: must be a number of minutes "
                            "> 0 (tune=off skips tuning)")
        if self.tune_tasks and not self.tune_task_patterns():
            problems.append(f"tune_tasks={self.tune_tasks}: name kernels, comma-separated "
                            "(e.g. tune_tasks=fused_conv2d18_add13_relu10,*conv2d20*)")
        elif self.tune_tasks and self.tune == "off":
            problems.append(f"tune_tasks={self.tune_tasks}: tune=off tunes nothing; use "
                            "tune=extend (top up those kernels) or tune=missing")
        if self.prepack and self.prepack not in PREPACK_VALUES:
            problems.append(f"prepack={self.prepack}: use prepack=on (tune the kernels with "
                            "their weights packed too) or leave it out")
        elif self.prepack == "on" and self.tune == "off":
            problems.append("prepack=on: tune=off tunes nothing; use tune=extend (with "
                            "tune_tasks= for some kernels) or tune=missing")
        if self.layout and self.layout not in CPU_FP32_LAYOUTS:
            problems.append(f"layout={self.layout}: use one of {', '.join(CPU_FP32_LAYOUTS)}")
        if self.rpc:
            problems.extend(_rpc_problems(self.rpc))
        cores = max_threads()
        if self.threads is not None and not 1 <= self.threads <= cores:
            problems.append(f"threads={self.threads}: must be 1..{cores} (this machine's "
                            "cores)")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup}: must be a whole number >= 0")
        if self.repeat < 1:
            problems.append(f"repeat={self.repeat}: must be a whole number >= 1")
        if self.rounds < 1:
            problems.append(f"rounds={self.rounds}: must be a whole number >= 1")
        if self.kit_report and not Path(self.kit_report).is_file():
            problems.append(f"kit_report={self.kit_report}: no such file (the JSON report a "
                            "validation kit's check.py wrote)")
        return problems

    def tune_task_patterns(self) -> tuple[str, ...]:
        """``tune_tasks`` split on commas (order kept, blanks dropped)."""
        return tuple(p.strip() for p in self.tune_tasks.split(",") if p.strip())

    def validate(self) -> None:
        """Collect every bad option into one ConfigError."""
        _raise(self.problems())


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("bad command-line option(s):\n  - " + "\n  - ".join(problems))


def _rpc_problems(rpc: str) -> list[str]:
    parts = rpc.split(":")
    if len(parts) not in (3, 4) or not parts[0] or not parts[2]:
        return [f"rpc={rpc}: use host:port:device_key[:timeout_s] "
                "(e.g. rpc=127.0.0.1:9190:rtx4090)"]
    port = parts[1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return [f"rpc={rpc}: port {port!r} must be a number 1..65535 "
                "(use host:port:device_key)"]
    if len(parts) == 4:
        try:
            ok = 0 < float(parts[3]) < float("inf")
        except ValueError:
            ok = False
        if not ok:
            return [f"rpc={rpc}: session timeout {parts[3]!r} must be a positive number "
                    "of seconds"]
    return []


OPTION_NAMES = tuple(f.name for f in fields(Options))
_INT_OPTIONS = {"trials": ">= 1", "threads": f"1..{max_threads()}", "warmup": ">= 0",
                "repeat": ">= 1", "rounds": ">= 1"}


def parse_options(get_var: Callable[..., str | None], target: str | None = None,
                  argv: Iterable[str] = (), other_vars: Iterable[str] = ()) -> Options:
    """Options from doit's ``NAME=VALUE`` strings (``get_var`` is :func:`doit.get_var`).

    An empty value (``trials=``) means the default. ``target`` is the default target when
    ``target=`` is not given (dodo.py passes the one a task name like ``x@h100`` names).
    A ``NAME=VALUE`` in ``argv`` whose NAME is neither an option nor one of ``other_vars``
    (read by other tasks, e.g. ``doit nightly``'s) is a problem too: doit would ignore it.

    Raises
    ------
    ConfigError
        Listing every bad option at once: its name, the value given and what is allowed.
    """
    problems = unknown_option_args(argv, (*OPTION_NAMES, *other_vars))
    values: dict = {}
    for name, allowed in _INT_OPTIONS.items():
        text = (get_var(name) or "").strip()
        if not text:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            problems.append(f"{name}={text}: not a whole number (allowed: {allowed})")
    text = (get_var("tune_minutes") or "").strip()
    if text:
        try:
            values["tune_minutes"] = float(text)
        except ValueError:
            problems.append(f"tune_minutes={text}: not a number (allowed: minutes > 0)")
    for name in ("tune", "rpc", "tune_tasks", "prepack", "layout", "kit_report"):
        text = (get_var(name) or "").strip()
        if text:
            values[name] = text
    options = Options(target=(get_var("target") or "").strip() or target or "cpu", **values)
    _raise(problems + options.problems())
    return options


_VAR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def unknown_option_args(argv: Iterable[str], known: Iterable[str]) -> list[str]:
    """``NAME=VALUE`` arguments whose NAME no task reads (a typo doit would ignore)."""
    known = set(known)
    problems = []
    for arg in argv:
        m = _VAR.match(arg)
        if m and m.group(1) not in known:
            problems.append(f"{arg}: unknown option {m.group(1)!r} (options: "
                            f"{', '.join(sorted(known))})")
    return problems


def unknown_task_args(argv: Iterable[str],
                      tasks: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """``group:name`` arguments whose group is a task group of ``tasks`` (group -> the names
    of its tasks) but whose name is none of them: ``(name, message)`` per argument, the
    message listing the names that exist. A name with ``*`` passes if it matches one."""
    problems = []
    for arg in argv:
        if arg.startswith("-") or "=" in arg or ":" not in arg:
            continue
        group, name = arg.split(":", 1)
        names = list(tasks.get(group, ()))
        if group not in tasks or not name:
            continue
        if name in names or ("*" in name and fnmatch.filter(names, name)):
            continue
        shown = [n for n in names if n != "report"]
        hint = ""
        if "@" not in name and any("@" in n for n in shown):
            like = [n for n in shown if n.split("@")[0] == name] or shown
            hint = f" ({group} tasks are named <artifact>@<target>: `doit {group}:{like[0]}`)"
        what = "model" if group == "source" else "artifact"
        problems.append((name, f"unknown {what} {name!r} in `doit {arg}`{hint}; known: "
                               f"{', '.join(shown) or 'none'}"))
    return problems


# Options that shape what a build makes: remembered per project, so that `doit validate`
# after `doit build:x tune=off` validates that build instead of tuning for an hour first.
REMEMBERED = ("tune", "trials", "tune_minutes", "layout", "rpc")
# ... except ``tune=extend``: remembered, a 15-minute top-up made every later `doit
# validate` or `doit bench` tune another 15 minutes (an extend run that stops on its budget
# is not up to date, so the same command continues it). Plain commands after a top-up use
# the earlier mode or the default ``missing``, which finds every kernel recorded.
ONE_OFF_TUNE = "extend"
REMEMBER_FILE = ".build_options.json"  # in artifacts/
NO_REMEMBER_ENV = "ONNX2DEPLOY_NO_REMEMBER"  # set by doit nightly: its tune=off is its own


def remembering(get_var: Callable[..., str | None], artifacts: Path,
                say: Callable[[str], None] = print) -> Callable[..., str | None]:
    """``get_var`` that falls back to this project's last explicit build-shaping options.

    A ``NAME=VALUE`` of :data:`REMEMBERED` given on the command line is saved in
    ``artifacts/.build_options.json``; a later command that omits NAME uses it and says so.
    ``NAME=`` (empty) forgets it: the default applies again.
    """
    import json
    import os

    path = artifacts / REMEMBER_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        saved = {}  # a damaged file only loses the memory, never the build
    saved = {k: v for k, v in saved.items() if k in REMEMBERED and isinstance(v, str)}
    given = {n: get_var(n) for n in REMEMBERED if get_var(n) is not None}
    if given and not os.environ.get(NO_REMEMBER_ENV):
        for name, value in given.items():
            if name == "tune" and value.strip() == ONE_OFF_TUNE:
                continue  # a top-up is a one-off: the earlier mode (or the default) stays
            if value.strip():
                saved[name] = value.strip()
            else:
                saved.pop(name, None)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(saved, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # not writable: check_writable reports that on its own
    used = {n: v for n, v in saved.items() if n not in given}
    if used:
        say("options " + " ".join(f"{n}={v}" for n, v in sorted(used.items())) +
            f" from an earlier command (artifacts/{REMEMBER_FILE}); pass NAME= to use "
            "the default again")

    def get(name: str, default: str | None = None) -> str | None:
        if name in given:
            return given[name]
        if name in used:
            return used[name]
        return get_var(name, default) if default is not None else get_var(name)

    return get
