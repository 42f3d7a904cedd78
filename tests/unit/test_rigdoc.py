"""Rig documents: the fact's command run against a folder laid out like a rig, its parsers on
captured output, and the renderer (sections, determinism, small diffs, no secrets)."""

from __future__ import annotations

import difflib
import json
import shlex
import subprocess

import pytest

from llm_garage import rigdoc
from llm_garage.facts.gpu import GpuInventory
from llm_garage.facts.rigdoc import (
    parse_loaded,
    parse_report,
    parse_stamp,
    report_command,
)
from llm_garage.hf import RemoteFile, Resolved, Spec
from llm_garage.plans.engines import BuildPlan
from llm_garage.plans.models import ModelPlan
from llm_garage.settings import flags_hash, load_flags_env, load_rig

COMMIT = "c5a2ac1" + "0" * 33
SHA_A, SHA_B = "a" * 64, "b" * 64
SECRET_KEY = "sk-rigdoc-test-8d1e"
HF_TOKEN = "hf_rigdocTestToken123"

# nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits, as the driver prints it
GPU_LINES = [
    "0, NVIDIA GeForce RTX 3090, GPU-5e7ac9b4-1111-2222-3333-444455556666, 00000000:01:00.0, "
    "24576, 1, 24332, 8.6, 570.172.08, 280.00, 100.00, 350.00, Enabled",
    "1, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, GPU-0b1c, 00000000:41:00.0, 97887, "
    "0, 97460, 12.0, 570.172.08, [N/A], 150.00, 600.00, Disabled",
]
# a llama.cpp start log, the lines the fact greps
LOAD_LINES = [
    "load_tensors: offloaded 49/49 layers to GPU",
    "load_tensors:        CUDA0 model buffer size = 17529.38 MiB",
    "load_tensors:        CUDA1 model buffer size = 16000.00 MiB",
    "load_tensors:   CPU_Mapped model buffer size =   333.84 MiB",
    "llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB",
    "llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB",
    "llama_kv_cache: size = 1024.00 MiB (  8192 cells,  32 layers,  1/1 seqs), "
    "K (f16):  512.00 MiB, V (f16):  512.00 MiB",
    "llama_context:      CUDA0 compute buffer size =   300.01 MiB",
    "llama_context:  CUDA_Host compute buffer size =    24.01 MiB",
]


def test_gpu_rows_with_real_field_names_and_unavailable_cells():
    out = GpuInventory().process(GPU_LINES)
    assert out["error"] is None
    first, second = out["gpus"]
    assert first == {"index": 0, "name": "NVIDIA GeForce RTX 3090",
                     "uuid": "GPU-5e7ac9b4-1111-2222-3333-444455556666",
                     "pci_bus_id": "00000000:01:00.0", "memory_mib": 24576,
                     "compute_cap": "8.6", "driver_version": "570.172.08",
                     "power_limit_w": 280.0, "power_min_w": 100.0, "power_max_w": 350.0,
                     "persistence_mode": True}
    assert second["power_limit_w"] is None and second["persistence_mode"] is False
    failed = GpuInventory().process(["NVIDIA-SMI has failed because it couldn't communicate "
                                     "with the NVIDIA driver.", "exit=9"])
    assert failed["gpus"] == [] and "couldn't communicate" in failed["error"]


def test_memory_at_load_per_device_and_buffer():
    loaded = parse_loaded(LOAD_LINES)
    assert [(x["device"], x["buffer"], x["mib"]) for x in loaded] == [
        ("CUDA0", "model", 17529.38), ("CUDA1", "model", 16000.0),
        ("CPU_Mapped", "model", 333.84), ("CUDA0", "KV", 1024.0), ("all", "KV total", 1024.0),
        ("CUDA0", "compute", 300.01), ("CUDA_Host", "compute", 24.01)]
    assert loaded[4]["detail"].startswith("(  8192 cells")


def test_stamp_fields():
    stamp = parse_stamp([f"{COMMIT} 0123456789", "engine=llama",
                         "version=version: 8137 (c5a2ac1)", "seconds=366", "jobs=2",
                         "ccache_hits=10", "ccache_misses=3", "finished=2026-11-20T10:00:00Z",
                         "cmake_args=-DGGML_CUDA=OFF -DCMAKE_BUILD_TYPE=Release"])
    assert stamp == {"commit": COMMIT, "flags_hash": "0123456789", "engine": "llama",
                     "version": "version: 8137 (c5a2ac1)", "seconds": 366, "jobs": 2,
                     "ccache_hits": 10, "ccache_misses": 3,
                     "finished": "2026-11-20T10:00:00Z",
                     "cmake_args": "-DGGML_CUDA=OFF -DCMAKE_BUILD_TYPE=Release"}


