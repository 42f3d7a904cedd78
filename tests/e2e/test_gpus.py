"""GPU power limits on test rigs with the fake nvidia-smi: set where they differ, checked against
each GPU's range before anything is set, re-applied at boot by the oneshot unit."""

from __future__ import annotations

import pytest

from lab.serving import (
    controller_env,
    gpu_state,
    install_fake_gpus,
    nvidia_calls,
    profile,
    rig_data,
    served_ids,
    service,
    sh,
    verify_units,
)

pytestmark = pytest.mark.e2e

POWER = "llm-garage-gpu-power.service"


def two_rigs(hub, git_url, garage_limit=(300, 280, 350), epyc_limit=450):
    """garage: three RTX 3090 (100-350 W, 350 W by default), one limit each; epyc: one RTX PRO
    6000 (150-600 W), one limit for all."""
    return {
        "garage": rig_data(hub, git_url, {"qwen": profile(8000)}, gpu_count=3,
                           gpu_power_limit_w=list(garage_limit)),
        "epyc": rig_data(hub, git_url, {"big": profile(8000)}, gpu_count=1,
                         gpu_power_limit_w=epyc_limit),
    }


def test_limits_set_where_they_differ_drift_corrected_and_reboot(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    garage, epyc = start_rigs("garage", "epyc")
    install_fake_gpus(garage, "rtx3090", 3)
    install_fake_gpus(epyc, "rtxpro6000", 1)
    env = controller_env(tmp_path)
    inventory = write_inventory(two_rigs(hub, git_url))

    first, _ = converge(inventory, env=env)

    assert gpu_state(garage) == [(0, 300.0, "Enabled"), (1, 280.0, "Enabled"),
                                 (2, 350.0, "Enabled")]
    assert gpu_state(epyc) == [(0, 450.0, "Enabled")]
    # Only what differed was set: GPU 2 was already at 350 W.
    assert nvidia_calls(garage) == [["-pm", "1"], ["-i", "0", "-pl", "300"],
                                    ["-i", "1", "-pl", "280"]]
    assert "drift: GPU 0 power limit 350 W, setting 300 W" in first.stderr
    for rig in (garage, epyc):
        assert "GPUs | GPU persistence mode and power limits" in first.changes()[rig.name]
        assert service(rig, POWER)["UnitFileState"] == "enabled"
    lines = sh(garage, f"cat /etc/systemd/system/{POWER}").splitlines()
    assert "Before=llama-server-qwen.service" in lines
    assert "ExecStart=/usr/bin/nvidia-smi -i 1 -pl 280" in lines
    assert "After=network-online.target llm-garage-gpu-power.service" in sh(
        garage, "cat /etc/systemd/system/llama-server-qwen.service").splitlines()
    verify_units(garage, POWER, "llama-server-qwen.service")

    # Someone changes a limit by hand: the next run puts it back and says so.
    garage.ssh("nvidia-smi -i 2 -pl 200")
    fixed = pyinfra_run(inventory, env=env)
    assert fixed.changes() == {"garage": ["GPUs | GPU persistence mode and power limits"]}
    assert "drift: GPU 2 power limit 200 W, setting 350 W" in fixed.stderr
    assert gpu_state(garage)[2] == (2, 350.0, "Enabled")

    # A reboot forgets the limits; the boot unit sets them again before the server starts.
    garage.reboot()
    assert nvidia_calls(garage)[0] == ["-pm", "1"]  # fresh log: only the boot unit's calls
    assert gpu_state(garage) == [(0, 300.0, "Enabled"), (1, 280.0, "Enabled"),
                                 (2, 350.0, "Enabled")]
    power_done = int(service(garage, POWER)["ActiveEnterTimestampMonotonic"])
    server = service(garage, "llama-server-qwen.service")
    assert server["ActiveState"] == "active"
    assert int(server["ActiveEnterTimestampMonotonic"]) >= power_done
    assert served_ids(garage, 8000) == ["qwen"]
    # ...so after a reboot a deploy has nothing to do: no limit to set, no restart.
    after = pyinfra_run(inventory, env=env)
    assert after.changes() == {}
    assert service(garage, "llama-server-qwen.service")["MainPID"] == server["MainPID"]
    converge(inventory, env=env)


def test_a_limit_outside_the_gpus_range_is_refused_before_anything_is_set(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    garage, epyc = start_rigs("garage", "epyc")
    install_fake_gpus(garage, "rtx3090", 3)
    install_fake_gpus(epyc, "rtxpro6000", 1)
    env = controller_env(tmp_path)

    refused = pyinfra_run(write_inventory(two_rigs(hub, git_url, epyc_limit=700)), env=env,
                          expect_ok=False)

    assert not refused.ok
    assert ("host 'epyc': GPU 0 (NVIDIA RTX PRO 6000 Blackwell Workstation Edition): "
            "gpu_power_limit_w 700 W is outside the allowed range 150-600 W. Nothing was set."
            in refused.stderr)
    assert "Beginning operation run" not in refused.stderr
    for rig in (garage, epyc):
        assert nvidia_calls(rig) == []
        assert sh(rig, "ls /opt/llm-garage /etc/systemd/system/llama-server-* 2>/dev/null "
                       "|| true") == ""

    # The wrong count of GPUs is refused the same way.
    hosts = two_rigs(hub, git_url)
    hosts["epyc"]["gpu_count"] = 2
    hosts["epyc"]["gpu_power_limit_w"] = None
    miscounted = pyinfra_run(write_inventory(hosts), env=env, expect_ok=False)
    assert "host 'epyc': gpu_count is 2 but nvidia-smi lists 1 GPU(s)" in miscounted.stderr
    assert nvidia_calls(epyc) == []

    converge(write_inventory(two_rigs(hub, git_url, epyc_limit=600)), env=env)
    assert gpu_state(epyc) == [(0, 600.0, "Enabled")]
