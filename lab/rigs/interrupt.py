"""Killing a deploy at a chosen point, as a lost controller or a power cut would.

`Interrupter` starts the pyinfra CLI in its own process group and watches two things while it
runs: the lines of its log (stderr) and the rig-side processes of the deploy (every process
the rig's sshd starts: the commands pyinfra runs, `garage-build`, `garage-fetch`, git, the
compiler ...). When a trigger holds, it freezes both at once (SIGSTOP to the controller's
group, the cgroup freezer for the rig side), so nothing moves past the point, and then
SIGKILLs them: the controller's whole group and every process of the rig's SSH sessions. The
rig itself keeps running (systemd, the llama-server services, sshd's listener).

The rig side is one freezer cgroup: the rig's sshd listener is moved into it before the
deploy starts, so every session and its children are born there. cgroup v1 (`freezer`
hierarchy) and cgroup v2 (`cgroup.freeze`) both work.

Nothing here is shipped: the deploy runs as it would anywhere, watched from outside.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.rigs.pyinfra_results import REPO_ROOT, PyinfraResult, parse_pyinfra_output, pyinfra_bin

CGROUP_ROOT = Path("/sys/fs/cgroup")
POLL_S = 0.002


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _status(pid: int) -> dict[str, str]:
    lines = _read(Path(f"/proc/{pid}/status")).splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(p) for p in _read(task / "children").split()]
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class RigSessions:
    """The rig side of every SSH session to `rig`, in one cgroup that can be frozen and
    killed. Use as a context manager around the deploys to interrupt."""

    def __init__(self, rig):
        self.rig = rig
        self.listener: int | None = None
        self.v1 = (CGROUP_ROOT / "freezer" / "tasks").exists()
        self.cgroup: Path | None = None
        self._home: Path | None = None

    def _find_listener(self) -> int:
        inits = _children(self.rig.pid)
        for init in inits:
            for pid in _children(init):
                if _status(pid).get("Name") == "sshd":
                    return pid
        raise RuntimeError(f"[{self.rig.name}] no sshd listener under nspawn pid {self.rig.pid}")

    def __enter__(self) -> RigSessions:
        self.listener = self._find_listener()
        name = f"garage-interrupt-{self.rig.machine}"
        if self.v1:
            self._home = CGROUP_ROOT / "freezer"
            self.cgroup = self._home / name
        else:
            line = next(x for x in _read(Path(f"/proc/{self.listener}/cgroup")).splitlines()
                        if x.startswith("0::"))
            self._home = CGROUP_ROOT / line[3:].lstrip("/")
            self.cgroup = self._home / name
        self.cgroup.mkdir(exist_ok=True)
        (self.cgroup / "cgroup.procs").write_text(str(self.listener))
        return self

    def __exit__(self, *exc) -> None:
        self.thaw()
        with contextlib.suppress(OSError):
            (self._home / "cgroup.procs").write_text(str(self.listener))
        for _ in range(50):
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
                return
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """Processes of the sessions (sshd's listener left out)."""
        return [int(p) for p in _read(self.cgroup / "cgroup.procs").split()
                if int(p) != self.listener]

    def services(self) -> list[int]:
        """Children of the rig's systemd (pids as seen here): services' main processes."""
        return [pid for init in _children(self.rig.pid) for pid in _children(init)]

    def processes(self) -> dict[int, list[str]]:
        return {pid: cmdline(pid) for pid in self.pids()}

    def freeze(self) -> None:
        if self.v1:
            (self.cgroup / "freezer.state").write_text("FROZEN")
        else:
            (self.cgroup / "cgroup.freeze").write_text("1")

    def frozen(self) -> bool:
        if self.v1:
            return _read(self.cgroup / "freezer.state").strip() == "FROZEN"
        return "frozen 1" in _read(self.cgroup / "cgroup.events")

    def thaw(self) -> None:
        if self.cgroup is None:
            return
        with contextlib.suppress(OSError):
            if self.v1:
                (self.cgroup / "freezer.state").write_text("THAWED")
            else:
                (self.cgroup / "cgroup.freeze").write_text("0")

    def kill(self, timeout: float = 10) -> list[list[str]]:
        """SIGKILL every session process (frozen or not); returns what was killed."""
        killed = []
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return killed
            for pid in pids:
                killed.append(cmdline(pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.thaw()  # a frozen process dies once thawed
            if time.monotonic() > deadline:
                raise RuntimeError(f"[{self.rig.name}] session processes survived SIGKILL: "
                                   f"{self.processes()}")
            time.sleep(0.05)


@dataclass
class Interruption:
    """What `Interrupter.run` saw: whether the trigger held, what it killed, the run's log."""

    fired: bool
    result: PyinfraResult
    rig_killed: list[list[str]] = field(default_factory=list)
    at_kill: dict = field(default_factory=dict)

    def killed(self, pattern: str) -> bool:
        """A rig-side process whose command line matches `pattern` was killed."""
        return any(re.search(pattern, " ".join(argv)) for argv in self.rig_killed)


class Watch:
    """What a trigger may look at: the deploy's log lines so far, the rig-side processes and
    the rig's files (`path("/etc/x")` is that file seen from this machine)."""

    def __init__(self, sessions: RigSessions):
        self.sessions = sessions
        self.lines: list[str] = []

    def path(self, rig_path: str) -> Path:
        return self.sessions.rig.merged / rig_path.lstrip("/")

    def process(self, pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(" ".join(argv)) for argv in self.sessions.processes().values())

    def service_process(self, pattern: str, besides: set[int] = frozenset()) -> bool:
        """A process started by the rig's systemd (a service's main process), other than
        `besides` (pids as seen here), matches `pattern`."""
        rx = re.compile(pattern)
        return any(rx.search(" ".join(cmdline(pid))) for pid in self.sessions.services()
                   if pid not in besides)

    def line(self, pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(line) for line in self.lines)


class Interrupter:
    """Runs deploys on one rig and kills them at a trigger (see the module docstring)."""

    def __init__(self, sessions: RigSessions):
        self.sessions = sessions

    def run(self, inventory: str | os.PathLike, trigger: Callable[[Watch], bool], *,
            env: dict[str, str] | None = None, deploy: str = "deploy.py",
            at_kill: Callable[[Watch], dict] | None = None,
            timeout: float = 600) -> Interruption:
        """Start the deploy; when `trigger(watch)` holds, freeze everything, call
        `at_kill(watch)` (a look at the rig while the deploy stands still), kill everything.
        A deploy that ends before the trigger holds is returned with ``fired=False``."""
        args = [str(pyinfra_bin()), "-y", str(inventory), deploy]
        run_env = {**os.environ, "PYINFRA_PROGRESS": "off", "NO_COLOR": "1", **(env or {})}
        watch = Watch(self.sessions)
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=run_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        out: list[str] = []
        reader = threading.Thread(target=lambda: watch.lines.extend(iter(proc.stderr.readline,
                                                                         "")), daemon=True)
        stdout_reader = threading.Thread(target=lambda: out.append(proc.stdout.read()),
                                         daemon=True)
        reader.start()
        stdout_reader.start()
        fired, killed, seen = False, [], {}
        try:
            while proc.poll() is None:
                if trigger(watch):
                    fired = True
                    self.sessions.freeze()
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGSTOP)
                    while not self.sessions.frozen():
                        time.sleep(POLL_S)
                    seen = at_kill(watch) if at_kill else {}
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    killed = self.sessions.kill()
                    break
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"the deploy ran {timeout:.0f}s without the trigger")
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None and not fired:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.sessions.thaw()
            reader.join(10)
            stdout_reader.join(10)
        stderr = "".join(watch.lines)
        result = parse_pyinfra_output("".join(out), stderr, proc.returncode, args=args,
                                      duration=time.monotonic() - start) if not fired else \
            PyinfraResult(args, proc.returncode, "".join(out), stderr, {}, {}, "killed",
                          duration=time.monotonic() - start)
        return Interruption(fired, result, killed, seen)
