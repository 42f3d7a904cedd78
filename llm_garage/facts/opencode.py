"""Facts about a client's opencode.json."""

from __future__ import annotations

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
