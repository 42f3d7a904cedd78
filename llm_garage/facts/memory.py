"""What memory a rig has for a model, read while the run is prepared: each GPU's memory as
nvidia-smi reports it (memory.total, memory.used, memory.free), the compute processes holding
GPU memory, which of those are our own llama-server services, and /proc/meminfo.

The memory plan (llm_garage/fit.py) counts what our own services hold as free when the
deploy replaces them, and everything else (the driver's reserve, a display, other programs)
as taken."""

from __future__ import annotations

import re

from pyinfra.api import FactBase

from . import split_exit

GPU_QUERY = "index,uuid,memory.total,memory.used,memory.free"
APPS_QUERY = "gpu_uuid,pid,used_memory"
# One section per source; a rig without nvidia-smi has no [gpus] section.
COMMAND = (
    "if command -v nvidia-smi >/dev/null 2>&1; then "
    "echo '[gpus]'; "
    f"nvidia-smi --query-gpu={GPU_QUERY} --format=csv,noheader,nounits 2>&1; echo exit=$?; "
    "echo '[apps]'; "
    f"nvidia-smi --query-compute-apps={APPS_QUERY} --format=csv,noheader,nounits 2>/dev/null; "
    "fi; "
    "echo '[servers]'; "
    "for f in /proc/[0-9]*/cgroup; do "
    "u=$(grep -o 'llama-server-[^/]*[.]service' \"$f\" 2>/dev/null | head -n 1); "
    "[ -n \"$u\" ] || continue; p=${f#/proc/}; p=${p%/cgroup}; "
    "echo \"$p $u $(sed -n 's/^VmRSS: *\\([0-9]*\\) kB/\\1/p' /proc/$p/status 2>/dev/null)\"; "
    "done; "
    "echo '[meminfo]'; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo"
)
_INT = re.compile(r"[0-9]+")


def _mib(cell: str) -> int | None:
    cell = cell.strip()
    return int(cell) if _INT.fullmatch(cell) else None


def parse(output) -> dict:
    """The command's sections -> {"gpus": [{"index", "uuid", "total_mib", "used_mib",
    "free_mib"}] or None (no nvidia-smi), "gpu_error": nvidia-smi's message or None,
    "apps": [{"uuid", "pid", "used_mib"}], "servers": {pid: {"unit", "rss_kib"}},
    "ram": {"total_kib", "available_kib"} or None}. A cell nvidia-smi cannot fill ([N/A],
    [Not Supported]) becomes None."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output:
        line = line.rstrip("\n")
        if re.fullmatch(r"\[(gpus|apps|servers|meminfo)\]", line.strip()):
            current = line.strip()[1:-1]
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    result: dict = {"gpus": None, "gpu_error": None, "apps": [], "servers": {}, "ram": None}
    if "gpus" in sections:
        lines, status = split_exit(sections["gpus"])
        rows = [[c.strip() for c in line.split(",")] for line in lines]
        if status or any(len(r) != 5 or not r[0].isdigit() for r in rows):
            result["gpu_error"] = " ".join(lines).strip() or f"nvidia-smi exited {status}"
        else:
            result["gpus"] = [{"index": int(r[0]), "uuid": r[1], "total_mib": _mib(r[2]),
                               "used_mib": _mib(r[3]), "free_mib": _mib(r[4])} for r in rows]
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


class RigMemory(FactBase):
    """GPU memory (nvidia-smi), the GPU memory of compute processes and which of them are our
    llama-server services (by their cgroup), and the RAM (/proc/meminfo); see `parse`."""

    command = COMMAND

    def process(self, output):
        return parse(list(output))