def _fake_rig(tmp_path):
    """Builds, a snapshot of blob links, a unit and a proof, laid out as on a rig."""
    builds = tmp_path / "builds" / "llama"
    for key, finished in (("c5a2ac100000-0123456789", "2026-11-20T10:00:00Z"),
                          ("b0000000000a-0123456789", "2026-11-01T10:00:00Z")):
        (builds / key).mkdir(parents=True)
        (builds / key / "stamp").write_text(
            f"{key[:12]} 0123456789\nversion=version: 1 ({key[:7]})\nseconds=5\n"
            f"finished={finished}\n")
    (builds / "unfinished-0123456789").mkdir()  # no stamp: never completed
    (builds / "current").symlink_to("c5a2ac100000-0123456789")
    blobs = tmp_path / "models" / ".blobs"
    blobs.mkdir(parents=True)
    (blobs / SHA_A).write_bytes(b"x" * 10)
    snapshot = tmp_path / "models" / "tiny" / COMMIT[:12]
    snapshot.mkdir(parents=True)
    (snapshot / "Tiny-00001-of-00002.gguf").symlink_to(blobs / SHA_A)
    (tmp_path / "unit").write_text("[Service]\nExecStart=/x/llama-server -m /m --port 8081\n"
                                   "Environment=A=1\n")
    (tmp_path / "proof.json").write_text(json.dumps({"ok": True, "n_ctx": 4096,
                                                     "unit": "llama-server-a.service"}))
    return report_command(str(tmp_path / "models"), {"llama": str(builds)},
                          [("a", "llama-server-a.service", str(tmp_path / "unit"),
                            str(tmp_path / "proof.json"))],
                          {"tiny": str(snapshot)})


def test_the_command_reads_a_rig_in_one_shell(tmp_path):
    command = _fake_rig(tmp_path)
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    report = parse_report(out.stdout.splitlines())
    assert report["machine"]["kernel"].startswith("Linux ")
    assert report["machine"]["memory_bytes"] > 0 and report["machine"]["cpus"] >= 1
    assert report["machine"]["disk"]["size_bytes"] > 0
    engine = report["engines"]["llama"]
    assert engine["current"] == "c5a2ac100000-0123456789"
    assert sorted(engine["builds"]) == ["b0000000000a-0123456789", "c5a2ac100000-0123456789"]
    assert engine["builds"]["c5a2ac100000-0123456789"]["version"] == "version: 1 (c5a2ac1)"
    assert report["models"]["tiny"] == [{"name": "Tiny-00001-of-00002.gguf", "sha256": SHA_A,
                                         "size": 10}]
    service = report["services"]["a"]
    assert service["unit_text"].startswith("[Service]\nExecStart=/x/llama-server")
    assert service["proof"]["n_ctx"] == 4096 and service["loaded"] == []


# --- the renderer ----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _secrets(monkeypatch):
    """A real API key and Hugging Face token where pyinfra runs: neither may be written."""
    monkeypatch.setenv("GARAGE_TEST_KEY", SECRET_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)


def _rig(**extra):
    rig, errors = load_rig("garage", {
        "ssh_hostname": "10.0.0.5", "gpu_count": 1, "gpu_power_limit_w": 280,
        "engines": {"llama": {"kind": "llama.cpp", "ref": "b8137", "remote":
                              "https://github.com/ggml-org/llama.cpp.git",
                              "cuda_architectures": ["86"]}},
        "models": {"tiny": {"repo": "garage/Tiny-GGUF", "revision": "main", "quant": "Q4_K_M"}},
        "profiles": {"a": {"model": "tiny", "engine": "llama", "port": 8081, "ctx_size": 4096,
                           "api_key_env": "GARAGE_TEST_KEY"},
                     "old": {"model": "tiny", "engine": "llama", "port": 8082,
                             "enabled": False}},
        "opencode_client": True, **extra})
    assert not errors, errors
    return rig


