"""One fact reading, in one round trip, what a rig document says about the rig (see
llm_garage/rigdoc.py): the machine, its CUDA toolkit, each engine's build stamps, each model
snapshot's files, each service's installed unit, last proof and the memory the server
reported at load. Its GPUs are the `GpuInventory` fact (llm_garage/facts/gpu.py).

The command prints sections, each opened by a `::doc:: <kind> [<name> …]` line and followed by
that section's raw lines; `parse_sections` splits them and the `parse_*` helpers read each
kind, so that every parser is tested on captured output."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence

from pyinfra.api import FactBase

MARK = "::doc::"
# Start-log lines of llama.cpp / ik_llama.cpp that say how much memory a device got.
MEMORY_LINE = r"buffer size *=|kv_cache.*: *size *="


def report_command(models_dir: str, engines: Mapping[str, str],
                   services: Sequence[tuple[str, str, str, str]],
                   snapshots: Mapping[str, str]) -> str:
    """The shell behind `RigReport`: `engines` = engine name -> its builds folder,
    `services` = (profile, service, installed unit file, proof report) per profile,
    `snapshots` = model name -> its snapshot folder. Always exits 0."""
    q = shlex.quote
    parts = [
        # a newline first: the file printed before may not end with one
        f"sec() {{ printf '\\n{MARK} %s\\n' \"$*\"; }}",
        "sec os; cat /etc/os-release 2>/dev/null",
        "sec kernel; uname -srm",
        "sec cpu; grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-; nproc --all",
        "sec memory; grep -m1 '^MemTotal:' /proc/meminfo",
        f"sec disk; df -P -B1 -- {q(models_dir)} 2>/dev/null | tail -n +2",
        "sec nvcc; for n in \"$(command -v nvcc 2>/dev/null)\" /usr/local/cuda/bin/nvcc; do "
        "if [ -n \"$n\" ] && [ -x \"$n\" ]; then echo \"$n\"; \"$n\" --version 2>&1 | "
        "grep -m1 'release'; break; fi; done",
    ]
    for name, builds in sorted(engines.items()):
        parts.append(
            f"sec current {q(name)} \"$(readlink {q(builds + '/current')} 2>/dev/null)\"; "
            f"for d in {q(builds)}/*/; do d=\"${{d%/}}\"; "
            "[ -f \"$d/stamp\" ] && [ ! -L \"$d\" ] || continue; "
            f"sec build {q(name)} \"${{d##*/}}\"; cat \"$d/stamp\"; done")
    for profile, service, unit_file, proof in services:
        parts += [
            f"sec active {q(profile)} \"$(systemctl is-active -- {q(service)} 2>/dev/null)\"",
            f"sec unit {q(profile)}; cat {q(unit_file)} 2>/dev/null",
            f"sec proof {q(profile)}; cat {q(proof)} 2>/dev/null",
            # the start log of the running server only (its invocation), not older starts
            f"sec loaded {q(profile)}; i=$(systemctl show -p InvocationID --value -- "
            f"{q(service)} 2>/dev/null); [ -n \"$i\" ] && journalctl --no-pager -o cat "
            f"_SYSTEMD_INVOCATION_ID=\"$i\" 2>/dev/null | grep -E {q(MEMORY_LINE)}",
        ]
    for name, snapshot in sorted(snapshots.items()):
        parts.append(
            f"sec model {q(name)}; for f in {q(snapshot)}/*; do [ -e \"$f\" ] || continue; "
            "printf '%s\\t%s\\t%s\\n' \"${f##*/}\" \"$(readlink -- \"$f\")\" "
            "\"$(stat -L -c %s -- \"$f\")\"; done")
    return "; ".join(parts) + "; true"


def parse_sections(lines: Sequence[str]) -> list[tuple[tuple[str, ...], list[str]]]:
    """Output of `report_command` -> [((kind, *words), [lines])], in order."""
    sections: list[tuple[tuple[str, ...], list[str]]] = []
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith(MARK + " "):
            sections.append((tuple(line[len(MARK) + 1:].split(" ")), []))
        elif sections:
            sections[-1][1].append(line)
    for _, body in sections:  # the newline each section starts with
        if body and body[-1] == "":
            body.pop()
    return sections


def parse_os_release(lines: Sequence[str]) -> str | None:
    values = {}
    for line in lines:
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"')
    return values.get("PRETTY_NAME") or values.get("NAME") or None


def parse_memory(lines: Sequence[str]) -> int | None:
    """`MemTotal:  131899652 kB` -> bytes."""
    for line in lines:
        m = re.match(r"MemTotal:\s+(\d+)\s*kB", line)
        if m:
            return int(m.group(1)) * 1024
    return None


def parse_disk(lines: Sequence[str]) -> dict | None:
    """A `df -P -B1` row -> filesystem, size and free bytes, mount point."""
    for line in lines:
        cells = line.split()
        if len(cells) >= 6 and cells[1].isdigit() and cells[3].isdigit():
            return {"filesystem": cells[0], "size_bytes": int(cells[1]),
                    "free_bytes": int(cells[3]), "mounted_on": " ".join(cells[5:])}
    return None


def parse_nvcc(lines: Sequence[str]) -> dict | None:
    """[path, `Cuda compilation tools, release 12.4, V12.4.131`] -> {"nvcc", "version"}."""
    if not lines or not lines[0].strip():
        return None
    version = None
    for line in lines[1:]:
        m = re.search(r"release (\d+\.\d+)", line)
        if m:
            version = m.group(1)
    return {"nvcc": lines[0].strip(), "version": version}


def parse_stamp(lines: Sequence[str]) -> dict:
    """A build stamp (see garage-build): `<commit> <flagshash>`, then key=value lines."""
    stamp: dict = {}
    if lines:
        commit, _, flags_hash = lines[0].strip().partition(" ")
        stamp.update(commit=commit, flags_hash=flags_hash)
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip()
        if key in ("seconds", "jobs", "ccache_hits", "ccache_misses") and value.isdigit():
            stamp[key] = int(value)
        else:
            stamp[key] = value.strip()
    return stamp


_BUFFER = re.compile(r"(\S+)\s+(model|KV|RS|compute|output)\s+buffer size\s*=\s*([0-9.]+)\s*MiB")
_KV_TOTAL = re.compile(r"kv_cache\w*:\s*size\s*=\s*([0-9.]+)\s*MiB(.*)")


def parse_loaded(lines: Sequence[str]) -> list[dict]:
    """The memory a server reported at load, from its start log: per (device, buffer kind)
    the MiB it allocated, in order of first mention (summed when a kind repeats), plus the
    KV cache's total line (`device` "all", with its cells and types as `detail`)."""
    out: dict[tuple[str, str], dict] = {}
    for line in lines:
        m = _BUFFER.search(line)
        if m:
            device, kind, mib = m.group(1), m.group(2), float(m.group(3))
            entry = out.setdefault((device, kind), {"device": device, "buffer": kind, "mib": 0.0})
            entry["mib"] = round(entry["mib"] + mib, 2)
            continue
        m = _KV_TOTAL.search(line)
        if m:
            detail = m.group(2).strip(" ,")
            out[("all", "KV total")] = {"device": "all", "buffer": "KV total",
                                        "mib": float(m.group(1)), "detail": detail}
    return list(out.values())


