"""Stage ``bench``: latency of the C++ binary, TVM in Python and onnxruntime, in one run.

The three are measured on the same input with the same thread count, interleaved: ``rounds``
rounds, each timing the three in turn (``repeat`` split between them, ``warmup`` untimed runs
at the start of each), and each runner's statistics pooled over its rounds. On a shared
machine the load drifts over a minute; a runner timed only at the start or the end of a run
would be judged by a different minute than the others (measured on a 2-core cloud VM:
onnxruntime alone drifted 38.7 -> 42.9 ms between minutes). Interleaving gives each the same
mix of minutes, and ``ratio_per_round`` shows how steady the comparison was.

- ``cpp``: the packaged ``bin/infer --warmup --repeat --threads --json``; its JSON's
  ``latency_ms`` (for a CUDA target: ``main()`` without the host<->device copies). Peak
  resident memory is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read in a fresh wrapper
  process whose only child is the binary: the kernel's high-water mark of the binary alone
  (model load included), with no earlier child of ours able to mask it, so no delta is needed.
- ``tvm_python``: ``relax.VirtualMachine`` on the same ``model.so``, a manual loop of
  ``main()`` calls (device synchronized after each). TVM sizes its thread pool from
  ``TVM_NUM_THREADS`` when the runtime starts, so this runs in a subprocess with it set.
- ``onnxruntime``: CPU execution provider (CUDA for a GPU artifact where onnxruntime has it),
  ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential execution; the
  fp32 model for an fp32 artifact, the quantize stage's model for a quantized one (QDQ,
  float16, bfloat16 weights).

Percentiles use numpy's linear interpolation, as the C++ app does (runtime_cpp/timing.h).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError, StageFailed
from pipeline.core.project import REPO
from pipeline.runtime.artifact import ArtifactUnderTest

STAGE = "bench"
NO_CUDA = "not run: no CUDA device"
RUNNERS = ("cpp", "tvm_python", "onnxruntime")
_LABELS = {"cpp": "C++ binary", "tvm_python": "TVM in Python", "onnxruntime": "onnxruntime"}
_ROOT = REPO
# what onnxruntime runs for a quantized scheme: the quantize stage's model
_ORT_MODEL = {"int8": "QDQ ONNX", "int8_dynamic": "dynamically quantized ONNX (quantize_dynamic)",
              "fp16": "float16 ONNX", "bf16": "bfloat16-weight ONNX"}
RSS_METHOD = ("getrusage(RUSAGE_CHILDREN).ru_maxrss of a wrapper process whose only child is "
              "bin/infer")

# Run in a fresh interpreter: its only child is the binary, so RUSAGE_CHILDREN is the binary's.
_CPP_WRAPPER = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from pipeline.runtime.app import run_binary
kwargs = json.loads(sys.argv[2])
proc = run_binary(**kwargs)
print(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

# TVM_NUM_THREADS is set in this interpreter's environment before tvm is imported. One
# process serves every round (importing tvm and loading the model take seconds): each line
# on stdin asks for {"warmup": w, "repeat": r} and is answered by one line of JSON.
_VM_BENCH = """
import json, sys, time
import numpy as np
import tvm
from tvm import relax
args = json.loads(sys.argv[1])
dev = tvm.cuda(0) if args["device"] == "cuda" else tvm.cpu(0)
vm = relax.VirtualMachine(tvm.runtime.load_module(args["model"]), dev)
inputs = [tvm.runtime.tensor(np.load(p), dev) for p in args["inputs"]]
# the weights follow the inputs, read and placed as validate's VM and the C++ app do
sys.path.insert(0, args["root"])
from pipeline.runtime.vm import model_weights
inputs += model_weights(args["model"], dev)
main = vm["main"]
threads = int(tvm.get_global_func("runtime.NumThreads")())
print(json.dumps({"ready": True}), flush=True)  # loaded: nothing of ours runs beside a round
for line in sys.stdin:
    ask = json.loads(line)
    times = []
    for i in range(ask["warmup"] + ask["repeat"]):
        start = time.perf_counter()
        main(*inputs)
        dev.sync()
        if i >= ask["warmup"]:
            times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"times_ms": times, "threads": threads}), flush=True)
"""


@dataclass(frozen=True)
class BenchConfig:
    """How one artifact is timed (its recipe, as data)."""

    threads: int  # for every runner: TVM's pool, onnxruntime's intra-op pool
    warmup: int
    repeat: int  # timed runs of each runner, split between the rounds
    target: dict  # core.targets.target_config()
    rounds: int  # interleaved rounds of the three runners (doit's rounds=, default 3)


def stats(times_ms: list[float]) -> dict[str, float]:
    """Median, p90, min, mean (ms) and throughput (inferences/s at the median).

    Parameters
    ----------
    times_ms : list of float
        One latency per timed run.

    Returns
    -------
    dict
        ``median_ms``, ``p90_ms``, ``min_ms``, ``mean_ms``, ``count``, ``throughput_per_s``.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    median = float(np.percentile(t, 50))
    return {"median_ms": median, "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
            "mean_ms": float(t.mean()), "count": int(t.size),
            "throughput_per_s": 1e3 / median if median > 0 else None}


