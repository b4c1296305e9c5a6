"""The targets table: every place an artifact can be built for, looked up by name.

Everything here is cheap to import (no TVM) because dodo.py reads it at load time; the
TVM ``Target`` object is made only inside stages, by :func:`tvm_target`.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class Backend:
    """What differs between kinds of target, in one place (looked up, never if-chained).

    Cheap plain data and small functions only; what needs TVM (layout passes, DLight) is
    chosen in the compiler from these names (:data:`pipeline.compiler.lowering.LAYOUT_RULES`,
    :data:`pipeline.stages.compile_model.UNTUNED_SCHEDULERS`).
    """

    kind: str  # TVM target kind
    device: str  # where the app and the Python VM run: "cpu" or "cuda"
    runs_on_build_host: bool  # the machine that builds can run (and tune, check) it
    kernel_check: bool  # published kernels checked against naive ones on the build host
    untuned_scheduler: str  # schedule of kernels without a record (compile_model's table)
    bit_exact_app: bool  # C++ app vs Python VM: bitwise, or within gpu_rel_tol
    toolchain: str  # what compiles the app's kernels (the package stage's README says it)
    log_key: Callable[[TargetSpec], str]  # tuning logs are kept per this key
    recipe: Callable[[TargetSpec], dict]  # plain-data target, part of every recipe
    tvm_target: Callable[[TargetSpec], dict]  # the tvm.target.Target config (+ "host")


@dataclass(frozen=True)
class TargetSpec:
    """One build target. ``kind`` is the TVM target kind; ``arch`` the CUDA SM, if any."""

    name: str
    kind: str  # "llvm" or "cuda": a key of BACKENDS
    description: str
    arch: str = ""

    @property
    def backend(self) -> Backend:
        return BACKENDS[self.kind]

    @property
    def is_gpu(self) -> bool:
        return self.backend.device != "cpu"


TARGETS: dict[str, TargetSpec] = {
    "cpu": TargetSpec("cpu", "llvm", "the host CPU (mcpu detected)"),
    "rtx4090": TargetSpec("rtx4090", "cuda", "NVIDIA RTX 4090 (CUDA sm_89)", arch="sm_89"),
    "h100": TargetSpec("h100", "cuda", "NVIDIA H100/H200 (CUDA sm_90)", arch="sm_90"),
}

# Device limits shared by the CUDA targets we support (Ada and Hopper consumer/datacenter).
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
                "thread_warp_size": 32}


def get_target(name: str) -> TargetSpec:
    """Look a target up by name; an unknown name fails listing the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}. "
                          "Pick one with e.g. `doit build:resnet50_int8 target=cpu`.") from None


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def host_cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags, as /proc/cpuinfo names them."""
    return frozenset(_cpuinfo().get("flags", "").split())


def host_cpu_class() -> str:
    """The ISA class of the host, e.g. ``x86_64-avx512-vnni``.

    Tuning logs are shared per ISA class, not per CPU model: a schedule tuned on one
    AVX-512+VNNI machine (Sapphire Rapids, Zen 4) replays on another, and MetaSchedule
    looks records up by workload only (never by target), so the class is the key we keep.
    """
    flags = host_cpu_flags()
    parts = [platform.machine() or "unknown"]
    if "avx512f" in flags:
        parts.append("avx512")
    elif "avx2" in flags:
        parts.append("avx2")
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        parts.append("vnni")
    return "-".join(parts)


def cpu_identity() -> str:
    """The host CPU's model name with its family/model numbers, e.g. ``AMD EPYC 26/2``.

    Some model names cover several generations ("AMD EPYC": Zen 4 is family 25, Zen 5 26),
    which LLVM compiles for differently and onnxruntime runs at different speeds.
    """
    info = _cpuinfo()
    name = info.get("model name", platform.processor()) or "unknown CPU"
    return f"{name} {info.get('cpu family', '?')}/{info.get('model', '?')}"


def host_machine_class() -> str:
    """The machine a latency baseline is kept for: ISA class and CPU identity.

    Finer than the tuning-log key on purpose: the same logs gave ResNet-50 fp32 1.5x
    onnxruntime's latency on a Zen 4 host and 2.0x on a Zen 5 host (whose full-width AVX-512
    onnxruntime uses better), so one baseline for both would flag or hide regressions.
    """
    return f"{host_cpu_class()} {cpu_identity()}"


def host_has_vnni() -> bool:
    return "avx512_vnni" in host_cpu_flags()


def num_threads() -> int:
    """Threads the CPU artifact is built and measured for (all cores of this machine)."""
    return os.cpu_count() or 1


def _cpu_recipe(spec: TargetSpec) -> dict:
    # The CPU model stands in for LLVM's detected mcpu, which would need TVM to read.
    # With family/model numbers (cpu_identity): tuned kernels are checked per CPU.
    return {"name": spec.name, "kind": "llvm", "class": host_cpu_class(),
            "cpu": cpu_identity(), "num_cores": num_threads()}


def _cuda_recipe(spec: TargetSpec) -> dict:
    # Whether this machine can run the artifact is part of the recipe of what runs it: a
    # "not run: no CUDA device" result must not be reused on a machine with a GPU.
    return {"name": spec.name, "kind": "cuda", "arch": spec.arch, **_CUDA_LIMITS,
            "device_present": shutil.which("nvidia-smi") is not None}


def _cpu_tvm_target(spec: TargetSpec) -> dict:
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": num_threads()}


def _cuda_tvm_target(spec: TargetSpec) -> dict:
    return {"kind": "cuda", "arch": spec.arch, **_CUDA_LIMITS, "host": {"kind": "llvm"}}


# The u8 x s8 -> s32 tensor intrinsic of a CPU target, best first: (LLVM target feature,
# intrinsic name in pipeline.compiler.intrinsics). AMX tiles only where the target has
# amx-int8 (Sapphire Rapids and later Xeons); every other AVX-512 CPU keeps VNNI.
CPU_INT8_DOT_INTRINSICS = (("amx-int8", "amx_tdpbusd_16x16x64"),
                           ("avx512vnni", "dot_16x4_vnni"))

BACKENDS: dict[str, Backend] = {
    "llvm": Backend(
        kind="llvm", device="cpu", runs_on_build_host=True, kernel_check=True,
        untuned_scheduler="rules", bit_exact_app=True, toolchain="host C++ compiler (CMake)",
        # Logs are shared per ISA class, not per CPU model (see host_cpu_class).
        log_key=lambda spec: f"cpu-{host_cpu_class()}",
        recipe=_cpu_recipe, tvm_target=_cpu_tvm_target),
    "cuda": Backend(
        kind="cuda", device="cuda", runs_on_build_host=False, kernel_check=False,
        untuned_scheduler="dlight",
        # CUDA kernels are compiled with fast-math (FACTS.md): not bitwise between builds.
        bit_exact_app=False, toolchain="nvcc: cubin + PTX fatbins for the target's SM",
        log_key=lambda spec: f"cuda-{spec.arch}", recipe=_cuda_recipe,
        tvm_target=_cuda_tvm_target),
}


def target_key(spec: TargetSpec) -> str:
    """The key tuning logs are stored under: per ISA class on CPU, per SM on CUDA."""
    return spec.backend.log_key(spec)


def target_config(spec: TargetSpec) -> dict:
    """Plain-data description of the target, part of every target-dependent recipe."""
    return spec.backend.recipe(spec)


def tvm_target(spec: TargetSpec):
    """The ``tvm.target.Target`` for a target spec (imports TVM: call inside stages only)."""
    import tvm

    config = dict(spec.backend.tvm_target(spec))
    host = config.pop("host", None)
    return tvm.target.Target(config, host=host) if host else tvm.target.Target(config)
