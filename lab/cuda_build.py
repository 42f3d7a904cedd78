"""Engine builds with the real CUDA compiler on this machine, as a rig would make them: the plan
from facts read here by their own commands, garage-build's own command line, ccache outside
the clone. Used by tests/unit/test_real_cuda_build.py and bench/cuda_bench.py.

The toolkit is CUDA 13.0 from NVIDIA's PyPI wheels (lab.standins.cuda_wheels) with a stub
driver library: objects and static libraries build, executables that call the driver do not
link."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

from lab.standins.cuda_wheels import CudaWheels
from lab.standins.real_llama import GOOD_TAG, RealLlama
from llm_garage.facts.engine import CudaToolkit, GitRemoteRefs
from llm_garage.layout import script_source
from llm_garage.operations.engine import build_command
from llm_garage.plans.engines import BuildPlan
from llm_garage.plans.engines import plan as plan_builds
from llm_garage.settings import load_rig

CCACHE_ENV = "GARAGE_CUDA_CCACHE"
DEFAULT_CCACHE = Path("/var/cache/llm-garage/cuda-ccache")
CUDA_DIR = "ggml/src/ggml-cuda"
DRIVER = "580.95.05"  # no driver here: the answer a rig with a CUDA 13 driver gives


def ccache_dir() -> Path:
    return Path(os.environ.get(CCACHE_ENV) or DEFAULT_CCACHE)


def local_fact(cls, env=None, **kwargs):
    """A fact answered by running its own command here."""
    fact = cls()
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    text = command if isinstance(command, str) else command.get_raw_value()
    out = subprocess.run(["sh", "-c", text], capture_output=True, text=True, env=env,
                         timeout=300).stdout
    return fact.process(out.splitlines())


def toolkit_env(wheels: CudaWheels) -> dict[str, str]:
    return {**os.environ, "PATH": f"{wheels.root / 'bin'}:{os.environ['PATH']}"}


def cuda_plan(garage_root: Path, wheels: CudaWheels, real: RealLlama, *, ref: str = GOOD_TAG,
              ccache: Path | None = None, jobs: int = 2, **engine) -> tuple[BuildPlan, dict]:
    """The plan a rig with an RTX 3090 gets for llama.cpp at `ref` (CUDA, FA_ALL_QUANTS, 86),
    and the toolkit fact it was made from."""
    toolkit = local_fact(CudaToolkit, env=toolkit_env(wheels))
    facts = {"CudaToolkit": toolkit,
             "GitRemoteRefs": local_fact(GitRemoteRefs, remote=str(real.path), ref=ref),
             "NvidiaDriver": {"version": DRIVER, "error": None}, "PinRecords": {}}
    data = {"garage_root": str(garage_root), "engines": {"llama": {
        "kind": "llama.cpp", "ref": ref, "remote": str(real.path),
        "cuda_architectures": [86], "build_jobs": jobs,
        "cmake_extra": {"CUDA_cuda_driver_LIBRARY": str(wheels.libcuda_stub)}, **engine}}}
    rig, errors = load_rig("builder", data)
    if errors:
        raise ValueError(errors)
    (plan,) = plan_builds(rig, lambda cls, **kw: facts[cls.__name__])
    return dataclasses.replace(plan, ccache_dir=str(ccache or ccache_dir())), toolkit


def garage_build(plan: BuildPlan, *options: str, timeout: float = 600,
                 **changes) -> subprocess.CompletedProcess:
    """garage-build with the plan's own command line, `options` added before the cmake flags."""
    if changes:
        plan = dataclasses.replace(plan, **changes)
    argv = shlex.split(build_command(plan, script_source("garage-build")).get_raw_value())
    at = argv.index("--")
    argv[at:at] = list(options)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def ccache_env(plan: BuildPlan, wheels: CudaWheels) -> dict[str, str]:
    """The environment garage-build compiles in."""
    return {**toolkit_env(wheels), "CCACHE_DIR": plan.ccache_dir,
            "CCACHE_BASEDIR": plan.ccache_base, "CCACHE_NOHASHDIR": "1"}


def cuda_objects(build_dir: str) -> set[str]:
    """The CUDA sources the configured build compiles, by make target (no suffix)."""
    out = subprocess.run(["make", "-C", f"{build_dir}/{CUDA_DIR}", "help"],
                         capture_output=True, text=True, check=True).stdout
    targets = {line[4:].strip() for line in out.splitlines() if line.startswith("... ")}
    return {t[:-2] for t in targets if t.endswith(".o")}


def make_objects(plan: BuildPlan, wheels: CudaWheels, names: list[str],
                 timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", f"{plan.build_dir}/{CUDA_DIR}",
                           *[f"{n}.o" for n in names]], capture_output=True, text=True,
                          env=ccache_env(plan, wheels), timeout=timeout)


def object_path(plan: BuildPlan, name: str) -> Path:
    return Path(plan.build_dir, CUDA_DIR, "CMakeFiles", "ggml-cuda.dir", f"{name}.cu.o")


def ccache_hits(plan: BuildPlan, wheels: CudaWheels) -> tuple[int, int]:
    """(hits, misses) since the last `ccache -z` in this cache."""
    stats = subprocess.run(["ccache", "--print-stats"], env=ccache_env(plan, wheels),
                           capture_output=True, text=True).stdout
    counts = dict(line.split("\t")[:2] for line in stats.splitlines() if "\t" in line)
    hits = int(counts.get("direct_cache_hit", 0)) + int(counts.get("preprocessed_cache_hit", 0))
    return hits, int(counts.get("cache_miss", 0))


def zero_stats(plan: BuildPlan, wheels: CudaWheels) -> None:
    subprocess.run(["ccache", "-z"], env=ccache_env(plan, wheels), capture_output=True,
                   check=True)
