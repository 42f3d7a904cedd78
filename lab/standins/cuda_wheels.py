"""A real, complete CUDA toolkit from NVIDIA's PyPI wheels, for tests that compile CUDA code.

``ensure_cuda_wheels`` installs one pinned set of wheels (nvcc, crt, nvvm, cudart, cuBLAS,
CCCL) with pip into ``$GARAGE_CUDA_WHEELS`` (default /var/cache/llm-garage/cuda-wheels), once
per set; they unpack into one toolkit folder, ``nvidia/cu13/{bin,include,lib,nvvm}``. Then:

- ``lib64``, a link to ``lib``: nvcc.profile links from ``lib64`` (NVIDIA's own layout);
- the unversioned ``libcublas.so``, ``libcublasLt.so`` and ``libcudart.so`` links that CMake's
  FindCUDAToolkit looks for (the wheels ship only the ``.so.13`` files);
- ``stubs/libcuda.so``, an empty shared library standing in for the driver's, enough to
  configure and compile objects (not to link an executable that calls the driver).

The wheel files themselves are kept in ``<cache>/files`` (``wheel_files``, checked against
the sha256 llm-garage pins for ``cuda_toolkit: "13.0"``), for the stand-in package index that
test rigs install the same toolkit from (lab.standins.wheel_index).

``python -m lab.standins.cuda_wheels`` installs the set and prints the toolkit folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llm_garage.plans.engines import CUDA_WHEELS

CACHE_ENV = "GARAGE_CUDA_WHEELS"
DEFAULT_CACHE = Path("/var/cache/llm-garage/cuda-wheels")
# CUDA 13.0 Update 1 as NVIDIA publishes it on PyPI (cuBLAS 13.0 Update 2).
RELEASE = "13.0"
PINNED = CUDA_WHEELS[RELEASE]
WHEELS = tuple(f"{w.project}=={w.file.split('-')[1]}" for w in PINNED.wheels)
LINKS = ("libcublas.so", "libcublasLt.so", "libcudart.so")


@dataclass(frozen=True)
class CudaWheels:
    """The installed toolkit: ``root`` holds bin/nvcc, include/ and lib/."""

    root: Path
    libcuda_stub: Path

    @property
    def nvcc(self) -> Path:
        return self.root / "bin" / "nvcc"

    def lib(self, name: str) -> Path:
        return self.root / "lib" / name


def cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def wheel_files(where: Path | None = None) -> Path:
    """The folder holding the pinned wheel files, downloaded first if missing (pip download,
    from the index pip is configured with); each file's sha256 is checked."""
    files = (where or cache()) / "files"
    missing = [w for w in PINNED.wheels if not (files / w.file).is_file()]
    if missing:
        files.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=files) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                 "--no-deps", "--only-binary=:all:", "-d", tmp,
                 *[f"{w.project}=={w.file.split('-')[1]}" for w in missing]],
                capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"pip download of the CUDA {RELEASE} wheels failed "
                                   f"({proc.returncode}):\n{proc.stdout}{proc.stderr}")
            for w in missing:
                (Path(tmp) / w.file).rename(files / w.file)
    for w in PINNED.wheels:
        digest = hashlib.sha256()
        with (files / w.file).open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != w.sha256:
            raise RuntimeError(f"{files / w.file} is not the pinned wheel (sha256 "
                               f"{digest.hexdigest()}, pinned {w.sha256})")
    return files


def ensure_cuda_wheels(where: Path | None = None) -> CudaWheels:
    """The pinned toolkit, installed first if missing; safe to call concurrently."""
    base = (where or cache()) / RELEASE
    if not (base / ".complete").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".tmp-{RELEASE}-", dir=base.parent) as tmp:
            tmp_base = Path(tmp) / "toolkit"
            _install(tmp_base, wheel_files(where))
            (tmp_base / ".complete").write_text("\n".join(WHEELS) + "\n")
            try:
                tmp_base.rename(base)
            except OSError:
                if not (base / ".complete").is_file():
                    shutil.rmtree(base, ignore_errors=True)
                    tmp_base.rename(base)
    return CudaWheels(root=base / "nvidia" / "cu13", libcuda_stub=base / "stubs" / "libcuda.so")


def _install(base: Path, files: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
         "--no-index", "--find-links", str(files), "--target", str(base), *WHEELS],
        capture_output=True, text=True)
    root = base / "nvidia" / "cu13"
    if proc.returncode != 0 or not (root / "bin" / "nvcc").is_file():
        raise RuntimeError(f"pip install of the CUDA {RELEASE} wheels into {base} failed "
                           f"({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    (root / "lib64").symlink_to("lib")
    for name in LINKS:
        versioned = sorted((root / "lib").glob(f"{name}.[0-9]*"))
        if not versioned:
            raise RuntimeError(f"no {name}.N in {root / 'lib'}")
        (root / "lib" / name).symlink_to(versioned[0].name)
    stubs = base / "stubs"
    stubs.mkdir()
    empty = stubs / "empty.c"
    empty.write_text("/* stands in for the driver's libcuda.so */\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(stubs / "libcuda.so"), str(empty)], check=True, capture_output=True)


if __name__ == "__main__":
    wheel_files()
    print(ensure_cuda_wheels().root)
