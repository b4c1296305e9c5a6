"""Roofline report: each kernel's GFLOP/s (int8: GOP/s) against this machine's measured peak.

The peak is measured on the spot (``peak_probe.cc``: an fp32 FMA loop and an int8 VNNI
``vpdpbusd`` loop, compiled with the system C++ compiler, the widest ISA the CPU has picked
at run time), so "close to the limit" is a number taken on the machine and in the minute the
kernels ran, not a datasheet figure: shared machines drift, and the ratio within one run is
what holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError, PipelineError

PROBE_SOURCE = Path(__file__).with_name("peak_probe.cc")
PEAK_KINDS = ("fp32", "int8")
# The peak a kernel is held against, by the artifact's compute dtype.
PEAK_KIND_BY_DTYPE = {"float32": "fp32", "int8": "int8"}


@dataclass(frozen=True)
class Peak:
    kind: str  # "fp32" (FMA) or "int8" (u8 x s8 dot products)
    isa: str | None  # the instruction set the loop ran ("avx512f", "avx512-vnni", ...)
    threads: int
    ops_per_s: float | None  # None: this CPU has no such instruction

    @property
    def gops(self) -> float | None:
        return None if self.ops_per_s is None else self.ops_per_s / 1e9


def _compiler() -> str:
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise PipelineError("no C++ compiler found (set CXX, or install g++ or clang++): the "
                        "peak probe is a small C++ program")


def build_probe(out_dir: Path) -> Path:
    """Compile the probe into ``out_dir``; return the executable's path."""
    exe = Path(out_dir) / "peak_probe"
    cmd = [_compiler(), "-O2", "-std=c++17", "-pthread", str(PROBE_SOURCE), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"compiling the peak probe failed ({' '.join(cmd)}):\n"
                            f"{done.stderr[-2000:]}")
    return exe


def measure_peak(kinds=PEAK_KINDS, threads=(1, 2), seconds: float = 0.3,
                 repeat: int = 3) -> list[Peak]:
    """The best of ``repeat`` timed runs of each kind on each thread count.

    Best, not median: the peak is what the machine can do; neighbours on a shared machine
    only ever make a run slower.
    """
    unknown = sorted(set(kinds) - set(PEAK_KINDS))
    if unknown or not threads or min(threads) < 1 or seconds <= 0 or repeat < 1:
        raise ConfigError(f"measure_peak: kinds must be among {PEAK_KINDS} (got unknown "
                          f"{unknown}), threads >= 1 (got {list(threads)}), seconds > 0 (got "
                          f"{seconds}), repeat >= 1 (got {repeat})")
    peaks = []
    with tempfile.TemporaryDirectory(prefix="peak_probe-") as tmp:
        exe = build_probe(Path(tmp))
        for kind in kinds:
            for n in threads:
                runs = [_run_probe(exe, kind, n, seconds) for _ in range(repeat)]
                rates = [r["ops_per_s"] for r in runs if r["ops_per_s"] is not None]
                peaks.append(Peak(kind, runs[0]["isa"], n, max(rates) if rates else None))
    return peaks


def peak_drift(before: list[Peak], after: list[Peak]) -> float:
    """The largest relative change of any peak between two measurements of one run: a
    shared machine whose neighbours got busier in between reads as drift, and the kernel
    rates measured between them compare only roughly with either."""
    now = {(p.kind, p.threads): p.ops_per_s for p in after}
    changes = [abs(now[(p.kind, p.threads)] - p.ops_per_s) / p.ops_per_s for p in before
               if p.ops_per_s and now.get((p.kind, p.threads))]
    return max(changes, default=0.0)


def _run_probe(exe: Path, kind: str, threads: int, seconds: float) -> dict:
    done = subprocess.run([str(exe), kind, str(threads), str(seconds)], capture_output=True,
                          text=True, timeout=60 + 10 * seconds)
    if done.returncode not in (0, 2):  # 2: no instruction for this kind on this CPU
        raise PipelineError(f"peak probe {kind} x{threads} failed (exit {done.returncode}): "
                            f"{done.stderr.strip()}")
    return json.loads(done.stdout)


