"""What rigs need from the host: commands run and logged, processes, mounts, and the check
that the machine has all it takes (root, the tools, overlayfs)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("garage.rigs")

REQUIRED_TOOLS = (
    "debootstrap",
    "systemd-nspawn",
    "ip",
    "iptables",
    "mount",
    "umount",
    "ssh",
    "ssh-keygen",
)

STOP_GRACE = 10.0


class RigError(RuntimeError):
    """A rig or fleet could not be created, reached or torn down."""



@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    start = time.monotonic()
    log.info("%s ...", what)
    try:
        yield
    except BaseException:
        log.info("%s failed after %.2fs", what, time.monotonic() - start)
        raise
    log.info("%s done in %.2fs", what, time.monotonic() - start)


def _run(
    args: Sequence[str], check: bool = True, timeout: float | None = 120, **kwargs
) -> subprocess.CompletedProcess:
    log.debug("run: %s", shlex.join(args))
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RigError(
            f"command failed ({proc.returncode}): {shlex.join(args)}\n"
            f"{proc.stdout}{proc.stderr}".rstrip()
        )
    return proc



def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields restart after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_our_nspawn(pid: int, root_dir: str) -> bool:
    cmd = _proc_cmdline(pid)
    return bool(cmd) and Path(cmd[0]).name == "systemd-nspawn" and root_dir in cmd


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point == target:
                return True
    return False


def _umount(path: Path) -> None:
    for _ in range(20):
        if not _is_mounted(path):
            return
        if _run(["umount", str(path)], check=False).returncode == 0:
            continue
        time.sleep(0.25)
    if _is_mounted(path):
        log.warning("lazy unmount of busy %s", path)
        _run(["umount", "-l", str(path)], check=False)


def _kill_pid(pid: int, grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; waits until the process is gone."""
    start_time = _proc_start_time(pid)
    if start_time is None:
        return

    def alive() -> bool:
        # Reaps our own children; for others, the /proc entry disappears (or is reused).
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        return _proc_start_time(pid) == start_time and not _is_zombie(pid)

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive():
                return
            time.sleep(0.05)
        if sig == signal.SIGTERM:
            log.warning("pid %d ignored SIGTERM for %.0fs, sending SIGKILL", pid, grace)
    raise RigError(f"pid {pid} survived SIGKILL")


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def missing_requirements() -> list[str]:
    """What this machine lacks to run rigs (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root privileges (running as uid {os.geteuid()})")
    missing += [f"command {tool!r}" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            missing.append("overlayfs support in the kernel")
    except OSError:
        missing.append("/proc/filesystems")
    return missing

