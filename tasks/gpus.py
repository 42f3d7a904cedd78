"""GPU persistence mode and power limits: set now where they drift, re-applied at every boot."""

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.server import Which
from pyinfra.operations import files

from llm_garage import units
from llm_garage.facts.gpu import GpuTable
from llm_garage.layout import GPU_POWER_UNIT, unit_path
from llm_garage.operations import gpu, services
from llm_garage.operations.gpu import GpuError, plan_power
from llm_garage.settings import Rig

UNIT_TEMPLATE = str(Path(__file__).resolve().parent.parent / "templates"
                    / "llm-garage-gpu-power.service.j2")


@deploy("GPUs")
def converge(rig: Rig) -> None:
    d = rig.data
    nvidia_modprobe = host.get_fact(Which, command="nvidia-modprobe") if d.gpu_count else None
    if not units.has_gpu_power_unit(rig, nvidia_modprobe):
        if d.gpu_count == 0:
            host.log("gpus: no NVIDIA GPUs (gpu_count 0), power settings skipped")
        services.unit_absent(name=f"No {GPU_POWER_UNIT}", service=GPU_POWER_UNIT,
                             paths=[unit_path(GPU_POWER_UNIT), rig.layout.gpu_power_unit])
        return

    nvidia_smi = host.get_fact(Which, command="nvidia-smi")
    if not nvidia_smi:
        raise GpuError(f"host {rig.name!r}: gpu_count is {d.gpu_count} but nvidia-smi "
                       "is not installed (install the NVIDIA driver first)")
    limits = rig.power_limits()
    # Checked now, while the deploy is prepared: a bad limit or GPU count stops the run before
    # any operation runs on any host (the operation decides again when it runs).
    plan_power(rig.name, d.gpu_count, limits, d.gpu_persistence_mode, host.get_fact(GpuTable))
    gpu.power_settings(name="GPU persistence mode and power limits", gpu_count=d.gpu_count,
                       limits=limits, persistence=d.gpu_persistence_mode, nvidia_smi=nvidia_smi)
    files.template(name=f"Rendered {GPU_POWER_UNIT}", src=UNIT_TEMPLATE,
                   dest=rig.layout.gpu_power_unit, user="root", group="root", mode="644",
                   create_remote_dir=False,
                   jinja_env_kwargs=dict(units.TEMPLATE_OPTIONS),
                   unit=units.gpu_power_unit_context(rig, nvidia_smi, nvidia_modprobe))
    services.unit_installed(name=f"Boot unit {GPU_POWER_UNIT}, enabled at boot",
                            source=rig.layout.gpu_power_unit,
                            unit_file=unit_path(GPU_POWER_UNIT), service=GPU_POWER_UNIT)
