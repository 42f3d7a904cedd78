"""Shared pytest fixtures: test rigs, pyinfra runs and the idempotence gate.

End-to-end tests are marked ``e2e``. They need root and the rig tools; where those are
missing an e2e test fails with the reason, unless ``GARAGE_SKIP_E2E=1`` is set (then it is
skipped with the reason).

Every ``e2e`` test must pass the idempotence gate, ``converge(...)``, at least once: the
deploy runs, must succeed, runs again and must change nothing on any host. A test that
never calls it fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import lab.rigs
from lab.rigs.pyinfra_results import (
    REPO_ROOT,
    PyinfraResult,
    check_first_run,
    converge_runs,
    run_pyinfra,
)

pytest_plugins = ["pytester"]

SKIP_E2E_ENV = "GARAGE_SKIP_E2E"
CONVERGED = pytest.StashKey[bool]()

log = logging.getLogger("garage.tests")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test on systemd-nspawn test rigs (needs root, debootstrap, "
        "systemd-container); must pass the idempotence gate (converge)",
    )


def _require_rigs() -> None:
    missing = lab.rigs.missing_requirements()
    if not missing:
        return
    reason = "e2e tests need " + ", ".join(missing)
    if os.environ.get(SKIP_E2E_ENV) == "1":
        pytest.skip(f"{reason} ({SKIP_E2E_ENV}=1)")
    pytest.fail(
        f"{reason}. Run them as root with debootstrap, systemd-container, iproute2 "
        f"and iptables installed, or set {SKIP_E2E_ENV}=1 to skip them.",
        pytrace=False,
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") is not None:
        item.stash[CONVERGED] = False
        _require_rigs()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if (
        report.when == "call"
        and report.passed
        and item.get_closest_marker("e2e") is not None
        and not item.stash.get(CONVERGED, False)
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: e2e test never passed the idempotence gate. Every e2e test must "
            f"call converge(inventory, deploy) at least once: the deploy runs, succeeds, "
            f"runs again and changes nothing on any host."
        )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def _fleet() -> Iterator[lab.rigs.Fleet]:
    _require_rigs()
    with lab.rigs.Fleet() as fleet:
        yield fleet


@pytest.fixture
def fleet() -> Iterator[lab.rigs.Fleet]:
    """A fresh fleet (bridge, subnet, SSH key) torn down after the test."""
    yield from _fleet()


@pytest.fixture(scope="module")
def module_fleet() -> Iterator[lab.rigs.Fleet]:
    """A fleet shared by the tests of one module, torn down after the module."""
    yield from _fleet()


@pytest.fixture
def start_rigs(fleet: lab.rigs.Fleet) -> Callable[..., list[lab.rigs.Rig]]:
    """Starts rigs in `fleet`: ``start_rigs("gpu1", "gpu2")`` or ``start_rigs(3)``;
    ``binds=`` as for `Fleet.start`."""

    def start(*names: str | int, binds=None) -> list[lab.rigs.Rig]:
        if len(names) == 1 and isinstance(names[0], int):
            first = len(fleet.rigs) + 1
            names = tuple(f"rig{i}" for i in range(first, first + names[0]))
        return fleet.start([str(name) for name in names], binds=binds)

    return start


@pytest.fixture
def write_inventory(fleet: lab.rigs.Fleet, tmp_path: Path) -> Callable[..., Path]:
    """Writes a pyinfra inventory for rigs of `fleet` into the test's tmp_path.

    ``write_inventory({"rig1": {"some_data": 1}}, groups={"gpu": ["rig1"]})``; a list of rig
    names means no extra data. Returns the file's path.
    """

    def write(
        hosts: dict[str, dict] | Sequence[str],
        name: str = "inventory.py",
        groups: dict[str, Sequence[str]] | None = None,
    ) -> Path:
        return fleet.write_inventory(tmp_path / name, hosts, groups=groups)

    return write


@pytest.fixture
def pyinfra_run() -> Callable[..., PyinfraResult]:
    """Runs the pyinfra CLI on an inventory: ``pyinfra_run(inv, "deploy.py", "--limit", "x")``.

    With ``expect_ok=True`` (the default) a failed run fails the test with pyinfra's log.
    """

    def run(
        inventory_path: str | os.PathLike,
        deploy: str | Sequence[str] = "deploy.py",
        *extra_args: str,
        env: dict[str, str] | None = None,
        expect_ok: bool = True,
    ) -> PyinfraResult:
        result = run_pyinfra(inventory_path, deploy, *extra_args, env=env)
        log.info("%s", result.summary())
        if expect_ok:
            check_first_run(result)
        return result

    return run


@pytest.fixture
def converge(request: pytest.FixtureRequest) -> Callable[..., tuple[PyinfraResult, PyinfraResult]]:
    """The idempotence gate: ``first, second = converge(inv, "deploy.py", *extra_args)``.

    Runs the deploy, asserts it succeeded, runs it again and asserts zero changes on every
    host. Returns both results. ``runner`` replaces `run_pyinfra` (tests of the gate itself).
    """

    def gate(
        inventory_path: str | os.PathLike,
        deploy: str | Sequence[str] = "deploy.py",
        *extra_args: str,
        env: dict[str, str] | None = None,
        runner: Callable[..., PyinfraResult] | None = None,
    ) -> tuple[PyinfraResult, PyinfraResult]:
        first, second = converge_runs(
            inventory_path, deploy, *extra_args, env=env, runner=runner or run_pyinfra
        )
        log.info("converged in %.1fs, no-op re-run %.1fs", first.duration, second.duration)
        request.node.stash[CONVERGED] = True
        return first, second

    return gate
