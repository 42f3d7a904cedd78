"""The fleets' networks: a host bridge and /24 subnet per fleet, NAT to the outside, and
per rig a network namespace joined to the bridge by a veth pair."""

from __future__ import annotations

import logging
from pathlib import Path

from lab.rigs.host import RigError, _run

log = logging.getLogger("garage.rigs")

SUBNET_PREFIX = "10.213"
BRIDGE_PREFIX = "grgbr"
FIRST_RIG_OCTET = 10
MAX_FLEETS = 250


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


def _free_index(fleets: dict) -> int:
    """The lowest fleet index whose bridge and subnet nothing on this machine uses."""
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


def _add_fleet_network(entry: dict, masquerade: bool) -> None:
    """The fleet's bridge with the host's address on it and, with `masquerade`, NAT out."""
    _run(["ip", "link", "add", entry["bridge"], "type", "bridge"])
    _run(["ip", "addr", "add", f"{entry['host_ip']}/24", "dev", entry["bridge"]])
    _run(["ip", "link", "set", entry["bridge"], "up"])
    if masquerade:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        _run(["iptables", "-t", "nat", "-A", "POSTROUTING", *_masquerade_rule(entry)])
        for rule in _forward_rules(entry):
            _run(["iptables", "-I", "FORWARD", *rule])


def _add_rig_link(netns: str, veth: str, bridge: str, ip: str, gateway: str) -> None:
    """A network namespace for a rig whose eth0 (address `ip`/24, default route via `gateway`)
    is a veth pair's end; the other end, `veth`, joins `bridge`.

    The fleet's index is free (no registered fleet has it), so a link or namespace of these
    names is a leftover of a run killed while it set up its rigs: removed first."""
    if Path(f"/sys/class/net/{veth}").exists():
        _run(["ip", "link", "del", veth])
    if Path(f"/run/netns/{netns}").exists():
        _run(["ip", "netns", "del", netns])
    _run(["ip", "netns", "add", netns])
    _run(
        [
            "ip",
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ]
    )
    _run(["ip", "link", "set", veth, "master", bridge, "up"])
    ns = ["ip", "-n", netns]
    _run([*ns, "link", "set", "lo", "up"])
    _run([*ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
    _run([*ns, "link", "set", "eth0", "up"])
    _run([*ns, "route", "add", "default", "via", gateway])