@dataclass(frozen=True)
class KernelRow:
    name: str
    us: float
    calls: int
    flops: int  # 2 x multiply-accumulates per model run (0: no MAC block)
    share: float  # of the model's kernel time
    label: str = ""  # the MAC blocks' shapes (kernel_flops.KernelWork.label)

    @property
    def gops(self) -> float | None:
        return self.flops / self.us / 1e3 if self.flops and self.us > 0 else None

    def of_peak(self, peak_gops: float | None) -> float | None:
        rate = self.gops
        return None if rate is None or not peak_gops else rate / peak_gops


def kernel_rows(times, work_by_name: dict) -> list[KernelRow]:
    """Join per-kernel times (``profile.KernelTime``) with per-kernel work
    (``kernel_flops.KernelWork``). A kernel called several times in one run (the same shape
    in several layers) did its FLOPs that many times."""
    total = sum(t.us for t in times) or 1.0
    rows = []
    for t in times:
        work = work_by_name.get(t.name)
        rows.append(KernelRow(t.name, t.us, t.calls, work.flops * t.calls if work else 0,
                              t.us / total, work.label if work else ""))
    return rows


def summarize(rows: list[KernelRow], peak_gops: float | None) -> dict:
    """Model totals: time, FLOPs, the MAC kernels' share of time and their overall rate."""
    total_us = sum(r.us for r in rows)
    mac = [r for r in rows if r.flops]
    mac_us = sum(r.us for r in mac)
    flops = sum(r.flops for r in mac)
    rate = flops / mac_us / 1e3 if mac_us else None
    return {"total_ms": total_us / 1e3, "gflop": flops / 1e9, "mac_kernels": len(mac),
            "mac_share": mac_us / total_us if total_us else 0.0, "mac_gops": rate,
            "model_gops": flops / total_us / 1e3 if total_us else None,
            "mac_of_peak": rate / peak_gops if rate and peak_gops else None}


def format_peaks(peaks: list[Peak]) -> str:
    lines = ["| kind | ISA | threads | peak G(FL)OP/s |", "|---|---|---|---|"]
    for p in peaks:
        rate = "n/a (no instruction)" if p.gops is None else f"{p.gops:.0f}"
        lines.append(f"| {p.kind} | {p.isa or '-'} | {p.threads} | {rate} |")
    return "\n".join(lines)


def format_rows(rows: list[KernelRow], peak_gops: float | None, unit: str,
                top: int | None = None) -> str:
    lines = [f"| kernel | MAC shape (spatial * reduction) | calls | ms | share | {unit} | "
             f"{unit}/s | % of peak |", "|---|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        rate, frac = r.gops, r.of_peak(peak_gops)
        name = r.name if len(r.name) <= 40 else r.name[:37] + "..."
        lines.append(f"| {name} | {r.label or '-'} | {r.calls} | {r.us / 1e3:.3f} | "
                     f"{100 * r.share:.1f}% | "
                     f"{r.flops / 1e9:.3f} | {'-' if rate is None else f'{rate:.0f}'} | "
                     f"{'-' if frac is None else f'{100 * frac:.0f}%'} |")
    return "\n".join(lines)


def artifact_roofline(compile_dir: Path, module_json: Path, peaks: list[Peak], threads: int,
                      repeat: int = 5, onnx_model: Path | None = None) -> dict:
    """The per-kernel table of one built CPU artifact (its ``compile`` and ``import`` stage
    outputs) against the peak of its compute dtype on ``threads`` threads, as plain data.
    With ``onnx_model`` (the model onnxruntime runs in ``doit bench``), also the same
    layers' times in onnxruntime (:mod:`pipeline.runtime.ort_profile`), under
    ``vs_onnxruntime``: a dict, or the error text if onnxruntime could not run it."""
    from pipeline.compiler.kernel_flops import artifact_kernel_work
    from pipeline.core.targets import get_target, tvm_target
    from pipeline.runtime.profile import profile_kernels

    manifest = json.loads((Path(compile_dir) / "manifest.json").read_text(encoding="utf-8"))
    config = manifest["config"]
    if config["target"].get("kind") != "llvm":
        raise ConfigError(f"{compile_dir}: the roofline report is for CPU artifacts, this one "
                          f"is built for {config['target'].get('name')}")
    dtype = config.get("compute_dtype", "float32")
    kind = PEAK_KIND_BY_DTYPE.get(dtype)
    if kind is None:
        raise ConfigError(f"{compile_dir}: no peak is measured for compute dtype {dtype!r}; "
                          f"known: {sorted(PEAK_KIND_BY_DTYPE)}")
    target = tvm_target(get_target(config["target"]["name"]))
    work = artifact_kernel_work(module_json, target, dtype, config.get("layout", ""))
    times = profile_kernels(compile_dir, repeat=repeat)
    # every kernel the VM calls should be a function of the lowered module (else its FLOPs
    # would silently read as 0): listed, for the report to show
    missing = [t.name for t in times if t.name not in work and not t.name.startswith("vm.")]
    rows = kernel_rows(times, work)
    peak = next((p for p in peaks if p.kind == kind and p.threads == threads), None)
    peak_gops = peak.gops if peak else None
    report = {"compute_dtype": dtype, "peak_kind": kind, "threads": threads,
              "peak_gops": peak_gops, "summary": summarize(rows, peak_gops),
              "unmatched_kernels": missing,
              "kernels": [{**asdict(r), "gops": r.gops, "of_peak": r.of_peak(peak_gops)}
                          for r in rows]}
    if onnx_model is not None:
        from pipeline.runtime import ort_profile

        try:
            nodes = ort_profile.profile_onnxruntime(onnx_model, threads, repeat=max(repeat, 10))
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types)
            report["vs_onnxruntime"] = (f"onnxruntime could not run {onnx_model}: "
                                        f"{type(e).__name__}: {str(e).strip()[:300]}")
        else:
            report["vs_onnxruntime"] = ort_profile.compare(report["kernels"], work, nodes)
    return report


