"""One deploy per rig: two deploys started together, one runs and the other stops at once
saying who holds the rig; a lock left by a run that is gone is taken over with a note."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from lab.rigs.pyinfra_results import run_pyinfra
from lab.serving import controller_env, profile, rig_data, served_ids, sh

pytestmark = pytest.mark.e2e

LOCK = "/opt/llm-garage/state/deploy.lock"


def test_two_deploys_at_once_one_runs_the_other_stops(
        start_rigs, write_inventory, converge, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    inventory = write_inventory({"rig1": rig_data(hub, git_url, {"a": profile(8081)})})
    results = {}

    first = threading.Thread(target=lambda: results.update(
        first=run_pyinfra(inventory, env=env)))
    first.start()
    deadline = time.monotonic() + 120
    while not rig.ssh(f"test -f {LOCK}", check=False).returncode == 0:
        assert time.monotonic() < deadline and first.is_alive(), "the first run never locked"
        time.sleep(0.2)
    second = run_pyinfra(inventory, env=env)
    first.join()

    assert results["first"].ok, results["first"].summary()
    assert not second.ok and second.changes() == {}
    assert (f"another deploy is running on this rig: {socket.gethostname()} pid "
            in second.stderr) and f"holds {LOCK}" in second.stderr
    assert served_ids(rig, 8081) == ["a"]
    assert rig.ssh(f"test -e {LOCK}", check=False).returncode == 1  # released at the end
    converge(inventory, env=env)


@pytest.mark.parametrize("holder, why", [
    (f"{socket.gethostname()} pid 999999 since 2026-01-01T00:00:00+0000\n{{boot}}",
     "its run on this machine is gone"),
    ("elsewhere pid 1 since 2026-01-01T00:00:00+0000\nanother-boot-id",
     "the rig rebooted since it was taken"),
])
def test_a_lock_left_by_a_run_that_is_gone_is_taken_over(
        holder, why, start_rigs, write_inventory, converge, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    boot = sh(rig, "cat /proc/sys/kernel/random/boot_id")
    rig.ssh(f"mkdir -p {os.path.dirname(LOCK)}")
    rig.put_text(holder.replace("{boot}", boot) + "\n", LOCK, 0o644)
    inventory = write_inventory({"rig1": rig_data(hub, git_url, {"a": profile(8081)})})

    first, _ = converge(inventory, env=controller_env(tmp_path))

    assert f"deploy lock {LOCK} ({holder.splitlines()[0]}) taken over: {why}" in first.stderr
    assert rig.ssh(f"test -e {LOCK}", check=False).returncode == 1


def test_a_lock_held_elsewhere_stops_the_rig_before_anything_runs(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    boot = sh(rig, "cat /proc/sys/kernel/random/boot_id")
    rig.ssh(f"mkdir -p {os.path.dirname(LOCK)}")
    rig.put_text(f"workstation pid 4242 since 2026-11-30T05:00:00+0000\n{boot}\n", LOCK, 0o644)
    inventory = write_inventory({"rig1": rig_data(hub, git_url, {"a": profile(8081)})})

    refused = pyinfra_run(inventory, env=controller_env(tmp_path), expect_ok=False)

    assert "another deploy is running on this rig: workstation pid 4242 since " \
        "2026-11-30T05:00:00+0000 holds" in refused.stderr
    assert refused.changes() == {}
    assert rig.ssh("test -e /opt/llm-garage/bin/garage-build", check=False).returncode == 1
    assert sh(rig, f"head -n 1 {LOCK}").startswith("workstation pid 4242")  # not ours to drop
    # Once that run is done (its lock gone), the deploy converges.
    rig.ssh(f"rm {LOCK}")
    converge(inventory, env=controller_env(tmp_path))
