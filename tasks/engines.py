"""Engines: llama.cpp / ik_llama.cpp built from their pins for the rig's GPUs, one folder per
(commit, flags), served through a `current` link that switches only to a verified build.

Pins, the CUDA toolkit and the GPUs are checked on the rig while the run is prepared: a tag
that does not exist or moved, a branch given as a pin, a missing or too old CUDA toolkit stop
the run before any operation executes, with the host, the engine and the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.hardware import Cpus
from pyinfra.operations import apt, files

import llm_garage
from llm_garage.facts.engine import (
    CudaToolkit,
    EngineError,
    GitRemoteRefs,
    GpuComputeCaps,
    PinRecords,
    architectures_from_caps,
    cuda_too_old,
    resolve_ref,
)
from llm_garage.operations import engine as ops
from llm_garage.operations.engine import BuildPlan
from llm_garage.settings import Engine, Rig, flags_hash

BUILD_PACKAGES = ["build-essential", "cmake", "git", "ccache", "libssl-dev"]
BUILD_SCRIPT = Path(llm_garage.__file__).parent / "files" / "garage-build"
CUDA_INSTALL_HINT = (
    "install the CUDA toolkit (NVIDIA's cuda-toolkit-12-8 or newer package, which puts nvcc in "
    "/usr/local/cuda/bin; or Debian's nvidia-cuda-toolkit)"
)

GetFact = Callable[..., Any]


def pins_path(rig: Rig) -> str:
    """Record of the commit each tag resolved to on this rig."""
    return f"{rig.state_dir}/engine-pins"


def script_path(rig: Rig) -> str:
    return f"{rig.data.garage_root}/bin/garage-build"


def fetch_specs(engine: Engine, commit: str) -> tuple[str, ...]:
    """What to fetch, in order, to bring `commit` into the source folder."""
    if engine.pinned_commit:
        return (commit, "+refs/heads/*:refs/remotes/origin/*")
    if engine.follow:
        return (f"+refs/heads/{engine.ref}:refs/remotes/origin/{engine.ref}", commit)
    return (f"+refs/tags/{engine.ref}:refs/tags/{engine.ref}", commit)


def _resolve_commit(rig: Rig, engine: Engine, get_fact: GetFact, problem) -> str | None:
    if engine.pinned_commit:
        return engine.pinned_commit
    remote = engine.git_remote
    info = get_fact(GitRemoteRefs, remote=remote, ref=engine.ref)
    if info is None:
        problem("git is not installed on the rig, so the pin cannot be resolved",
                "install git (apt-get install git) and run again")
        return None
    if info["error"]:
        problem(f"cannot read {remote}: {info['error']}",
                "check the remote setting and that the rig reaches it")
        return None
    kind, commit = resolve_ref(info["refs"], engine.ref)
    if engine.follow:
        if kind != "branch":
            what = "a tag" if kind == "tag" else "not a branch"
            problem(f"follow: true but {engine.ref!r} is {what} on {remote}",
                    "a branch name with follow: true, or a tag / commit SHA with follow: false")
            return None
        return commit
    if kind == "missing":
        problem(f"no tag {engine.ref!r} on {remote}",
                f"pin an existing tag (git ls-remote --tags {remote}) or a full commit SHA")
        return None
    if kind == "branch":
        problem(f"{engine.ref!r} is a branch on {remote}, not a pin",
                "pin a tag or a full commit SHA, or set follow: true to track the branch")
        return None
    recorded = get_fact(PinRecords, path=pins_path(rig)).get((remote, engine.ref))
    if recorded and recorded != commit:
        problem(f"tag {engine.ref!r} on {remote} now points at {commit}, but this rig recorded "
                f"{recorded} for it: the tag moved",
                f"pin the commit you want by its SHA; to accept the moved tag, delete its line "
                f"from {pins_path(rig)} on the rig")
        return None
    return commit


def _architectures(engine: Engine, get_fact: GetFact, problem) -> list[str] | None:
    if engine.cuda_architectures != "auto":
        return list(engine.cuda_architectures)
    gpus = get_fact(GpuComputeCaps)
    if gpus is None:
        problem("cuda_architectures 'auto' needs nvidia-smi, which is not installed",
                "install the NVIDIA driver, or list the architectures (e.g. [86])")
        return None
    if gpus["error"]:
        problem(f"nvidia-smi failed: {gpus['error']}",
                "fix the NVIDIA driver, or list the architectures (e.g. [86])")
        return None
    if not gpus["caps"]:
        problem("nvidia-smi lists no GPUs for cuda_architectures 'auto'",
                "list the architectures (e.g. [86]), or cuda: false")
        return None
    try:
        return architectures_from_caps(gpus["caps"])
    except ValueError as e:
        problem(f"{e}, so 'auto' cannot derive the architectures",
                "list the architectures (e.g. [86])")
        return None


def plan_builds(rig: Rig, get_fact: GetFact) -> list[BuildPlan]:
    """One BuildPlan per engine, from facts read on the rig; raises EngineError listing every
    problem of this rig (nothing has run yet when it does)."""
    problems: list[str] = []
    plans = []
    toolkit: dict | None = None
    for name, engine in sorted(rig.engines.items()):
        found = len(problems)

        def problem(what, fix, name=name, engine=engine):
            problems.append(f"engines.{name} (ref {engine.ref!r}): {what}. Fix: {fix}.")

        commit = _resolve_commit(rig, engine, get_fact, problem)
        arches: list[str] | None = None
        if engine.cuda:
            toolkit = toolkit or get_fact(CudaToolkit)
            if toolkit is None:
                problem("GGML_CUDA=ON needs nvcc, found neither in PATH nor in "
                        "/usr/local/cuda/bin", f"{CUDA_INSTALL_HINT}, or set cuda: false")
            arches = _architectures(engine, get_fact, problem)
            if toolkit and arches:
                version = toolkit["version"]
                if version is None:
                    problem(f"cannot read the CUDA version from {toolkit['nvcc']} --version",
                            CUDA_INSTALL_HINT)
                else:
                    for arch, need in cuda_too_old(arches, version):
                        problem(f"architecture {arch} needs CUDA >= {need}, but "
                                f"{toolkit['nvcc']} is CUDA {version[0]}.{version[1]}",
                                f"install CUDA {need} or newer, or drop {arch}")
        if len(problems) > found or commit is None:
            continue
        jobs = engine.build_jobs if isinstance(engine.build_jobs, int) else get_fact(Cpus) or 1
        flags = engine.cmake_flags(arches)
        targets = ("llama-server", "rpc-server") if engine.rpc else ("llama-server",)
        plans.append(BuildPlan(
            engine=name, kind=engine.kind, ref=engine.ref, commit=commit,
            remote=engine.git_remote, fetch=fetch_specs(engine, commit),
            source_dir=rig.engine_source_dir(name), builds_dir=rig.engine_builds_dir(name),
            flags=tuple(flags.items()), flags_hash=flags_hash(flags),
            architectures=tuple(arches or ()), jobs=int(jobs), ccache_dir=rig.ccache_dir,
            ccache_base=rig.data.garage_root, nvcc=toolkit["nvcc"] if engine.cuda else None,
            targets=targets,
        ))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EngineError(f"host {rig.name}: {len(problems)} engine problem(s); nothing was "
                          f"changed on any host:\n{lines}")
    return plans


@deploy("Engines")
def converge(rig: Rig) -> dict[str, list[OperationMeta]]:
    """Build every engine of the rig at its pin and switch its `current` link to that build.

    Returns, per engine name, the operations whose change means its `current` build switched
    this run (services running that engine restart when any of them changed)."""
    if not rig.engines:
        return {}
    plans = plan_builds(rig, host.get_fact)

    apt.packages(name="Install build tools", packages=BUILD_PACKAGES)
    root = rig.data.garage_root
    for path in (f"{root}/bin", f"{root}/src", f"{root}/builds", rig.ccache_dir):
        files.directory(name=f"Ensure {path}", path=path, user="root", group="root", mode="755")
    files.put(name="Install the build script", src=str(BUILD_SCRIPT), dest=script_path(rig),
              add_deploy_dir=False, user="root", group="root", mode="755")

    switched: dict[str, list[OperationMeta]] = {}
    for plan in plans:
        if plan.ref != plan.commit and not rig.engines[plan.engine].follow:
            ops.record_pin(name=f"Record {plan.engine} tag {plan.ref}", path=pins_path(rig),
                           remote=plan.remote, tag=plan.ref, commit=plan.commit)
        ops.build(name=f"Build {plan.engine} {plan.ref} ({plan.key})", plan=plan,
                  script=script_path(rig))
        switch = ops.switch(name=f"Switch {plan.engine} to {plan.key}",
                            builds_dir=plan.builds_dir, key=plan.key)
        ops.prune(name=f"Prune old {plan.engine} builds", builds_dir=plan.builds_dir,
                  keep=rig.engines[plan.engine].keep_builds, wanted=plan.key)
        switched[plan.engine] = [switch]
    return switched