def _plans(rig, commit=COMMIT, ref="b8137"):
    engine = rig.engines["llama"]
    flags = engine.cmake_flags(["86"])
    build = BuildPlan(engine="llama", kind="llama.cpp", ref=ref, commit=commit,
                      remote=engine.git_remote,
                      fetch=(f"+refs/tags/{ref}:refs/tags/{ref}", commit),
                      source_dir="/opt/llm-garage/src/llama",
                      builds_dir="/opt/llm-garage/builds/llama", flags=tuple(flags.items()),
                      flags_hash=flags_hash(flags), architectures=("86",), jobs=16,
                      ccache_dir="/opt/llm-garage/ccache", ccache_base="/opt/llm-garage",
                      nvcc="/usr/local/cuda/bin/nvcc")
    files = (RemoteFile("Q4_K_M/Tiny-00001-of-00002.gguf", 10, SHA_A),
             RemoteFile("Q4_K_M/Tiny-00002-of-00002.gguf", 20, SHA_B))
    resolved = Resolved(Spec("garage/Tiny-GGUF", "main", "quant", "Q4_K_M"), "f" * 40, files)
    snapshot = rig.layout.model_snapshot("tiny", resolved.commit)
    model = ModelPlan(name="tiny", folder=rig.layout.model_dir("tiny"), snapshot=snapshot,
                      blobs=rig.layout.blobs_dir,
                      files=tuple({"name": f.name, "size": f.size, "sha256": f.sha256,
                                   "url": resolved.url("https://huggingface.co", f)}
                                  for f in files), resolved=resolved)
    return {"llama": build}, {"tiny": model}


def _report(build, free=1000):
    unit = (f"# Generated by llm-garage\n[Service]\nExecStart={build.build_dir}/bin/llama-server "
            "-m /srv/models/tiny/ffffffffffff/Tiny-00001-of-00002.gguf --port 8081 "
            "--api-key-file ${CREDENTIALS_DIRECTORY}/api-key\nEnvironment=CUDA_DEVICE_ORDER="
            "PCI_BUS_ID\n")
    return {
        "machine": {"os": "Debian GNU/Linux 12 (bookworm)", "kernel": "Linux 6.1.0 x86_64",
                    "cpu": "AMD EPYC 9175F 16-Core Processor", "cpus": 32,
                    "memory_bytes": 256 * 2**30,
                    "disk": {"filesystem": "/dev/nvme0n1p2", "size_bytes": 4 * 2**40,
                             "free_bytes": free, "mounted_on": "/"}},
        "gpus": GpuInventory().process(GPU_LINES[:1]),
        "nvcc": {"nvcc": "/usr/local/cuda/bin/nvcc", "version": "12.8"},
        "engines": {"llama": {"current": build.key, "builds": {build.key: parse_stamp([
            build.stamp, f"version=version: 8137 ({build.commit[:7]})", "seconds=366",
            "jobs=16", "ccache_hits=0", "ccache_misses=400",
            "finished=2026-11-20T10:00:00Z", "cmake_args=" + " ".join(build.cmake_args)])}}},
        "services": {"a": {"active": "active", "unit_text": unit,
                           "proof": {"ok": True, "n_ctx": 4096, "slots": 1,
                                     "build_info": f"b8137-{build.commit[:7]}",
                                     "tool_call": "add", "unit": "llama-server-a.service"},
                           "loaded": parse_loaded(LOAD_LINES)}},
        "models": {"tiny": [{"name": "Tiny-00001-of-00002.gguf", "sha256": SHA_A, "size": 10},
                            {"name": "Tiny-00002-of-00002.gguf", "sha256": SHA_B, "size": 20}]},
    }


def _data(commit=COMMIT, ref="b8137", free=987654321):
    rig = _rig()
    engines, models = _plans(rig, commit, ref)
    from llm_garage.opencode import providers_for
    return rigdoc.collect(rig, _report(engines["llama"], free), engines, models,
                          providers_for(rig, {"garage": rig}))


