"""Facts about a client's opencode.json."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase


class ConfigFile(FactBase):
    """`{"real": path with symlinks resolved, "mode": "644" or None, "text": content or None}`.

    A symlinked opencode.json (dotfile managers) is read and later written through the link,
    so the link stays."""

    def command(self, path: str):
        q = shlex.quote(path)
        return (f"r=$(readlink -m -- {q}); printf 'real=%s\\n' \"$r\"; "
                "if [ -f \"$r\" ]; then stat -c 'mode=%a' -- \"$r\"; echo ---; cat -- \"$r\"; fi")

    def process(self, output):
        lines = list(output)
        info = {"real": None, "mode": None, "text": None}
        for n, line in enumerate(lines):
            if line == "---":
                info["text"] = "\n".join(lines[n + 1:])
                break
            key, _, value = line.partition("=")
            if key in ("real", "mode"):
                info[key] = value
        return info


REPORT_MARK = "==> llm-garage proof"


class ProofReports(FactBase):
    """What the last proof of each service found, as `garage-server-check --report` wrote it:
    `{profile: report dict, or None when there is none or it is not JSON}`. The report holds
    `ok`, `n_ctx` (the context one request gets, from the server's /props) and `slots`.

    + reports: profile -> the report's path on the rig"""

    def command(self, reports: dict):
        q = shlex.quote
        return "; ".join(f"printf '\\n{REPORT_MARK} %s\\n' {q(profile)}; cat -- {q(path)} "
                         "2>/dev/null" for profile, path in sorted(reports.items())) + "; true"

    def process(self, output):
        found: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(REPORT_MARK + " "):
                current = line[len(REPORT_MARK) + 1:]
                found[current] = []
            elif current is not None:
                found[current].append(line)
        out = {}
        for profile, lines in found.items():
            try:
                report = json.loads("\n".join(lines)) if "".join(lines).strip() else None
            except ValueError:
                report = None
            out[profile] = report if isinstance(report, dict) else None
        return out
