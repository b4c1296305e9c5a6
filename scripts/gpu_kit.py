#!/usr/bin/env python3
"""Pack an artifact's bundle and validation kit into one tarball for a machine without TVM.

The build makes, next to each bundle, a validation kit (``artifacts/<artifact>/<target>/kit``:
inputs, onnxruntime's outputs computed here, the gates and ``check.py``, which needs Python 3
and numpy only). This script puts the bundle and the kit into one uncompressed tar (the
bundle is already gzipped), checks that they belong together and that the tar fits the
device machine's transfer limit, and prints the commands to run there and back here:

    doit build:resnet50_int8 target=h100 tune=off           # bundle + kit (cross-compiled)
    python scripts/gpu_kit.py resnet50_int8 --target h100   # -> one tarball, commands
    # on the GPU machine:
    tar xf resnet50_int8-h100-gpu.tar
    python3 resnet50_int8-h100-kit/check.py --out kit_report.json
    # back here:
    doit validate:resnet50_int8@h100 target=h100 kit_report=kit_report.json

Exit status: 0 packed; 2 nothing to pack (not built, kit and bundle of different builds,
too large).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.hashing import sha256_file  # noqa: E402  (cheap: no TVM import)
from pipeline.core.store import verify  # noqa: E402

MIB = 1 << 20


class CannotPack(Exception):
    """Nothing consistent to pack (exit status 2)."""


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    st = path.stat()
    info.size, info.mtime = st.st_size, 0
    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    with open(path, "rb") as f:
        tar.addfile(info, f)


def pack(project: Path, artifact: str, target: str, out: Path | None,
         max_mib: float) -> tuple[Path, dict]:
    """Write the tarball; returns its path and what it holds."""
    art = project / "artifacts" / artifact / target
    kit_dir, bundle = art / "kit", art / f"{artifact}-{target}.tar.gz"
    build = f"doit build:{artifact} target={target}"
    if not (kit_dir / "kit.json").is_file() or not bundle.is_file():
        raise CannotPack(f"no kit or bundle in {art}: build it first (`{build}`, "
                         "add tune=off to skip tuning)")
    problem = verify(kit_dir.resolve())
    if problem:
        raise CannotPack(f"the kit in {kit_dir} is not intact ({problem}): run `{build}`")
    kit = json.loads((kit_dir / "kit.json").read_text(encoding="utf-8"))
    if sha256_file(bundle) != kit["bundle"]["sha256"]:
        raise CannotPack(f"{bundle.name} is not the bundle the kit was made for (a build "
                         f"stopped half way?): run `{build}`")
    root = f"{artifact}-{target}-kit"
    out = (out or project / "artifacts" / "reports" / "gpu_kit" /
           f"{artifact}-{target}-gpu.tar").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(p for p in kit_dir.resolve().rglob("*") if p.is_file()):
            rel = path.relative_to(kit_dir.resolve()).as_posix()
            if rel != "manifest.json":  # the store's record, not the kit's
                _add_file(tar, path, f"{root}/{rel}")
        _add_file(tar, bundle.resolve(), bundle.name)
    os.replace(tmp, out)
    size = out.stat().st_size
    info = {"tarball": str(out), "bytes": size, "bundle_bytes": bundle.stat().st_size,
            "kit_bytes": size - bundle.stat().st_size, "kit_dir": root, "bundle": bundle.name}
    if size > max_mib * MIB:
        raise CannotPack(f"{out} is {size / MIB:.1f} MiB, over the {max_mib:g} MiB a device "
                         f"run carries (bundle {bundle.stat().st_size / MIB:.1f} MiB); "
                         "fewer validation samples ([validation] samples) shrink the kit, "
                         "not the bundle")
    return out, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="<model>_<variant>, e.g. resnet50_int8")
    parser.add_argument("--target", default="cpu", help="the target it was built for")
    parser.add_argument("--project", type=Path, default=Path.cwd(),
                        help="the project directory doit runs in (default: here)")
    parser.add_argument("--out", type=Path, help="the tarball (default: artifacts/reports/"
                        "gpu_kit/<artifact>-<target>-gpu.tar)")
    parser.add_argument("--max-mib", type=float, default=64,
                        help="refuse a tarball larger than this (default 64)")
    args = parser.parse_args(argv)
    try:
        out, info = pack(args.project.resolve(), args.artifact, args.target, args.out,
                         args.max_mib)
    except CannotPack as e:
        print(f"gpu_kit: {e}", file=sys.stderr)
        return 2
    at = f"{args.artifact}@{args.target}"
    print(f"packed {out}: {info['bytes'] / MIB:.1f} MiB (bundle {info['bundle_bytes'] / MIB:.1f} "
          f"MiB, kit {info['kit_bytes'] / MIB:.2f} MiB)\n")
    print("On the device machine (Python 3 + numpy; no TVM needed):")
    print(f"  tar xf {out.name} && python3 {info['kit_dir']}/check.py --out kit_report.json")
    print("Then fetch kit_report.json and, here:")
    print(f"  doit validate:{at} target={args.target} kit_report="
          f"{shlex.quote('kit_report.json')}")
    print(f"  (or put it at artifacts/{args.artifact}/{args.target}/kit_report.json, where "
          "`doit validate` finds it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
