"""Facts about llama-server services: whether each runs with the inputs it was proven with,
and which unit files llm-garage owns."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

from llm_garage.facts.paths import PathStates


def inputs_digest_command(unit: str, key_file: str | None, binary: str, model: str) -> str:
    """Shell printing one sha256 over everything a llama-server runs with: the unit's content
    (its command line and environment; the unit names the build it runs), the API key file,
    the binary's identity and the identity (inode, size, mtime) of every .gguf beside the
    model's first shard.

    Identity rather than content, so that a digest costs nothing for a 100 GB model; the
    model task moves verified files into place, so a changed file is a new inode."""
    q = shlex.quote
    model_dir = model.rsplit("/", 1)[0] or "/"
    parts = [f"sha256sum < {q(unit)} 2>/dev/null"]
    if key_file:
        parts.append(f"sha256sum < {q(key_file)} 2>/dev/null")
    parts += [
        f"stat -L -c '%n %i %s %Y' {q(binary)} 2>/dev/null",
        f"(cd {q(model_dir)} 2>/dev/null && stat -L -c '%n %i %s %Y' -- *.gguf 2>/dev/null)",
    ]
    return "{ " + "; ".join(parts) + "; } | sha256sum | cut -c1-64"


class ServiceState(FactBase):
    """Where one llama-server service stands (see `operations.services.served`):

    `active` and `enabled` (systemctl), `proven` (the inputs digest recorded when it last
    passed its proof, or None), `inputs` (the digest of the wanted unit and what it runs, see
    `inputs_digest_command`), `installed` (True when the systemd unit is the wanted one),
    `proven_unit` (a copy of the last proven unit exists), `failed` (the digest of inputs
    that failed their proof, or None) and `failure` (why, one line)."""

    def command(self, service: str, wanted: str, installed: str, proven_unit: str,
                proven_path: str, failed_path: str, digest: str):
        q = shlex.quote
        return (f"printf 'active=%s\\n' \"$(systemctl is-active -- {q(service)} 2>/dev/null)\"; "
                f"printf 'enabled=%s\\n' \"$(systemctl is-enabled -- {q(service)} 2>/dev/null)\"; "
                f"printf 'proven=%s\\n' \"$(cat {q(proven_path)} 2>/dev/null)\"; "
                f"printf 'inputs=%s\\n' \"$({digest})\"; "
                f"cmp -s {q(wanted)} {q(installed)} && echo installed=yes; "
                f"test -f {q(proven_unit)} && echo proven_unit=yes; "
                f"printf 'failed=%s\\n' \"$(head -n 1 {q(failed_path)} 2>/dev/null)\"; "
                f"printf 'failure=%s\\n' \"$(sed -n 2p {q(failed_path)} 2>/dev/null)\"; true")

    def process(self, output):
        values = {}
        for line in output:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
        return {
            "active": values.get("active") or "unknown",
            "enabled": values.get("enabled") == "enabled",
            "proven": values.get("proven") or None,
            "inputs": values.get("inputs") or None,
            "installed": values.get("installed") == "yes",
            "proven_unit": values.get("proven_unit") == "yes",
            "failed": values.get("failed") or None,
            "failure": values.get("failure") or None,
        }


class GarageUnits(FactBase):
    """Names of the unit files in `directory` matching `pattern` whose first line carries
    llm-garage's marker (units that other tools wrote are never listed)."""

    default = list

    def command(self, directory: str, pattern: str, marker: str):
        q = shlex.quote
        return (f"cd {q(directory)} 2>/dev/null || exit 0; "
                f"for f in {pattern}; do [ -f \"$f\" ] || continue; "
                f"head -n 1 -- \"$f\" | grep -qF -- {q(marker)} && printf '%s\\n' \"$f\"; "
                "done; true")

    def process(self, output):
        return sorted(line.strip() for line in output if line.strip())


class UnitPresence(FactBase):
    """`{"active": bool, "enabled": bool, "present": [paths that exist]}` for a unit and the
    files that belong to it."""

    @staticmethod
    def default():
        return {"active": False, "enabled": False, "present": []}

    def command(self, service: str, paths: list[str]):
        q = shlex.quote
        checks = " ".join(q(p) for p in paths)
        return (f"systemctl is-active --quiet -- {q(service)} 2>/dev/null && echo active; "
                f"systemctl is-enabled --quiet -- {q(service)} 2>/dev/null && echo enabled; "
                f"for p in {checks}; do [ -e \"$p\" ] && printf 'present=%s\\n' \"$p\"; done; "
                "true")

    def process(self, output):
        lines = [line.strip() for line in output]
        return {
            "active": "active" in lines,
            "enabled": "enabled" in lines,
            "present": [line.partition("=")[2] for line in lines if line.startswith("present=")],
        }


class InstalledUnit(FactBase):
    """A unit rendered beside our state and the unit systemd reads, in one command:
    `files` (`PathStates` of both, with their sha256) and `enabled` (what
    `systemctl is-enabled` says of `service`, "" when it says nothing)."""

    def command(self, source: str, unit_file: str, service: str):
        return (PathStates().command([source, unit_file]) + "; printf 'enabled=%s\\n' "
                f"\"$(systemctl is-enabled -- {shlex.quote(service)} 2>/dev/null)\"; true")

    def process(self, output):
        lines = [line for line in output if not line.startswith("enabled=")]
        enabled = [line.partition("=")[2].strip() for line in output
                   if line.startswith("enabled=")]
        return {"files": PathStates().process(lines), "enabled": enabled[0] if enabled else ""}
