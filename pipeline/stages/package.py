"""Stage ``package``: a C++ inference app built with CMake, bundled with model and TVM runtime."""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, CorruptInputError, StageFailed, collect
from pipeline.core.project import REPO
from pipeline.core.targets import TARGETS, TargetSpec, get_target
from pipeline.runtime.params import params_path

STAGE = "package"

_ROOT = REPO
TEMPLATES_DIR = _ROOT / "templates"
RUNTIME_CPP_DIR = _ROOT / "runtime_cpp"

# dtype -> the npy::DType enumerator in runtime_cpp/npy.h (the app reads and writes these).
_NPY_ENUM = {"float32": "kFloat32", "float16": "kFloat16", "int8": "kInt8", "uint8": "kUInt8",
             "int32": "kInt32", "int64": "kInt64"}
SUPPORTED_DTYPES = tuple(_NPY_ENUM)
BUILD_TYPES = ("Release", "RelWithDebInfo", "MinSizeRel", "Debug")
TARGET_KINDS = ("llvm", "cuda")

# Oldest driver branch that runs each CUDA major version (NVIDIA, "CUDA Compatibility",
# minor version compatibility table): any driver of that branch or newer runs the bundle.
CUDA_MIN_DRIVER = {11: "450", 12: "525", 13: "580"}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CUDA_ARCH = re.compile(r"^sm_[0-9]+[a-z]?$")
# Fixed member metadata so that identical inputs give an identical bundle, byte for byte.
_BUNDLE_MTIME = 0
_LOG_TAIL_LINES = 40
_TOOL_TIMEOUT_S = 900


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the app checks it at run time: static shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    range: tuple = ()  # (lo, hi) of an input's values, both included; () for any value
    onnx_name: str = ""  # the ONNX graph's name where TVM renamed it: the app takes both

    def __post_init__(self) -> None:
        # io.json and friends give shapes as lists; keep the spec hashable and comparable.
        for attr in ("shape", "range"):
            if isinstance(getattr(self, attr), list):
                object.__setattr__(self, attr, tuple(getattr(self, attr)))

    @classmethod
    def from_any(cls, value: TensorSpec | Mapping[str, Any]) -> TensorSpec:
        """Accept a ``TensorSpec`` or plain data ``{"name", "shape", "dtype"}`` (and an
        optional ``"range": [lo, hi]``)."""
        if isinstance(value, TensorSpec):
            return value
        if (not isinstance(value, Mapping) or not {"name", "shape", "dtype"} <= set(value)
                or not set(value) <= {"name", "shape", "dtype", "range", "onnx_name"}):
            raise ConfigError(f"tensor spec {value!r} must be a mapping with the keys "
                              "'name', 'shape' and 'dtype' (and optionally 'range' and "
                              "'onnx_name')")
        shape = value["shape"]
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise ConfigError(f"tensor {value['name']!r}: shape {shape!r} must be a list of ints")
        return cls(str(value["name"]), tuple(shape), str(value["dtype"]),
                   tuple(value.get("range", ())), str(value.get("onnx_name", "")))

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.range:
            out["range"] = list(self.range)
        if self.onnx_name:
            out["onnx_name"] = self.onnx_name
        return out

    def problems(self, role: str) -> list[str]:
        """Everything wrong with this spec, as messages (empty if it is fine)."""
        out = []
        if not self.name:
            out.append(f"{role} has an empty name")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.shape):
            out.append(f"{role} {self.name!r}: shape {list(self.shape)} must hold positive ints "
                       "(the app is built for static shapes)")
        if self.dtype not in _NPY_ENUM:
            out.append(f"{role} {self.name!r}: dtype {self.dtype!r} is not supported; "
                       f"supported: {', '.join(SUPPORTED_DTYPES)}")
        if self.range and (role != "input" or self.dtype.startswith("float") or
                           len(self.range) != 2 or self.range[0] > self.range[1]):
            out.append(f"{role} {self.name!r}: range {list(self.range)} must be [lo, hi] of "
                       "an integer input (lo <= hi)")
        return out


