"""Stand-ins shared by the serving e2e tests (services, GPUs, opencode): the fixture engine
served by git daemon on the fleet's bridge, and the Hugging Face stand-in with a tiny model."""

import pytest

from lab.serving import make_engine_repo, make_hub
from lab.standins.engine_repo import GitDaemon


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    base = tmp_path_factory.mktemp("engines")
    return base, make_engine_repo(base)


@pytest.fixture
def git_url(fleet, repos):
    base, _ = repos
    with GitDaemon(base, bind_ip=fleet.host_ip) as daemon:
        yield daemon.url


@pytest.fixture
def hub(fleet, tmp_path):
    with make_hub(fleet.host_ip, tmp_path / "hub") as server:
        yield server
