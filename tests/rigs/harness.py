"""Test rigs: Debian bookworm systemd-nspawn containers booted with systemd as PID 1.

A rig is an overlayfs copy of a cached base root filesystem, booted by ``systemd-nspawn -b``
inside its own network namespace, attached by a veth pair to a host bridge that belongs to
its fleet. Rigs are reached over SSH as root with a key the fleet generates, which is how
pyinfra reaches them too.

Fleets coexist: each allocates its own bridge and /24 subnet under an flock'd registry file,
and records what it started (nspawn PIDs, mounts, namespaces) so that a later run can clean
up after a fleet whose owner died.

Everything here is plain subprocess calls to ip, iptables, mount, systemd-nspawn, ssh-keygen
and ssh; it needs root.

Environment: ``GARAGE_RIG_CACHE`` (base rootfs cache, default /var/cache/llm-garage/rigs),
``GARAGE_RIG_STATE`` (registry and fleet state, default /var/tmp/llm-garage-rigs).
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("garage.rigs")

HARNESS_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# Installed into the base: the deploys under test install their build dependencies with apt,
# and finding them already there keeps the tests fast and offline.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "git",
    "curl",
    "ca-certificates",
    "sudo",
    "iproute2",
    "procps",
    "build-essential",
    "cmake",
    "ccache",
    "libssl-dev",
    "openssl",
)

# Units that only get in the way inside a short-lived test container.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-networkd-wait-online.service",
    "systemd-journal-flush.service",  # the journal is volatile: nothing to flush
    "getty@tty1.service",
)

DEFAULT_CACHE_DIR = Path("/var/cache/llm-garage/rigs")
DEFAULT_STATE_ROOT = Path("/var/tmp/llm-garage-rigs")
SUBNET_PREFIX = "10.213"
BRIDGE_PREFIX = "grgbr"
FIRST_RIG_OCTET = 10
MAX_FLEETS = 250

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

BOOT_TIMEOUT = 90.0
STOP_GRACE = 10.0

_RIG_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_FLEET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RigError(RuntimeError):
    """A rig or fleet could not be created, reached or torn down."""


# --------------------------------------------------------------------------------------------
# small helpers


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


def _ssh_keygen(path: Path, comment: str) -> None:
    """A new ed25519 key pair without passphrase at `path` (and `path`.pub)."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _cache_dir() -> Path:
    return Path(os.environ.get("GARAGE_RIG_CACHE") or DEFAULT_CACHE_DIR)


def _state_root() -> Path:
    return Path(os.environ.get("GARAGE_RIG_STATE") or DEFAULT_STATE_ROOT)


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


# --------------------------------------------------------------------------------------------
# base root filesystem


def base_key() -> str:
    spec = json.dumps(
        {
            "version": HARNESS_VERSION,
            "suite": SUITE,
            "mirror": MIRROR,
            "packages": sorted(BASE_PACKAGES),
            "masked": sorted(MASKED_UNITS),
        },
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def base_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or _cache_dir()) / f"base-{base_key()}"


