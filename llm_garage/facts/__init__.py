"""Our facts: small pyinfra facts that read one thing on a rig each."""

import re

EXIT_RE = re.compile(r"exit=(\d+)")


def split_exit(output) -> tuple[list[str], int]:
    """Output lines without the trailing `exit=N` marker, and N (0 when absent).

    Facts whose command must not fail (a missing tool or an unreachable remote is an answer,
    not an error) end it with `; echo exit=$?`."""
    lines = [line.rstrip("\n") for line in output]
    if lines and (m := EXIT_RE.fullmatch(lines[-1].strip())):
        return lines[:-1], int(m.group(1))
    return lines, 0
