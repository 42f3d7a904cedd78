"""Running the pyinfra CLI and reading what it did, per host.

pyinfra 3.10 reports results two ways, both parsed here:

* ``--json``: stdout is one JSON object; ``results.operations[]`` lists, per operation, the
  hosts where it changed something (``success``), did nothing (``no_change``) or failed
  (``error``), and ``results.failed_hosts`` the hosts that dropped out. This is what
  `run_pyinfra` asks for.
* text: the log on stderr has, per operation, ``--> Starting operation: NAME`` followed by one
  ``[host] Success`` / ``[host] No changes`` / ``[host] Error...`` line per host, and ends with
  the results table (``Operation  Hosts  Success  Error  No Change`` ... ``Grand total``,
  from ``pyinfra_cli/prints.py:print_results``) that has counts but no host names. Per-host
  figures come from the log lines and must add up to the table's grand total.

When pyinfra aborts (``--> pyinfra error: No hosts remaining!``) neither the JSON nor the table
is printed; the per-host log lines are then all there is, and the result says so. A run the
deploy refused while it was prepared (llm_garage/refusal.py) prints its message alone, which
always says ``nothing was changed on any host``; that line is the result's error.

Output that fits none of this raises `ResultParseError`: unreadable output never passes for
"nothing changed".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OP_START_RE = re.compile(r"^--> Starting (?:[\w ,]+ )?operation: (?P<name>.*?)\s*$")
HOST_STATUS_RE = re.compile(
    r"^\s*\[(?P<host>[^\]]+)\]\s+(?P<status>Success|No changes|Error)(?P<rest>.*)$"
)
CONNECT_FAIL_RE = re.compile(r"^\s*\[(?P<host>[^\]]+)\]\s+Could not connect")
PYINFRA_ERROR_RE = re.compile(r"^--> pyinfra error(?: in .+? line \d+)?: (?P<msg>.*)$")
REFUSAL_RE = re.compile(r"nothing was changed on any host", re.IGNORECASE)
TABLE_HEADER_RE = re.compile(r"^(?P<indent>\s*)Operation\s+Hosts\s+Success\s+Error\s+No Change\s*$")
TABLE_COLUMNS = ("Hosts", "Success", "Error", "No Change")


class ResultParseError(AssertionError):
    """pyinfra's output could not be read; it must not be taken for a clean run."""


@dataclass
class HostResult:
    name: str
    changed_ops: list[str] = field(default_factory=list)
    no_change_ops: list[str] = field(default_factory=list)
    error_ops: list[str] = field(default_factory=list)
    failed: bool = False  # the host dropped out of the run (connect error or failed op)

    @property
    def changed(self) -> int:
        """Operations that changed something (pyinfra's "Success" column)."""
        return len(self.changed_ops)

    @property
    def success(self) -> int:
        return self.changed

    @property
    def no_change(self) -> int:
        return len(self.no_change_ops)

    @property
    def errors(self) -> int:
        return len(self.error_ops)


@dataclass
class PyinfraResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    hosts: dict[str, HostResult]
    totals: dict[str, int]  # hosts/success/error/no_change, as pyinfra counts them
    source: str  # "json", "text", or "log-only" (pyinfra aborted before its results)
    error: str | None = None  # pyinfra's "--> pyinfra error: ..." message, or our refusal
    duration: float = 0.0
    dry: bool = False  # a --dry run: "changed" means "would change"

    @property
    def ok(self) -> bool:
        return (
            self.returncode == 0
            and self.error is None
            and not any(h.errors or h.failed for h in self.hosts.values())
        )

    @property
    def changed(self) -> int:
        return sum(h.changed for h in self.hosts.values())

    def changes(self) -> dict[str, list[str]]:
        """Host -> names of the operations that changed something there (only hosts with any)."""
        return {name: h.changed_ops for name, h in sorted(self.hosts.items()) if h.changed_ops}

    def summary(self) -> str:
        lines = [
            f"pyinfra exited {self.returncode} after {self.duration:.1f}s "
            f"({self.source} results): {shlex.join(self.args)}"
        ]
        if self.error:
            lines.append(f"  pyinfra error: {self.error}")
        for name, h in sorted(self.hosts.items()):
            lines.append(
                f"  [{name}] changed={h.changed} no_change={h.no_change} "
                f"errors={h.errors}{' FAILED' if h.failed else ''}"
            )
            lines += [f"      changed: {op}" for op in h.changed_ops]
            lines += [f"      error:   {op}" for op in h.error_ops]
        return "\n".join(lines)

    def output_tail(self, chars: int = 6000) -> str:
        text = ANSI_RE.sub("", self.stderr)
        return text if len(text) <= chars else "...\n" + text[-chars:]


