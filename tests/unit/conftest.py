import os
from pathlib import Path

import pytest

from llm_garage.cli import load_inventory
from llm_garage.fleet import load_fleet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def garage_fleet():
    """The validated rigs of the example inventory, inventory/garage.py."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return load_fleet(load_inventory("inventory/garage.py"))
    finally:
        os.chdir(cwd)