def test_the_document_has_every_section_with_the_rigs_values():
    data = _data()
    text = rigdoc.render(data)
    headings = [line for line in text.splitlines() if line.startswith("#")
                and not line.startswith("# ") or line.startswith("# Rig")]
    assert [h for h in headings if h.startswith(("# ", "## "))] == [
        "# Rig garage", "## Machine", "## GPUs", "## Engines", "## Models", "## Profiles",
        "## opencode", "## Rebuild by hand"]
    assert "| CPU | AMD EPYC 9175F 16-Core Processor, 32 logical CPUs |" in text
    assert ("| 0 | NVIDIA GeForce RTX 3090 | `GPU-5e7ac9b4-1111-2222-3333-444455556666` | "
            "`00000000:01:00.0` | 24576 MiB | 8.6 | 570.172.08 | 280 W (100 W–350 W) | on |"
            in text)
    assert f"- pin: `b8137 → {COMMIT}` from `https://github.com/ggml-org/llama.cpp.git`" in text
    assert "- `--version`: `version: 8137 (c5a2ac1)`" in text
    assert "-DCMAKE_CUDA_ARCHITECTURES=86" in text and "ccache 0 hits / 400 misses" in text
    assert f"| `Q4_K_M/Tiny-00002-of-00002.gguf` | 20 B (20 B) | `{SHA_B}` | ok |" in text
    assert "- last proof: ok, n_ctx 4096, 1 slot(s), build b8137-c5a2ac1, tool call `add` " \
        "and tool result" in text
    assert "| CUDA0 | model | 17529.38 |" in text
    assert "### old: disabled" in text
    assert "- `llm-garage-garage-8081`: http://10.0.0.5:8081/v1, models `a`" in text
    # rebuild by hand: exact commands, the unit's full text, the GPU settings
    assert (f"git -C /opt/llm-garage/src/llama checkout --detach {COMMIT}\ncmake -S "
            "/opt/llm-garage/src/llama -B /opt/llm-garage/builds/llama/") in text
    assert "echo '" + SHA_B + "  /srv/models/tiny/ffffffffffff/Tiny-00002-of-00002.gguf' | " \
        "sha256sum -c -" in text
    unit = _report(_plans(_rig())[0]["llama"])["services"]["a"]["unit_text"]
    assert ("cat > /etc/systemd/system/llama-server-a.service <<'LLM_GARAGE_UNIT'\n" + unit
            + "LLM_GARAGE_UNIT\n") in text
    assert "nvidia-smi -pm 1\nnvidia-smi -i 0 -pl 280\n" in text
    # the free disk space moves by itself: JSON only
    assert data["observed"] == {"models_dir_free_bytes": 987654321}
    assert "987654321" not in text and "941.9 MiB" not in text


def test_identical_data_renders_identical_bytes_and_no_secret():
    one, two = _data(), _data()
    assert rigdoc.dumps(one) == rigdoc.dumps(two)
    assert rigdoc.render(one) == rigdoc.render(two)
    assert rigdoc.render(json.loads(rigdoc.dumps(one))) == rigdoc.render(one)
    for text in (rigdoc.render(one), rigdoc.dumps(one)):
        assert SECRET_KEY not in text and HF_TOKEN not in text
    assert "/etc/llm-garage/llama-server-a.key" in rigdoc.render(one)


def test_by_hand_writes_the_key_from_its_variable_and_waits_for_health():
    text = rigdoc.render(_data())
    key = "/etc/llm-garage/llama-server-a.key"
    assert (f"install -m 600 /dev/null {key}\n"
            f"printf '%s\\n' \"$GARAGE_TEST_KEY\" > {key}   # the API key: set "
            "GARAGE_TEST_KEY first (as for the deploy)\n") in text
    assert ("systemctl enable --now llama-server-a.service\ncurl -fsS --retry 900 "
            "--retry-delay 1 --retry-all-errors --retry-max-time 900 "
            "http://127.0.0.1:8081/health\n") in text
    assert "apt-get install -y build-essential cmake git libssl-dev curl ca-certificates" in text


