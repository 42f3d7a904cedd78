"""Facts read ahead: one command per rig reads what the plans and our operations will read.

pyinfra reads a fact with one command each time it is asked for, and an operation asks when it
runs, so that it sees what earlier operations changed; a no-op deploy thus pays one round
trip per fact read. Here the tasks declare the facts their plans read while the deploy is
prepared (`declare(..., while_prepared=True)`), and our operations, when a task adds them,
the facts they will read when they run (`reads_ahead`). The first `read` of a declared fact
reads every declared fact still to be read in that phase in one shell command, each between
markers carrying its exit status; facts that run the same command (the GPU facts' one
nvidia-smi query) share one run of it.

An answer is used only while no operation has run a command on that rig since it was read
(pyinfra's own record of each finished operation's commands), and answers read while the
deploy was prepared are not used once it runs (another deploy may hold the rig until then),
so every operation still decides from the rig's state as it is: after a change, the next
read reads again, in one command, what is still to be read. A fact that failed or could not
be processed in a batch, or was not declared, is read by pyinfra's `host.get_fact` as before.
An operation must read before it yields its first command."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import secrets
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pyinfra import context, logger
from pyinfra.api import StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.facts import FactBase

Read = tuple[type[FactBase], Mapping[str, Any]]


Epoch = tuple[bool, int]  # executing?, finished operations that ran a command on the rig


@dataclasses.dataclass
class _Answer:
    value: Any
    epoch: Epoch


@dataclasses.dataclass
class _Rig:
    declared: dict[str, Read] = dataclasses.field(default_factory=dict)
    # reads still to come: while the deploy is prepared (plans) and by operations
    readers: dict[bool, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {False: {}, True: {}})
    answers: dict[str, _Answer] = dataclasses.field(default_factory=dict)
    batches: int = 0


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rig(host, create: bool = False) -> _Rig | None:
    """The rig's reads (created when `create`); None for a run that declared none."""
    try:
        rigs = _STATES.setdefault(host.state, {}) if create else _STATES.get(host.state, {})
    except TypeError:  # a stand-in state (operation tests): nothing is read ahead
        return None
    return rigs.setdefault(host.name, _Rig()) if create else rigs.get(host.name)


def _key(cls: type[FactBase], kwargs: Mapping[str, Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}:" + json.dumps(kwargs, sort_keys=True,
                                                                 default=str)


def epoch(host) -> Epoch:
    """Whether the operations run, and how many of the rig's finished operations ran a
    command: an answer read at another epoch may be stale (answers read while the deploy is
    prepared are never used once it runs: other deploys may hold the rig until then)."""
    state = host.state
    return state.is_executing, sum(
        1 for data in state.ops.get(host, {}).values()
        if data.operation_meta.is_complete() and data.operation_meta.executed)


def declare(host, reads: Iterable[Read], *, while_prepared: bool = False) -> None:
    """An operation added for `host` will read these facts when it runs (`while_prepared`:
    the tasks will, while the deploy is prepared)."""
    rig = _rig(host, create=True)
    if rig is None:
        return
    readers = rig.readers[not while_prepared]
    for cls, kwargs in reads:
        key = _key(cls, kwargs)
        rig.declared[key] = (cls, dict(kwargs))
        readers[key] = readers.get(key, 0) + 1


def reads_ahead(reads: Callable[..., Iterable[Read]]):
    """Wrap an operation (outside its `@operation()`): when a task calls it, `reads` gets the
    operation's own arguments and names the facts the operation will read (each a fact class
    and its arguments), so that one command reads them all for the rig."""

    def wrap(op):
        params = inspect.signature(op).parameters

        @functools.wraps(op)
        def call(*args, **kwargs):
            own = {k: v for k, v in kwargs.items() if k in params}
            bound = inspect.signature(op).bind_partial(*args, **own).arguments
            declare(context.host, reads(**bound))
            return op(*args, **kwargs)

        return call

    return wrap


