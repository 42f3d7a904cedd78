from pathlib import Path

import pytest

from llm_garage.fleet import SettingsError
from llm_garage.settings import load_rig

REPO = Path(__file__).resolve().parents[2]


def example_hosts(path: Path) -> dict[str, dict]:
    """Host name -> data of an inventory file whose groups list `(name, data)` hosts, read the
    way pyinfra reads them (module-level lists, `__file__` set), without loading pyinfra's
    CLI: that patches the process with gevent, which unit tests with threads must not see."""
    namespace = {"__file__": str(path.relative_to(REPO))}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    hosts: dict[str, dict] = {}
    for key, value in namespace.items():
        if key.startswith("_") or not isinstance(value, list | tuple):
            continue
        for entry in value:
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
                hosts[entry[0]] = entry[1]
    return hosts


@pytest.fixture(scope="session")
def garage_fleet():
    """The validated rigs of the example inventory, inventory/garage.py."""
    rigs, problems = {}, []
    for name, data in example_hosts(REPO / "inventory" / "garage.py").items():
        rig, errors = load_rig(name, data)
        problems += errors
        rigs[name] = rig
    if problems:
        raise SettingsError(problems)
    assert set(rigs) == {"garage", "epyc"}
    return rigs
