"""Memory: every enabled profile's memory plan (llm_garage/fit.py) against the memory the rig
really has, while the run is prepared: before any rig changes, before any byte of weights is
fetched.

The plan comes from the GGUF header summaries in the lock (`llm-garage lock` reads them); the
rig's side from the `GpuMemory` and `RigMemory` facts (nvidia-smi's memory.total and
memory.free, what our own services that this deploy replaces hold, /proc/meminfo), the
inventory's gpu_memory_mib where nvidia-smi does not answer. A profile that does not fit stops
the run, naming the device that is short, by how much, and the settings that would fit;
`memory_check: warn` only warns."""

from __future__ import annotations

from pyinfra import host, logger

from llm_garage import fit, readahead
from llm_garage.facts.gpu import GpuMemory
from llm_garage.facts.memory import RigMemory, with_gpus
from llm_garage.plans import models as model_plan
from llm_garage.refusal import Refusal
from llm_garage.settings import Rig


class MemoryPlanError(Refusal):
    """An enabled profile would run out of memory on this rig."""


def reads(rig: Rig) -> list:
    """What `check` reads on the rig (when the lock plans a profile)."""
    return [(RigMemory, {}), (GpuMemory, {})] if rig.enabled_profiles else []


def check(rig: Rig) -> None:
    profiles = [(name, p) for name, p in sorted(rig.profiles.items()) if p.enabled]
    layouts = model_plan.layouts_for(host.state) if profiles else None
    if layouts is None:
        return  # no lock: the models' warning says to lock them (and why)
    missing = sorted({p.model for _, p in profiles if p.model not in layouts})
    if missing:
        logger.warning(f"--> {rig.name}: no memory plan for {', '.join(missing)} (the lock has "
                       "no GGUF header summary for it); `llm-garage lock <inventory>` records "
                       "one")
    checked = [(name, p) for name, p in profiles if p.model in layouts]
    if not checked:
        return
    memory = with_gpus(readahead.read(RigMemory), readahead.read(GpuMemory))
    refusals = []
    for name, p in checked:
        layout = layouts[p.model]
        opts = fit.options_for(rig, name, memory)
        plan = fit.plan(layout, opts)
        if not plan.overfull():
            continue
        line = fit.refusal(rig.name, name, plan, layout, opts)
        table = "\n".join("      " + row for row in fit.table(plan))
        if p.memory_check == "warn":
            logger.warning(f"--> {line} (memory_check: warn: deploying anyway)\n{table}")
        else:
            refusals.append(f"{line}\n{table}")
    if refusals:
        raise MemoryPlanError(
            f"host {rig.name}: {len(refusals)} profile(s) would run out of memory; nothing "
            "was changed on any host and no model file was downloaded (set memory_check: "
            "warn to deploy anyway):\n" + "\n".join(f"  - {r}" for r in refusals))
