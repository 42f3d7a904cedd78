"""Engines: llama.cpp / ik_llama.cpp built from their pins for the rig's GPUs, one folder per
(commit, flags). The plan (pins, CUDA checks, flags) is made in llm_garage/plans/engines.py.

Units name the build they run; an engine's `current` link moves to a new build only once
every service using it has proven it (`switch_proven`, after the services)."""

from __future__ import annotations

from collections.abc import Mapping

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from llm_garage import readahead
from llm_garage.operations import engine as ops
from llm_garage.operations import packages, paths
from llm_garage.plans import engines as engine_plan
from llm_garage.plans.engines import BuildPlan
from llm_garage.settings import Rig

BUILD_PACKAGES = ["build-essential", "cmake", "git", "ccache", "libssl-dev"]


@deploy("Engines")
def converge(rig: Rig) -> tuple[dict[str, BuildPlan], dict[str, list[OperationMeta]]]:
    """Build every engine of the rig at its pin. Returns the plans (name -> BuildPlan) and,
    per engine, the operations whose change means a build changed this run."""
    if not rig.engines:
        return {}, {}
    plans = prepare(rig)
    layout = rig.layout
    built: dict[str, list[OperationMeta]] = {}
    for plan in plans:
        if plan.records_tag:
            ops.record_pin(name=f"Record {plan.engine} tag {plan.ref}", path=layout.engine_pins,
                           remote=plan.remote, tag=plan.ref, commit=plan.commit)
        built[plan.engine] = [ops.build(name=f"Build {plan.engine} {plan.ref} ({plan.key})",
                                        plan=plan, script=layout.script("garage-build"))]
        ops.prune(name=f"Prune old {plan.engine} builds", builds_dir=plan.builds_dir,
                  keep=plan.keep_builds, wanted=plan.key)
    return {plan.engine: plan for plan in plans}, built


def prepare(rig: Rig) -> list[BuildPlan]:
    """The plan (every check made), then what every build needs: the build tools, the
    folders and each pinned CUDA toolkit, installed once for all the engines using it."""
    plans = engine_plan.plan(rig, readahead.read)
    layout = rig.layout
    packages.installed(name="Install build tools", packages=BUILD_PACKAGES)
    paths.folders(name="Ensure " + ", ".join(layout.engine_dirs), paths=layout.engine_dirs,
                  user="root", group="root", mode="755")
    installs = {plan.cuda_install.pin: plan.cuda_install for plan in plans if plan.cuda_install}
    for pin, install in sorted(installs.items()):
        ops.cuda_toolkit(name=f"Install CUDA {pin} ({install.wheels.release}) into "
                              f"{install.toolkit_dir}", install=install,
                         script=layout.script("garage-cuda"))
    return plans


def reads(rig: Rig) -> list:
    """What the engines' plan reads on the rig while the deploy is prepared."""
    return engine_plan.reads(rig)


@deploy("Engines proven")
def switch_proven(rig: Rig, plans: Mapping[str, BuildPlan],
                  proofs: Mapping[str, list[OperationMeta]]) -> None:
    """Point each engine's `current` at its new build once every service running it passed
    its proof in this run (`proofs`: engine -> those services' operations)."""
    for name, plan in sorted(plans.items()):
        checks = proofs.get(name, [])
        ops.switch(name=f"Switch {name} to {plan.key}", builds_dir=plan.builds_dir,
                   key=plan.key,
                   _if=lambda checks=checks: not any(op.did_error() for op in checks))
