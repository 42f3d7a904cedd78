"""Real llama.cpp on a test rig: upstream's tree (from the llama-cpp-python sdist, tags b7001
and a bad b7002) served by git daemon, built CPU-only by the deploy, serving a tiny model with
Qwen3.5's real chat template, which must carry a two-turn tool-call conversation; the memory
plan of that model must agree with the buffer sizes llama-server logs when it loads it.

The rig's ccache lives on the host (``lab.rigs.ccache_binds``): the first run on a machine
builds llama-server cold, later runs mostly hit the cache."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import lab.rigs
from lab.rigs.pyinfra_results import REPO_ROOT
from lab.serving import controller_env
from lab.standins.engine_repo import GitDaemon
from lab.standins.gguf_gen import write_split_model
from lab.standins.hf_server import HFServer
from lab.standins.real_llama import ensure_real_llama, write_qwen_tool_model
from llm_garage import fit
from llm_garage.lock import Lock
from llm_garage.settings import load_rig

pytestmark = pytest.mark.e2e

MODEL_REPO = "garage/Qwen3.5-Tiny-GGUF"
MODEL_FILE = "Qwen3.5-Tiny-F32.gguf"
DENSE_REPO = "garage/Dense-GGUF"
PORT = 8080
# One parameter, an integer enum of one value: the tool call grammar leaves the model nothing
# to choose (a string parameter would be free text up to </parameter>).
TOOL = {"type": "function", "function": {
    "name": "set_mode", "description": "Set the garage's mode.",
    "parameters": {"type": "object", "properties": {"mode": {"type": "integer", "enum": [1]}},
                   "required": ["mode"]}}}
NO_THINKING = {"enable_thinking": False}

log = logging.getLogger("garage.tests")


@pytest.fixture(scope="module")
def real():
    return ensure_real_llama()


@pytest.fixture(scope="module")
def real_git_url(module_fleet, real):
    with GitDaemon(real.base, bind_ip=module_fleet.host_ip) as daemon:
        yield daemon.url


@pytest.fixture(scope="module")
def qwen_hub(module_fleet, real, tmp_path_factory):
    model = write_qwen_tool_model(tmp_path_factory.mktemp("qwen") / MODEL_FILE, real)
    dense = write_split_model(tmp_path_factory.mktemp("dense"), "Dense-F32", 3, n_layers=4,
                              vocab=2048, n_embd=256, n_ff=512)
    with HFServer(bind=module_fleet.host_ip) as hub:
        hub.add_repo(MODEL_REPO, {MODEL_FILE: model})
        hub.add_repo(DENSE_REPO, {f"F32/{p.name}": p for p in dense})
        yield hub


def rig_data(hub: HFServer, git_url: str, ref: str) -> dict:
    engine = {"kind": "llama.cpp", "ref": ref, "remote": f"{git_url}/llama.cpp.git",
              "cuda": False,
              "cmake_extra": {"LLAMA_USE_PREBUILT_UI": "OFF", "LLAMA_CURL": "OFF"}}
    profile = {"model": "qwen", "engine": "llama", "port": PORT, "alias": "qwen-tiny",
               "ctx_size": 4096, "jinja": True, "health_timeout_s": 120}
    return {"hf_endpoint": hub.url,
            "models": {"qwen": {"repo": MODEL_REPO, "revision": "main", "files": [MODEL_FILE]}},
            "engines": {"llama": engine}, "profiles": {"qwen": profile}}


def post(rig, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{rig.ip}:{PORT}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def tool_turns(rig) -> tuple[tuple[int, dict], tuple[int, dict]]:
    """Turn 1 must call the tool; turn 2 sends that call and its result back."""
    messages = [{"role": "user", "content": "Put the garage in mode 1."}]
    first = post(rig, "/v1/chat/completions", {
        "model": "qwen-tiny", "messages": messages, "tools": [TOOL], "tool_choice": "required",
        "max_tokens": 200, "chat_template_kwargs": NO_THINKING})
    status, body = first
    if status != 200 or not body["choices"][0]["message"].get("tool_calls"):
        return first, (0, {})
    call = body["choices"][0]["message"]["tool_calls"][0]
    messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call.get("id", ""), "content": "mode is 1"}]
    second = post(rig, "/v1/chat/completions", {
        "model": "qwen-tiny", "messages": messages, "tools": [TOOL], "max_tokens": 16,
        "chat_template_kwargs": NO_THINKING})
    return first, second


def test_real_llama_cpp_serves_a_two_turn_tool_conversation(
        module_fleet, converge, real, real_git_url, qwen_hub, tmp_path):
    (rig,) = module_fleet.start(["rig1"], binds=lab.rigs.ccache_binds("real-llama.cpp"))
    # locked: the deploy plans the model's memory from its GGUF header before fetching it
    data = {**rig_data(qwen_hub, real_git_url, real.good_tag),
            "models_lock": str(tmp_path / "inventory.lock.json")}
    # the library's load figures (buffer sizes) are logged at verbosity 4 in this tree
    data["profiles"]["qwen"]["extra_args"] = ["--log-verbosity", "4"]
    # a second model, split in 3 shards, with 3 slots of their own KV streams and q8_0 K,
    # not memory-mapped (this tree spells no_mmap --load-mode none: --no-mmap is refused)
    data["models"]["dense"] = {"repo": DENSE_REPO, "revision": "main", "quant": "F32"}
    data["profiles"]["dense"] = {
        "model": "dense", "engine": "llama", "port": PORT + 1, "alias": "dense",
        "ctx_size": 9216, "parallel": 3, "cache_type_k": "q8_0", "prove_tool_call": False,
        "no_mmap": True, "health_timeout_s": 120, "extra_args": ["--log-verbosity", "4"]}
    inventory = module_fleet.write_inventory(tmp_path / "inventory.py", {"rig1": data})
    env = controller_env(tmp_path)
    locked = subprocess.run([sys.executable, "-m", "llm_garage.cli", "lock", str(inventory)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                            env={"PATH": "/usr/bin:/bin", **env})
    assert locked.returncode == 0, locked.stderr

    converge(inventory, env=env)

    stamp = rig.ssh("cat /opt/llm-garage/builds/llama/current/stamp").stdout.splitlines()
    build = dict(line.split("=", 1) for line in stamp[1:] if "=" in line)
    log.info("llama-server built in %s s, ccache %s hits, %s misses", build["seconds"],
             build["ccache_hits"], build["ccache_misses"])
    version = rig.ssh("/opt/llm-garage/builds/llama/current/bin/llama-server --version 2>&1",
                      check=False).stdout
    # "version: 0.5.0-dev (build 7001, commit 76a3564)": the build number is the commit count
    assert (f"(build {real.build_number(real.good_tag)}, commit {real.short(real.good_tag)})"
            in version), version
    (status1, turn1), (status2, turn2) = tool_turns(rig)
    assert status1 == 200, turn1
    choice = turn1["choices"][0]
    assert choice["finish_reason"] == "tool_calls", turn1
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "set_mode"
    assert isinstance(call["function"]["arguments"], str), call
    assert json.loads(call["function"]["arguments"]) == {"mode": 1}
    assert status2 == 200, turn2
    assert turn2["choices"][0]["message"]["role"] == "assistant"

    # no_mmap as this build spells it: the build's load-flags.env, read by the unit
    env_file = rig.ssh("cat /opt/llm-garage/builds/llama/current/load-flags.env").stdout
    assert "GARAGE_NO_MMAP=--load-mode none\n" in env_file, env_file
    unit = rig.ssh("cat /etc/systemd/system/llama-server-dense.service").stdout
    assert " $GARAGE_NO_MMAP" in unit and "--no-mmap " not in unit.split("ExecStart=")[1]
    dense_pid = service_pid(rig, "llama-server-dense.service")
    argv = rig.ssh(f"tr '\\0' ' ' < /proc/{dense_pid}/cmdline").stdout
    assert "--load-mode none" in argv and "--no-mmap" not in argv, argv

    # The bench against the real server: token counts from its /tokenize, its own timings.
    pid = service_pid(rig, "llama-server-qwen.service")
    out = subprocess.run([sys.executable, "-m", "llm_garage.cli", "bench", str(inventory),
                          "--profile", "qwen", "--depths", "256,1k,4k", "--gen", "16",
                          "--repeat", "2"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **controller_env(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    log.info("bench on real llama.cpp:\n%s", out.stdout)
    recs = [json.loads(line) for line in
            (tmp_path / "bench-results" / "rig1.jsonl").read_text().splitlines()]
    measured = [r for r in recs if r["kind"] == "result"]
    assert [(r["depth"], r["repeat"]) for r in measured] == [(256, 1), (256, 2), (1024, 1),
                                                           (1024, 2)]
    assert [r["label"] for r in recs if r["kind"] == "skip"] == ["4K"]  # 4096 + 16 > n_ctx
    for r in measured:
        # every prompt token evaluated (a unique prefix: nothing reused from the cache)
        assert (r["prompt_n"], r["cache_n"], r["predicted_n"]) == (r["depth"], 0, 16), r
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["ttft_ms"] > 0
        assert r["engine"]["commit"] == real.good_commit
        assert r["decode_w"] is None and r["gpus"] == []  # no GPU: no power
    assert service_pid(rig, "llama-server-qwen.service") == pid

    # The memory plan against what llama-server itself reported at load (CPU only: the
    # engine is built without CUDA, so the plan puts every layer on the CPU).
    locked = Lock.load(tmp_path / "inventory.lock.json")
    settings, errors = load_rig("rig1", data)
    assert not errors, errors
    # memory-mapped, one model buffer per file; not mapped (dense), one for the CPU
    for profile, files in (("qwen", 1), ("dense", 1)):
        layout = locked.layouts[profile]
        opts = fit.options_for(settings, profile)
        cpu = fit.plan(layout, opts).device("CPU")
        logged = load_figures(rig, f"llama-server-{profile}.service", files)
        log.info("%s: memory plan vs llama-server (MiB): weights %.4f vs %.2f, KV %.4f vs %.2f, "
                 "CPU compute buffer (not planned) %.2f; load lines:\n%s", profile,
                 cpu.weights / fit.MIB, logged["weights"], cpu.kv / fit.MIB, logged["kv"],
                 logged["compute"], "\n".join(logged["lines"]))
        for planned, reported in ((cpu.weights, logged["weights"]), (cpu.kv, logged["kv"])):
            # 1 %, or the log's own rounding to 0.01 MiB per figure, whichever is larger
            assert abs(planned / fit.MIB - reported) <= max(0.01 * reported, 0.005 * files), (
                profile, planned / fit.MIB, reported, logged["lines"])
    # the dense model: 3 slots, each its own stream of 9216 / 3 cells, K q8_0, V f16
    assert re.search(r"\( *3072 cells, +4 layers, +3/3 seqs\), K \(q8_0\)",
                     "\n".join(logged["lines"])), logged["lines"]
    assert cpu.layers == [0, 1, 2, 3, 4] and cpu.weights > 12 * fit.MIB


LOAD_FIGURES = {
    "weights": re.compile(r"CPU(?:_Mapped)? model buffer size = +([\d.]+) MiB"),
    "kv": re.compile(r"CPU KV buffer size = +([\d.]+) MiB"),
    "compute": re.compile(r"CPU compute buffer size = +([\d.]+) MiB"),
}


def load_figures(rig, unit: str, files: int) -> dict:
    """The buffer sizes llama-server logged at its last load: the model's (one buffer per
    file of a split model), the KV cache's and the compute buffer's, in MiB."""
    journal = rig.ssh(f"journalctl -u {unit} -b -o cat --no-pager").stdout
    figures: dict = {"lines": [line for line in journal.splitlines()
                               if "buffer size" in line or "llama_kv_cache: size" in line]}
    for key, pattern in LOAD_FIGURES.items():
        found = [float(x) for x in pattern.findall(journal)]
        assert found, f"no {key} figure in the journal of {unit}:\n" + "\n".join(
            figures["lines"] or journal.splitlines()[-60:])
        figures[key] = sum(found[-files:]) if key == "weights" else found[-1]
    return figures


def test_real_llama_cpp_tag_that_breaks_tool_history_is_rolled_back(
        module_fleet, converge, pyinfra_run, real, real_git_url, qwen_hub, tmp_path):
    """The seed rig's incident, on the real server: the new tag answers a single tool call but
    500s on a history holding one. The deploy's proof catches it and puts the old build back."""
    (rig,) = module_fleet.start(["rig2"], binds=lab.rigs.ccache_binds("real-llama.cpp"))
    env = controller_env(tmp_path)
    unit = "llama-server-qwen.service"

    def inventory(ref):
        return module_fleet.write_inventory(
            tmp_path / "inventory.py", {"rig2": rig_data(qwen_hub, real_git_url, ref)})

    first, _ = converge(inventory(real.good_tag), env=env)
    assert f"{unit}: proven: " in first.stderr and "tool call and tool result OK" in first.stderr
    pid = service_pid(rig, unit)

    failed = pyinfra_run(inventory(real.bad_tag), env=env, expect_ok=False)

    assert failed.hosts["rig2"].failed
    text = failed.stderr
    assert "Unknown (built-in) filter 'items' for type String" in text, text[-4000:]
    assert f"{unit}: NOT PROVEN (tool result failed: " in text
    assert f"rolled back to b{real.build_number(real.good_tag)}-{real.short(real.good_tag)}" \
        in text and "serving again" in text
    log.info("rollback output:\n%s", "\n".join(
        line for line in text.splitlines() if "llama-server-qwen" in line or "NOT PROVEN" in line))
    (status1, _), (status2, _) = tool_turns(rig)
    assert (status1, status2) == (200, 200)  # the old build answers the same conversation
    restarted = service_pid(rig, unit)
    assert restarted != pid

    again = pyinfra_run(inventory(real.bad_tag), env=env, expect_ok=False)
    assert f"{unit}: these inputs already failed their proof (tool result failed" in again.stderr
    assert again.changes() == {} and service_pid(rig, unit) == restarted


def service_pid(rig, unit: str) -> str:
    return rig.ssh(f"systemctl show -p MainPID --value {unit}").stdout.strip()
