"""Test rigs for people: ``python -m lab.rigs up|down|status|ssh`` (or ``scripts/rigs``).

    up [--name rigs] [--rigs N]    boot N rigs (rig1..rigN) that stay up until `down`
    down [--name rigs]             stop them and remove everything they used
    status                         list fleets and their rigs
    ssh [--name rigs] RIG [CMD]    log in to a rig as root (or run CMD there)

`up` writes a pyinfra inventory for the rigs into the fleet's directory and prints its path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import lab.rigs
from lab.rigs.host import _proc_start_time

DEFAULT_NAME = "rigs"


def _up(args: argparse.Namespace) -> int:
    fleet = lab.rigs.Fleet(args.name, detached=True)
    try:
        rigs = fleet.start([f"rig{i}" for i in range(1, args.rigs + 1)])
        inventory = fleet.write_inventory(fleet.dir / "inventory.py", [r.name for r in rigs])
    except BaseException:
        fleet.teardown()
        raise
    print(f"fleet {fleet.name}: bridge {fleet.bridge}, host address {fleet.host_ip}")
    for rig in rigs:
        print(f"  {rig.name:<10} {rig.ip}")
    print(f"inventory: {inventory}")
    print(
        "ssh:       scripts/rigs ssh "
        + ("" if args.name == DEFAULT_NAME else f"--name {args.name} ")
        + rigs[0].name
    )
    print(f"pyinfra:   .venv/bin/pyinfra {inventory} deploy.py")
    return 0


def _down(args: argparse.Namespace) -> int:
    lab.rigs.Fleet.attach(args.name).teardown()
    print(f"fleet {args.name} is down")
    return 0


def _status(args: argparse.Namespace) -> int:
    lab.rigs.cleanup_stale()
    fleets = lab.rigs.list_fleets()
    if not fleets:
        print("no fleets")
    for entry in fleets:
        owner = entry["owner"]["pid"] if entry["owner"] else "detached"
        print(
            f"{entry['name']}: {entry['bridge']} {entry['host_ip']} (owner {owner}) {entry['dir']}"
        )
        for rig in entry["rigs"].values():
            up = rig["pid"] and _proc_start_time(rig["pid"]) == rig["pid_start"]
            print(f"  {rig['name']:<10} {rig['ip']:<15} {'up' if up else 'down'}")
    return 0


def _ssh(args: argparse.Namespace) -> int:
    rig = lab.rigs.Fleet.attach(args.name).rig(args.rig)
    argv = rig.ssh_args()
    if sys.stdin.isatty():
        argv.insert(1, "-t")
    argv += args.command
    os.execvp(argv[0], argv)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rigs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="boot a fleet of rigs")
    up.add_argument("--name", default=DEFAULT_NAME)
    up.add_argument("--rigs", type=int, default=2)
    down = sub.add_parser("down", help="tear a fleet down")
    down.add_argument("--name", default=DEFAULT_NAME)
    sub.add_parser("status", help="list fleets")
    ssh = sub.add_parser("ssh", help="ssh into a rig")
    ssh.add_argument("rig")
    ssh.add_argument("--name", default=DEFAULT_NAME)
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.cmd == "up" else logging.WARNING,
        format="%(asctime)s %(message)s",
    )
    try:
        return {"up": _up, "down": _down, "status": _status, "ssh": _ssh}[args.cmd](args)
    except lab.rigs.RigError as exc:
        print(f"rigs: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
