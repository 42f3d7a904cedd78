"""The fake nvidia-smi and nvcc answer in the formats of the real tools."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from lab.standins.gpu import FAKES_DIR, fake_gpu_files

NVIDIA_SMI = FAKES_DIR / "nvidia-smi"
NVCC = FAKES_DIR / "nvcc"


@pytest.fixture
def rig(tmp_path):
    """A root directory for the fakes, laid out like a rig, filled by fake_gpu_files."""

    def make(model="rtx3090", count=2, cuda_version=None):
        for path, (content, mode) in fake_gpu_files(model, count, cuda_version).items():
            target = tmp_path / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
        return tmp_path

    return make


def run(tool, root, *args, euid=None):
    env = dict(os.environ, FAKE_NVIDIA_ROOT=str(root))
    if euid is not None:
        env["FAKE_NVIDIA_EUID"] = str(euid)
    return subprocess.run([sys.executable, str(tool), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def smi(root, *args, **kw):
    return run(NVIDIA_SMI, root, *args, **kw)


def calls(root):
    log = root / "run/fake-nvidia/calls.log"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_fake_gpu_files_lists_rig_paths():
    files = fake_gpu_files("rtx3090", 6, "12.8")
    assert set(files) == {"/usr/bin/nvidia-smi", "/etc/fake-nvidia/gpus.json",
                          "/usr/local/cuda/bin/nvcc", "/etc/fake-nvidia/cuda_version",
                          "/usr/local/cuda/lib64/libcublas.so"}
    assert files["/usr/bin/nvidia-smi"][1] == 0o755
    assert json.loads(files["/etc/fake-nvidia/gpus.json"][0]) == {"model": "rtx3090", "count": 6}
    assert set(fake_gpu_files("rtxpro6000", 1)) == {"/usr/bin/nvidia-smi",
                                                     "/etc/fake-nvidia/gpus.json"}
    with pytest.raises(ValueError):
        fake_gpu_files("rtx9090", 1)
    with pytest.raises(ValueError):
        fake_gpu_files(["rtx3090"], 2)


def test_fake_query_csv_with_header_and_units(rig):
    root = rig("rtx3090", 2)
    r = smi(root, "--query-gpu=index,name,memory.total,compute_cap,power.limit,"
                  "power.default_limit,power.min_limit,power.max_limit,persistence_mode",
            "--format=csv")
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    assert lines[0] == ("index, name, memory.total [MiB], compute_cap, power.limit [W], "
                        "power.default_limit [W], power.min_limit [W], power.max_limit [W], "
                        "persistence_mode")
    assert lines[1] == ("0, NVIDIA GeForce RTX 3090, 24576 MiB, 8.6, 350.00 W, 350.00 W, "
                        "100.00 W, 350.00 W, Disabled")
    assert lines[2].startswith("1, NVIDIA GeForce RTX 3090, ")
    assert len(lines) == 3


def test_fake_query_noheader_nounits_and_stable_ids(rig):
    root = rig("rtxpro6000", 2)
    args = ("--query-gpu=index,uuid,pci.bus_id,memory.total,compute_cap,power.max_limit",
            "--format=csv,noheader,nounits")
    first = smi(root, *args)
    assert first.stdout == smi(root, *args).stdout
    rows = [line.split(", ") for line in first.stdout.splitlines()]
    assert rows[0][0] == "0" and rows[1][0] == "1"
    assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        rows[0][1])
    assert rows[0][1] != rows[1][1]
    assert rows[0][2:] == ["00000000:01:00.0", "97887", "12.0", "600.00"]
    assert rows[1][2] == "00000000:02:00.0"
    header = smi(root, "--query-gpu=power.limit,memory.used", "--format=csv,nounits")
    assert header.stdout.splitlines() == ["power.limit [W], memory.used [MiB]", "600.00, 2",
                                          "600.00, 2"]


def test_fake_query_every_documented_field(rig):
    root = rig("rtx3090", 1)
    fields = ("index,name,uuid,pci.bus_id,memory.total,memory.used,compute_cap,power.draw,"
              "power.limit,enforced.power.limit,power.default_limit,power.min_limit,"
              "power.max_limit,persistence_mode,temperature.gpu,utilization.gpu,driver_version")
    r = smi(root, f"--query-gpu={fields}", "--format=csv,noheader")
    assert r.returncode == 0
    assert len(r.stdout.strip().split(", ")) == len(fields.split(","))


def test_fake_unknown_field_is_the_real_error(rig):
    root = rig()
    r = smi(root, "--query-gpu=index,cuda_version", "--format=csv")
    assert r.returncode == 2
    assert r.stdout == 'Field "cuda_version" is not a valid field to query.\n\n'


def test_fake_select_by_index_list_and_invalid_index(rig):
    root = rig("rtx3090", 6)
    r = smi(root, "-i", "1,4", "--query-gpu=index", "--format=csv,noheader")
    assert r.stdout.split() == ["1", "4"]
    r = smi(root, "-i", "6", "--query-gpu=index", "--format=csv,noheader")
    assert (r.returncode, r.stdout) == (6, "No devices were found\n")
    listed = smi(root, "-L").stdout.splitlines()
    assert len(listed) == 6
    assert re.fullmatch(r"GPU 0: NVIDIA GeForce RTX 3090 \(UUID: GPU-[0-9a-f-]{36}\)", listed[0])


def test_fake_power_limit_set_range_and_log(rig):
    root = rig("rtx3090", 2)
    r = smi(root, "-i", "0", "-pl", "300")
    assert r.returncode == 0
    assert r.stdout == ("Power limit for GPU 00000000:01:00.0 was set to 300.00 W from 350.00 W.\n"
                        "All done.\n")
    limits = smi(root, "--query-gpu=power.limit", "--format=csv,noheader,nounits").stdout
    assert limits.split() == ["300.00", "350.00"]
    r = smi(root, "-i", "1", "-pl", "50")
    assert r.returncode != 0
    assert r.stdout == ("Provided power limit 50.00 W is not a valid power limit which should be "
                        "between 100.00 W and 350.00 W for GPU 00000000:02:00.0\n"
                        "Terminating early due to previous errors.\n")
    logged = calls(root)
    assert [c["argv"] for c in logged] == [["-i", "0", "-pl", "300"], ["-i", "1", "-pl", "50"]]
    assert [c["changed"] for c in logged] == [True, False]


def test_fake_power_limit_needs_root(rig):
    root = rig("rtx3090", 1)
    r = smi(root, "-pl", "300", euid=1000)
    assert r.returncode == 4
    assert r.stdout.splitlines() == [
        "Failed to set power management limit for GPU 00000000:01:00.0: Insufficient Permissions",
        "Terminating early due to previous errors.",
    ]
    limit = smi(root, "--query-gpu=power.limit", "--format=csv,noheader").stdout
    assert limit == "350.00 W\n"


def test_fake_persistence_mode_and_reboot_forgets(rig):
    root = rig("rtx3090", 2)
    r = smi(root, "-pm", "1")
    assert r.stdout.splitlines() == ["Enabled persistence mode for GPU 00000000:01:00.0.",
                                     "Enabled persistence mode for GPU 00000000:02:00.0.",
                                     "All done."]
    r = smi(root, "-i", "0", "-pm", "1")
    assert r.stdout.splitlines() == [
        "Persistence mode is already Enabled for GPU 00000000:01:00.0.", "All done."]
    smi(root, "-i", "1", "-pl", "280")
    query = ("--query-gpu=persistence_mode,power.limit", "--format=csv,noheader")
    assert smi(root, *query).stdout.splitlines() == ["Enabled, 350.00 W", "Enabled, 280.00 W"]
    # A reboot empties /run: limits and persistence mode are gone, like on real hardware.
    for f in (root / "run/fake-nvidia").iterdir():
        f.unlink()
    assert smi(root, *query).stdout.splitlines() == ["Disabled, 350.00 W", "Disabled, 350.00 W"]


def test_fake_query_power_layout(rig):
    root = rig("rtxpro6000", 1)
    smi(root, "-pl", "450")
    out = smi(root, "-q", "-d", "POWER").stdout.splitlines()
    assert out[1] == "==============NVSMI LOG=============="
    assert "Attached GPUs                                          : 1" in out
    assert "GPU 00000000:01:00.0" in out
    i = out.index("    GPU Power Readings")
    assert out[i + 3] == "        Current Power Limit                            : 450.00 W"
    assert out[i + 4] == "        Requested Power Limit                          : 450.00 W"
    assert out[i + 5] == "        Default Power Limit                            : 600.00 W"
    assert out[i + 6] == "        Min Power Limit                                : 150.00 W"
    assert out[i + 7] == "        Max Power Limit                                : 600.00 W"


def test_fake_without_config_is_a_machine_without_driver(tmp_path):
    r = smi(tmp_path, "-L")
    assert r.returncode == 9
    assert "couldn't communicate with the NVIDIA driver" in r.stdout


def test_fake_nvcc_version_and_refuses_to_compile(rig):
    root = rig("rtx3090", 1, cuda_version="12.4")
    r = run(NVCC, root, "--version")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == "nvcc: NVIDIA (R) Cuda compiler driver"
    assert "Cuda compilation tools, release 12.4, V12.4.131" in r.stdout.splitlines()
    default = run(NVCC, root.parent / "nowhere", "-V")
    assert "release 12.8, V12.8.93" in default.stdout
    compile_attempt = run(NVCC, root, "-c", "kernel.cu", "-o", "kernel.o")
    assert compile_attempt.returncode != 0
    assert "cannot compile" in compile_attempt.stderr


def test_fake_power_draw_follows_the_engine_phase(tmp_path):
    phase = tmp_path / "phase"
    files = fake_gpu_files("rtx3090", 2, power_draw_by_phase={"prefill": 300, "decode": 200},
                           phase_file=str(phase))
    for path, (content, mode) in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)

    def draws():
        out = smi(tmp_path, "--query-gpu=index,power.draw", "--format=csv,noheader,nounits")
        assert out.returncode == 0, out.stdout
        return [line for line in out.stdout.splitlines()]

    assert draws() == ["0, 21.40", "1, 21.77"]  # no phase file yet: the preset's idle draw
    phase.write_text("prefill\n")
    assert draws() == ["0, 300.00", "1, 300.37"]
    phase.write_text("decode\n")
    assert draws() == ["0, 200.00", "1, 200.37"]
    phase.write_text("idle\n")  # a phase without a value: the preset's draw
    assert draws() == ["0, 21.40", "1, 21.77"]


def test_fake_compute_apps_add_to_memory_used(tmp_path):
    config = tmp_path / "etc/fake-nvidia/gpus.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"gpus": [
        {"model": "rtx3090", "memory_used_mib": 300,
         "processes": [{"pid": 4242, "name": "/usr/bin/python3", "used_memory_mib": 20480}]},
        {"model": "rtx3090"}]}))
    memory = smi(tmp_path, "--query-gpu=index,memory.total,memory.used,memory.free",
                 "--format=csv,noheader,nounits").stdout.splitlines()
    # used = 300 + the process; free = total - reserved (243) - used
    assert memory == ["0, 24576, 20780, 3553", "1, 24576, 1, 24332"]
    uuid = smi(tmp_path, "--query-gpu=uuid", "--format=csv,noheader").stdout.split()[0]
    apps = smi(tmp_path, "--query-compute-apps=gpu_uuid,pid,used_memory",
               "--format=csv,noheader,nounits")
    assert apps.returncode == 0 and apps.stdout == f"{uuid}, 4242, 20480\n"
    with_header = smi(tmp_path, "--query-compute-apps=pid,process_name,used_gpu_memory",
                      "--format=csv").stdout.splitlines()
    assert with_header == ["pid, process_name, used_gpu_memory [MiB]",
                           "4242, /usr/bin/python3, 20480 MiB"]
    none = smi(tmp_path, "-i", "1", "--query-compute-apps=pid", "--format=csv,noheader")
    assert none.returncode == 0 and none.stdout == ""
    bad = smi(tmp_path, "--query-compute-apps=pid,bogus", "--format=csv")
    assert bad.returncode == 2 and 'Field "bogus" is not a valid field' in bad.stdout
