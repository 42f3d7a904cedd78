"""Rigs and fleets: rigs on overlayfs over the base image, booted by systemd-nspawn, reached
over SSH; a fleet starts them, writes their pyinfra inventory and tears them down."""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lab.rigs.host import (
    RigError,
    _boot_id,
    _is_mounted,
    _is_our_nspawn,
    _is_zombie,
    _kill_pid,
    _proc_start_time,
    _run,
    _step,
    _umount,
    missing_requirements,
)
from lab.rigs.image import FULL, Image, ensure_base
from lab.rigs.network import (
    BRIDGE_PREFIX,
    FIRST_RIG_OCTET,
    SUBNET_PREFIX,
    _add_fleet_network,
    _add_rig_link,
    _free_index,
    _host_resolv_conf,
)
from lab.rigs.registry import _cleanup_entry, _Registry, _state_root, cleanup_stale
from llm_garage.layout import Layout

log = logging.getLogger("garage.rigs")

BOOT_TIMEOUT = 90.0

_RIG_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_FLEET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _ssh_keygen(path: Path, comment: str) -> None:
    """A new ed25519 key pair without passphrase at `path` (and `path`.pub)."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


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
    binds: tuple[tuple[str, str], ...] = ()
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


RIG_CCACHE_ENV = "GARAGE_RIG_CCACHE"
DEFAULT_RIG_CCACHE = Path("/var/cache/llm-garage/rig-ccache")


def ccache_binds(key: str, garage_root: str = "/opt/llm-garage") -> dict[Path, str]:
    """`binds` for `Fleet.start` that give rigs a ccache kept on the host between runs:
    ``$GARAGE_RIG_CCACHE/<key>`` (default /var/cache/llm-garage/rig-ccache/<key>) at the
    deploy's ccache folder. Rigs that build the same engine under the same name hit it, since
    the deploy sets ccache's base_dir to ``garage_root``."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", key):
        raise RigError(f"bad ccache key {key!r}")
    host = Path(os.environ.get(RIG_CCACHE_ENV) or DEFAULT_RIG_CCACHE) / key
    return {host: Layout(garage_root=garage_root, models_dir="/srv/models").ccache_dir}


def _bind_pairs(binds: Mapping[str | os.PathLike, str]) -> tuple[tuple[str, str], ...]:
    """(host folder, rig path) pairs for nspawn's --bind, host folders created."""
    pairs = []
    for host, inside in binds.items():
        host = Path(host)
        for path in (str(host), inside):
            if not os.path.isabs(path) or ":" in path or "," in path:
                raise RigError(f"bind paths must be absolute, without ':' or ',': {path!r}")
        host.mkdir(parents=True, exist_ok=True)
        pairs.append((str(host.resolve()), inside))
    return tuple(pairs)


class Fleet:
    """A set of rigs on one bridge and /24 subnet; a context manager that tears itself down.

    `name` defaults to one derived from the allocated subnet; `state_dir` (default
    ``$GARAGE_RIG_STATE/<name>``, ``/var/tmp/llm-garage-rigs/<name>``) holds the overlay upper
    dirs, the SSH key and logs. A `detached` fleet outlives its process (the CLI's sandbox).
    `image` is the root filesystem its rigs boot (`lab.rigs.image.FULL` or `MINIMAL`).
    """

    def __init__(
        self,
        name: str | None = None,
        state_dir: str | os.PathLike | None = None,
        *,
        detached: bool = False,
        masquerade: bool = True,
        cache_dir: str | os.PathLike | None = None,
        image: Image = FULL,
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
        self.base = ensure_base(Path(cache_dir) if cache_dir else None, image)
        with self._registry.locked() as data:
            fleets = data["fleets"]
            if name is not None and any(e["name"] == name for e in fleets.values()):
                raise RigError(f"fleet {name!r} already exists (see `python -m lab.rigs status`)")
            self.index = _free_index(fleets)
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
            _add_fleet_network(self.entry, masquerade)

    @property
    def ssh_key_path(self) -> Path:
        return self.dir / "id_ed25519"

    # -- rigs

    def start(
        self,
        names: Sequence[str],
        timeout: float = BOOT_TIMEOUT,
        binds: Mapping[str | os.PathLike, str] | None = None,
    ) -> list[Rig]:
        """Creates and boots rigs in parallel; returns them once SSH answers on each.

        `binds` maps host folders to paths inside every one of these rigs
        (``systemd-nspawn --bind``, read-write, kept across reboots); a missing host folder
        is created. What a rig writes there outlives the rig (e.g. a ccache shared by runs).
        """
        pairs = _bind_pairs(binds or {})
        rigs = [self._new_rig(name, pairs) for name in names]
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

    def _new_rig(self, name: str, binds: tuple[tuple[str, str], ...] = ()) -> Rig:
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
                binds=binds,
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
            _add_rig_link(rig.netns, rig.veth, self.bridge, rig.ip, self.host_ip)
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
                        *(f"--bind={host}:{inside}" for host, inside in rig.binds),
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
            f"# pyinfra inventory for test rig fleet {self.name!r}, written by lab.rigs.fleet",
            "",
        ]
        entries = []
        path = Path(path)
        for name, data in hosts.items():
            # llm-garage's rig documents go beside the inventory, not into the repository
            merged = {**self.connection_data(name), "docs_dir": str(path.parent / "docs"),
                      **data}
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