def _bench_cpp(art: ArtifactUnderTest, inputs: Path | dict, threads: int, warmup: int,
               repeat: int, out_dir: Path) -> dict:
    json_path = out_dir / "cpp_latency.json"
    kwargs = {"pkg_dir": str(art.package_dir), "warmup": warmup, "repeat": repeat,
              "threads": threads, "json_path": str(json_path),
              "input_npy": ({k: str(v) for k, v in inputs.items()} if isinstance(inputs, dict)
                            else str(inputs))}
    proc = subprocess.run([sys.executable, "-c", _CPP_WRAPPER, str(_ROOT), json.dumps(kwargs)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StageFailed(STAGE, f"{art.name}: the bin/infer wrapper failed: {proc.stderr[-2000:]}")
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    if ran["returncode"] != 0 or not json_path.is_file():
        raise StageFailed(STAGE, f"{art.name}: bin/infer exited {ran['returncode']}: "
                          f"{(ran['stderr'] or ran['stdout']).strip()[-2000:]}")
    report = json.loads(json_path.read_text(encoding="utf-8"))
    lat = report["latency_ms"]
    median = float(lat["median"])
    return {"median_ms": median, "p90_ms": float(lat["p90"]), "min_ms": float(lat["min"]),
            "mean_ms": float(lat["mean"]), "count": int(lat["count"]),
            "throughput_per_s": 1e3 / median if median > 0 else None,
            "threads": int(report["threads"]), "device_timing": report["device_timing"],
            "peak_rss_mb": ran["maxrss_kib"] / 1024.0, "peak_rss_method": RSS_METHOD,
            "samples_ms": [float(t) for t in report["samples_ms"]]}


class _TvmPythonRunner:
    """``relax.VirtualMachine`` on the artifact's ``model.so`` in a subprocess that stays up
    between rounds (:data:`_VM_BENCH`)."""

    def __init__(self, art: ArtifactUnderTest, paths: list[Path], threads: int, out_dir: Path):
        args = {"model": str(Path(art.package_dir) / "model.so"),
                "inputs": [str(p) for p in paths], "root": str(_ROOT),
                "device": "cuda" if art.is_gpu else "cpu"}
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        if art.is_gpu:  # the subprocess compiles the kernels at load: NVRTC or nvcc, as smoke
            from pipeline.runtime.vm import cuda_compile_mode

            env["TVM_CUDA_COMPILE_MODE"] = cuda_compile_mode()
        self.name = art.name
        # stderr to a file: a pipe nobody reads while it runs could fill and block it
        self.stderr_path = Path(out_dir) / "tvm_python.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", _VM_BENCH, json.dumps(args)],
                                         env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True)
        # Wait until it has imported TVM and loaded the model (seconds of CPU), or it
        # would be doing that while the first round times the C++ app.
        self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.stdin.close()
            code = self.proc.wait()
            err = self.stderr_path.read_text(encoding="utf-8", errors="replace")
            raise StageFailed(STAGE, f"{self.name}: the Python VM benchmark failed "
                              f"(exit {code}): {err[-2000:]}")
        return json.loads(line)

    def time(self, warmup: int, repeat: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"warmup": warmup, "repeat": repeat}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: the read below says so with its stderr
        data = self._answer()
        return {**stats(data["times_ms"]), "threads": data["threads"],
                "samples_ms": data["times_ms"]}

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _ort_session(art: ArtifactUnderTest, threads: int):
    """(session, what it runs) for the artifact's onnxruntime counterpart."""
    import onnxruntime as ort

    model = Path(art.qdq_onnx if art.quantized else art.fp32_onnx)
    from pipeline.runtime.ort_profile import bench_session_options

    config = None
    if art.quantized and art.scheme:  # the scheme's session config for its model
        from pipeline.schemes import get_scheme

        config = dict(get_scheme(art.scheme).ort_session_config)
    options = bench_session_options(threads, config)
    provider = "CPUExecutionProvider"
    if art.is_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        provider = "CUDAExecutionProvider"
    session = ort.InferenceSession(str(model), options, providers=[provider])
    return session, {"threads": threads, "provider": provider,
                     "model": _ORT_MODEL.get(art.scheme, "QDQ ONNX") if art.quantized
                     else "fp32 ONNX", "model_path": str(model), "version": ort.__version__}


