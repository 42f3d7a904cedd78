"""Facts about a rig's NVIDIA GPUs, all read with nvidia-smi: the power table that power
limits are checked against, and the compute capabilities `cuda_architectures: auto` builds for.

Both are None when nvidia-smi is not installed. The power table fails the fact when nvidia-smi
fails (it is read at execute time, where that is the right answer); the compute capabilities
report nvidia-smi's message instead, so that planning can say what to fix."""

from __future__ import annotations

import dataclasses
import re

from pyinfra.api import FactBase

from . import split_exit

QUERY_FIELDS = ("index", "name", "power.limit", "power.min_limit", "power.max_limit",
                "persistence_mode")
GPU_TABLE_COMMAND = ("nvidia-smi --query-gpu=" + ",".join(QUERY_FIELDS)
                     + " --format=csv,noheader,nounits")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One row of the power table; None where the driver answers [N/A] or similar."""

    index: int
    name: str
    power_limit_w: float | None
    min_limit_w: float | None
    max_limit_w: float | None
    persistence_mode: bool | None


def _watts(cell: str) -> float | None:
    cell = cell.strip()
    return float(cell) if _NUMBER.fullmatch(cell) else None


def _persistence(cell: str) -> bool | None:
    return {"enabled": True, "disabled": False}.get(cell.strip().lower())


def parse_gpu_table(lines: list[str]) -> list[Gpu] | None:
    """`nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits` rows -> GPUs.

    Cells such as `[N/A]`, `[Not Supported]` or `[Unknown Error]` become None. The name may
    itself hold commas, so the fields are taken from both ends. Returns None when a line does
    not look like a row of that query (nvidia-smi printed an error instead)."""
    gpus = []
    for line in lines:
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(QUERY_FIELDS) or not cells[0].isdigit():
            return None
        limit, low, high, persistence = cells[-4:]
        gpus.append(Gpu(
            index=int(cells[0]),
            name=", ".join(cells[1:-4]),
            power_limit_w=_watts(limit),
            min_limit_w=_watts(low),
            max_limit_w=_watts(high),
            persistence_mode=_persistence(persistence),
        ))
    return sorted(gpus, key=lambda g: g.index)


class GpuTable(FactBase):
    """Index, name, power limit with its allowed range, and persistence mode of every GPU.

    None when nvidia-smi is not installed; a failing nvidia-smi (no driver) fails the fact
    with nvidia-smi's own message."""

    command = GPU_TABLE_COMMAND

    def requires_command(self, *args, **kwargs) -> str:
        return "nvidia-smi"

    def process(self, output):
        return parse_gpu_table(list(output))


# --- compute capabilities ------------------------------------------------------------------

class GpuComputeCaps(FactBase):
    """Compute capability of each GPU, as nvidia-smi prints it ("8.6", or "[N/A]"):
    `{"caps": [...], "error": None}`, `{"caps": [], "error": "<message>"}` when nvidia-smi
    fails, `None` when nvidia-smi is not installed."""

    def requires_command(self, *args, **kwargs) -> str:
        return "nvidia-smi"

    command = "nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>&1; echo exit=$?"

    def process(self, output):
        lines, status = split_exit(output)
        lines = [line.strip() for line in lines if line.strip()]
        if status:
            return {"caps": [], "error": " ".join(lines) or f"nvidia-smi exited {status}"}
        return {"caps": lines, "error": None}


# --- driver ------------------------------------------------------------------------------------

class NvidiaDriver(FactBase):
    """The NVIDIA driver's version as nvidia-smi reports it: `{"version": "570.172.08",
    "error": None}`, `{"version": None, "error": "<message>"}` when nvidia-smi fails (no
    driver loaded), `None` when nvidia-smi is not installed."""

    def requires_command(self, *args, **kwargs) -> str:
        return "nvidia-smi"

    command = "nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1; echo exit=$?"

    def process(self, output):
        lines, status = split_exit(output)
        lines = [line.strip() for line in lines if line.strip()]
        version = lines[0] if lines and re.fullmatch(r"\d+(\.\d+)+", lines[0]) else None
        if status or version is None:
            return {"version": None,
                    "error": " ".join(lines) or f"nvidia-smi exited {status}"}
        return {"version": version, "error": None}
