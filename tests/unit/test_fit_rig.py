"""The memory plan against a rig's real memory (the RigMemory and GpuMemory facts, read by
their own commands with the fake nvidia-smi), and the fixes it suggests, each checked by the
plan itself."""

from __future__ import annotations

import json
import subprocess

import pytest

from lab.standins.gpu import FAKES_DIR
from llm_garage import fit
from llm_garage.facts.gpu import GPU_QUERY_COMMAND, GpuMemory
from llm_garage.facts.memory import COMMAND, parse, with_gpus
from llm_garage.fit import MIB, Options
from llm_garage.settings import load_rig

from .test_fit import QWEN397, small

CAPTURED = """\
[apps]
GPU-aaaa, 101, 20000
GPU-aaaa, 202, 1500
GPU-bbbb, 303, [N/A]
[servers]
101 llama-server-big.service 2097152
303 llama-server-other.service 1048576
[meminfo]
MemTotal:       65536000 kB
MemAvailable:   30000000 kB
""".splitlines()
CAPTURED_GPUS = GpuMemory().process([
    "0, NVIDIA GeForce RTX 3090, GPU-aaaa, 00000000:01:00.0, 24576, 22000, 2333, 8.6, "
    "570.172.08, 350.00, 100.00, 350.00, Enabled",
    "1, NVIDIA GeForce RTX 3090, GPU-bbbb, 00000000:21:00.0, 24576, 500, 23833, 8.6, "
    "570.172.08, 350.00, 100.00, 350.00, Enabled",
    "exit=0"])


