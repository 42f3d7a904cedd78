"""garage-cuda, the rig-side toolkit installer, run here with the operation's own command
line against the stand-in package index: small wheels laid out as NVIDIA's (a shell nvcc
that answers like 13.0's, cuBLAS and cudart as .so.13 files), so that every path is quick.
The real wheels are installed by tests/e2e/test_real_cuda.py."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest

from lab.standins.wheel_index import WheelIndex
from llm_garage.facts.engine import CudaToolkitAt, CudaToolkitStamp
from llm_garage.layout import script_source
from llm_garage.operations.engine import cuda_command
from llm_garage.plans.engines import CudaInstall, CudaWheels, Wheel

NVCC = """#!/bin/sh
case "$1" in
--version) echo "Cuda compilation tools, release 13.0, V13.0.88" ;;
--list-gpu-arch) printf 'compute_75\\ncompute_86\\n' ;;
esac
"""


def make_wheel(folder: Path, project: str, version: str, files: dict[str, tuple[str, int]]):
    path = folder / f"{project.replace('-', '_')}-{version}-py3-none-manylinux_2_27_x86_64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, (text, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, text)
    return Wheel(project, path.name, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def wheel_set(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    root = "nvidia/cu13"
    wheels = (
        make_wheel(folder, "nvidia-cuda-nvcc", "13.0.88", {f"{root}/bin/nvcc": (NVCC, 0o744)}),
        make_wheel(folder, "nvidia-cuda-runtime", "13.0.96", {
            f"{root}/lib/libcudart.so.13": ("", 0o644),
            f"{root}/include/cuda_runtime.h": ("", 0o664)}),
        make_wheel(folder, "nvidia-cublas", "13.0.2.14", {
            f"{root}/lib/libcublas.so.13": ("", 0o644),
            f"{root}/lib/libcublasLt.so.13": ("", 0o644)}),
    )
    return folder, CudaWheels(release="13.0.88", folder=root, wheels=wheels,
                              arches=("75", "86"))


def install(toolkit_dir: Path, index: WheelIndex, wheels: CudaWheels):
    spec = CudaInstall("13.0", str(toolkit_dir), index.url, wheels)
    argv = shlex.split(cuda_command(spec, script_source("garage-cuda")).get_raw_value())
    return spec, subprocess.run(argv, capture_output=True, text=True, timeout=120)


def fact(cls, **kwargs):
    command = cls().command(**kwargs)
    text = command if isinstance(command, str) else command.get_raw_value()
    out = subprocess.run(["sh", "-c", text], capture_output=True, text=True).stdout
    return cls().process(out.splitlines())


def test_installs_links_stamps_and_then_leaves_it_alone(tmp_path, wheel_set):
    folder, wheels = wheel_set
    target = tmp_path / "garage" / "cuda" / "13.0"
    with WheelIndex(folder) as index:
        spec, proc = install(target, index, wheels)
        assert proc.returncode == 0, proc.stderr
        asked = list(index.requests)
        spec, again = install(target, index, wheels)
        assert again.returncode == 0 and "is already installed" in again.stdout
        assert index.requests == asked  # nothing downloaded the second time
    assert sorted(p for p in asked if p.startswith("/files/")) == \
        sorted(f"/files/{w.file}" for w in wheels.wheels)
    assert fact(CudaToolkitStamp, path=spec.stamp_path) == spec.stamp
    found = fact(CudaToolkitAt, nvcc=spec.nvcc)
    assert (found["release"], found["arches"]) == ("13.0.88", ["75", "86"])
    assert any(p.endswith("/lib64/libcublas.so") for p in found["cublas"]), found["cublas"]
    assert os.stat(spec.nvcc).st_mode & 0o777 == 0o755  # executable for everyone, as pip does
    assert os.stat(target / "include" / "cuda_runtime.h").st_mode & 0o777 == 0o644
    for name in ("libcublas.so", "libcublasLt.so", "libcudart.so"):
        assert os.path.realpath(target / "lib64" / name).endswith(f"{name}.13")
    stub = target / "lib64" / "stubs" / "libcuda.so"
    assert stub.exists()  # a link to the driver's library, or an empty stub without one
    lines = (target / "stamp").read_text().splitlines()
    assert lines[1:3] == ["release=13.0.88", f"index={index.url}"]
    assert [ln.split()[1] for ln in lines[3:]] == [w.sha256 for w in wheels.wheels]
    assert sorted(os.listdir(target.parent)) == ["13.0"]  # no temporary folder left


def test_a_wheel_that_is_not_the_pinned_one_changes_nothing(tmp_path, wheel_set):
    folder, wheels = wheel_set
    target = tmp_path / "cuda" / "13.0"
    with WheelIndex(folder) as index:
        good, proc = install(target, index, wheels)
        assert proc.returncode == 0, proc.stderr
        tampered = (*wheels.wheels[:2], Wheel(wheels.wheels[2].project, wheels.wheels[2].file,
                                              "0" * 64))
        other = CudaWheels(wheels.release, wheels.folder, tampered, wheels.arches)
        _, refused = install(target, index, other)
    assert refused.returncode == 1
    assert f"not the pinned {'0' * 64}" in refused.stderr
    assert fact(CudaToolkitStamp, path=good.stamp_path) == good.stamp  # the old one stays
    assert sorted(os.listdir(target.parent)) == ["13.0"]


def test_a_wheel_the_index_does_not_list_and_an_nvcc_of_another_release(tmp_path, wheel_set):
    folder, wheels = wheel_set
    missing = CudaWheels(wheels.release, wheels.folder,
                         (*wheels.wheels, Wheel("nvidia-cuda-cccl", "nvidia_cuda_cccl-13.0.85-"
                                                "py3-none-any.whl", "0" * 64)), wheels.arches)
    other = CudaWheels("13.0.48", wheels.folder, wheels.wheels, wheels.arches)
    with WheelIndex(folder) as index:
        _, unlisted = install(tmp_path / "a" / "13.0", index, missing)
        _, wrong = install(tmp_path / "b" / "13.0", index, other)
    assert unlisted.returncode == 1 and "/nvidia-cuda-cccl/" in unlisted.stderr
    assert wrong.returncode == 1 and "--version does not report 13.0.48" in wrong.stderr
    for run in ("a", "b"):
        assert os.listdir(tmp_path / run) == []  # nothing installed, nothing left
