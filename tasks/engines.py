"""Engines: llama.cpp / ik_llama.cpp built from their pins for the rig's GPUs, one folder per
(commit, flags), served through a `current` link that switches only to a verified build.
The plan (pins, CUDA checks, flags) is made in llm_garage/plans/engines.py."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import apt, files

from llm_garage.operations import engine as ops
from llm_garage.plans import engines as engine_plan
from llm_garage.settings import Rig

BUILD_PACKAGES = ["build-essential", "cmake", "git", "ccache", "libssl-dev"]


@deploy("Engines")
def converge(rig: Rig) -> dict[str, list[OperationMeta]]:
    """Build every engine of the rig at its pin and switch its `current` link to that build.

    Returns, per engine name, the operations whose change means its `current` build switched
    this run (services running that engine restart when any of them changed)."""
    if not rig.engines:
        return {}
    plans = engine_plan.plan(rig, host.get_fact)
    layout = rig.layout
    apt.packages(name="Install build tools", packages=BUILD_PACKAGES)
    for path in layout.engine_dirs:
        files.directory(name=f"Ensure {path}", path=path, user="root", group="root", mode="755")
    switched: dict[str, list[OperationMeta]] = {}
    for plan in plans:
        if plan.records_tag:
            ops.record_pin(name=f"Record {plan.engine} tag {plan.ref}", path=layout.engine_pins,
                           remote=plan.remote, tag=plan.ref, commit=plan.commit)
        ops.build(name=f"Build {plan.engine} {plan.ref} ({plan.key})", plan=plan,
                  script=layout.script("garage-build"))
        switch = ops.switch(name=f"Switch {plan.engine} to {plan.key}",
                            builds_dir=plan.builds_dir, key=plan.key)
        ops.prune(name=f"Prune old {plan.engine} builds", builds_dir=plan.builds_dir,
                  keep=plan.keep_builds, wanted=plan.key)
        switched[plan.engine] = [switch]
    return switched