@dataclass(frozen=True)
class PackageConfig:
    """What the package stage needs to know: the target and the model's io spec.

    ``inputs`` and ``outputs`` may be given as plain data (lists of ``{"name", "shape",
    "dtype"}``); they are stored as tuples of :class:`TensorSpec`, inputs in the order the
    model's ``main`` takes them.
    """

    model: str  # model name: names the bundle
    target: str  # target name, as in pipeline.core.targets
    target_kind: str  # "llvm" or "cuda"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cuda_arch: str = ""  # e.g. "sm_89"; defaults to the targets table's for a known target
    build_type: str = "Release"  # CMake build type
    # weight tensors main() takes after the inputs, from model.params next to model.so
    # (the compile stage's; 0: the weights are inside model.so)
    params: int = 0

    def __post_init__(self) -> None:
        for attr in ("inputs", "outputs"):
            value = getattr(self, attr)
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
                raise ConfigError(f"PackageConfig.{attr} must be a list of tensor specs, "
                                  f"got {value!r}")
            object.__setattr__(self, attr, tuple(TensorSpec.from_any(v) for v in value))
        if self.target_kind == "cuda" and not self.cuda_arch and self.target in TARGETS:
            # The targets table knows each CUDA target's SM; callers need not repeat it.
            object.__setattr__(self, "cuda_arch", TARGETS[self.target].arch)

        problems = []
        for attr in ("model", "target"):
            if not _SAFE_NAME.match(getattr(self, attr)):
                problems.append(f"{attr} {getattr(self, attr)!r} must match {_SAFE_NAME.pattern} "
                                "(it names files)")
        if self.target_kind not in TARGET_KINDS:
            problems.append(f"target_kind {self.target_kind!r} is not one of "
                            f"{', '.join(TARGET_KINDS)}")
        if self.target_kind == "cuda" and not _CUDA_ARCH.match(self.cuda_arch):
            problems.append(f"cuda_arch {self.cuda_arch!r} must look like 'sm_89' "
                            "for a cuda target")
        if self.target_kind == "llvm" and self.cuda_arch:
            problems.append(f"cuda_arch {self.cuda_arch!r} given for an llvm target")
        if not isinstance(self.params, int) or isinstance(self.params, bool) or self.params < 0:
            problems.append(f"params {self.params!r} must be a count of weight tensors (>= 0)")
        if self.build_type not in BUILD_TYPES:
            problems.append(f"build_type {self.build_type!r} is not one of "
                            f"{', '.join(BUILD_TYPES)}")
        for role, specs in (("input", self.inputs), ("output", self.outputs)):
            if not specs:
                problems.append(f"the model needs at least one {role}")
            for spec in specs:
                problems += spec.problems(role)
            names = [s.name for s in specs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                problems.append(f"duplicate {role} names: {', '.join(dupes)}")
        collect(problems, ConfigError, "invalid package config:")

    @classmethod
    def for_target(cls, model_name: str, target: TargetSpec, inputs: Sequence[Any],
                   outputs: Sequence[Any], build_type: str = "Release",
                   params: int = 0) -> PackageConfig:
        """Build a config from a :class:`~pipeline.core.targets.TargetSpec` and a plain io spec.

        Parameters
        ----------
        model_name : str
            Name of the model; names the bundle ``<model>-<target>.tar.gz``.
        target : TargetSpec
            The build target, e.g. ``get_target("cpu")``.
        inputs, outputs : sequence of mapping or TensorSpec
            ``{"name", "shape", "dtype"}`` per tensor, inputs in the model's argument order.
        build_type : str
            CMake build type of the app.
        params : int
            Weight tensors ``main`` takes after the inputs (``model.params`` next to
            ``model.so``); 0 when the weights are inside ``model.so``.

        Returns
        -------
        PackageConfig
        """
        return cls(model_name, target.name, target.kind, inputs, outputs,
                   cuda_arch=target.arch if target.kind == "cuda" else "", build_type=build_type,
                   params=params)

    @property
    def is_cuda(self) -> bool:
        return self.target_kind == "cuda"

    @property
    def bundle_name(self) -> str:
        return f"{self.model}-{self.target}.tar.gz"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready), e.g. for the stage's recipe hash."""
        return {"model": self.model, "target": self.target,
                "target_kind": self.target_kind, "cuda_arch": self.cuda_arch,
                "build_type": self.build_type, "params": self.params,
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}


