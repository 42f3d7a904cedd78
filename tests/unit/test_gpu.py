"""GPU power table parsing and power-limit decisions."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from llm_garage.facts.gpu import (
    GPU_QUERY_COMMAND,
    Gpu,
    GpuComputeCaps,
    GpuInventory,
    GpuMemory,
    GpuTable,
    NvidiaDriver,
    parse_query,
)
from llm_garage.operations import gpu as gpu_ops
from llm_garage.operations.gpu import GpuError, PowerChange, plan_power
from tests.unit.ophelper import on_host, run_op

FAKE_SMI = Path(__file__).resolve().parents[2] / "lab" / "standins" / "gpu" / "nvidia-smi"

# nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits, as the driver prints it
# (index, name, uuid, pci.bus_id, memory.total/used/free, compute_cap, driver_version,
# power.limit/min_limit/max_limit, persistence_mode)
QUERY_3090 = [
    "0, NVIDIA GeForce RTX 3090, GPU-aaaa, 00000000:01:00.0, 24576, 22000, 2333, 8.6, "
    "570.172.08, 350.00, 100.00, 350.00, Enabled",
    "1, NVIDIA GeForce RTX 3090, GPU-bbbb, 00000000:21:00.0, 24576, 1, 24332, 8.6, "
    "570.172.08, 280.00, 100.00, 350.00, Disabled",
    "exit=0",
]
NO_DRIVER = ["NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.", "exit=9"]


def gpu(index, limit=350.0, low=100.0, high=350.0, persistence=True, name="RTX 3090"):
    return Gpu(index, name, limit, low, high, persistence)


def test_power_table():
    assert GpuTable().process(QUERY_3090) == [
        Gpu(0, "NVIDIA GeForce RTX 3090", 350.0, 100.0, 350.0, True),
        Gpu(1, "NVIDIA GeForce RTX 3090", 280.0, 100.0, 350.0, False),
    ]


def test_unavailable_cells_and_a_comma_in_the_name():
    rows = [
        "1, Tesla K80, Rev 2, GPU-k80, 00000000:05:00.0, 11441, [N/A], [N/A], 3.7, 470.82.01, "
        "[N/A], [Not Supported], [Unknown Error], [N/A]",
        "0, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, GPU-pro, 00000000:41:00.0, "
        "97887, 425, 97460, 12.0, 580.95.05, 600.00, 150.00, 600.00, Enabled",
        "",
        "exit=0",
    ]
    assert GpuTable().process(rows) == [
        Gpu(0, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 600.0, 150.0, 600.0, True),
        Gpu(1, "Tesla K80, Rev 2", None, None, None, None),
    ]
    memory = GpuMemory().process(rows)
    assert memory["gpu_error"] is None and memory["gpus"][1] == {
        "index": 1, "uuid": "GPU-k80", "total_mib": 11441, "used_mib": None, "free_mib": None}
    assert GpuComputeCaps().process(rows) == {"caps": ["12.0", "3.7"], "error": None}
    assert NvidiaDriver().process(rows) == {"version": "580.95.05", "error": None}


@pytest.mark.parametrize("lines", [NO_DRIVER, ["0, only, three", "exit=0"]])
def test_what_is_not_a_table_is_nvidia_smis_message(lines):
    said = " ".join(lines[:-1])
    assert parse_query(lines) == (None, said)
    assert GpuTable().process(lines) is None  # the power settings stop, saying so
    assert GpuMemory().process(lines) == {"gpus": None, "gpu_error": said}
    assert GpuInventory().process(lines) == {"gpus": [], "error": said}
    assert GpuComputeCaps().process(lines) == {"caps": [], "error": said}
    assert NvidiaDriver().process(lines) == {"version": None, "error": said}


def test_every_gpu_fact_runs_the_one_query():
    """One command for all: a read-ahead batch runs nvidia-smi once for every GPU fact."""
    facts = (GpuTable, GpuMemory, GpuInventory, GpuComputeCaps, NvidiaDriver)
    assert {cls().command for cls in facts} == {GPU_QUERY_COMMAND}


def run_query(tmp_path, config: dict | None) -> list[str]:
    """The facts' own command, in a shell, with the fake nvidia-smi (or none) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if config is not None:
        (bin_dir / "nvidia-smi").symlink_to(FAKE_SMI)
        (tmp_path / "gpus.json").write_text(json.dumps(config))
        env.update(FAKE_NVIDIA_CONFIG=str(tmp_path / "gpus.json"),
                   FAKE_NVIDIA_STATE_DIR=str(tmp_path / "state"))
    out = subprocess.run(["sh", "-c", GPU_QUERY_COMMAND], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_facts_read_the_fake_nvidia_smi(tmp_path):
    """The facts' command against the fake nvidia-smi (real output format)."""
    out = run_query(tmp_path, {"gpus": [{"model": "rtx3090"}, {"model": "rtxpro6000"}]})
    assert GpuTable().process(out) == [
        Gpu(0, "NVIDIA GeForce RTX 3090", 350.0, 100.0, 350.0, False),
        Gpu(1, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 600.0, 150.0, 600.0, False),
    ]
    inventory = GpuInventory().process(out)
    assert inventory["error"] is None
    assert [(g["name"], g["memory_mib"], g["compute_cap"]) for g in inventory["gpus"]] == [
        ("NVIDIA GeForce RTX 3090", 24576, "8.6"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 97887, "12.0")]
    assert all(g["uuid"].startswith("GPU-") and g["pci_bus_id"] for g in inventory["gpus"])
    assert GpuComputeCaps().process(out) == {"caps": ["8.6", "12.0"], "error": None}
    assert re.fullmatch(r"\d+(\.\d+)+", NvidiaDriver().process(out)["version"])


def test_facts_without_nvidia_smi_or_without_a_driver(tmp_path):
    missing = run_query(tmp_path, None)
    for cls in (GpuTable, GpuMemory, GpuInventory, GpuComputeCaps, NvidiaDriver):
        assert cls().process(missing) is None, cls
    (tmp_path / "broken").mkdir()  # the fake without its config: no driver loaded
    broken = subprocess.run(
        ["sh", "-c", GPU_QUERY_COMMAND], capture_output=True, text=True, timeout=30,
        env={"PATH": f"{FAKE_SMI.parent}:/usr/bin:/bin",
             "FAKE_NVIDIA_CONFIG": str(tmp_path / "broken" / "none.json"),
             "FAKE_NVIDIA_STATE_DIR": str(tmp_path / "broken")}).stdout.splitlines()
    assert GpuTable().process(broken) is None
    assert "couldn't communicate with the NVIDIA driver" in GpuMemory().process(broken)[
        "gpu_error"]


# --- decisions -----------------------------------------------------------------------------

def test_nothing_to_do_when_everything_matches():
    assert plan_power("garage", 2, [350.0, 349.8], True, [gpu(0), gpu(1)]) == []


def test_only_the_gpus_that_differ_are_set():
    table = [gpu(0), gpu(1, limit=280.0, persistence=False), gpu(2, limit=300.0)]
    assert plan_power("garage", 3, [350.0, 350.0, 300.0], True, table) == [
        PowerChange("pm", None, "1", "persistence mode off on GPU 1, turning on"),
        PowerChange("pl", 1, "350", "GPU 1 power limit 280 W, setting 350 W"),
    ]


def test_persistence_left_alone_and_no_limits():
    table = [gpu(0, limit=123.0, persistence=False)]
    assert plan_power("r", 1, None, False, table) == []


def test_limit_outside_the_range_names_host_gpu_and_range_and_sets_nothing():
    table = [gpu(0), gpu(1, name="NVIDIA RTX PRO 6000", low=150.0, high=600.0)]
    with pytest.raises(GpuError) as e:
        plan_power("epyc", 2, [350.0, 700.0], True, table)
    assert str(e.value) == (
        "host 'epyc': GPU 1 (NVIDIA RTX PRO 6000): gpu_power_limit_w 700 W is outside the "
        "allowed range 150-600 W. Nothing was set.")


def test_every_bad_gpu_is_named():
    with pytest.raises(GpuError) as e:
        plan_power("garage", 2, [50.0, 400.0], True, [gpu(0), gpu(1)])
    assert "GPU 0 (RTX 3090): gpu_power_limit_w 50 W" in str(e.value)
    assert "GPU 1 (RTX 3090): gpu_power_limit_w 400 W" in str(e.value)


def test_unknown_range_cannot_take_a_limit():
    with pytest.raises(GpuError, match=r"GPU 0 \(RTX 3090\) does not report"):
        plan_power("r", 1, [300.0], True, [gpu(0, low=None, high=None)])


def test_count_mismatch():
    with pytest.raises(GpuError) as e:
        plan_power("garage", 6, [350.0] * 6, True, [gpu(0), gpu(1)])
    assert str(e.value).startswith("host 'garage': gpu_count is 6 but nvidia-smi lists 2 GPU(s)")


def test_missing_nvidia_smi():
    with pytest.raises(GpuError, match="nvidia-smi is missing"):
        plan_power("r", 1, None, True, None)


# --- the operation -------------------------------------------------------------------------

def power(table, executing=False, **kwargs):
    return run_op(gpu_ops.power_settings, {"gpu.GpuTable": table}, host_name="garage",
                  executing=executing, **kwargs)


def test_operation_sets_what_drifted_and_reports_it():
    table = [gpu(0, persistence=False), gpu(1, limit=280.0, persistence=False)]
    run = power(table, gpu_count=2, limits=[350.0, 350.0], persistence=True,
                nvidia_smi="/usr/bin/nvidia-smi")
    assert run.raw == ["/usr/bin/nvidia-smi -pm 1", "/usr/bin/nvidia-smi -i 1 -pl 350"]
    assert run.logs == ["drift: persistence mode off on GPU 0, 1, turning on",
                        "drift: GPU 1 power limit 280 W, setting 350 W"]


def test_operation_noop():
    run = power([gpu(0)], gpu_count=1, limits=[350.0])
    assert run.commands == []
    assert run.noops == ["GPU persistence mode and power limits already as configured"]


def test_operation_refuses_before_yielding_anything():
    with on_host({"gpu.GpuTable": [gpu(0), gpu(1)]}, host_name="garage"), \
            pytest.raises(GpuError):
        next(gpu_ops.power_settings._inner(gpu_count=2, limits=[350.0, 351.0]))


def test_operation_fails_the_host_instead_of_raising_while_running():
    """Settings checked at prepare time can meet other GPUs when the operation runs."""
    run = power([gpu(0)], executing=True, gpu_count=2, limits=[350.0, 350.0])
    assert run.raw == [
        "echo 'host '\"'\"'garage'\"'\"': gpu_count is 2 but nvidia-smi lists 1 GPU(s) "
        "(0: RTX 3090); set gpu_count to what the rig has' >&2; exit 1"]
