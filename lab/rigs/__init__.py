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

The modules: `host` (commands, processes, mounts, what the machine needs), `image` (the cached
root filesystems: `FULL`, with the deploy's tools preinstalled, and `MINIMAL`, a bare Debian
12 with systemd, SSH and python3), `network` (bridges, namespaces, veth pairs, NAT),
`registry` (the fleets on this machine, cleanup after dead owners), `fleet` (`Rig` and
`Fleet`), `pyinfra_results` (running pyinfra and reading its results); ``python -m lab.rigs``
is the CLI (``scripts/rigs``).

Environment: ``GARAGE_RIG_CACHE`` (base rootfs cache, default /var/cache/llm-garage/rigs),
``GARAGE_RIG_STATE`` (registry and fleet state, default /var/tmp/llm-garage-rigs),
``GARAGE_RIG_CCACHE`` (host folders bound at rigs' ccache by ``ccache_binds``, default
/var/cache/llm-garage/rig-ccache).
"""

from lab.rigs.fleet import Fleet, Rig, ccache_binds
from lab.rigs.host import RigError, missing_requirements
from lab.rigs.image import FULL, MINIMAL, base_path, ensure_base
from lab.rigs.registry import DEFAULT_STATE_ROOT, cleanup_stale, list_fleets

__all__ = [
    "DEFAULT_STATE_ROOT",
    "FULL",
    "MINIMAL",
    "Fleet",
    "Rig",
    "RigError",
    "base_path",
    "ccache_binds",
    "cleanup_stale",
    "ensure_base",
    "list_fleets",
    "missing_requirements",
]
