"""Facts about a rig's NVIDIA GPUs, all from one nvidia-smi query (`GPU_QUERY_COMMAND`): the
power table that power limits are checked against, each GPU's memory for the memory plan,
the compute capabilities `cuda_architectures: auto` builds for, the driver's version, and
what a rig document lists.

Each is None when nvidia-smi is not installed. When nvidia-smi fails (no driver loaded), the
power table is None too (the power settings stop, saying so); the others carry nvidia-smi's
message, so that planning can say what to fix."""

from __future__ import annotations

import dataclasses
import re

from pyinfra.api import FactBase

from . import split_exit

# Every nvidia-smi field our facts read, in one query: the GPU facts here all run this same
# command, so that one read-ahead batch runs nvidia-smi once for all of them
# (llm_garage/readahead.py); each fact keeps what it needs.
QUERY_FIELDS = ("index", "name", "uuid", "pci.bus_id", "memory.total", "memory.used",
                "memory.free", "compute_cap", "driver_version", "power.limit",
                "power.min_limit", "power.max_limit", "persistence_mode")
NOT_INSTALLED = "nvidia-smi is not installed"
GPU_QUERY_COMMAND = ("if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu="
                     + ",".join(QUERY_FIELDS) + " --format=csv,noheader,nounits 2>&1; "
                     f"echo exit=$?; else echo '{NOT_INSTALLED}'; fi")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


def parse_query(output) -> tuple[list[dict[str, str]] | None, str | None] | None:
    """`GPU_QUERY_COMMAND`'s output -> None when nvidia-smi is not installed; else (rows,
    None), each row its cells by field name, sorted by index; or (None, what nvidia-smi said)
    when it failed or printed something else. The name may itself hold commas, so the other
    fields are taken from both ends."""
    lines, status = split_exit(output)
    lines = [line for line in lines if line.strip()]
    if [line.strip() for line in lines] == [NOT_INSTALLED]:
        return None
    said = " ".join(line.strip() for line in lines) or f"nvidia-smi exited {status}"
    if status:
        return None, said
    rows, tail = [], len(QUERY_FIELDS) - 2
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(QUERY_FIELDS) or not cells[0].isdigit():
            return None, said
        rows.append(dict(zip(QUERY_FIELDS, [cells[0], ", ".join(cells[1:-tail]),
                                            *cells[-tail:]], strict=True)))
    return sorted(rows, key=lambda row: int(row["index"])), None


class GpuQuery(FactBase):
    """Base of the GPU facts: one nvidia-smi query (`GPU_QUERY_COMMAND`), None when nvidia-smi
    is not installed; each subclass keeps its fields in `answer`."""

    command = GPU_QUERY_COMMAND

    def process(self, output):
        parsed = parse_query(output)
        return None if parsed is None else self.answer(*parsed)

    def answer(self, rows: list[dict[str, str]] | None, error: str | None):
        """The fact from `parse_query`'s rows, or (rows None) from nvidia-smi's message."""
        raise NotImplementedError


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


def _cell(value: str) -> str | None:
    """None for nvidia-smi's [N/A], [Not Supported], [Unknown Error] and the like."""
    value = value.strip()
    return None if not value or value.startswith("[") else value


def _mib(cell: str) -> int | None:
    value = _watts(cell)
    return int(value) if value is not None else None


# --- power table ---------------------------------------------------------------------------

def gpu_table(rows: list[dict[str, str]]) -> list[Gpu]:
    """Rows of `parse_query` -> GPUs; cells nvidia-smi cannot fill become None."""
    return [Gpu(index=int(row["index"]), name=row["name"],
                power_limit_w=_watts(row["power.limit"]),
                min_limit_w=_watts(row["power.min_limit"]),
                max_limit_w=_watts(row["power.max_limit"]),
                persistence_mode=_persistence(row["persistence_mode"])) for row in rows]


class GpuTable(GpuQuery):
    """Index, name, power limit with its allowed range, and persistence mode of every GPU.

    None when nvidia-smi is not installed or does not answer the query (no driver): the
    power settings then stop, saying so."""

    def answer(self, rows, error):
        return None if rows is None else gpu_table(rows)


# --- memory --------------------------------------------------------------------------------

class GpuMemory(GpuQuery):
    """Each GPU's memory: `{"gpus": [{"index", "uuid", "total_mib", "used_mib",
    "free_mib"}], "gpu_error": None}`, `{"gpus": None, "gpu_error": "<message>"}` when
    nvidia-smi fails; None when nvidia-smi is not installed."""

    def answer(self, rows, error):
        if rows is None:
            return {"gpus": None, "gpu_error": error}
        return {"gpus": [{"index": int(r["index"]), "uuid": r["uuid"],
                          "total_mib": _mib(r["memory.total"]),
                          "used_mib": _mib(r["memory.used"]),
                          "free_mib": _mib(r["memory.free"])} for r in rows],
                "gpu_error": None}


# --- what a rig document lists -------------------------------------------------------------

class GpuInventory(GpuQuery):
    """Each GPU as a rig document lists it: `{"gpus": [{"index", "name", "uuid",
    "pci_bus_id", "memory_mib", "compute_cap", "driver_version", "power_limit_w",
    "power_min_w", "power_max_w", "persistence_mode"}], "error": None}`, or `{"gpus": [],
    "error": "<message>"}` when nvidia-smi fails; None when it is not installed."""

    def answer(self, rows, error):
        if rows is None:
            return {"gpus": [], "error": error}
        return {"gpus": [{
            "index": int(r["index"]), "name": r["name"], "uuid": _cell(r["uuid"]),
            "pci_bus_id": _cell(r["pci.bus_id"]), "memory_mib": _mib(r["memory.total"]),
            "compute_cap": _cell(r["compute_cap"]),
            "driver_version": _cell(r["driver_version"]),
            "power_limit_w": _watts(r["power.limit"]),
            "power_min_w": _watts(r["power.min_limit"]),
            "power_max_w": _watts(r["power.max_limit"]),
            "persistence_mode": _persistence(r["persistence_mode"]),
        } for r in rows], "error": None}


# --- compute capabilities ------------------------------------------------------------------

class GpuComputeCaps(GpuQuery):
    """Compute capability of each GPU, as nvidia-smi prints it ("8.6", or "[N/A]"):
    `{"caps": [...], "error": None}`, `{"caps": [], "error": "<message>"}` when nvidia-smi
    fails, `None` when nvidia-smi is not installed."""

    def answer(self, rows, error):
        if rows is None:
            return {"caps": [], "error": error}
        return {"caps": [r["compute_cap"] for r in rows], "error": None}


# --- driver ------------------------------------------------------------------------------------

class NvidiaDriver(GpuQuery):
    """The NVIDIA driver's version as nvidia-smi reports it: `{"version": "570.172.08",
    "error": None}`, `{"version": None, "error": "<message>"}` when nvidia-smi fails (no
    driver loaded) or lists no GPU, `None` when nvidia-smi is not installed."""

    def answer(self, rows, error):
        version = rows[0]["driver_version"] if rows else None
        if version is None or not re.fullmatch(r"\d+(\.\d+)+", version):
            return {"version": None, "error": error or "nvidia-smi lists no GPU"}
        return {"version": version, "error": None}