def test_a_new_build_is_a_small_diff_of_the_engine_lines():
    new = "d00d" + "1" * 36
    old_text = rigdoc.render(_data()).splitlines()
    new_text = rigdoc.render(_data(commit=new, ref="b8138")).splitlines()
    changed = [line for line in difflib.unified_diff(old_text, new_text, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    # pin, heading, --version, build folder, configure line, kept build; by hand: the
    # comment, fetch, checkout, configure, build, --version, ExecStart inside the unit text
    assert 10 <= len(changed) <= 30, "\n".join(changed)
    assert all("b813" in line or new in line or COMMIT in line or new[:7] in line
               or "c5a2ac1" in line or new[:12] in line or COMMIT[:12] in line
               for line in changed), "\n".join(changed)
    assert not any(line.lstrip("+-").startswith(("| ", "## ")) for line in changed)


def test_files_are_written_once_and_only_when_they_change(tmp_path):
    data = _data()
    written = rigdoc.write(tmp_path, data)
    assert sorted(p.name for p in written) == ["garage.json", "garage.md"]
    before = {p: p.stat().st_mtime_ns for p in written}
    assert rigdoc.write(tmp_path, _data()) == []
    assert rigdoc.write(tmp_path, _data(free=5000)) == []  # only an observed value moved
    assert {p: p.stat().st_mtime_ns for p in written} == before
    changed = rigdoc.write(tmp_path, _data(commit="d00d" + "1" * 36))
    assert sorted(p.name for p in changed) == ["garage.json", "garage.md"]
    assert json.loads((tmp_path / "garage.json").read_text())["engines"][0]["commit"] \
        .startswith("d00d")
    assert list(tmp_path.glob(".garage*")) == []  # no temporary file left


def test_the_rig_document_shows_the_latest_table_and_a_deploy_keeps_it(tmp_path):
    data = _data()
    rigdoc.write(tmp_path, data)
    lines = ["run-b: rig garage …", "", "| Context | Prefill t/s | Decode t/s | TTFT ms | "
             "Power W | Decode tokens/kWh |", "| 4K | 1,000.0 | 46.3 | 4,096 | 818.0 | 203,765 |"]
    written = rigdoc.set_bench(tmp_path, data["rig"], "run-b", "inv/bench-results/garage.jsonl",
                               lines)
    md_path, js_path = rigdoc.doc_paths(tmp_path, data["rig"])
    assert sorted(written) == sorted([md_path, js_path])
    md = md_path.read_text()
    assert "## Benchmark" in md and "`run-b`" in md
    assert "| 4K | 1,000.0 | 46.3 | 4,096 | 818.0 | 203,765 |" in md
    assert md.index("## Benchmark") > md.index("## Profiles")
    fresh = _data()  # what the next deploy collects: the table stays
    assert "bench" not in fresh
    rigdoc.keep_bench(tmp_path, fresh)
    assert fresh["bench"]["run"] == "run-b"
    assert rigdoc.pending(tmp_path, fresh) == []
    assert rigdoc.set_bench(tmp_path / "none", data["rig"], "r", "p", lines) == []


def test_a_pinned_toolkit_names_its_release_folder_index_and_wheels():
    import dataclasses

    from llm_garage.plans.engines import CUDA_WHEELS, CudaInstall
    rig = _rig()
    engines, models = _plans(rig)
    install = CudaInstall("13.0", "/opt/llm-garage/cuda/13.0", "http://10.0.0.1:3141/simple",
                          CUDA_WHEELS["13.0"])
    engines["llama"] = dataclasses.replace(engines["llama"], nvcc=install.nvcc,
                                           cuda_toolkit="13.0.88", cuda_install=install)
    text = rigdoc.render(rigdoc.collect(rig, _report(engines["llama"]), engines, models, None))
    assert "- CUDA compiler: `/opt/llm-garage/cuda/13.0/bin/nvcc` (CUDA 13.0.88)" in text
    assert ("- CUDA toolkit installed by llm-garage into `/opt/llm-garage/cuda/13.0` from "
            "NVIDIA's wheels on `http://10.0.0.1:3141/simple` (its `stamp` lists them):") in text
    for wheel in CUDA_WHEELS["13.0"].wheels:
        assert f"  - `{wheel.file} sha256:{wheel.sha256}`" in text
    plain = rigdoc.render(_data())
    assert "- CUDA compiler: `/usr/local/cuda/bin/nvcc`\n" in plain
    assert "CUDA toolkit installed by llm-garage" not in plain


@pytest.mark.parametrize("help_text, load_mode", [
    ("-lm,   --load-mode MODE   model loading mode", True),
    ("--no-mmap   do not memory-map the model\n--mlock   keep the model in RAM", False),
])
def test_by_hand_load_flags_follow_the_servers_help(tmp_path, help_text, load_mode):
    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    server = build / "bin" / "llama-server"
    # a long help, so a reader that stops early would leave the writer a broken pipe
    server.write_text("#!/bin/sh\nprintf '%s\\n' " + shlex.quote(help_text)
                      + "\nseq 1 100000\n")
    server.chmod(0o755)
    env_file = build / "load-flags.env"
    lines = rigdoc.load_flags_by_hand(str(build), str(env_file))
    assert lines[0].startswith("# ")
    subprocess.run(["bash", "-e", "-o", "pipefail", "-c", lines[1]], check=True)
    assert env_file.read_text() == load_flags_env(load_mode)
    assert rigdoc.load_flags_by_hand(str(build), None) == []
