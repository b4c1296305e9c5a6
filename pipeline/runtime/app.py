"""Run a packaged C++ app (``bin/infer``): what smoke, validate and bench call."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.errors import ConfigError


def run_binary(pkg_dir: Path, input_npy: Path | Mapping[str, Path], output_npy: Path | None = None,
               warmup: int = 0, repeat: int = 1, threads: int | None = None,
               json_path: Path | None = None, *, model: Path | None = None,
               device_timing: str | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run a packaged app's ``bin/infer``.

    Parameters
    ----------
    pkg_dir : Path
        A package folder (``out_dir`` of :func:`run`, or an unpacked bundle's root).
    input_npy : Path or mapping of str to Path
        The input file; for a model with several inputs, ``{input name: path}``.
    output_npy : Path, optional
        Where to write the output (single-output models).
    warmup, repeat : int
        Untimed and timed runs.
    threads : int, optional
        TVM thread pool size (1 to the core count); default: every core.
    json_path : Path, optional
        Where the app writes its latency statistics as JSON.
    model : Path, optional
        Another compiled model than ``pkg_dir/model.so``.
    device_timing : {"include-copies", "exclude-copies"}, optional
        Which latency the app reports first.
    timeout : float, optional
        Seconds before the app is killed (``subprocess.TimeoutExpired``).

    Returns
    -------
    subprocess.CompletedProcess
        With text ``stdout``/``stderr``; not checked: exit status 2 means bad arguments or
        input files, 1 a runtime failure.
    """
    binary = Path(pkg_dir) / "bin" / "infer"
    if not binary.is_file():
        raise ConfigError(f"{binary} does not exist; is {pkg_dir} a package folder?")
    cmd = [str(binary)]
    if isinstance(input_npy, Mapping):
        for name, path in sorted(input_npy.items()):
            cmd += ["--input", f"{name}={path}"]
    else:
        cmd += ["--input", str(input_npy)]
    options = {"--output": output_npy, "--warmup": warmup, "--repeat": repeat,
               "--threads": threads, "--json": json_path, "--model": model,
               "--device-timing": device_timing}
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
