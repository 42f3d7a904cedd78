"""The real CUDA toolkit on a test rig: `cuda_toolkit: "13.0"` installed by the deploy from
NVIDIA's wheels (served by a stand-in package index on the fleet's bridge, the same pinned
files as on PyPI), then llama.cpp's real tree configured with exactly the deploy's flags and a
sample of real CUDA objects compiled by that nvcc: one plain kernel and one flash-attention
instance that only GGML_CUDA_FA_ALL_QUANTS builds.

Not the whole llama-server (30 to 60 minutes on 2 cores): lab/deploys/cuda_sample.py runs the
deploy's own steps up to the builds, then garage-build --configure-only and make of the
sample objects. The rig's ccache lives on the host (``lab.rigs.ccache_binds``), so reruns
compile from the cache; the wheels come from lab.standins.cuda_wheels' cache (downloaded once
per machine)."""

from __future__ import annotations

import logging
import time

import pytest

import lab.rigs
from lab.serving import controller_env
from lab.standins.cuda_wheels import wheel_files
from lab.standins.engine_repo import GitDaemon
from lab.standins.gpu import fake_gpu_files
from lab.standins.real_llama import ensure_real_llama
from lab.standins.wheel_index import WheelIndex
from llm_garage.plans.engines import CUDA_WHEELS, CudaInstall
from llm_garage.settings import flags_hash, load_rig

pytestmark = pytest.mark.e2e

log = logging.getLogger("garage.tests")

TOOLKIT = "/opt/llm-garage/cuda/13.0"
KERNEL = "softmax"
FA_ALL_QUANTS_ONLY = "template-instances/fattn-vec-instance-q4_0-q8_0"
CUDA_DIR = "ggml/src/ggml-cuda"


@pytest.fixture(scope="module")
def sources():
    try:
        return wheel_files(), ensure_real_llama()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"no CUDA wheels or llama.cpp tree here: {error}")


def test_the_pinned_toolkit_is_installed_and_compiles_the_deploys_cuda_objects(
        start_rigs, write_inventory, converge, sources, tmp_path):
    wheels, real = sources
    (rig,) = start_rigs("rig1", binds=lab.rigs.ccache_binds("real-cuda-13.0"))
    for path, (content, mode) in fake_gpu_files("rtx3090", 1,
                                                driver_version="580.95.05").items():
        rig.put_text(content.decode(), path, mode)
    with GitDaemon(real.base, bind_ip=rig.fleet.host_ip) as daemon, \
            WheelIndex(wheels, bind=rig.fleet.host_ip) as index:
        data = {"gpu_count": 1, "cuda_wheel_index": index.url,
                "engines": {"llama": {"kind": "llama.cpp", "ref": real.good_tag,
                                      "remote": f"{daemon.url}/llama.cpp.git",
                                      "cuda_toolkit": "13.0",
                                      "cmake_extra": {"LLAMA_CURL": "OFF"}}}}
        inventory = write_inventory({"rig1": data})
        env = controller_env(tmp_path, GARAGE_CUDA_SAMPLE_OBJECTS=f"{KERNEL}.o "
                                                                 f"{FA_ALL_QUANTS_ONLY}.o")
        started = time.monotonic()
        # The gate runs it twice: the second run finds the toolkit installed (and downloads
        # nothing), the build folder configured and the objects compiled.
        first, _second = converge(inventory, "lab/deploys/cuda_sample.py", env=env)
        took = time.monotonic() - started
        files_asked = [p for p in index.requests if p.startswith("/files/")]

    pinned = CUDA_WHEELS["13.0"]
    assert sorted(files_asked) == sorted(f"/files/{w.file}" for w in pinned.wheels)
    (install_op,) = [op for op in first.changes()["rig1"] if op.startswith("Install CUDA 13.0")]
    stamp = rig.ssh(f"cat {TOOLKIT}/stamp").stdout.splitlines()
    assert stamp[0] == CudaInstall("13.0", TOOLKIT, index.url, pinned).stamp
    assert rig.ssh("ls -A /opt/llm-garage/cuda").stdout.split() == ["13.0"]  # no temp left
    assert "V13.0.88" in rig.ssh(f"{TOOLKIT}/bin/nvcc --version").stdout

    # The build folder is the deploy's: its key holds the flags and the toolkit's version.
    rig_settings, errors = load_rig("rig1", data)
    assert errors == []
    flags = rig_settings.engines["llama"].cmake_flags(["86"])
    (key,) = rig.ssh("ls /opt/llm-garage/builds/llama").stdout.split()
    assert key == f"{real.good_commit[:12]}-{flags_hash(flags, '13.0.88')}"
    build = f"/opt/llm-garage/builds/llama/{key}"
    build_log = rig.ssh(f"cat {build}/build.log").stdout
    for flag in ("-DGGML_CUDA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=ON",
                 "-DCMAKE_CUDA_ARCHITECTURES=86", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 f"-DCMAKE_CUDA_COMPILER={TOOLKIT}/bin/nvcc",
                 "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"):
        assert flag in build_log, flag
    assert "The CUDA compiler identification is NVIDIA 13.0.88" in build_log
    cache = rig.ssh(f"cat {build}/CMakeCache.txt").stdout
    assert f"CUDA_cublas_LIBRARY:FILEPATH={TOOLKIT}/lib64/libcublas.so" in cache
    assert f"CUDA_cuda_driver_LIBRARY:FILEPATH={TOOLKIT}/lib64/stubs/libcuda.so" in cache

    # Each sample object: compiled by the installed nvcc, through ccache, with the deploy's
    # architecture and FA_ALL_QUANTS.
    sample = rig.ssh(f"cat {build}/sample.log").stdout
    for name in (KERNEL, FA_ALL_QUANTS_ONLY):
        (line,) = [ln for ln in sample.splitlines() if f"/{name}.cu.o" in ln and " -c " in ln]
        assert f"ccache {TOOLKIT}/bin/nvcc" in line, line
        assert "--generate-code=arch=compute_86,code=[compute_86,sm_86]" in line, line
        # FA_ALL_QUANTS turns on every K/V type pair: q4_0 K with q8_0 V is one of them
        assert "-DGGML_CUDA_FA_Q4_0_Q8_0=1" in line, line
        size = rig.ssh(f"stat -c %s {build}/{CUDA_DIR}/CMakeFiles/ggml-cuda.dir/{name}.cu.o")
        assert int(size.stdout) > 10_000
    log.info("real CUDA 13.0 on a rig: install, configure and 2 objects, then a no-op run: "
             "%.0f s (%s)", took, install_op)
