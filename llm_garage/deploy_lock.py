"""One deploy per rig at a time: a lock file on each rig, taken when the run starts executing
operations and released after its last operation (also on a rig that failed).

It lives outside the operations on purpose: taking and releasing it is not a change to the
rig, and a run that changes nothing must report nothing.

A run is known by where it runs and its process (`RUN`). A second run finds the lock taken:
that rig stops at once, saying who holds it and since when (or waits up to
`deploy_lock_wait_s`), before any of its operations run. A lock is stale, and taken over with a
note, when the rig rebooted since it was taken, or when the run holding it ran on this same
machine and its process is gone (killed, or ended before releasing it)."""

from __future__ import annotations

import os
import socket
import time

from pyinfra import logger
from pyinfra.api import QuoteString, StringCommand
from pyinfra.api.state import BaseStateCallback

RUN = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
POLL_S = 5

# Create the lock only if absent (noclobber): exit 0 when taken, else print the rig's boot id
# and the lock's content and exit 1.
_TAKE = ('mkdir -p -- "$(dirname -- "$1")" && boot=$(cat /proc/sys/kernel/random/boot_id) && '
         '{ ( set -C; printf "%s\\n%s\\n" "$2" "$boot" > "$1" ) 2>/dev/null && exit 0; '
         'printf "boot=%s\\n" "$boot"; cat -- "$1" 2>/dev/null; exit 1; }')
_RELEASE = '[ "$(head -n 1 -- "$1" 2>/dev/null)" = "$2" ] && rm -f -- "$1"; true'


def stale_reason(holder: str, holder_boot: str, boot: str, here: str | None = None) -> str | None:
    """Why a held lock may be taken over, or None while its run may still be going."""
    if not holder:
        return "it names no run"
    if holder_boot and holder_boot != boot:
        return "the rig rebooted since it was taken"
    name, _, rest = holder.partition(" pid ")
    pid = rest.split(" ", 1)[0]
    if name == (here or socket.gethostname()) and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return "its run on this machine is gone"
        except PermissionError:
            pass
    return None


def _shell(host, script: str, *args: str):
    command = StringCommand("sh", "-c", QuoteString(script), "-", *[QuoteString(a) for a in args])
    return host.run_shell_command(command)


def take(host, path: str, wait_s: float, run: str = RUN) -> str | None:
    """Take the lock on `host`; None when taken, else why not (who holds it)."""
    deadline = time.monotonic() + wait_s
    while True:
        ok, output = _shell(host, _TAKE, path, run)
        if ok:
            return None
        lines = [line.strip() for line in output.stdout_lines]
        boot = lines[0].removeprefix("boot=") if lines else ""
        holder = lines[1] if len(lines) > 1 else ""
        if holder == run:
            return None
        why = stale_reason(holder, lines[2] if len(lines) > 2 else "", boot)
        if why:
            logger.warning(f"{host.print_prefix}deploy lock {path} ({holder or 'empty'}) taken "
                           f"over: {why}")
            _shell(host, 'rm -f -- "$1"', path)
            continue
        if time.monotonic() >= deadline:
            return (f"another deploy is running on this rig: {holder} holds {path}; wait for "
                    "it to finish (or set deploy_lock_wait_s), or remove that file if its run "
                    "is gone")
        time.sleep(POLL_S)


def release(host, path: str, run: str = RUN) -> None:
    _shell(host, _RELEASE, path, run)


class DeployLocks(BaseStateCallback):
    """Takes every rig's lock before the first operation runs; releases them after the last.
    `locks`: host name -> (lock path, seconds to wait for another run)."""

    def __init__(self, locks: dict[str, tuple[str, float]]):
        self.locks = locks
        self.held: dict[str, object] = {}
        self.last_op = None

    def operation_start(self, state, op_hash):
        if self.last_op is not None:
            return
        order = state.get_op_order()
        self.last_op = order[-1] if order else op_hash
        refused = set()
        for host in list(state.activated_hosts):
            if host.name not in self.locks or host in state.failed_hosts:
                continue
            path, wait_s = self.locks[host.name]
            why = take(host, path, wait_s)
            if why:
                logger.error(f"{host.print_prefix}{why}")
                refused.add(host)
            else:
                self.held[host.name] = host
        state.fail_hosts(refused)

    def operation_end(self, state, op_hash):
        if op_hash != self.last_op:
            return
        for name, host in sorted(self.held.items()):
            release(host, self.locks[name][0])
        self.held.clear()


def hold(state, locks: dict[str, tuple[str, float]]) -> None:
    """Hold every rig's deploy lock for this run (once per run, whichever host asks first)."""
    if not any(isinstance(h, DeployLocks) for h in state.callback_handlers):
        state.add_callback_handler(DeployLocks(locks))
