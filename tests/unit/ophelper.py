"""Run one of our operations against facts given in the test, as pyinfra's own operation tests
do: the operation gets its arguments and the facts it would see, and the test checks the
commands it yields and its no-op description. Nothing connects to a host.

Facts are named `module.Class`, like pyinfra's fixtures: `gpu.GpuTable`, `files.Sha256File`.
A fact the operation asks for but the test did not give fails the test. A fact given as a
callable is called with the fact's arguments (for facts that depend on them)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from pyinfra.api import StringCommand
from pyinfra.context import ctx_host


def fact_name(cls) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


class OpHost:
    """What an operation body reads from pyinfra's `host` while it decides."""

    def __init__(self, facts: dict[str, Any], name: str, executing: bool,
                 global_args: dict | None):
        self.facts = facts
        self.name = name
        self.print_prefix = f"[{name}] "
        self.state = SimpleNamespace(is_executing=executing)
        self.current_op_global_arguments = global_args or {}
        self.asked: list[tuple[str, dict]] = []
        self.noops: list[str] = []
        self.logs: list[str] = []

    @property
    def noop_description(self) -> str | None:
        return self.noops[-1] if self.noops else None

    def get_fact(self, cls, **kwargs):
        key = fact_name(cls)
        self.asked.append((key, kwargs))
        if key not in self.facts:
            raise KeyError(f"missing test fact data: {key} (given: {sorted(self.facts)})")
        value = self.facts[key]
        return copy.deepcopy(value(**kwargs) if callable(value) else value)

    def noop(self, text: str) -> None:
        self.noops.append(text)

    def log(self, text: str, *args) -> None:
        self.logs.append(text)

    def get_temp_filename(self, key: str) -> str:
        return "/tmp/pyinfra-" + hashlib.sha1(key.encode()).hexdigest()


@contextmanager
def on_host(facts: dict[str, Any] | None = None, *, host_name: str = "rig1",
            executing: bool = False, global_args: dict | None = None) -> Iterator[OpHost]:
    """Make an OpHost pyinfra's current host, for driving an operation's generator by hand."""
    host = OpHost(facts or {}, host_name, executing, global_args)
    with ctx_host.use(host):
        yield host


@dataclasses.dataclass
class OpRun:
    commands: list
    host: OpHost

    @property
    def raw(self) -> list:
        """The commands with each shell string as its text; other commands as they are."""
        return [c.get_raw_value() if isinstance(c, StringCommand) else c for c in self.commands]

    @property
    def noops(self) -> list[str]:
        return self.host.noops

    @property
    def noop_description(self) -> str | None:
        return self.host.noop_description

    @property
    def logs(self) -> list[str]:
        return self.host.logs


def run_op(op, facts: dict[str, Any] | None = None, *args, host_name: str = "rig1",
           executing: bool = False, global_args: dict | None = None, **kwargs) -> OpRun:
    """Run `op` (an @operation) with `args`/`kwargs` on a host whose facts are `facts`;
    `executing` is pyinfra's execute-time pass, `global_args` the operation's global arguments
    (`_sudo`, ...)."""
    with on_host(facts, host_name=host_name, executing=executing,
                 global_args=global_args) as host:
        commands = list(op._inner(*args, **kwargs))
    return OpRun(commands, host)


class ShellHost(OpHost):
    """The host a function command (FunctionCommand) of an operation runs on: records each
    shell command it runs, with its arguments, and answers `results` in order ((ok, stdout);
    success with no output once they run out)."""

    def __init__(self, results=(), global_args: dict | None = None):
        super().__init__({}, "rig", True, global_args)
        self.calls: list[tuple[str, dict]] = []
        self.results = list(results)

    @property
    def ran(self) -> list[str]:
        return [command for command, _ in self.calls]

    def run_shell_command(self, command, **kwargs):
        self.calls.append((command.get_raw_value(), kwargs))
        ok, stdout = self.results.pop(0) if self.results else (True, "")
        return ok, SimpleNamespace(stdout_lines=stdout.splitlines())
