"""The registry of fleets (one per machine, flock'd): what each fleet started, so that a later
run can clean up after a fleet whose owner died.

``GARAGE_RIG_STATE`` moves it and the fleets' state (default /var/tmp/llm-garage-rigs)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from lab.rigs.host import (
    _boot_id,
    _is_our_nspawn,
    _kill_pid,
    _proc_start_time,
    _run,
    _step,
    _umount,
)
from lab.rigs.network import _remove_fleet_network

log = logging.getLogger("garage.rigs")

DEFAULT_STATE_ROOT = Path("/var/tmp/llm-garage-rigs")


def _state_root() -> Path:
    return Path(os.environ.get("GARAGE_RIG_STATE") or DEFAULT_STATE_ROOT)



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