@dataclass(frozen=True)
class PackageStageConfig:
    """The package stage's recipe: which artifact for which target (known before anything
    runs); the app's tensors come from the compile stage's ``io.json`` (see :meth:`app`)."""

    artifact: str  # names the bundle
    target: dict  # core.targets.target_config()
    # compiled input name -> [lo, hi]: the app refuses integer inputs outside it
    input_ranges: dict = field(default_factory=dict)
    # compiled input name -> the ONNX name TVM renamed ("input_1" -> "input.1")
    onnx_names: dict = field(default_factory=dict)

    def app(self, io: Mapping[str, Any]) -> PackageConfig:
        """The app to generate for a model with the tensors of ``io`` (compile's io.json)."""
        inputs = []
        for t in io["inputs"]:
            extra = {"range": self.input_ranges.get(t["name"]),
                     "onnx_name": self.onnx_names.get(t["name"])}
            inputs.append({**t, **{k: v for k, v in extra.items() if v}})
        return PackageConfig.for_target(self.artifact, get_target(self.target["name"]),
                                        inputs, io["outputs"],
                                        params=int(io.get("params", {}).get("count", 0)))


def _c_string(value: str) -> str:
    """A C++ string literal for ``value``: printable ASCII kept, every other byte octal-escaped."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F and ch != "?":  # '?' escaped too: no trigraph can ever form
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


@lru_cache(maxsize=1)
def _jinja_env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["cstr"] = _c_string
    env.filters["npy_enum"] = _NPY_ENUM.__getitem__
    return env


def render_sources(config: PackageConfig) -> dict[str, str]:
    """Render the app's generated sources.

    Parameters
    ----------
    config : PackageConfig
        Target and io spec baked into the app.

    Returns
    -------
    dict of str to str
        File name under ``src/`` (``main.cc``, ``CMakeLists.txt``) to its text. The same
        config always gives the same text: no timestamps, plain data in.
    """
    context = {"model_name": config.model, "target_name": config.target,
               "target_kind": config.target_kind, "is_cuda": config.is_cuda,
               "cuda_arch": config.cuda_arch, "build_type": config.build_type,
               "num_params": config.params,
               "inputs": [dict(s.to_dict(), range=list(s.range), onnx_name=s.onnx_name)
                          for s in config.inputs],
               "outputs": [s.to_dict() for s in config.outputs]}
    env = _jinja_env()
    return {name: env.get_template(name + ".j2").render(**context)
            for name in ("CMakeLists.txt", "main.cc")}


class _Reader:
    """Little-endian cursor over TVM's binary serialization (u64 lengths, raw bytes)."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise CorruptInputError(f"{self.what}: truncated at byte {self.pos}")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def blob(self) -> bytes:
        size = self.u64()
        if self.pos + size > len(self.data):
            raise CorruptInputError(f"{self.what}: a field of {size} bytes runs past the end")
        self.pos += size
        return self.data[self.pos - size:self.pos]

    def u64_vector(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _elf_symbol_data(image: bytes, name: str, what: str) -> bytes | None:
    """The bytes from where dynamic symbol ``name`` points to the end of its section, or None."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise CorruptInputError(f"{what}: not a 64-bit little-endian ELF shared library")
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize)
                for i in range(shnum)]
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 11 or not entsize:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for off in range(offset, offset + size, entsize):
            st_name, _, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", image, off)
            end = image.index(b"\0", strtab + st_name)
            if image[strtab + st_name:end].decode() != name or not 0 < st_shndx < len(sections):
                continue
            _, _, _, sec_addr, sec_offset, sec_size, *_ = sections[st_shndx]
            start = sec_offset + st_value - sec_addr
            return image[start:sec_offset + sec_size]
    return None


def _embedded_modules(model_so: Path) -> list[tuple[str, bytes]]:
    """(kind, serialized bytes) of each module ``export_library`` embedded in a library.

    Reads the ``__tvm_ffi__library_bin`` blob, laid out as tvm-ffi's ``library_module.cc``
    documents: ``<nbytes> <import tree> (<kind> [<bytes>])*``; kind ``_lib`` (the host code
    itself) has no bytes.
    """
    what = f"compiled model {model_so}"
    data = _elf_symbol_data(Path(model_so).read_bytes(), "__tvm_ffi__library_bin", what)
    if data is None:  # a plain library without embedded modules
        return []
    outer = _Reader(data, what + " (module blob)")
    reader = _Reader(outer.blob(), outer.what)
    indptr = reader.u64_vector()
    reader.u64_vector()  # import tree child indices
    modules = []
    for _ in range(max(len(indptr) - 1, 0)):
        kind = reader.blob().decode("utf-8", errors="replace")
        modules.append((kind, b"" if kind == "_lib" else reader.blob()))
    return modules


def cuda_kernel_sources(model_so: Path) -> list[str]:
    """CUDA C++ sources that a compiled model carries uncompiled.

    TVM 0.27 keeps CUDA kernels as source when it compiles on a machine without a GPU, and
    compiles them when the model is loaded, through a callback (``tvm_callback_cuda_compile``)
    that only its Python package registers. The C++ app serves kernels compiled at package
    time instead; this reads their sources out of the library.

    Parameters
    ----------
    model_so : Path
        A Relax executable exported with ``export_library``.

    Returns
    -------
    list of str
        One source per CUDA module whose code format is ``"cuda"``; empty when the kernels
        are already compiled (PTX/cubin, as when TVM compiled on a GPU machine) or there are
        no CUDA modules.

    Raises
    ------
    CorruptInputError
        The library or its embedded module blob cannot be parsed.
    """
    sources = []
    for kind, payload in _embedded_modules(model_so):
        if kind != "cuda":
            continue
        # A CUDA module serializes as [fmt][function table][code] (TVM cuda_module.cc).
        module = _Reader(payload, f"compiled model {model_so} (CUDA module)")
        if module.blob() != b"cuda":
            continue  # already PTX/cubin/fatbin: the runtime loads it as it is
        # The code is the last field; the function table before it is not needed here.
        for start in range(module.pos, len(payload) - 7):
            (size,) = struct.unpack_from("<Q", payload, start)
            if start + 8 + size == len(payload):
                code = payload[start + 8:].decode("utf-8")
                if "__global__" in code:
                    sources.append(code)
                    break
        else:
            raise CorruptInputError(f"compiled model {model_so}: found a CUDA module but not its "
                                    "source (has TVM's module format changed?)")
    return sources


def _check_model_matches_target(model_so: Path, config: PackageConfig) -> None:
    """A model compiled for another kind of target would only fail when the app runs it."""
    has_cuda = any(kind == "cuda" for kind, _ in _embedded_modules(model_so))
    if has_cuda != config.is_cuda:
        found = "CUDA kernels" if has_cuda else "no CUDA kernels"
        raise ConfigError(f"compiled model {model_so} has {found}, but target "
                          f"{config.target!r} is {config.target_kind}; package the model "
                          "compiled for that target")


def _wheel_paths(config: PackageConfig) -> dict[str, Path]:
    """CMake cache variables locating the tvm-ffi headers and the wheel's runtime libraries.

    ``tvm`` is located without importing it (the import loads the whole compiler).
    """
    import tvm_ffi.libinfo as ffi_info

    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise StageFailed(STAGE, "the apache-tvm wheel is not installed in this Python")
    tvm_lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    paths = {"TVM_FFI_INCLUDE_DIR": Path(ffi_info.find_include_path()),
             "DLPACK_INCLUDE_DIR": Path(ffi_info.find_dlpack_include_path()),
             "TVM_FFI_LIBRARY": Path(ffi_info.find_libtvm_ffi()),
             "TVM_RUNTIME_LIBRARY": tvm_lib / "libtvm_runtime.so"}
    if config.is_cuda:
        paths["TVM_RUNTIME_CUDA_LIBRARY"] = tvm_lib / "libtvm_runtime_cuda.so"
    missing = [f"{k}={v}" for k, v in sorted(paths.items()) if not v.exists()]
    if missing:
        raise StageFailed(STAGE, "the TVM wheel lacks " + ", ".join(missing))
    return paths


def _run_logged(cmd: list[str], log_path: Path, what: str, cwd: Path) -> None:
    """Run a build tool, appending its output to the log; StageFailed quotes the log's tail."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=_TOOL_TIMEOUT_S, check=False)
            rc: int | str = proc.returncode
        except FileNotFoundError:
            rc = "not found"
        except subprocess.TimeoutExpired:
            rc = f"timed out after {_TOOL_TIMEOUT_S} s"
        log.write(f"[exit: {rc}]\n")
    if rc != 0:
        raise StageFailed(STAGE, f"{what} failed ({rc}); last lines of the log:\n"
                          + _log_tail(log_path), log_path=log_path)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("  | " + line for line in text[-lines:])


def _readme(config: PackageConfig, libs: list[str], has_kernels: bool) -> str:
    """The bundle's README.txt: how to run it and what the machine needs."""
    root = config.bundle_name.removesuffix(".tar.gz")
    first = config.inputs[0]
    lines = [
        f"{config.model} for target '{config.target}' ({config.target_kind}"
        + (f", {config.cuda_arch}" if config.is_cuda else "") + "), built by onnx2deploy.",
        "",
        "Layout",
        "  bin/infer    inference app (finds lib/ and model.so relative to itself)",
        "  model.so     the compiled model (TVM Relax executable)",
        *(["  model.params its weights (TVM param file, loaded next to model.so)"]
          if config.params else []),
        "  lib/         TVM runtime libraries: " + ", ".join(libs),
        "  src/         the app's sources; rebuild with:",
        "               cmake -S src -B build && cmake --build build",
        *(["  kernels/     the model's CUDA kernels, compiled ahead of time "
           "(NAME.fatbin from NAME.cu)"] if has_kernels else []),
        "",
        "Run",
        f"  {root}/bin/infer --input x.npy --output y.npy --warmup 10 --repeat 100 "
        "--json stats.json",
        "  bin/infer --help lists every option (--threads N sets the CPU thread pool size).",
        "",
        "Inputs (.npy, C order, little-endian; shape and dtype are checked):",
        *[f"  {s.onnx_name or s.name}: {s.dtype} {list(s.shape)}"
          + (f", values in [{s.range[0]}, {s.range[1]}] (others are refused)" if s.range else "")
          + (f" (also accepted as {s.name})" if s.onnx_name else "") for s in config.inputs],
        "Outputs:",
        *[f"  {s.name}: {s.dtype} {list(s.shape)}" for s in config.outputs],
    ]
    if len(config.inputs) > 1:
        lines.append("Several inputs: pass --input NAME=PATH for each, "
                     f"e.g. --input {first.onnx_name or first.name}=a.npy")
    lines += ["", "Exit status: 0 ok, 1 runtime failure, 2 bad arguments or input files.", "",
              "Requirements",
              "  Linux x86_64, with glibc and libstdc++ at least as new as the build machine's."]
    if config.is_cuda:
        cudart = next((lib for lib in libs if lib.startswith("libcudart.so.")), "")
        major = int(cudart.rsplit(".", 1)[1]) if cudart else None
        branch = CUDA_MIN_DRIVER.get(major) if major else None
        driver = (f"branch {branch} or newer" if branch
                  else "one for this CUDA version (see NVIDIA's CUDA compatibility table)")
        lines += [
            f"  An NVIDIA GPU of architecture {config.cuda_arch}, or a newer one (its driver then",
            "  compiles the kernels' PTX at the first run).",
            f"  CUDA {major}: the CUDA runtime ships in lib/ ({cudart}); the machine needs the",
            f"  NVIDIA driver only (libcuda.so.1): {driver}.",
            "  --device-timing include-copies|exclude-copies picks the latency reported first:",
            "  with or without the host<->device copies of inputs and outputs (both are printed).",
        ]
    return "\n".join(lines) + "\n"


def _write_bundle(out_dir: Path, root: str, members: list[str], bundle: Path) -> None:
    """A tar.gz of ``members`` (top-level names in out_dir) under ``root/``, reproducibly.

    Sorted members, fixed mtime/owner/mode and a gzip header without name or time: the
    same files always give the same bytes. Files are streamed into the archive (a bundle of
    a 2 GiB model never holds it in memory).
    """
    entries = {root: out_dir}
    for member in members:
        path = out_dir / member
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            entries[f"{root}/{item.relative_to(out_dir).as_posix()}"] = item
    tmp = bundle.with_name(bundle.name + ".tmp")
    with open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(entries):
            path = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = _BUNDLE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = path.stat().st_size
                info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    os.replace(tmp, bundle)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (a 2 GiB weights file is not copied
    inside the store), else a copy. Store outputs are never modified in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def run(model_so: Path, config: PackageConfig, out_dir: Path) -> dict[str, Path]:
    """Build the inference app for a compiled model and bundle it.

    Renders ``src/`` (app sources plus the ``runtime_cpp`` headers; for CUDA, the model's
    kernel sources too), configures and builds it with CMake in ``out_dir/build`` (log:
    ``out_dir/build.log``; the build tree is removed once it succeeded), then lays out
    ``bin/infer``, ``lib/`` (the TVM runtime libraries the app needs), ``model.so`` (and
    its ``model.params`` when ``config.params`` says it takes weights),
    ``kernels/`` (CUDA only) and ``README.txt``, and packs them with ``src/`` into
    ``<model>-<target>.tar.gz``, which unpacks to one folder of that name.

    Parameters
    ----------
    model_so : Path
        The Relax executable exported with ``export_library``.
    config : PackageConfig
        Target and io spec of the model.
    out_dir : Path
        Where everything is written; nothing is written outside it.

    Returns
    -------
    dict of str to Path
        ``bundle``, ``binary``, ``model``, ``lib_dir``, ``src_dir``, ``readme``, ``build_log``,
        ``kernels_dir`` when CUDA kernels were compiled ahead of time, and ``params`` when
        the model takes its weights from ``model.params``.

    Raises
    ------
    CorruptInputError
        ``model_so`` is missing or not a shared library.
    ConfigError
        ``model_so`` was compiled for another kind of target than ``config`` names.
    StageFailed
        CMake configure or build failed (the message quotes the end of the build log), or the
        build produced no binary.
    """
    model_so = Path(model_so)
    out_dir = Path(out_dir).resolve()  # the build tools run with cwd=out_dir
    try:
        with open(model_so, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CorruptInputError(f"compiled model {model_so}: cannot read it "
                                f"({e.strerror})") from None
    if magic != b"\x7fELF":
        raise CorruptInputError(f"compiled model {model_so} is not a shared library (no ELF "
                                "header); export it with Executable.export_library")
    _check_model_matches_target(model_so, config)
    weights = params_path(model_so)
    if config.params and not weights.is_file():
        raise CorruptInputError(f"compiled model {model_so} takes {config.params} weight "
                                f"tensors, but {weights} does not exist; package the compile "
                                "stage's model.so with its model.params")
    wheel = _wheel_paths(config)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise StageFailed(STAGE, "cmake not found on PATH; install cmake >= 3.18")

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"src_dir": out_dir / "src", "build_dir": out_dir / "build", "bin_dir": out_dir / "bin",
             "lib_dir": out_dir / "lib", "model": out_dir / "model.so",
             "readme": out_dir / "README.txt", "build_log": out_dir / "build.log",
             "params": out_dir / "model.params",
             "kernels_dir": out_dir / "kernels", "bundle": out_dir / config.bundle_name}
    # Start clean: leftovers of an earlier run (another target's libs) must not reach the bundle.
    for path in paths.values():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    src = paths["src_dir"]
    (src / "runtime_cpp").mkdir(parents=True)
    for name, text in render_sources(config).items():
        (src / name).write_text(text, encoding="utf-8")
    for header in sorted(RUNTIME_CPP_DIR.glob("*.h")):
        shutil.copyfile(header, src / "runtime_cpp" / header.name)
    kernels = cuda_kernel_sources(model_so) if config.is_cuda else []
    if kernels:
        (src / "kernels").mkdir()
        for i, code in enumerate(kernels):
            (src / "kernels" / f"cuda{i}.cu").write_text(code, encoding="utf-8")

    build, log = paths["build_dir"], paths["build_log"]
    log.write_text(f"package {config.model} for {config.target}\n", encoding="utf-8")
    _run_logged([cmake, "-S", str(src), "-B", str(build), f"-DCMAKE_BUILD_TYPE={config.build_type}",
                 *[f"-D{k}={v}" for k, v in sorted(wheel.items())]],
                log, "cmake configure", cwd=out_dir)
    _run_logged([cmake, "--build", str(build)], log, "cmake build", cwd=out_dir)

    binary, libs_file = build / "infer", build / "runtime_libs.txt"
    if not binary.is_file() or not libs_file.is_file():
        raise StageFailed(STAGE, f"the build reported success but left no {binary.name} or "
                          f"{libs_file.name} in {build}", log_path=log)
    lib_dir, bin_dir = paths["lib_dir"], paths["bin_dir"]
    lib_dir.mkdir()
    bin_dir.mkdir()
    libs = []
    for line in libs_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            lib = Path(line.strip())
            shutil.copyfile(lib, lib_dir / lib.name)  # follows symlinks (libcudart.so.N)
            os.chmod(lib_dir / lib.name, 0o755)
            libs.append(lib.name)
    if kernels:
        # The app matches the runtime's request against kernels/NAME.cu, then serves NAME.fatbin.
        paths["kernels_dir"].mkdir()
        for i in range(len(kernels)):
            fatbin = build / "kernels" / f"cuda{i}.fatbin"
            if not fatbin.is_file():
                raise StageFailed(STAGE, f"the build left no {fatbin}", log_path=log)
            shutil.copyfile(fatbin, paths["kernels_dir"] / fatbin.name)
            shutil.copyfile(src / "kernels" / f"cuda{i}.cu", paths["kernels_dir"] / f"cuda{i}.cu")
    shutil.copyfile(binary, bin_dir / "infer")
    os.chmod(bin_dir / "infer", 0o755)
    shutil.copyfile(model_so, paths["model"])
    os.chmod(paths["model"], 0o644)
    members = ["README.txt", "bin", "lib", "model.so", "src"] + (["kernels"] if kernels else [])
    if weights.is_file():  # (also with no tensors in it: every stage output always exists)
        _link_or_copy(weights, out_dir / "model.params")
        members.append("model.params")
    paths["readme"].write_text(_readme(config, sorted(libs), bool(kernels)), encoding="utf-8")

    _write_bundle(out_dir, config.bundle_name.removesuffix(".tar.gz"), members, paths["bundle"])
    # The build tree (caches with absolute paths, object files) is no output; on failure it
    # stays for inspection.
    shutil.rmtree(build)
    result = {"bundle": paths["bundle"], "binary": bin_dir / "infer", "model": paths["model"],
              "lib_dir": lib_dir, "src_dir": src, "readme": paths["readme"], "build_log": log}
    if kernels:
        result["kernels_dir"] = paths["kernels_dir"]
    if weights.is_file():
        result["params"] = paths["params"]
    return result


def package_artifact(model_so: Path, io_json: Path, config: PackageStageConfig,
                     out_dir: Path) -> dict[str, Path]:
    """Stage entry: :func:`run` for the app that the compiled model's ``io.json`` describes."""
    import json

    io = json.loads(Path(io_json).read_text(encoding="utf-8"))
    return run(model_so, config.app(io), out_dir)
