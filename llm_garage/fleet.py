"""Validated settings for every host of an inventory, built once per run before any operation."""

from __future__ import annotations

import weakref

from .refusal import Refusal
from .schema import SettingProblem
from .settings import Rig, load_rig, raw_host_data


class SettingsError(Refusal):
    """Every settings problem of the inventory, one line each, raised before any host changes."""

    def __init__(self, errors: list[SettingProblem]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(
            f"{len(errors)} settings problem(s); nothing was changed on any host:\n{lines}"
        )


def load_fleet(hosts) -> dict[str, Rig]:
    """Validate every host (pyinfra Host objects); raise SettingsError listing all problems."""
    rigs: dict[str, Rig] = {}
    errors: list[SettingProblem] = []
    for host in hosts:
        rig, host_errors = load_rig(host.name, raw_host_data(host))
        errors += host_errors
        if rig is not None:
            rigs[host.name] = rig
    if errors:
        raise SettingsError(errors)
    return rigs


_FLEETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fleet_for(state) -> dict[str, Rig]:
    """The validated fleet of this pyinfra run (validated once, on first use)."""
    if state not in _FLEETS:
        _FLEETS[state] = load_fleet(state.inventory)
    return _FLEETS[state]


def rig_for(host) -> Rig:
    """This host's settings; validates every host of the inventory first."""
    return fleet_for(host.state)[host.name]
