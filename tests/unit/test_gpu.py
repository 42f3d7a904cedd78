"""GPU power table parsing and power-limit decisions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_garage.facts.gpu import GPU_TABLE_COMMAND, Gpu, GpuTable, parse_gpu_table
from llm_garage.operations import gpu as gpu_ops
from llm_garage.operations.gpu import GpuError, PowerChange, plan_power
from tests.unit.ophelper import on_host, run_op

FAKE_SMI = Path(__file__).resolve().parents[2] / "lab" / "standins" / "gpu" / "nvidia-smi"

TABLE_3090 = [
    "0, NVIDIA GeForce RTX 3090, 350.00, 100.00, 350.00, Enabled",
    "1, NVIDIA GeForce RTX 3090, 280.00, 100.00, 350.00, Disabled",
]


def gpu(index, limit=350.0, low=100.0, high=350.0, persistence=True, name="RTX 3090"):
    return Gpu(index, name, limit, low, high, persistence)


def test_parse_table():
    assert parse_gpu_table(TABLE_3090) == [
        Gpu(0, "NVIDIA GeForce RTX 3090", 350.0, 100.0, 350.0, True),
        Gpu(1, "NVIDIA GeForce RTX 3090", 280.0, 100.0, 350.0, False),
    ]


def test_parse_table_with_unavailable_cells_and_a_comma_in_the_name():
    rows = parse_gpu_table([
        "1, Tesla K80, Rev 2, [N/A], [Not Supported], [Unknown Error], [N/A]",
        "0, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, 600.00, 150.00, 600.00, Enabled",
        "",
    ])
    assert rows == [
        Gpu(0, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 600.0, 150.0, 600.0, True),
        Gpu(1, "Tesla K80, Rev 2", None, None, None, None),
    ]


@pytest.mark.parametrize("lines", [
    ["NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."],
    ["0, only, three"],
])
def test_parse_table_refuses_what_is_not_a_table(lines):
    assert parse_gpu_table(lines) is None


def test_fact_reads_the_fake_nvidia_smi(tmp_path):
    """The fact's command against the fake nvidia-smi (real output format)."""
    (tmp_path / "etc/fake-nvidia").mkdir(parents=True)
    (tmp_path / "etc/fake-nvidia/gpus.json").write_text(
        '{"gpus": [{"model": "rtx3090"}, {"model": "rtxpro6000"}]}')
    env = dict(os.environ, FAKE_NVIDIA_ROOT=str(tmp_path))
    argv = [sys.executable, str(FAKE_SMI), *GPU_TABLE_COMMAND.split()[1:]]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    assert GpuTable().process(out.splitlines()) == [
        Gpu(0, "NVIDIA GeForce RTX 3090", 350.0, 100.0, 350.0, False),
        Gpu(1, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 600.0, 150.0, 600.0, False),
    ]
    assert GpuTable().requires_command() == "nvidia-smi"


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
