"""GPU persistence mode and power limits: set now where they drift, re-applied at every boot."""

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.server import Which

from llm_garage import readahead, units
from llm_garage.facts.gpu import GpuTable
from llm_garage.layout import GPU_POWER_UNIT, unit_path
from llm_garage.operations import gpu, paths, services
from llm_garage.operations.gpu import GpuError, plan_power
from llm_garage.settings import Rig

UNIT_TEMPLATE = str(Path(__file__).resolve().parent.parent / "templates"
                    / "llm-garage-gpu-power.service.j2")


def reads(rig: Rig) -> list:
    """What `converge` reads on the rig while the deploy is prepared."""
    if not rig.data.gpu_count:
        return []
    return [(Which, {"command": "nvidia-modprobe"}), (Which, {"command": "nvidia-smi"}),
            (GpuTable, {})]


@deploy("GPUs")
def converge(rig: Rig) -> None:
    d = rig.data
    nvidia_modprobe = readahead.read(Which, command="nvidia-modprobe") if d.gpu_count else None
    if not units.has_gpu_power_unit(rig, nvidia_modprobe):
        if d.gpu_count == 0:
            host.log("gpus: no NVIDIA GPUs (gpu_count 0), power settings skipped")
        services.unit_absent(name=f"No {GPU_POWER_UNIT}", service=GPU_POWER_UNIT,
                             paths=[unit_path(GPU_POWER_UNIT), rig.layout.gpu_power_unit])
        return

    nvidia_smi = readahead.read(Which, command="nvidia-smi")
    if not nvidia_smi:
        raise GpuError(f"host {rig.name!r}: gpu_count is {d.gpu_count} but nvidia-smi "
                       "is not installed (install the NVIDIA driver first)")
    limits = rig.power_limits()
    # Checked now, while the deploy is prepared: a bad limit or GPU count stops the run before
    # any operation runs on any host (the operation decides again when it runs).
    plan_power(rig.name, d.gpu_count, limits, d.gpu_persistence_mode, readahead.read(GpuTable))
    gpu.power_settings(name="GPU persistence mode and power limits", gpu_count=d.gpu_count,
                       limits=limits, persistence=d.gpu_persistence_mode, nvidia_smi=nvidia_smi)
    paths.text_installed(name=f"Rendered {GPU_POWER_UNIT}", path=rig.layout.gpu_power_unit,
                         text=units.render(UNIT_TEMPLATE, units.gpu_power_unit_context(
                             rig, nvidia_smi, nvidia_modprobe)),
                         user="root", group="root", mode="644")
    services.unit_installed(name=f"Boot unit {GPU_POWER_UNIT}, enabled at boot",
                            source=rig.layout.gpu_power_unit,
                            unit_file=unit_path(GPU_POWER_UNIT), service=GPU_POWER_UNIT)