def parse_snapshot(lines: Sequence[str]) -> list[dict]:
    """`<name>\\t<link target>\\t<size>` per file of a snapshot -> name, the sha256 its blob is
    named by (None when the file is not a blob link), size."""
    files = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        blob = parts[1].rsplit("/", 1)[-1]
        files.append({"name": parts[0],
                      "sha256": blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None,
                      "size": int(parts[2]) if parts[2].isdigit() else None})
    return sorted(files, key=lambda f: f["name"])


def parse_report(lines: Sequence[str]) -> dict:
    """`report_command`'s output -> what a rig document reads from the rig."""
    report: dict = {"machine": {}, "nvcc": None, "engines": {}, "services": {}, "models": {}}
    machine = report["machine"]
    for (kind, *words), body in parse_sections(lines):
        if kind == "os":
            machine["os"] = parse_os_release(body)
        elif kind == "kernel":
            machine["kernel"] = (body[0].strip() if body else None) or None
        elif kind == "cpu":
            machine["cpu"] = body[0].strip() if len(body) > 1 else None
            machine["cpus"] = int(body[-1]) if body and body[-1].strip().isdigit() else None
        elif kind == "memory":
            machine["memory_bytes"] = parse_memory(body)
        elif kind == "disk":
            machine["disk"] = parse_disk(body)
        elif kind == "nvcc":
            report["nvcc"] = parse_nvcc(body)
        elif kind in ("current", "build") and words:
            engine = report["engines"].setdefault(words[0], {"current": None, "builds": {}})
            if kind == "current":
                target = " ".join(words[1:]).rstrip("/").rsplit("/", 1)[-1]
                engine["current"] = target or None
            elif len(words) == 2:
                engine["builds"][words[1]] = parse_stamp(body)
        elif kind in ("active", "unit", "proof", "loaded") and words:
            service = report["services"].setdefault(words[0], {})
            if kind == "active":
                service["active"] = " ".join(words[1:]) or "unknown"
            elif kind == "unit":
                service["unit_text"] = "\n".join(body) + "\n" if body else None
            elif kind == "proof":
                try:
                    service["proof"] = json.loads("\n".join(body)) if body else None
                except ValueError:
                    service["proof"] = None
            else:
                service["loaded"] = parse_loaded(body)
        elif kind == "model" and words:
            report["models"][words[0]] = parse_snapshot(body)
    return report


class RigReport(FactBase):
    """What a rig document reads from the rig, in one command (see `report_command`)."""

    def command(self, models_dir: str, engines: dict, services: list, snapshots: dict):
        return report_command(models_dir, engines, [tuple(s) for s in services], snapshots)

    def process(self, output):
        return parse_report(list(output))