def _bench_ort(session, feed: dict, warmup: int, repeat: int) -> dict:
    times = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {**stats(times), "samples_ms": times}


def _pooled(rounds: list[dict]) -> dict:
    """One runner's rounds as one result: statistics over every round's samples (the
    first round's other fields; the highest peak memory)."""
    samples = [t for r in rounds for t in r["samples_ms"]]
    pooled = {**rounds[0], **stats(samples),
              "round_medians_ms": [r["median_ms"] for r in rounds]}
    pooled.pop("samples_ms")
    if "peak_rss_mb" in pooled:
        pooled["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    return pooled


def run(art: ArtifactUnderTest, threads: int, warmup: int, repeat: int, out_dir: Path,
        *, rounds: int = 3, seed: int = 0) -> dict:
    """Benchmark one artifact against onnxruntime; write ``out_dir/bench.json``.

    Parameters
    ----------
    art : ArtifactUnderTest
        The packaged artifact (see :mod:`pipeline.stages.validate`).
    threads : int
        CPU threads for every runner (TVM's pool, onnxruntime's intra-op pool).
    warmup, repeat : int
        Untimed runs of each runner per round; timed runs of each runner in all, split
        evenly between the rounds (rounded up).
    out_dir : Path
        Receives ``bench.json``, the input and the runners' raw timing files.
    rounds : int
        Interleaved rounds: each times the C++ binary, TVM in Python and onnxruntime in
        turn; each runner's statistics are over all its rounds.
    seed : int
        Seed of the synthetic input all three runners share.

    Returns
    -------
    dict
        ``status`` ("ok" or "not run: no CUDA device"), the settings, one entry per runner
        in :data:`RUNNERS` (``median_ms``, ``p90_ms``, ``min_ms``, ``mean_ms``,
        ``throughput_per_s``, ``round_medians_ms``, ...; ``cpp`` adds ``peak_rss_mb``),
        ``ratio`` (C++ median / onnxruntime median), ``ratio_per_round`` (the same within
        each round) and ``ratio_tvm_python``.

    Raises
    ------
    ConfigError
        ``threads``, ``warmup``, ``repeat`` or ``rounds`` out of range.
    StageFailed
        A runner failed (the message quotes its output).
    """
    from pipeline.runtime.data import calibration_samples, file_stems
    from pipeline.runtime.vm import cuda_available

    problems = [f"{k}={v} must be >= {lo}" for k, v, lo in
                (("threads", threads, 1), ("warmup", warmup, 0), ("repeat", repeat, 1),
                 ("rounds", rounds, 1))
                if not isinstance(v, int) or v < lo]
    cores = os.cpu_count() or 1
    if isinstance(threads, int) and threads > cores:  # bin/infer refuses more than the cores
        problems.append(f"threads={threads} must be <= {cores} (this machine's cores)")
    if problems:
        raise ConfigError(f"bench {art.name}: " + "; ".join(problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {**art.header(), "threads": threads, "warmup": warmup,
                              "repeat": repeat, "rounds": rounds,
                              "input": f"seeded synthetic (seed {seed})"}
    if art.is_gpu and not cuda_available():
        result.update(status=NO_CUDA, ratio=None, ratio_tvm_python=None,
                      **{runner: None for runner in RUNNERS})
        _write_json(out_dir / "bench.json", result)
        print(f"bench: {art.name} on {art.target}: {NO_CUDA}", flush=True)
        return result

    io = json.loads(Path(art.io_json).read_text(encoding="utf-8"))
    order = [t["name"] for t in io["inputs"]]
    feed = calibration_samples(art.inputs, 1, seed, "", art.ranges)[0]
    stems = file_stems(order)
    paths = [out_dir / f"input_{stems[name]}.npy" for name in order]
    for spec_name, path in zip(art.feed_names(io), paths, strict=True):
        np.save(path, feed[spec_name])
    inputs: Path | dict = paths[0] if len(paths) == 1 else dict(zip(order, paths, strict=True))

    per_round = -(-repeat // rounds)
    session, ort_info = _ort_session(art, threads)
    timed: dict[str, list[dict]] = {runner: [] for runner in RUNNERS}
    vm = _TvmPythonRunner(art, paths, threads, out_dir)
    try:
        for _ in range(rounds):
            timed["cpp"].append(_bench_cpp(art, inputs, threads, warmup, per_round, out_dir))
            timed["tvm_python"].append(vm.time(warmup, per_round))
            timed["onnxruntime"].append({**_bench_ort(session, feed, warmup, per_round),
                                         **ort_info})
    finally:
        vm.close()
    for runner in RUNNERS:
        result[runner] = _pooled(timed[runner])
    ort_median = result["onnxruntime"]["median_ms"]
    result["ratio"] = result["cpp"]["median_ms"] / ort_median
    result["ratio_per_round"] = [c["median_ms"] / o["median_ms"] for c, o in
                                 zip(timed["cpp"], timed["onnxruntime"], strict=True)]
    result["ratio_tvm_python"] = result["tvm_python"]["median_ms"] / ort_median
    result["status"] = "ok"
    _write_json(out_dir / "bench.json", result)
    print(f"bench: {art.name} on {art.target}, {threads} threads: C++ "
          f"{result['cpp']['median_ms']:.3f} ms, TVM Python "
          f"{result['tvm_python']['median_ms']:.3f} ms, onnxruntime {ort_median:.3f} ms "
          f"(C++/onnxruntime {result['ratio']:.2f}x; per round "
          f"{' '.join(f'{r:.2f}' for r in result['ratio_per_round'])})", flush=True)
    return result


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def chart(results: list[dict], png: Path) -> Path:
    """Bar chart of median latency per artifact next to onnxruntime (p90 as whiskers).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch). The y axis
    turns logarithmic when latencies span more than 30x (untuned TVM next to onnxruntime).

    Parameters
    ----------
    results : list of dict
        What :func:`run` returned per artifact; artifacts not run are labelled, not drawn.
    png : Path
        Where the PNG is written.

    Returns
    -------
    Path
        ``png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.8 * len(results) + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(RUNNERS)
    labels = [f"{r['artifact']}\n@{r['target']}" for r in results]
    medians = [r[k]["median_ms"] for r in results if r.get("status") == "ok" for k in RUNNERS]
    if medians and max(medians) / max(min(medians), 1e-9) > 30:
        ax.set_yscale("log")
    for j, runner in enumerate(RUNNERS):
        xs, ys, whiskers = [], [], []
        for i, res in enumerate(results):
            if res.get("status") == "ok":
                xs.append(i + (j - 1) * width)
                ys.append(res[runner]["median_ms"])
                whiskers.append(res[runner]["p90_ms"] - res[runner]["median_ms"])
        ax.bar(xs, ys, width, label=_LABELS[runner], yerr=[[0] * len(ys), whiskers], capsize=3)
    for i, res in enumerate(results):
        if res.get("status") != "ok":
            ax.annotate(res.get("status", "not run"), (i, 0.5), xycoords=("data", "axes fraction"),
                        ha="center", rotation=90, fontsize=8, color="gray")
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_xlim(-0.6, max(len(results), 1) - 0.4)
    ax.set_ylabel("median latency, ms (whisker: p90)")
    threads = sorted({r["threads"] for r in results})
    ax.set_title("Latency per artifact vs onnxruntime (threads: "
                 f"{', '.join(map(str, threads))})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(png), format="png")
    return png


def report(results: list[dict], out_dir: Path) -> dict:
    """Write ``bench.md`` (a table, and ``bench.png`` embedded) and an aggregate ``bench.json``.

    Parameters
    ----------
    results : list of dict
        What :func:`run` returned per artifact.
    out_dir : Path
        The report folder.

    Returns
    -------
    dict
        The aggregate written to ``bench.json``: ``artifacts`` and the ``chart`` file name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart(results, out_dir / "bench.png")
    lines = ["# Benchmark", "", "![latency per artifact vs onnxruntime](bench.png)", "",
             "| artifact | target | threads | runner | median ms | p90 ms | min ms | inferences/s "
             "| peak RSS MB | vs onnxruntime |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if res.get("status") != "ok":
            lines.append(f"| {res['artifact']} | {res['target']} | {res['threads']} | - | - | - | "
                         f"- | - | - | {res.get('status')} |")
            continue
        ort_median = res["onnxruntime"]["median_ms"]
        for runner in RUNNERS:
            s = res[runner]
            rss = f"{s['peak_rss_mb']:.1f}" if "peak_rss_mb" in s else "-"
            lines.append(f"| {res['artifact']} | {res['target']} | {res['threads']} | "
                         f"{_LABELS[runner]} | {s['median_ms']:.3f} | {s['p90_ms']:.3f} | "
                         f"{s['min_ms']:.3f} | {s['throughput_per_s']:.1f} | {rss} | "
                         f"{s['median_ms'] / ort_median:.2f}x |")
    lines += ["", "Same input and thread count for every runner, measured back to back in one "
              "run. C++ binary: its own `--json` timing; peak RSS: " + RSS_METHOD + ". "
              "onnxruntime: intra-op threads as listed, inter-op 1, sequential; the QDQ model for "
              "int8 artifacts."]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    aggregate = {"artifacts": list(results), "chart": "bench.png"}
    _write_json(out_dir / "bench.json", aggregate)
    return aggregate