def parse_pyinfra_output(
    stdout: str, stderr: str, returncode: int = 0, args: Sequence[str] = (), duration: float = 0.0
) -> PyinfraResult:
    """Reads a pyinfra run's output (JSON or text mode) into per-host results."""
    stdout_clean = ANSI_RE.sub("", stdout)
    stderr_clean = ANSI_RE.sub("", stderr)
    error = None
    for line in (stdout_clean + "\n" + stderr_clean).splitlines():
        match = PYINFRA_ERROR_RE.match(line.strip())
        if match:
            error = match.group("msg").strip()
    if error is None and returncode != 0:
        refused = [line.strip() for line in stderr_clean.splitlines() if REFUSAL_RE.search(line)]
        error = refused[0] if refused else None

    def make(hosts, totals, source, dry=False):
        return PyinfraResult(
            args=list(args),
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            hosts=hosts,
            totals=totals,
            source=source,
            error=error,
            duration=duration,
            dry=dry,
        )

    payload = _json_payload(stdout_clean)
    if payload is not None:
        hosts, totals, dry = _from_json(payload)
        return make(hosts, totals, "json", dry)

    log_hosts = _from_log(stdout_clean + "\n" + stderr_clean)
    table = _parse_table(stdout_clean + "\n" + stderr_clean)
    if table is not None:
        totals = table
        mine = {
            "success": sum(h.changed for h in log_hosts.values()),
            "error": sum(h.errors for h in log_hosts.values()),
            "no_change": sum(h.no_change for h in log_hosts.values()),
        }
        theirs = {key: totals[key] for key in mine}
        if mine != theirs:
            raise ResultParseError(
                f"per-host log lines {mine} disagree with the results table's grand total "
                f"{theirs}; cannot trust this output"
            )
        return make(log_hosts, totals, "text")

    if returncode != 0 and error is not None:
        totals = {
            "hosts": sum(
                len(h.changed_ops) + len(h.no_change_ops) + len(h.error_ops)
                for h in log_hosts.values()
            ),
            "success": sum(h.changed for h in log_hosts.values()),
            "error": sum(h.errors for h in log_hosts.values()),
            "no_change": sum(h.no_change for h in log_hosts.values()),
        }
        return make(log_hosts, totals, "log-only")

    raise ResultParseError(
        f"no pyinfra results (neither --json output nor a results table) in output of a run "
        f"that exited {returncode}:\n--- stdout ---\n{stdout[-3000:]}\n"
        f"--- stderr ---\n{stderr[-3000:]}"
    )


