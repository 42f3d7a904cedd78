"""The real CUDA compiler on llama.cpp's real tree, with exactly the flags a deploy uses.

The plan is made as on a rig, from facts read here by their own commands (this machine's git,
and CUDA 13.0 from NVIDIA's PyPI wheels, lab.standins.cuda_wheels); garage-build runs the
plan's command line with --configure-only; then a sample of real CUDA objects is compiled in
that build folder: one plain kernel and one flash-attention instance that only
GGML_CUDA_FA_ALL_QUANTS builds. ccache lives outside the clone ($GARAGE_CUDA_CCACHE, default
/var/cache/llm-garage/cuda-ccache), so a rerun takes seconds (36 s cold, 14 s warm here).

Skipped where pip cannot install the wheels or the llama.cpp tree cannot be had."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from lab.cuda_build import (
    CUDA_DIR,
    ccache_hits,
    cuda_objects,
    cuda_plan,
    garage_build,
    make_objects,
    object_path,
    zero_stats,
)
from lab.standins.cuda_wheels import ensure_cuda_wheels
from lab.standins.real_llama import ensure_real_llama

KERNEL = "softmax"
FA_ALL_QUANTS_ONLY = "template-instances/fattn-vec-instance-q4_0-q8_0"

log = logging.getLogger("garage.tests")


@pytest.fixture(scope="module")
def toolchain():
    try:
        return ensure_cuda_wheels(), ensure_real_llama()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"no CUDA wheels or llama.cpp tree here: {error}")


def test_real_nvcc_configures_and_compiles_the_deploys_cuda_objects(tmp_path, toolchain):
    wheels, real = toolchain
    plan, toolkit = cuda_plan(tmp_path / "garage", wheels, real)
    flags = dict(plan.flags)
    assert (flags["GGML_CUDA"], flags["GGML_CUDA_FA_ALL_QUANTS"],
            flags["CMAKE_CUDA_ARCHITECTURES"], flags["LLAMA_USE_PREBUILT_UI"]) == \
        ("ON", "ON", "86", "OFF")
    assert plan.nvcc == f"{wheels.root}/bin/nvcc" and plan.cuda_toolkit == toolkit["release"]
    assert "86" in toolkit["arches"] and f"{wheels.root}/lib/libcublas.so" in toolkit["cublas"]

    started = time.monotonic()
    proc = garage_build(plan, "--configure-only")
    configured = time.monotonic() - started
    build_log = Path(plan.log_path).read_text() if Path(plan.log_path).exists() else ""
    assert proc.returncode == 0, proc.stderr + build_log
    assert "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache" in build_log
    assert f"-DCMAKE_CUDA_COMPILER={plan.nvcc}" in build_log
    assert f"The CUDA compiler identification is NVIDIA {toolkit['release']}" in build_log
    cache = Path(plan.build_dir, "CMakeCache.txt").read_text()
    assert f"CUDA_cublas_LIBRARY:FILEPATH={wheels.root}/lib/libcublas.so" in cache
    cuda_flags = Path(plan.build_dir, CUDA_DIR, "CMakeFiles", "ggml-cuda.dir",
                      "flags.make").read_text()
    assert "--generate-code=arch=compute_86,code=[compute_86,sm_86]" in cuda_flags
    listed = cuda_objects(plan.build_dir)
    assert {KERNEL, FA_ALL_QUANTS_ONLY} <= listed

    zero_stats(plan, wheels)
    started = time.monotonic()
    made = make_objects(plan, wheels, [KERNEL, FA_ALL_QUANTS_ONLY], timeout=900)
    compiled = time.monotonic() - started
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    for name in (KERNEL, FA_ALL_QUANTS_ONLY):
        obj = object_path(plan, name)
        assert obj.is_file() and obj.stat().st_size > 10_000, obj
    hits, misses = ccache_hits(plan, wheels)
    assert hits + misses == 2  # both went through ccache, as the deploy's launchers say
    log.info(f"real nvcc {toolkit['release']}: configure {configured:.1f} s, "
             f"{len(listed)} objects listed in ggml-cuda, {KERNEL} + {FA_ALL_QUANTS_ONLY} "
             f"{compiled:.1f} s (ccache hits {hits}/2)")


def test_without_fa_all_quants_the_mixed_instance_is_not_built(tmp_path, toolchain):
    wheels, real = toolchain
    plan, _ = cuda_plan(tmp_path / "garage", wheels, real, fa_all_quants=False)
    proc = garage_build(plan, "--configure-only")
    assert proc.returncode == 0, proc.stderr
    listed = cuda_objects(plan.build_dir)
    assert KERNEL in listed and FA_ALL_QUANTS_ONLY not in listed
