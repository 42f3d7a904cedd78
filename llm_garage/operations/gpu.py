"""GPU persistence mode and power limits, set only where the driver's state differs."""

from __future__ import annotations

import dataclasses

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation

from llm_garage import readahead
from llm_garage.facts.gpu import Gpu, GpuTable
from llm_garage.readahead import reads_ahead
from llm_garage.refusal import Refusal

# nvidia-smi reports limits to the hundredth of a watt, and some drivers round what they were
# given; a limit this close to the wanted one is not drift.
WATTS_TOLERANCE = 0.5


class GpuError(Refusal):
    """The rig's GPUs cannot take the configured settings; raised before anything is set."""


@dataclasses.dataclass(frozen=True)
class PowerChange:
    """One nvidia-smi call: `index` None = every GPU; `what` is "pm" or "pl"."""

    what: str
    index: int | None
    value: str
    note: str


def plan_power(host_name: str, gpu_count: int, limits: list[float] | None, persistence: bool,
               table: list[Gpu] | None) -> list[PowerChange]:
    """What to change so that the GPUs match the settings, or GpuError naming the host,
    the GPU index and the allowed range. Checks every GPU before proposing any change."""
    if table is None:
        raise GpuError(
            f"host {host_name!r}: gpu_count is {gpu_count} but nvidia-smi is missing or does "
            "not answer --query-gpu (is the NVIDIA driver installed?)")
    if len(table) != gpu_count:
        found = ", ".join(f"{g.index}: {g.name}" for g in table) or "none"
        raise GpuError(
            f"host {host_name!r}: gpu_count is {gpu_count} but nvidia-smi lists {len(table)} "
            f"GPU(s) ({found}); set gpu_count to what the rig has")
    problems = []
    for gpu, want in zip(table, limits or [], strict=False):
        if gpu.min_limit_w is None or gpu.max_limit_w is None:
            problems.append(f"GPU {gpu.index} ({gpu.name}) does not report its power limit "
                            f"range, so gpu_power_limit_w {want:g} W cannot be checked or set")
        elif not gpu.min_limit_w <= want <= gpu.max_limit_w:
            problems.append(f"GPU {gpu.index} ({gpu.name}): gpu_power_limit_w {want:g} W is "
                            f"outside the allowed range {gpu.min_limit_w:g}-"
                            f"{gpu.max_limit_w:g} W")
    if problems:
        raise GpuError(f"host {host_name!r}: " + "; ".join(problems)
                               + ". Nothing was set.")

    changes = []
    if persistence:
        off = [g.index for g in table if g.persistence_mode is not True]
        if off:
            changes.append(PowerChange(
                "pm", None, "1",
                "persistence mode off on GPU " + ", ".join(str(i) for i in off) + ", turning on"))
    for gpu, want in zip(table, limits or [], strict=False):
        current = gpu.power_limit_w
        if current is not None and abs(current - want) < WATTS_TOLERANCE:
            continue
        was = f"{current:g} W" if current is not None else "unknown"
        changes.append(PowerChange("pl", gpu.index, f"{want:g}",
                                   f"GPU {gpu.index} power limit {was}, setting {want:g} W"))
    return changes


@reads_ahead(lambda **_: [(GpuTable, {})])
@operation()
def power_settings(gpu_count: int, limits: list[float] | None = None, persistence: bool = True,
                   nvidia_smi: str = "nvidia-smi"):
    """
    Turn on persistence mode and set each GPU's power limit, only where they differ.

    + gpu_count: how many GPUs the rig must have (a different count is an error)
    + limits: watts per GPU index; None leaves the limits alone
    + persistence: turn persistence mode on (False leaves it alone)
    + nvidia_smi: path of nvidia-smi on the rig

    Every limit is checked against the GPU's own min and max before anything is set; a
    limit outside them raises GpuError (``tasks/gpus.py`` checks the same while the
    deploy is prepared, so that a run with ``-y`` stops before any host changes). Each
    correction is reported as drift.

    **Example:**

    .. code:: python

        gpu.power_settings(name="GPU power", gpu_count=6, limits=[350.0] * 6)
    """
    table = readahead.read(GpuTable)
    try:
        changes = plan_power(host.name, gpu_count, limits, persistence, table)
    except GpuError as e:
        if not host.state.is_executing:
            raise  # while preparing: stop the run before anything is set anywhere
        yield StringCommand("echo", QuoteString(str(e)), ">&2;", "exit", "1")
        return
    if not changes:
        host.noop("GPU persistence mode and power limits already as configured")
        return
    for change in changes:
        host.log(f"drift: {change.note}")
    for change in changes:
        if change.what == "pm":
            yield StringCommand(nvidia_smi, "-pm", change.value)
        else:
            yield StringCommand(nvidia_smi, "-i", str(change.index), "-pl", change.value)
