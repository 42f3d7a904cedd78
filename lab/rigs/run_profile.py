"""Where a pyinfra run's time goes: per fact and per operation, from pyinfra's `--debug` log.

`profile_run` runs ``pyinfra -y --debug INVENTORY DEPLOY`` and stamps every line of its log
with the time it arrived. pyinfra 3.10 logs, at debug level:

* ``Getting fact: NAME (ARGS) ...`` each time a fact is asked for (a cached one runs nothing);
* ``Running command on HOST: ...`` / ``Command exit status: N`` around each command it runs
  on a rig (fact or operation), one at a time per host;
* ``Starting operation {'NAME'} on HOST`` as each operation starts on each host.

The run is split into the prepare phase (the deploy file runs once per host, one host after
the other: every fact an operation asks for is read then) and the execute phase (each
operation on every host at once, then the next). A fact's time is the time its commands ran;
an operation's time is from its start to the start of the next operation (all hosts).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lab.rigs.pyinfra_results import ANSI_RE, REPO_ROOT, pyinfra_bin

FACT_RE = re.compile(r"Getting fact: (?P<name>[\w.]+) \((?P<args>.*?)\) \(ensure_hosts")
COMMAND_RE = re.compile(r"Running command on (?P<host>[^:]+): ")
EXIT_RE = re.compile(r"Command exit status: (?P<status>-?\d+)")
OP_RE = re.compile(r"Starting operation \{(?P<names>.*)\} on (?P<host>\S+)\s*$")
END_RE = re.compile(r"^--> (Results|Disconnecting)")


@dataclass
class Section:
    name: str
    seconds: float = 0.0
    commands: int = 0
    calls: int = 0  # facts: times asked for (cached answers included)


@dataclass
class Profile:
    total: float = 0.0
    prepare: float = 0.0
    execute: float = 0.0
    facts: dict[str, Section] = field(default_factory=dict)
    operations: dict[str, Section] = field(default_factory=dict)
    commands_by_host: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> phase

    @property
    def fact_commands(self) -> int:
        return sum(s.commands for s in self.facts.values())

    @property
    def operation_commands(self) -> int:
        return sum(s.commands for s in self.operations.values())

    def table(self, top: int = 12) -> list[str]:
        hosts = max(len(self.commands_by_host), 1)
        fact_s = sum(s.seconds for s in self.facts.values())
        lines = [
            f"total {self.total:.2f}s: prepare {self.prepare:.2f}s (fact commands "
            f"{fact_s:.2f}s, the rest on this machine), execute {self.execute:.2f}s",
            f"commands run on the rigs: {self.fact_commands} for facts, "
            f"{self.operation_commands} by operations ({len(self.operations)} operations, "
            f"{hosts} rig(s)); per rig: "
            + ", ".join(f"{h} {c.get('prepare', 0)}+{c.get('execute', 0)}"
                        for h, c in sorted(self.commands_by_host.items())),
            f"  {'facts (prepare), slowest first':<58} {'asked':>5} {'cmds':>5} {'seconds':>8}",
        ]
        for s in sorted(self.facts.values(), key=lambda s: -s.seconds)[:top]:
            lines.append(f"  {s.name[:58]:<58} {s.calls:>5} {s.commands:>5} {s.seconds:>8.3f}")
        lines.append(f"  {'operations (execute), slowest first':<58} {'':>5} {'cmds':>5} "
                     f"{'seconds':>8}")
        for s in sorted(self.operations.values(), key=lambda s: -s.seconds)[:top]:
            lines.append(f"  {s.name[:58]:<58} {'':>5} {s.commands:>5} {s.seconds:>8.3f}")
        return lines


def parse(lines: Sequence[tuple[float, str]], start: float = 0.0, end: float | None = None
          ) -> Profile:
    """A profile from (arrival time, line) pairs of a `--debug` log."""
    profile = Profile()
    fact: Section | None = None
    op: Section | None = None
    op_started = 0.0
    first_op = None
    running: float | None = None
    execute_end = None
    for stamp, raw in lines:
        line = ANSI_RE.sub("", raw).strip()
        if op is None and (m := FACT_RE.search(line)):
            fact = profile.facts.setdefault(m.group("name"), Section(m.group("name")))
            fact.calls += 1
        elif m := OP_RE.search(line):
            # One name per host where the hosts name it differently ({'a', 'b'}).
            name = " / ".join(sorted(n.strip().strip("'\"")
                                     for n in m.group("names").split("', '")))
            if op is None or op.name != name:
                if op is not None:
                    op.seconds += stamp - op_started
                else:
                    first_op = stamp
                op = profile.operations.setdefault(name, Section(name))
                op_started = stamp
        elif m := COMMAND_RE.search(line):
            phase = "prepare" if op is None else "execute"
            counts = profile.commands_by_host.setdefault(m.group("host"), {})
            counts[phase] = counts.get(phase, 0) + 1
            target = op if op is not None else fact
            if target is not None:
                target.commands += 1
            running = stamp
        elif EXIT_RE.search(line):
            if op is None and fact is not None and running is not None:
                fact.seconds += stamp - running
            running = None
        elif END_RE.search(line) and op is not None and execute_end is None:
            execute_end = stamp
    last = end if end is not None else (lines[-1][0] if lines else start)
    if op is not None:
        op.seconds += (execute_end or last) - op_started
    profile.total = last - start
    profile.prepare = (first_op if first_op is not None else last) - start
    profile.execute = ((execute_end or last) - first_op) if first_op is not None else 0.0
    return profile


def profile_run(inventory: str | os.PathLike, deploy: str, env: dict[str, str] | None = None,
                timeout: float = 600) -> tuple[Profile, int, str]:
    """Run `deploy` once with `--debug`; returns its profile, exit status and log."""
    args = [str(pyinfra_bin()), "-y", "--debug", str(inventory), deploy]
    run_env = {**os.environ, "PYINFRA_PROGRESS": "off", "NO_COLOR": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=run_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append((time.monotonic(), line))
    status = proc.wait(timeout=timeout)
    end = time.monotonic()
    return parse(lines, start, end), status, "".join(line for _, line in lines)
