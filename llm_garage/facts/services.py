"""Facts about llama-server services: whether each runs with the inputs it was proven with,
and which unit files llm-garage owns."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


def inputs_digest_command(unit: str, key_file: str | None, engine_link: str, binary: str,
                          model: str) -> str:
    """Shell printing one sha256 over everything a llama-server runs with: the unit file, the
    API key file, where the engine's `current` link points and the binary there, and the
    identity (inode, size, mtime) of every .gguf beside the model's first shard.

    Identity rather than content, so that a digest costs nothing for a 100 GB model; the
    model task moves verified files into place, so a changed file is a new inode."""
    q = shlex.quote
    model_dir = model.rsplit("/", 1)[0] or "/"
    parts = [f"sha256sum {q(unit)} 2>/dev/null"]
    if key_file:
        parts.append(f"sha256sum {q(key_file)} 2>/dev/null")
    parts += [
        f"readlink -f {q(engine_link)}",
        f"stat -L -c '%n %i %s %Y' {q(binary)} 2>/dev/null",
        f"(cd {q(model_dir)} 2>/dev/null && stat -L -c '%n %i %s %Y' -- *.gguf 2>/dev/null)",
    ]
    return "{ " + "; ".join(parts) + "; } | sha256sum | cut -c1-64"


class ServiceState(FactBase):
    """`{"active": systemctl is-active, "proven": the inputs digest recorded when the service
    last passed its check, or None, "inputs": digest of the inputs now}` for one llama-server
    unit (see `inputs_digest_command`)."""

    def command(self, service: str, proven_path: str, digest: str):
        q = shlex.quote
        return (f"printf 'active=%s\\n' \"$(systemctl is-active -- {q(service)} 2>/dev/null)\"; "
                f"printf 'proven=%s\\n' \"$(cat {q(proven_path)} 2>/dev/null)\"; "
                f"printf 'inputs=%s\\n' \"$({digest})\"")

    def process(self, output):
        values = {}
        for line in output:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
        return {
            "active": values.get("active") or "unknown",
            "proven": values.get("proven") or None,
            "inputs": values.get("inputs") or None,
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
