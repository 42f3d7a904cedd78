"""What memory a rig has for a model, read while the run is prepared: the compute processes
holding GPU memory, which of those are our own llama-server services, and /proc/meminfo. Each
GPU's memory (nvidia-smi's memory.total, memory.used, memory.free) is the `GpuMemory` fact
(llm_garage/facts/gpu.py), which shares its nvidia-smi call with the other GPU facts.

The memory plan (llm_garage/fit.py) counts what our own services hold as free when the
deploy replaces them, and everything else (the driver's reserve, a display, other programs)
as taken."""

from __future__ import annotations

import re

from pyinfra.api import FactBase

APPS_QUERY = "gpu_uuid,pid,used_memory"
# One section per source; a rig without nvidia-smi has no [apps] section.
COMMAND = (
    "if command -v nvidia-smi >/dev/null 2>&1; then "
    "echo '[apps]'; "
    f"nvidia-smi --query-compute-apps={APPS_QUERY} --format=csv,noheader,nounits 2>/dev/null; "
    "fi; "
    "echo '[servers]'; "
    # one grep over every process (a rig may run thousands), then one line per server
    "grep -H -s -o -m 1 'llama-server-[^/]*[.]service' /proc/[0-9]*/cgroup | "
    "while IFS=: read -r f u; do p=${f#/proc/}; p=${p%/cgroup}; "
    "echo \"$p $u $(sed -n 's/^VmRSS:[[:space:]]*\\([0-9]*\\) kB/\\1/p' "
    "/proc/$p/status 2>/dev/null)\"; "
    "done; "
    "echo '[meminfo]'; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo"
)
_INT = re.compile(r"[0-9]+")


def _mib(cell: str) -> int | None:
    cell = cell.strip()
    return int(cell) if _INT.fullmatch(cell) else None


def parse(output) -> dict:
    """The command's sections -> {"gpus": None, "gpu_error": None (both filled from
    `GpuMemory` by `with_gpus`), "apps": [{"uuid", "pid", "used_mib"}], "servers": {pid:
    {"unit", "rss_kib"}}, "ram": {"total_kib", "available_kib"} or None}. A cell nvidia-smi
    cannot fill ([N/A], [Not Supported]) becomes None."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output:
        line = line.rstrip("\n")
        if re.fullmatch(r"\[(apps|servers|meminfo)\]", line.strip()):
            current = line.strip()[1:-1]
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    result: dict = {"gpus": None, "gpu_error": None, "apps": [], "servers": {}, "ram": None}
    for line in sections.get("apps", []):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 3 and cells[1].isdigit():
            result["apps"].append({"uuid": cells[0], "pid": int(cells[1]),
                                   "used_mib": _mib(cells[2])})
    for line in sections.get("servers", []):
        cells = line.split()
        if len(cells) >= 2 and cells[0].isdigit():
            rss = int(cells[2]) if len(cells) > 2 and cells[2].isdigit() else None
            result["servers"][int(cells[0])] = {"unit": cells[1], "rss_kib": rss}
    meminfo = {}
    for line in sections.get("meminfo", []):
        key, _, value = line.partition(":")
        number = value.split()
        if number and number[0].isdigit():
            meminfo[key.strip()] = int(number[0])
    if "MemTotal" in meminfo:
        result["ram"] = {"total_kib": meminfo["MemTotal"],
                         "available_kib": meminfo.get("MemAvailable")}
    return result


def with_gpus(memory: dict, gpus: dict | None) -> dict:
    """`RigMemory` with each GPU's memory from `GpuMemory` (None: no nvidia-smi): what the
    memory plan reads (llm_garage/fit.py)."""
    return {**memory, **(gpus or {})}


class RigMemory(FactBase):
    """The GPU memory of compute processes, which of them are our llama-server services (by
    their cgroup), and the RAM (/proc/meminfo); see `parse` and `with_gpus`."""

    command = COMMAND

    def process(self, output):
        return parse(list(output))
