"""The real CUDA compiler on llama.cpp's real tree, with exactly the flags a deploy uses.

The plan is made as on a rig, from facts read here by their own commands (this machine's git,
and CUDA 13.0 from NVIDIA's PyPI wheels, lab.standins.cuda_wheels); garage-build runs the
plan's command line with --configure-only; then a sample of real CUDA objects is compiled in
that build folder: one plain kernel and one flash-attention instance that only
GGML_CUDA_FA_ALL_QUANTS builds. ccache lives outside the clone ($GARAGE_CUDA_CCACHE, default
/var/cache/llm-garage/cuda-ccache), so a rerun takes seconds. The driver library is a stub:
objects compile, nothing links against the driver.

Skipped where pip cannot install the wheels or the llama.cpp tree cannot be had."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from lab.standins.cuda_wheels import ensure_cuda_wheels
from lab.standins.real_llama import GOOD_TAG, ensure_real_llama
from llm_garage.facts.engine import CudaToolkit, GitRemoteRefs
from llm_garage.layout import script_source
from llm_garage.operations.engine import build_command
from llm_garage.plans.engines import plan as plan_builds
from llm_garage.settings import load_rig

CCACHE_ENV = "GARAGE_CUDA_CCACHE"
CUDA_DIR = "ggml/src/ggml-cuda"
# Make targets of the Makefile generator; each compiles CMakeFiles/ggml-cuda.dir/<name>.cu.o.
KERNEL = "softmax"
FA_ALL_QUANTS_ONLY = "template-instances/fattn-vec-instance-q4_0-q8_0"

log = logging.getLogger("garage.tests")


def local_fact(cls, env=None, **kwargs):
    """A fact answered by running its own command here."""
    fact = cls()
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    text = command if isinstance(command, str) else command.get_raw_value()
    out = subprocess.run(["sh", "-c", text], capture_output=True, text=True, env=env,
                         timeout=300).stdout
    return fact.process(out.splitlines())


@pytest.fixture(scope="module")
def toolchain():
    try:
        wheels = ensure_cuda_wheels()
        real = ensure_real_llama()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"no CUDA wheels or llama.cpp tree here: {error}")
    return wheels, real


def plan_for(tmp_path: Path, wheels, real, **engine):
    env = {**os.environ, "PATH": f"{wheels.root / 'bin'}:{os.environ['PATH']}"}
    toolkit = local_fact(CudaToolkit, env=env)
    facts = {"CudaToolkit": toolkit,
             "GitRemoteRefs": local_fact(GitRemoteRefs, remote=str(real.path), ref=GOOD_TAG),
             "NvidiaDriver": {"version": "580.95.05", "error": None},  # no driver here
             "PinRecords": {}, "Cpus": 2}
    data = {"garage_root": str(tmp_path / "garage"), "engines": {"llama": {
        "kind": "llama.cpp", "ref": GOOD_TAG, "remote": str(real.path),
        "cuda_architectures": [86],
        "cmake_extra": {"CUDA_cuda_driver_LIBRARY": str(wheels.libcuda_stub)}, **engine}}}
    rig, errors = load_rig("builder", data)
    assert errors == []
    (plan,) = plan_builds(rig, lambda cls, **kw: facts[cls.__name__])
    ccache = Path(os.environ.get(CCACHE_ENV) or "/var/cache/llm-garage/cuda-ccache")
    return dataclasses.replace(plan, ccache_dir=str(ccache)), toolkit


def configure(plan) -> subprocess.CompletedProcess:
    argv = shlex.split(build_command(plan, script_source("garage-build")).get_raw_value())
    argv.insert(argv.index("--"), "--configure-only")
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def objects(build_dir: str) -> set[str]:
    """The CUDA sources the configured build compiles, by make target (no suffix)."""
    out = subprocess.run(["make", "-C", f"{build_dir}/{CUDA_DIR}", "help"],
                         capture_output=True, text=True, check=True).stdout
    targets = {line[4:].strip() for line in out.splitlines() if line.startswith("... ")}
    return {t[:-2] for t in targets if t.endswith(".o")}


def test_real_nvcc_configures_and_compiles_the_deploys_cuda_objects(tmp_path, toolchain):
    wheels, real = toolchain
    plan, toolkit = plan_for(tmp_path, wheels, real)
    flags = dict(plan.flags)
    assert (flags["GGML_CUDA"], flags["GGML_CUDA_FA_ALL_QUANTS"],
            flags["CMAKE_CUDA_ARCHITECTURES"], flags["LLAMA_USE_PREBUILT_UI"]) == \
        ("ON", "ON", "86", "OFF")
    assert plan.nvcc == f"{wheels.root}/bin/nvcc" and plan.cuda_toolkit == toolkit["release"]
    assert "86" in toolkit["arches"] and f"{wheels.root}/lib/libcublas.so" in toolkit["cublas"]

    started = time.monotonic()
    proc = configure(plan)
    configured = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr + (Path(plan.log_path).read_text()
                                                if Path(plan.log_path).exists() else "")
    build_log = Path(plan.log_path).read_text()
    assert "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache" in build_log
    assert f"-DCMAKE_CUDA_COMPILER={plan.nvcc}" in build_log
    assert f"The CUDA compiler identification is NVIDIA {toolkit['release']}" in build_log
    cache = Path(plan.build_dir, "CMakeCache.txt").read_text()
    cuda_flags = Path(plan.build_dir, CUDA_DIR, "CMakeFiles", "ggml-cuda.dir",
                      "flags.make").read_text()
    assert "--generate-code=arch=compute_86,code=[compute_86,sm_86]" in cuda_flags
    assert f"CUDA_cublas_LIBRARY:FILEPATH={wheels.root}/lib/libcublas.so" in cache
    listed = objects(plan.build_dir)
    assert {KERNEL, FA_ALL_QUANTS_ONLY} <= listed

    env = {**os.environ, "CCACHE_DIR": plan.ccache_dir, "CCACHE_BASEDIR": plan.ccache_base,
           "CCACHE_NOHASHDIR": "1", "PATH": f"{wheels.root / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["ccache", "-z"], env=env, capture_output=True, check=True)
    started = time.monotonic()
    made = subprocess.run(["make", "-C", f"{plan.build_dir}/{CUDA_DIR}", f"{KERNEL}.o",
                           f"{FA_ALL_QUANTS_ONLY}.o"], capture_output=True, text=True, env=env,
                          timeout=900)
    compiled = time.monotonic() - started
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    for name in (KERNEL, FA_ALL_QUANTS_ONLY):
        obj = Path(plan.build_dir, CUDA_DIR, "CMakeFiles", "ggml-cuda.dir", f"{name}.cu.o")
        assert obj.is_file() and obj.stat().st_size > 10_000, obj
    stats = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True,
                           text=True).stdout
    counts = dict(line.split("\t")[:2] for line in stats.splitlines() if "\t" in line)
    hits = int(counts.get("direct_cache_hit", 0)) + int(counts.get("preprocessed_cache_hit", 0))
    log.info(f"real nvcc {toolkit['release']}: configure {configured:.1f} s, "
             f"{len(listed)} objects listed in ggml-cuda, {KERNEL} + {FA_ALL_QUANTS_ONLY} "
             f"{compiled:.1f} s (ccache hits {hits}/2)")


def test_without_fa_all_quants_the_mixed_instance_is_not_built(tmp_path, toolchain):
    wheels, real = toolchain
    plan, _ = plan_for(tmp_path, wheels, real, fa_all_quants=False)
    proc = configure(plan)
    assert proc.returncode == 0, proc.stderr
    listed = objects(plan.build_dir)
    assert KERNEL in listed and FA_ALL_QUANTS_ONLY not in listed