def run_command(tmp_path, config: dict | None) -> dict:
    """The facts' own commands, in a shell, with the fake nvidia-smi (or none) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin"}
    if config is not None:
        (bin_dir / "nvidia-smi").symlink_to(FAKES_DIR / "nvidia-smi")
        (tmp_path / "gpus.json").write_text(json.dumps(config))
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_NVIDIA_CONFIG": str(
            tmp_path / "gpus.json"), "FAKE_NVIDIA_STATE_DIR": str(tmp_path / "state")}
    def run(command):
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    return with_gpus(parse(run(COMMAND)), GpuMemory().process(run(GPU_QUERY_COMMAND)))


def test_fact_command_reads_memory_used_and_processes_from_nvidia_smi(tmp_path):
    memory = run_command(tmp_path, {"gpus": [
        {"model": "rtx3090", "processes": [{"pid": 4242, "used_memory_mib": 20480}]},
        {"model": "rtxpro6000"}]})
    (a, b) = memory["gpus"]
    assert (a["index"], a["total_mib"], a["used_mib"], a["free_mib"]) == (
        0, 24576, 20481, 24576 - 243 - 20481)
    assert (b["total_mib"], b["free_mib"]) == (97887, 97887 - 425 - 2)
    assert a["uuid"].startswith("GPU-") and memory["apps"] == [
        {"uuid": a["uuid"], "pid": 4242, "used_mib": 20480}]
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    assert memory["ram"]["total_kib"] == total_kib and memory["ram"]["available_kib"] > 0
    assert memory["gpu_error"] is None


def test_fact_without_nvidia_smi_or_without_a_driver(tmp_path):
    none = run_command(tmp_path, None)
    assert none["gpus"] is None and none["gpu_error"] is None and none["ram"]
    (tmp_path / "broken").mkdir()  # the fake without its config: no driver loaded
    env = {"PATH": f"{FAKES_DIR}:/usr/bin:/bin",
           "FAKE_NVIDIA_CONFIG": str(tmp_path / "broken" / "none.json"),
           "FAKE_NVIDIA_STATE_DIR": str(tmp_path / "broken")}
    broken = [subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                             timeout=30, env=env).stdout.splitlines()
              for command in (COMMAND, GPU_QUERY_COMMAND)]
    memory = with_gpus(parse(broken[0]), GpuMemory().process(broken[1]))
    assert memory["gpus"] is None
    assert "couldn't communicate with the NVIDIA driver" in memory["gpu_error"]


def test_fact_parses_servers_and_cells_nvidia_smi_cannot_fill():
    memory = with_gpus(parse(CAPTURED), CAPTURED_GPUS)
    assert memory["apps"][2] == {"uuid": "GPU-bbbb", "pid": 303, "used_mib": None}
    assert memory["servers"] == {101: {"unit": "llama-server-big.service", "rss_kib": 2097152},
                                 303: {"unit": "llama-server-other.service",
                                       "rss_kib": 1048576}}
    assert memory["ram"] == {"total_kib": 65536000, "available_kib": 30000000}


def rig_with(profiles: dict, **data):
    rig, errors = load_rig("r", {
        "gpu_count": 2, "engines": {"e": {"kind": "llama.cpp", "ref": "b8137"},
                                    "cpu": {"kind": "llama.cpp", "ref": "b8137",
                                            "cuda": False}},
        "models": {"m": {"repo": "a/b", "revision": "main", "quant": "Q4"}},
        "profiles": profiles, **data})
    assert not errors, errors
    return rig


def profile(**settings):
    return {"model": "m", "engine": "e", "port": 8000, "ctx_size": 1000, **settings}


def test_capacity_from_facts_counts_only_what_this_deploy_replaces_as_free():
    rig = rig_with({"big": profile(), "other": profile(port=8001),
                    "old": profile(port=8002, enabled=False)},
                   gpu_memory_mib=99999, gpu_reserve_mib=[0, 24000])
    opts = fit.options_for(rig, "big", with_gpus(parse(CAPTURED), CAPTURED_GPUS))
    # GPU 0: free 2333 + the 20000 of big's own server (pid 101); pid 202 is not ours
    # GPU 1: free 23833 + nothing (pid 303 is `other`, which keeps running), but
    # gpu_reserve_mib 24000 leaves 576: the larger of measured and reserved use counts
    assert opts.capacities == {"0": (2333 + 20000) * MIB, "1": 576 * MIB}
    assert opts.memory_notes["0"] == "nvidia-smi: 24,576 MiB total, 2,243 MiB held by others"
    assert opts.memory_notes["1"].endswith("743 MiB held by others, gpu_reserve_mib 24,000")
    # RAM: available + big's server's resident memory (other's stays taken)
    assert opts.ram == (30000000 + 2097152) * 1024 and not opts.weights_in_ram
    # from `other`'s side, big's server keeps running: its 20000 MiB stay taken
    other = fit.options_for(rig, "other", with_gpus(parse(CAPTURED), CAPTURED_GPUS))
    assert other.capacities["0"] == 2333 * MIB
    assert fit.options_for(rig_with({"big": profile(no_mmap=True)}), "big").weights_in_ram


def test_settings_only_where_nvidia_smi_does_not_answer():
    rig = rig_with({"big": profile()}, gpu_memory_mib=[24576, 12288], gpu_reserve_mib=512)
    no_smi = {"gpus": None, "gpu_error": None, "apps": [], "servers": {}, "ram": None}
    opts = fit.options_for(rig, "big", no_smi)
    assert opts.capacities == {"0": 24064 * MIB, "1": 11776 * MIB} and opts.ram is None
    assert opts.memory_notes["1"] == "gpu_memory_mib 12,288 - gpu_reserve_mib 512"


def test_an_engine_without_cuda_plans_everything_on_the_cpu():
    rig = rig_with({"c": profile(engine="cpu")})
    opts = fit.options_for(rig, "c", with_gpus(parse(CAPTURED), CAPTURED_GPUS))
    assert opts.gpus == [] and opts.capacities == {}
    p = fit.plan(small(), opts)
    assert p.gpus == [] and p.device("CPU").weights == 1000 + 4 * 1110 + 504


def test_ram_counts_kv_always_and_weights_only_without_mmap():
    layout = small()
    opts = Options(gpus=[], ctx_size=1024, ram=100_000)
    p = fit.plan(layout, opts)
    cpu = p.device("CPU")
    # weights memory-mapped: 4 x 64,000 B of KV only
    assert cpu.total == 4 * 65_536 and cpu.headroom == 100_000 - 262_144
    assert "memory-mapped" in " ".join(p.notes)
    assert "CPU needs 0.2 MiB of RAM but has 0.1 MiB" in p.shortfall()
    resident = fit.plan(layout, Options(gpus=[], ctx_size=1024, ram=10**6,
                                        weights_in_ram=True)).device("CPU")
    assert resident.total == 262_144 + 1000 + 4 * 1110 + 504


# --- fixes ----------------------------------------------------------------------------------

def capacities(*mib):
    return {str(i): m * MIB for i, m in enumerate(mib)}


def test_largest_ctx_size_that_fits_is_checked_by_the_plan():
    opts = Options(gpus=["0"], ctx_size=262144, cache_type_k="q8_0", cache_type_v="q8_0",
                   capacities=capacities(66 * 1024))
    p = fit.plan(QWEN397, opts)
    assert p.overfull()
    found = fit.fixes(QWEN397, opts)
    ctx = int(next(f for f in found if f.startswith("ctx_size: "))[10:])
    assert ctx % 256 == 0 and ctx < 262144
    assert fit.fits(QWEN397, Options(**{**vars(opts), "ctx_size": ctx}))
    assert not fit.fits(QWEN397, Options(**{**vars(opts), "ctx_size": ctx + 256}))


def test_q8_0_kv_suggested_when_it_is_enough():
    # 64 GiB of weights + 7.5 GiB f16 KV; q8_0 brings KV to 3.98 GiB
    opts = Options(gpus=["0"], ctx_size=262144, capacities=capacities(69 * 1024))
    assert fit.plan(QWEN397, opts).overfull()
    assert "cache_type_k: q8_0, cache_type_v: q8_0" in fit.fixes(QWEN397, opts)
    assert fit.fits(QWEN397, Options(**{**vars(opts), "cache_type_k": "q8_0",
                                        "cache_type_v": "q8_0"}))


def test_tensor_split_by_layers_and_the_fewest_cpu_moe_layers():
    layout = small(n_layer=8)
    # equal split: CUDA0 blocks 0-4 (5 x 1110 + KV), CUDA1 blocks 5-7 + output
    opts = Options(gpus=["0", "1"], tensor_split=[1, 1], ctx_size=1024,
                   capacities={"0": 4 * (1110 + 65_536), "1": 10**7})
    assert fit.plan(layout, opts).overfull()
    found = fit.fixes(layout, opts)
    split = next(f for f in found if f.startswith("tensor_split: "))
    counts = json.loads(split[len("tensor_split: "):])
    assert sum(counts) == 9 and counts[0] <= 4
    p = fit.plan(layout, Options(**{**vars(opts), "tensor_split": counts}))
    assert not p.overfull() and len(p.device("CUDA0").layers) == counts[0]
    # experts to the CPU: the first N layers' 1000 B each; KV dominates here, so none helps
    assert not any(f.startswith(("n_cpu_moe", "cpu_moe")) for f in found)

    # weights 8 x 1110 + 504, q8_0 KV 8 x 34 x 256 (the least the engine pads to), logits
    # 100 x 512 x 4; 2500 B short
    need = 8 * 1110 + 504 + 8 * 34 * 256 + 204_800
    tight = Options(gpus=["0"], ctx_size=256, cache_type_k="q8_0", cache_type_v="q8_0",
                    capacities={"0": need - 2500})
    found = fit.fixes(layout, tight)
    assert found == ["n_cpu_moe: 3"]  # 3 layers' experts of 1000 B each
    n = 3
    assert fit.fits(layout, Options(**{**vars(tight), "n_cpu_moe": n}))
    assert not fit.fits(layout, Options(**{**vars(tight), "n_cpu_moe": n - 1}))


def test_nothing_suggested_for_what_fits_or_cannot_fit():
    assert fit.fixes(small(), Options(gpus=["0"], ctx_size=1024, capacities=capacities(1))) == []
    hopeless = Options(gpus=["0"], ctx_size=1024, capacities={"0": 10})
    assert fit.fixes(small(), hopeless) == [] and fit.plan(small(), hopeless).overfull()


@pytest.mark.parametrize("costs, caps, expected", [
    ([10] * 6, [30, 30], [3, 3]),
    ([10] * 6, [20, 60], [1, 5]),  # 50% and 83% full, not 100% and 67%
    ([10, 10, 10, 10, 10, 50], [40, 70], [4, 2]),
    ([10, 10, 10, 10, 10, 50], [40, 40], None),  # the last layer alone is too big
    ([10] * 6, [20, 20], None),
])
def test_balanced_split_keeps_layers_in_order(costs, caps, expected):
    assert fit.balanced_split(costs, 0, caps) == expected