def ensure_base(cache_dir: Path | None = None) -> Path:
    """The cached base root filesystem, built first if missing. Safe to call concurrently."""
    cache_dir = cache_dir or _cache_dir()
    final = base_path(cache_dir)
    if (final / ".garage-base").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".garage-base").is_file():
            return final
        for stale in [*cache_dir.glob(".tmp-base-*"), *cache_dir.glob(".trash-base-*")]:
            log.info("removing half-built base %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".tmp-base-{base_key()}-{os.getpid()}"
        with _step(f"building base rootfs {final.name} (debootstrap {SUITE}, one-off)"):
            try:
                _build_base(tmp, cache_dir / "debs")
                if final.exists():  # a directory without the marker is not a base
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _remove_unused_bases(cache_dir, keep=final)
    return final


def _remove_unused_bases(cache_dir: Path, keep: Path) -> None:
    """Old bases (another package list or harness version) that no fleet uses any more."""
    in_use = {e["base"] for e in list_fleets()} | {str(keep)}
    for old in cache_dir.glob("base-*"):
        if str(old) not in in_use:
            log.info("removing unused base %s (in the background)", old.name)
            trash = cache_dir / f".trash-{old.name}-{os.getpid()}"
            os.rename(old, trash)
            subprocess.Popen(
                ["rm", "-rf", "--one-file-system", str(trash)],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )


def _build_base(root: Path, deb_cache: Path) -> None:
    deb_cache.mkdir(parents=True, exist_ok=True)
    with _step("debootstrap"):
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--components=main",
                f"--include={','.join(BASE_PACKAGES)}",
                f"--cache-dir={deb_cache}",
                SUITE,
                str(root),
                MIRROR,
            ],
            timeout=1800,
        )

    def write(rel: str, text: str, mode: int = 0o644) -> None:
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        path.chmod(mode)

    write(
        "/etc/apt/sources.list",
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n",
    )
    write(
        "/etc/apt/apt.conf.d/90garage-rig",
        'Acquire::Languages "none";\nAPT::Install-Recommends "false";\n',
    )
    write("/etc/dpkg/dpkg.cfg.d/garage-rig-unsafe-io", "force-unsafe-io\n")
    write("/etc/resolv.conf", _host_resolv_conf())
    write("/etc/hostname", "rig\n")
    write(
        "/etc/ssh/sshd_config.d/garage-rig.conf",
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UseDNS no\n",
    )
    write(
        "/etc/systemd/journald.conf.d/garage-rig.conf",
        "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
    )

    with _step("apt-get update and upgrade in the base"):
        env = "DEBIAN_FRONTEND=noninteractive"
        _run(
            [
                "systemd-nspawn",
                "-q",
                "-D",
                str(root),
                "--register=no",
                "--keep-unit",
                "--resolv-conf=off",
                "--timezone=off",
                "--link-journal=no",
                "--pipe",
                "sh",
                "-euc",
                f"apt-get -q update && {env} apt-get -qy -o Dpkg::Options::=--force-confold "
                "upgrade && apt-get clean",
            ],
            timeout=1800,
        )

    # sshd in a container: pam_loginuid cannot always write the audit login uid.
    pam = root / "etc/pam.d/sshd"
    if pam.is_file():
        pam.write_text(
            re.sub(
                r"^session\s+required\s+pam_loginuid\.so",
                "session optional pam_loginuid.so",
                pam.read_text(),
                flags=re.M,
            )
        )
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Empty machine-id: every rig gets its own at first start.
    write("/etc/machine-id", "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / ".garage-base").write_text(
        json.dumps(
            {
                "key": base_key(),
                "version": HARNESS_VERSION,
                "suite": SUITE,
                "packages": list(BASE_PACKAGES),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n"
    )


def _host_resolv_conf() -> str:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        lines = []
    servers = [
        line
        for line in lines
        if line.split()[:1] == ["nameserver"] and not line.split()[1].startswith("127.")
    ]
    if not servers:
        log.warning("host has no usable nameserver for rigs; they will not resolve names")
    return "\n".join(servers) + "\n"


# --------------------------------------------------------------------------------------------
# registry of fleets (one per machine, flock'd)


class _Registry:
    def __init__(self, root: Path | None = None):
        self.root = root or _state_root()
        self.path = self.root / "registry.json"
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Yields the registry dict; written back when the block exits normally."""
        with self._thread_lock:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / "registry.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    data = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    data = {"fleets": {}}
                yield data
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
                os.replace(tmp, self.path)


def _entry_is_stale(entry: dict) -> bool:
    if entry.get("boot_id") != _boot_id():
        return True
    owner = entry.get("owner")
    if owner is None:  # a detached fleet (the CLI's): only `down` removes it
        return False
    return _proc_start_time(owner["pid"]) != owner["start_time"]


def _cleanup_entry(entry: dict) -> None:
    """Removes everything a registry entry recorded. Kills only our own nspawn processes."""
    for rig in entry.get("rigs", {}).values():
        pid = rig.get("pid")
        if (
            pid
            and rig.get("pid_start") == _proc_start_time(pid)
            and _is_our_nspawn(pid, rig["merged"])
        ):
            log.info("stopping leftover rig %s (pid %d)", rig["name"], pid)
            _kill_pid(pid)
    for rig in entry.get("rigs", {}).values():
        _umount(Path(rig["merged"]))
        if Path(f"/run/netns/{rig['netns']}").exists():
            _run(["ip", "netns", "del", rig["netns"]], check=False)
    _remove_fleet_network(entry)
    fleet_dir = Path(entry["dir"])
    if fleet_dir.is_dir() and (fleet_dir / ".garage-fleet").exists():
        shutil.rmtree(fleet_dir, ignore_errors=True)


def _remove_fleet_network(entry: dict) -> None:
    if entry.get("masquerade"):
        _run(["iptables", "-t", "nat", "-D", "POSTROUTING", *_masquerade_rule(entry)], check=False)
    for rule in _forward_rules(entry):
        _run(["iptables", "-D", "FORWARD", *rule], check=False)
    if Path(f"/sys/class/net/{entry['bridge']}").exists():
        _run(["ip", "link", "del", entry["bridge"]], check=False)


def _masquerade_rule(entry: dict) -> list[str]:
    return [
        "-s",
        entry["subnet"],
        "!",
        "-o",
        entry["bridge"],
        "-j",
        "MASQUERADE",
        "-m",
        "comment",
        "--comment",
        f"llm-garage {entry['bridge']}",
    ]


def _forward_rules(entry: dict) -> list[list[str]]:
    comment = ["-m", "comment", "--comment", f"llm-garage {entry['bridge']}"]
    return [
        ["-i", entry["bridge"], "-j", "ACCEPT", *comment],
        ["-o", entry["bridge"], "-j", "ACCEPT", *comment],
    ]


def cleanup_stale(registry: _Registry | None = None) -> list[str]:
    """Cleans up fleets whose owning process died. Returns their names."""
    registry = registry or _Registry()
    cleaned = []
    with registry.locked() as data:
        for key, entry in list(data["fleets"].items()):
            if _entry_is_stale(entry):
                with _step(f"cleaning up leftovers of fleet {entry['name']!r}"):
                    _cleanup_entry(entry)
                del data["fleets"][key]
                cleaned.append(entry["name"])
    return cleaned


def list_fleets(registry: _Registry | None = None) -> list[dict]:
    registry = registry or _Registry()
    with registry.locked() as data:
        return [dict(entry, stale=_entry_is_stale(entry)) for entry in data["fleets"].values()]


# --------------------------------------------------------------------------------------------
# rigs and fleets


@dataclass
class Rig:
    """One booted container. Reach it with `ssh`, `put`, `put_text`."""

    fleet: Fleet = field(repr=False)
    name: str
    ip: str
    index: int
    netns: str
    veth: str
    dir: Path
    pid: int | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def merged(self) -> Path:
        return self.dir / "root"

    @property
    def machine(self) -> str:
        """nspawn's machine name: unique on the host (fleets may reuse rig names)."""
        return self.netns

    def ssh_args(self, *, timeout: float = 10) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.fleet.ssh_key_path),
            "-l",
            "root",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            f"ConnectTimeout={max(1, int(timeout))}",
            "-o",
            "ServerAliveInterval=5",
            self.ip,
        ]

    def ssh(
        self, cmd: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Runs `cmd` through root's shell on the rig; text output captured."""
        proc = subprocess.run(
            [*self.ssh_args(), "--", cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise RigError(
                f"[{self.name}] {cmd!r} exited {proc.returncode}\n"
                f"{proc.stdout}{proc.stderr}".rstrip()
            )
        return proc

    def put(self, local: str | os.PathLike, remote: str, mode: int | None = None) -> None:
        """Copies a local file to `remote` (parents created), keeping its mode by default."""
        local = Path(local)
        if mode is None:
            mode = local.stat().st_mode & 0o7777
        self._write(local.read_bytes(), remote, mode)

    def put_text(self, text: str, remote: str, mode: int = 0o644) -> None:
        self._write(text.encode(), remote, mode)

    def _write(self, payload: bytes, remote: str, mode: int) -> None:
        q = shlex.quote(remote)
        tmp = shlex.quote(f"{remote}.garage-put")
        cmd = (
            f'mkdir -p -- "$(dirname -- {q})" && cat > {tmp} && '
            f"chmod {mode:o} {tmp} && mv -f -- {tmp} {q}"
        )
        proc = subprocess.run(
            [*self.ssh_args(), "--", cmd], input=payload, capture_output=True, timeout=300
        )
        if proc.returncode != 0:
            raise RigError(
                f"[{self.name}] writing {remote} failed: {proc.stderr.decode(errors='replace')}"
            )

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Powers the rig off cleanly and boots it again from the same disk (upper dir)."""
        with _step(f"[{self.name}] reboot"):
            self.stop()
            self.fleet._boot(self, timeout=timeout)

    def stop(self) -> None:
        """Shuts the container down (SIGTERM to nspawn = clean poweroff) and unmounts it."""
        if self.pid is not None:
            with _step(f"[{self.name}] stop (pid {self.pid})"):
                _kill_pid(self.pid)
                if self._proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(timeout=1)
            self.pid = None
            self._proc = None
            self.fleet._record(self)
        _umount(self.merged)

    @property
    def running(self) -> bool:
        return (
            self.pid is not None
            and _proc_start_time(self.pid) is not None
            and not _is_zombie(self.pid)
        )

    def journal(self, lines: int = 200) -> str:
        return self.ssh(f"journalctl -b --no-pager -n {int(lines)}", check=False).stdout

    def console_log(self) -> str:
        try:
            return (self.dir / "nspawn.log").read_text(errors="replace")
        except OSError:
            return ""


class Fleet:
    """A set of rigs on one bridge and /24 subnet; a context manager that tears itself down.

    `name` defaults to one derived from the allocated subnet; `state_dir` (default
    ``$GARAGE_RIG_STATE/<name>``, ``/var/tmp/llm-garage-rigs/<name>``) holds the overlay upper
    dirs, the SSH key and logs. A `detached` fleet outlives its process (the CLI's sandbox).
    """

    def __init__(
        self,
        name: str | None = None,
        state_dir: str | os.PathLike | None = None,
        *,
        detached: bool = False,
        masquerade: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ):
        missing = missing_requirements()
        if missing:
            raise RigError("cannot run rigs here, missing: " + ", ".join(missing))
        if name is not None and not _FLEET_NAME_RE.match(name):
            raise RigError(f"bad fleet name {name!r}")
        self._registry = _Registry()
        self._lock = threading.RLock()
        self._torn_down = False
        self.rigs: dict[str, Rig] = {}
        cleanup_stale(self._registry)
        self.base = ensure_base(Path(cache_dir) if cache_dir else None)
        with self._registry.locked() as data:
            fleets = data["fleets"]
            if name is not None and any(e["name"] == name for e in fleets.values()):
                raise RigError(f"fleet {name!r} already exists (see `python -m tests.rigs status`)")
            self.index = self._allocate(fleets)
            self.name = name or f"fleet{self.index}"
            self.bridge = f"{BRIDGE_PREFIX}{self.index}"
            self.subnet = f"{SUBNET_PREFIX}.{self.index}.0/24"
            self.host_ip = f"{SUBNET_PREFIX}.{self.index}.1"
            self.dir = Path(state_dir) if state_dir else _state_root() / self.name
            self.entry = {
                "name": self.name,
                "index": self.index,
                "bridge": self.bridge,
                "subnet": self.subnet,
                "host_ip": self.host_ip,
                "dir": str(self.dir),
                "base": str(self.base),
                "boot_id": _boot_id(),
                "masquerade": masquerade,
                "owner": None
                if detached
                else {"pid": os.getpid(), "start_time": _proc_start_time(os.getpid())},
                "rigs": {},
            }
            fleets[str(self.index)] = self.entry
        try:
            self._setup(masquerade)
        except BaseException:
            self.teardown()
            raise

    # -- allocation and host network

    @staticmethod
    def _allocate(fleets: dict) -> int:
        routes = _run(["ip", "-4", "route", "show"]).stdout
        for index in range(1, MAX_FLEETS + 1):
            if str(index) in fleets:
                continue
            if Path(f"/sys/class/net/{BRIDGE_PREFIX}{index}").exists():
                continue
            if f"{SUBNET_PREFIX}.{index}." in routes:
                continue
            return index
        raise RigError("no free fleet subnet left")

    def _setup(self, masquerade: bool) -> None:
        with _step(f"fleet {self.name}: bridge {self.bridge} {self.host_ip}/24"):
            if (self.dir / ".garage-fleet").exists():  # left behind by an unrecorded fleet
                log.info("removing old state in %s", self.dir)
                shutil.rmtree(self.dir)
            elif self.dir.exists() and any(self.dir.iterdir()):
                raise RigError(f"state dir {self.dir} exists and is not a fleet's; not using it")
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / ".garage-fleet").write_text(self.name + "\n")
            (self.dir / "rigs").mkdir(exist_ok=True)
            _ssh_keygen(self.ssh_key_path, f"llm-garage-rigs {self.name}")
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            if masquerade:
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
                _run(["iptables", "-t", "nat", "-A", "POSTROUTING", *_masquerade_rule(self.entry)])
                for rule in _forward_rules(self.entry):
                    _run(["iptables", "-I", "FORWARD", *rule])

    @property
    def ssh_key_path(self) -> Path:
        return self.dir / "id_ed25519"

    # -- rigs

    def start(self, names: Sequence[str], timeout: float = BOOT_TIMEOUT) -> list[Rig]:
        """Creates and boots rigs in parallel; returns them once SSH answers on each."""
        rigs = [self._new_rig(name) for name in names]
        with _step(f"fleet {self.name}: starting {len(rigs)} rig(s)"):
            with ThreadPoolExecutor(max_workers=min(8, len(rigs) or 1)) as pool:
                futures = [pool.submit(self._create_and_boot, rig, timeout) for rig in rigs]
                errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return rigs

    def rig(self, name: str) -> Rig:
        try:
            return self.rigs[name]
        except KeyError:
            raise KeyError(f"fleet {self.name!r} has no rig {name!r}") from None

    def _new_rig(self, name: str) -> Rig:
        if not _RIG_NAME_RE.match(name):
            raise RigError(f"bad rig name {name!r} (lowercase letters, digits, '-')")
        with self._lock:
            if self._torn_down:
                raise RigError(f"fleet {self.name!r} is torn down")
            if name in self.rigs:
                raise RigError(f"rig {name!r} already exists in fleet {self.name!r}")
            index = len(self.rigs)
            if FIRST_RIG_OCTET + index > 254:
                raise RigError("too many rigs in one fleet")
            rig = Rig(
                fleet=self,
                name=name,
                ip=f"{SUBNET_PREFIX}.{self.index}.{FIRST_RIG_OCTET + index}",
                index=index,
                netns=f"grg{self.index}-{name}",
                veth=f"grg{self.index}v{index}",
                dir=self.dir / "rigs" / name,
            )
            self.rigs[name] = rig
            self._record(rig)
        return rig

    def _record(self, rig: Rig) -> None:
        info = {
            "name": rig.name,
            "ip": rig.ip,
            "netns": rig.netns,
            "veth": rig.veth,
            "merged": str(rig.merged),
            "pid": rig.pid,
            "pid_start": _proc_start_time(rig.pid) if rig.pid else None,
        }
        with self._registry.locked() as data:
            entry = data["fleets"].get(str(self.index))
            if entry is not None:
                entry["rigs"][rig.name] = info
                self.entry = entry

    def _create_and_boot(self, rig: Rig, timeout: float) -> None:
        with _step(f"[{rig.name}] create {rig.ip}"):
            for sub in ("upper", "work", "root"):
                (rig.dir / sub).mkdir(parents=True, exist_ok=True)
            self._mount(rig)
            self._first_boot_files(rig)
            _run(["ip", "netns", "add", rig.netns])
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    rig.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    rig.netns,
                ]
            )
            _run(["ip", "link", "set", rig.veth, "master", self.bridge, "up"])
            ns = ["ip", "-n", rig.netns]
            _run([*ns, "link", "set", "lo", "up"])
            _run([*ns, "addr", "add", f"{rig.ip}/24", "dev", "eth0"])
            _run([*ns, "link", "set", "eth0", "up"])
            _run([*ns, "route", "add", "default", "via", self.host_ip])
        self._boot(rig, timeout=timeout, mounted=True)

    def _mount(self, rig: Rig) -> None:
        if _is_mounted(rig.merged):
            return
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.base},upperdir={rig.dir / 'upper'},workdir={rig.dir / 'work'}",
                str(rig.merged),
            ]
        )

    def _first_boot_files(self, rig: Rig) -> None:
        root = rig.merged

        def write(rel: str, text: str, mode: int = 0o644) -> None:
            path = root / rel.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.write_text(text)
            path.chmod(mode)

        write("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
        write("/etc/hostname", rig.name + "\n")
        write(
            "/etc/hosts",
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{rig.name}\n"
            f"{self.host_ip}\tgarage-host\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )
        write("/etc/resolv.conf", _host_resolv_conf())
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pub = Path(f"{self.ssh_key_path}.pub").read_text()
        write("/root/.ssh/authorized_keys", pub, 0o600)
        _ssh_keygen(root / "etc/ssh/ssh_host_ed25519_key", f"root@{rig.name}")

    def _boot(self, rig: Rig, timeout: float = BOOT_TIMEOUT, mounted: bool = False) -> None:
        if not mounted:
            self._mount(rig)
        with _step(f"[{rig.name}] boot"):
            logfile = open(rig.dir / "nspawn.log", "ab")
            try:
                proc = subprocess.Popen(
                    [
                        "systemd-nspawn",
                        "-b",
                        "-D",
                        str(rig.merged),
                        "--register=no",
                        "--keep-unit",
                        "--console=passive",
                        "--resolv-conf=off",
                        "--timezone=off",
                        "--link-journal=no",
                        "-M",
                        rig.machine,
                        f"--hostname={rig.name}",
                        f"--network-namespace-path=/run/netns/{rig.netns}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                logfile.close()
            rig._proc = proc
            rig.pid = proc.pid
            self._record(rig)
            self._wait_ready(rig, timeout)

    def _wait_ready(self, rig: Rig, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if rig._proc is not None and rig._proc.poll() is not None:
                raise RigError(
                    f"[{rig.name}] systemd-nspawn exited {rig._proc.returncode} "
                    f"during boot:\n{rig.console_log()[-3000:]}"
                )
            try:
                proc = subprocess.run(
                    [*rig.ssh_args(timeout=2), "systemctl is-system-running --wait"],
                    capture_output=True,
                    text=True,
                    timeout=max(1.0, deadline - time.monotonic()),
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                break
            state = proc.stdout.strip()
            if state == "running":
                return
            if state == "degraded":
                failed = rig.ssh("systemctl --failed --no-legend --plain", check=False)
                log.warning("[%s] booted degraded: %s", rig.name, failed.stdout.strip())
                return
            last = f"{proc.returncode}: {proc.stdout}{proc.stderr}".strip()
            time.sleep(0.2)
        raise RigError(
            f"[{rig.name}] not ready after {timeout:.0f}s (last: {last})\n"
            f"{rig.console_log()[-3000:]}"
        )

    # -- inventory

    def write_inventory(
        self,
        path: str | os.PathLike,
        hosts: dict[str, dict] | Sequence[str],
        groups: dict[str, Sequence[str]] | None = None,
    ) -> Path:
        """Writes a pyinfra inventory for the given rigs.

        `hosts` maps rig name to host data (a list of names means no extra data); the data is
        written verbatim over the SSH connection data of `connection_data`. Every host is in
        the group ``rigs``; `groups` adds more (group name -> rig names).
        """
        if not isinstance(hosts, dict):
            hosts = {name: {} for name in hosts}
        lines = [
            f"# pyinfra inventory for test rig fleet {self.name!r}, written by tests.rigs.harness",
            "",
        ]
        entries = []
        for name, data in hosts.items():
            merged = {**self.connection_data(name), **data}
            text = repr(merged)
            try:
                if ast.literal_eval(text) != merged:
                    raise ValueError
            except (ValueError, SyntaxError):
                raise TypeError(
                    f"host data for {name!r} must be plain literals "
                    f"(str, int, float, bool, None, list, tuple, dict)"
                ) from None
            entries.append(f"    ({name!r}, {text}),")
        lines += ["rigs = [", *entries, "]"]
        for group, members in (groups or {}).items():
            if not group.isidentifier() or group == "rigs":
                raise ValueError(f"bad group name {group!r}")
            unknown = set(members) - set(hosts)
            if unknown:
                raise ValueError(f"group {group!r} names unknown hosts {sorted(unknown)}")
            lines.append(f"{group} = {list(members)!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def connection_data(self, name: str) -> dict:
        """The pyinfra SSH connection data for one rig."""
        rig = self.rig(name)
        return {
            "ssh_hostname": rig.ip,
            "ssh_user": "root",
            "ssh_key": str(self.ssh_key_path),
            "ssh_strict_host_key_checking": "no",
            "ssh_known_hosts_file": "/dev/null",
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
            "ssh_connect_retries": 2,
        }

    # -- teardown

    def teardown(self) -> None:
        """Stops every rig, removes mounts, namespaces, bridge, iptables rules and state."""
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
        with _step(f"fleet {getattr(self, 'name', '?')}: teardown"):
            rigs = list(self.rigs.values())
            with ThreadPoolExecutor(max_workers=min(8, len(rigs) or 1)) as pool:
                for rig in rigs:
                    pool.submit(self._stop_quietly, rig)
            with self._registry.locked() as data:
                entry = data["fleets"].pop(str(getattr(self, "index", "")), None)
                if entry is not None:
                    _cleanup_entry(entry)

    @staticmethod
    def _stop_quietly(rig: Rig) -> None:
        try:
            rig.stop()
        except Exception:
            log.exception("[%s] stop failed; cleanup continues", rig.name)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    # -- detached fleets

    @classmethod
    def attach(cls, name: str) -> Fleet:
        """A handle on an existing fleet from the registry (e.g. the CLI's sandbox)."""
        registry = _Registry()
        with registry.locked() as data:
            matches = [e for e in data["fleets"].values() if e["name"] == name]
        if not matches:
            raise RigError(f"no fleet named {name!r}")
        entry = matches[0]
        fleet = cls.__new__(cls)
        fleet._registry = registry
        fleet._lock = threading.RLock()
        fleet._torn_down = False
        fleet.index, fleet.name = entry["index"], entry["name"]
        fleet.bridge, fleet.subnet, fleet.host_ip = (
            entry["bridge"],
            entry["subnet"],
            entry["host_ip"],
        )
        fleet.dir, fleet.base, fleet.entry = Path(entry["dir"]), Path(entry["base"]), entry
        fleet.rigs = {}
        for info in entry["rigs"].values():
            rig = Rig(
                fleet=fleet,
                name=info["name"],
                ip=info["ip"],
                index=len(fleet.rigs),
                netns=info["netns"],
                veth=info["veth"],
                dir=Path(info["merged"]).parent,
                pid=info["pid"],
            )
            if rig.pid and (
                info.get("pid_start") != _proc_start_time(rig.pid)
                or not _is_our_nspawn(rig.pid, info["merged"])
            ):
                rig.pid = None
            fleet.rigs[rig.name] = rig
        return fleet
