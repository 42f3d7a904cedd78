"""Debian packages our operations need on the rig."""

from __future__ import annotations

from collections.abc import Sequence

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation
from pyinfra.facts.deb import DebPackages

from llm_garage import readahead
from llm_garage.readahead import reads_ahead


@reads_ahead(lambda **_: [(DebPackages, {})])
@operation()
def installed(packages: Sequence[str]):
    """
    Install the `packages` that are missing, after an ``apt-get update`` (only then: a fresh
    rig may have no package lists, or lists older than its mirror, and a rig that has them
    all fetches nothing).

    + packages: Debian package names

    **Example:**

    .. code:: python

        packages.installed(name="Build tools", packages=["cmake", "ccache"])
    """
    have = readahead.read(DebPackages)
    missing = [p for p in packages if p not in have]
    if not missing:
        host.noop(f"{', '.join(packages)} installed")
        return
    yield StringCommand("apt-get", "update")
    yield StringCommand("DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-o",
                        "Dpkg::Options::=--force-confdef", "-o",
                        "Dpkg::Options::=--force-confold", "install",
                        *[QuoteString(p) for p in missing])