def reference_onnx(artifacts: Path, artifact: str) -> Path | None:
    """The ONNX model ``doit bench`` runs in onnxruntime for ``artifact``: its quantized model
    (``<artifact>/quantize/model.onnx``) or else its model's source
    (``<model>/source/model.onnx``, the model being the longest ``_``-prefix that has one)."""
    quantized = Path(artifacts) / artifact / "quantize" / "model.onnx"
    if quantized.is_file():
        return quantized
    parts = artifact.split("_")
    for n in range(len(parts) - 1, 0, -1):
        source = Path(artifacts) / "_".join(parts[:n]) / "source" / "model.onnx"
        if source.is_file():
            return source
    return None


def artifact_dirs(artifacts: Path, artifact: str) -> tuple[Path, Path]:
    """``(compile_dir, module_json)`` of a built CPU artifact such as ``resnet50_int8``."""
    compile_dir = Path(artifacts) / artifact / "cpu" / "compile"
    module_json = Path(artifacts) / artifact / "import" / "module.json"
    for path in (compile_dir / "manifest.json", module_json):
        if not path.exists():
            raise ConfigError(f"{path} not found: build the artifact first "
                              f"(`doit build:{artifact} tune=off`)")
    return compile_dir, module_json


def format_report(name: str, report: dict, top: int | None = 15) -> str:
    """Markdown: one artifact's summary line and its heaviest ``top`` kernels."""
    unit = "GFLOP" if report["peak_kind"] == "fp32" else "GOP"
    s = report["summary"]
    peak = report["peak_gops"]
    rate = "-" if s["mac_gops"] is None else f"{s['mac_gops']:.0f}"
    frac = "-" if s["mac_of_peak"] is None else f"{100 * s['mac_of_peak']:.0f}%"
    lines = [f"**{name}** ({report['compute_dtype']}, {report['threads']} threads): "
             f"{s['total_ms']:.2f} ms in kernels, {s['gflop']:.2f} {unit}; the "
             f"{s['mac_kernels']} conv/matmul kernels take {100 * s['mac_share']:.1f}% of "
             f"the time at {rate} {unit}/s = {frac} of the measured {report['peak_kind']} "
             f"peak ({'-' if peak is None else f'{peak:.0f}'} {unit}/s)"]
    if report["unmatched_kernels"]:
        lines.append(f"(no FLOP count for: {', '.join(report['unmatched_kernels'])})")
    rows = [KernelRow(k["name"], k["us"], k["calls"], k["flops"], k["share"], k["label"])
            for k in report["kernels"]]
    lines += ["", format_rows(rows, peak, unit, top)]
    versus = report.get("vs_onnxruntime")
    if isinstance(versus, str):
        lines += ["", versus]
    elif versus:
        from pipeline.runtime.ort_profile import format_comparison

        lines += ["", format_comparison(versus, top)]
    return "\n".join(lines)