def read(cls: type[FactBase], **kwargs: Any) -> Any:
    """The fact on the current host: the read-ahead answer while it is fresh, else pyinfra's
    own read."""
    host = context.host
    rig = _rig(host)
    if rig is None:
        return host.get_fact(cls, **kwargs)
    key = _key(cls, kwargs)
    now = epoch(host)
    readers = rig.readers[now[0]]
    if key in readers:
        readers[key] = max(readers[key] - 1, 0)
    answer = rig.answers.get(key)
    if key in rig.declared and (answer is None or answer.epoch != now):
        _read_batch(host, rig, now, key)
        answer = rig.answers.get(key)
    if answer is not None and answer.epoch == now:
        return answer.value
    return host.get_fact(cls, **kwargs)


def _command(fact: FactBase, kwargs: Mapping[str, Any]):
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    requires = fact.requires_command
    requires = requires(**kwargs) if callable(requires) else requires
    return command, requires


def _read_batch(host, rig: _Rig, now: Epoch, wanted: str) -> None:
    """Read in one command every declared fact still to be read in this phase (and
    `wanted`)."""
    readers = rig.readers[now[0]]
    pending = [k for k in rig.declared if (readers.get(k, 0) > 0 or k == wanted)
               and (k not in rig.answers or rig.answers[k].epoch != now)]
    token = secrets.token_hex(8)
    bits: list[Any] = []
    facts: dict[int, tuple[str, FactBase]] = {}
    runs: dict[tuple[str, str | None], int] = {}  # facts with the same command share one run
    source: dict[int, int] = {}  # fact -> the run whose output it reads
    for i, key in enumerate(pending):
        cls, kwargs = rig.declared[key]
        fact = cls()
        if fact.shell_executable:
            continue
        command, requires = _command(fact, kwargs)
        facts[i] = key, fact
        source[i] = runs.setdefault((str(command), requires), i)
        if source[i] != i:
            continue
        guard = ["command", "-v", requires, ">/dev/null", "2>&1", "&&"] if requires else []
        # $(...) keeps each fact's output apart and its status; printf restores the last
        # newline it drops.
        bits += ["echo", f"'GARAGE-READ {token} {i}';", "__out=$(", *guard, "(", command,
                 "));", "__status=$?;", '[ -z "$__out" ] ||', "printf", "'%s\\n'",
                 '"$__out";', "echo", f"'GARAGE-READ {token} {i} END' \"$__status\";"]
    if not facts:
        return
    arguments, _ = pop_global_arguments(host.state, host,
                                        dict(host.current_op_global_arguments or {}))
    connector = {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}
    try:
        status, output = host.run_shell_command(StringCommand(*bits),
                                                print_output=host.state.print_fact_output,
                                                print_input=host.state.print_fact_input,
                                                **connector)
    except Exception as error:  # noqa: BLE001 - any failure: read one by one as before
        logger.debug("%sread ahead failed: %s", host.print_prefix, error)
        return
    rig.batches += 1
    if not status:
        return
    lines: dict[int, list[str]] = {}
    statuses: dict[int, int] = {}
    current: int | None = None
    begin, end = f"GARAGE-READ {token} ", " END "
    for line in output.stdout_lines:
        if line.startswith(begin):
            rest = line[len(begin):]
            if end.strip() in rest.split():
                index, _, code = rest.partition(end)
                if index.isdigit() and code.strip().isdigit():
                    statuses[int(index)] = int(code)
                current = None
            elif rest.isdigit():
                current = int(rest)
                lines[current] = []
            continue
        if current is not None:
            lines[current].append(line)
    answered = 0
    for i, (key, fact) in facts.items():
        run = source[i]
        if statuses.get(run) != 0:
            continue
        try:
            value = fact.process(list(lines[run])) if lines.get(run) else fact.default()
        except Exception:  # noqa: BLE001 - pyinfra's own read reports it
            continue
        rig.answers[key] = _Answer(value, now)
        answered += 1
    logger.debug("%sread ahead: %d of %d fact(s) in one command (%d run(s))",
                 host.print_prefix, answered, len(facts), len(runs))
