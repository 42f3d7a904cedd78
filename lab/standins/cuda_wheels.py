"""A real, complete CUDA toolkit from NVIDIA's PyPI wheels, for tests that compile CUDA code.

``ensure_cuda_wheels`` installs one pinned set of wheels (nvcc, crt, nvvm, cudart, cuBLAS,
CCCL) with pip into ``$GARAGE_CUDA_WHEELS`` (default /var/cache/llm-garage/cuda-wheels), once
per set; they unpack into one toolkit folder, ``nvidia/cu13/{bin,include,lib,nvvm}``. Then:

- ``lib64``, a link to ``lib``: nvcc.profile links from ``lib64`` (NVIDIA's own layout);
- the unversioned ``libcublas.so``, ``libcublasLt.so`` and ``libcudart.so`` links that CMake's
  FindCUDAToolkit looks for (the wheels ship only the ``.so.13`` files);
- ``stubs/libcuda.so``, an empty shared library standing in for the driver's, enough to
  configure and compile objects (not to link an executable that calls the driver).

``python -m lab.standins.cuda_wheels`` installs the set and prints the toolkit folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "GARAGE_CUDA_WHEELS"
DEFAULT_CACHE = Path("/var/cache/llm-garage/cuda-wheels")
# CUDA 13.0 Update 1 as NVIDIA publishes it on PyPI (cuBLAS 13.0 Update 2).
RELEASE = "13.0"
WHEELS = ("nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-crt==13.0.88", "nvidia-nvvm==13.0.88",
          "nvidia-cuda-runtime==13.0.96", "nvidia-cublas==13.0.2.14",
          "nvidia-cuda-cccl==13.0.85")
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


def ensure_cuda_wheels(where: Path | None = None) -> CudaWheels:
    """The pinned toolkit, installed first if missing; safe to call concurrently."""
    base = (where or cache()) / RELEASE
    if not (base / ".complete").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".tmp-{RELEASE}-", dir=base.parent) as tmp:
            tmp_base = Path(tmp) / "toolkit"
            _install(tmp_base)
            (tmp_base / ".complete").write_text("\n".join(WHEELS) + "\n")
            try:
                tmp_base.rename(base)
            except OSError:
                if not (base / ".complete").is_file():
                    shutil.rmtree(base, ignore_errors=True)
                    tmp_base.rename(base)
    return CudaWheels(root=base / "nvidia" / "cu13", libcuda_stub=base / "stubs" / "libcuda.so")


def _install(base: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
         "--target", str(base), *WHEELS], capture_output=True, text=True)
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
    print(ensure_cuda_wheels().root)