def _json_payload(stdout: str) -> dict | None:
    # print_json writes one line; anything a deploy printed to stdout comes before it.
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        return None
    text = lines[-1]
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise ResultParseError(f"pyinfra --json output is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or "results" not in payload:
        raise ResultParseError(f"pyinfra --json output has no 'results': {text[:500]}")
    return payload


def _from_json(payload: dict) -> tuple[dict[str, HostResult], dict[str, int], bool]:
    hosts: dict[str, HostResult] = {}

    def host(name: str) -> HostResult:
        return hosts.setdefault(name, HostResult(name))

    try:
        results = payload["results"]
        if results is None:  # --dry: the plan says what would change
            for op in payload["plan"]:
                for name in op["hosts_with_change"] + op["hosts_with_conditional_change"]:
                    host(name).changed_ops.append(op["name"])
            return (
                hosts,
                {
                    "hosts": len(hosts),
                    "success": sum(h.changed for h in hosts.values()),
                    "error": 0,
                    "no_change": 0,
                },
                True,
            )
        for op in results["operations"]:
            for name in op["success"]:
                host(name).changed_ops.append(op["name"])
            for name in op["no_change"]:
                host(name).no_change_ops.append(op["name"])
            for name in op["error"]:
                host(name).error_ops.append(op["name"])
        for name in results["failed_hosts"]:
            host(name).failed = True
        totals = {
            key: int(results["totals"][key]) for key in ("hosts", "success", "error", "no_change")
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultParseError(f"unexpected pyinfra --json layout ({exc!r})") from None
    return hosts, totals, False


def _from_log(text: str) -> dict[str, HostResult]:
    hosts: dict[str, HostResult] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        match = OP_START_RE.match(line.strip())
        if match:
            current = match.group("name")
            continue
        if line.strip().startswith("--> "):
            current = None  # a new phase (results, disconnecting, ...)
            continue
        match = CONNECT_FAIL_RE.match(line)
        if match:
            hosts.setdefault(match.group("host"), HostResult(match.group("host"))).failed = True
            continue
        match = HOST_STATUS_RE.match(line)
        if match and current is not None:
            result = hosts.setdefault(match.group("host"), HostResult(match.group("host")))
            status = match.group("status")
            if status == "Success":
                result.changed_ops.append(current)
            elif status == "No changes":
                result.no_change_ops.append(current)
            else:
                result.error_ops.append(current)
                if not match.group("rest").startswith(" (ignored"):
                    result.failed = True
    return hosts


def _parse_table(text: str) -> dict[str, int] | None:
    """The results table's grand total, or None if there is no table.

    A table that is there but cannot be read raises `ResultParseError`.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = TABLE_HEADER_RE.match(line.rstrip())
        if not header:
            continue
        starts = [line.index(col) for col in TABLE_COLUMNS]
        rows = 0
        for row in lines[i + 1 :]:
            if not row.strip():
                break
            cells = [
                row[a:b].strip() for a, b in zip(starts, starts[1:] + [len(row) + 1], strict=True)
            ]
            name = row[: starts[0]].strip()
            try:
                values = [0 if cell == "-" else int(cell) for cell in cells]
            except ValueError:
                raise ResultParseError(f"unreadable results table row: {row!r}") from None
            if name == "Grand total":
                if rows == 0 and values[0] != 0:
                    raise ResultParseError("results table has a total but no rows")
                return dict(zip(("hosts", "success", "error", "no_change"), values, strict=True))
            rows += 1
        raise ResultParseError("results table without a 'Grand total' row")
    return None


def pyinfra_bin() -> Path:
    """The pyinfra CLI next to the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / "pyinfra"
    if candidate.exists():
        return candidate
    return REPO_ROOT / ".venv" / "bin" / "pyinfra"


def run_pyinfra(
    inventory: str | os.PathLike,
    deploy: str | Sequence[str] = "deploy.py",
    *extra_args: str,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 3600,
    json_output: bool = True,
) -> PyinfraResult:
    """Runs ``pyinfra -y [--json] EXTRA_ARGS INVENTORY DEPLOY...`` from the repo root.

    `deploy` is a deploy file (relative to the repo root) or a sequence of operation words,
    e.g. ``("exec", "--", "true")``.
    """
    deploy_args = [deploy] if isinstance(deploy, str | os.PathLike) else list(deploy)
    args = [
        str(pyinfra_bin()),
        "-y",
        *(["--json"] if json_output else []),
        *extra_args,
        str(inventory),
        *(str(a) for a in deploy_args),
    ]
    run_env = {**os.environ, "PYINFRA_PROGRESS": "off", "NO_COLOR": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        env=run_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    duration = time.monotonic() - start
    return parse_pyinfra_output(
        proc.stdout, proc.stderr, proc.returncode, args=args, duration=duration
    )


class NotConvergedError(AssertionError):
    """A deploy run failed, or the re-run still changed something."""


def check_first_run(result: PyinfraResult) -> None:
    if not result.ok:
        raise NotConvergedError(
            f"deploy failed:\n{result.summary()}\n--- pyinfra log ---\n{result.output_tail()}"
        )
    if not result.hosts:
        raise NotConvergedError(f"deploy ran no operations on any host:\n{result.summary()}")


def check_no_changes(result: PyinfraResult, expected_hosts: Sequence[str] | None = None) -> None:
    """The idempotence check: the re-run succeeded and changed nothing on any host."""
    if result.dry:
        raise NotConvergedError("the idempotence re-run must be a real run, not --dry")
    check_first_run(result)
    missing = sorted(set(expected_hosts or ()) - set(result.hosts))
    if missing:
        raise NotConvergedError(f"re-run has no results for hosts {missing}:\n{result.summary()}")
    changes = result.changes()
    if changes or result.totals.get("success", 0):
        listing = "\n".join(f"  [{host}] {op}" for host, ops in changes.items() for op in ops)
        raise NotConvergedError(
            f"not idempotent: the second run changed {result.changed} operation(s):\n"
            f"{listing}\n{result.summary()}"
        )


def converge_runs(
    inventory: str | os.PathLike,
    deploy: str | Sequence[str] = "deploy.py",
    *extra_args: str,
    env: dict[str, str] | None = None,
    runner=run_pyinfra,
) -> tuple[PyinfraResult, PyinfraResult]:
    """Runs the deploy twice: the first run must succeed, the second must change nothing."""
    first = runner(inventory, deploy, *extra_args, env=env)
    check_first_run(first)
    second = runner(inventory, deploy, *extra_args, env=env)
    check_no_changes(second, expected_hosts=sorted(first.hosts))
    return first, second
