"""The serving proof on test rigs: each deliberate fault of a new build fails its proof and is
rolled back to the last proven build, which serves again; a rerun reports the recorded failure
without restarting anything; a first deploy that fails is left stopped; a silent CPU fallback
fails; deliberate restarts never trip systemd's start limit."""

from __future__ import annotations

import json
import shlex

import pytest

from lab.serving import (
    controller_env,
    engine,
    profile,
    rig_data,
    service,
    sh,
    starts,
)
from lab.standins.gpu import fake_gpu_files

pytestmark = pytest.mark.e2e

UNIT = "llama-server-a.service"
STATE = "/opt/llm-garage/state/services"


def tool_conversation(rig, port: int) -> tuple[int, int]:
    """(status of turn 1, status of turn 2): a tool call, then the history holding it."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}},
        "required": ["city"]}}}
    user = {"role": "user", "content": "Weather in Paris?"}
    first = {"messages": [user], "tools": [tool], "tool_choice": "required"}
    status1, body = post(rig, port, first)
    call = json.loads(body)["choices"][0]["message"]["tool_calls"][0]
    second = {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}],
              "tools": [tool]}
    status2, _ = post(rig, port, second)
    return status1, status2


def post(rig, port: int, body: dict) -> tuple[int, str]:
    out = rig.ssh(f"curl -s -o /tmp/body -w '%{{http_code}}' -H 'Content-Type: "
                  f"application/json' -d {shlex.quote(json.dumps(body))} "
                  f"http://127.0.0.1:{port}/v1/chat/completions; echo; cat /tmp/body",
                  check=False).stdout
    status, _, text = out.partition("\n")
    return int(status or 0), text


def current_build(rig) -> str:
    return sh(rig, "readlink /opt/llm-garage/builds/llama/current")


def running_binary(rig) -> str:
    pid = service(rig, UNIT)["MainPID"]
    return sh(rig, f"readlink /proc/{pid}/exe")


@pytest.mark.parametrize("fault, step, reason", [
    ("tool_history_500", "tool result",
     "answered 500: Unknown (built-in) filter 'items' for type String"),
    ("arguments_object", "tool call", "arguments are a dict, not a JSON string"),
    ("ctx_clamp", "props", "the context was clamped"),
    ("crash_after_health", "warm-up", "warm-up request 1 of 1 answered nothing"),
])
def test_a_change_that_fails_its_proof_is_rolled_back(
        fault, step, reason, start_rigs, write_inventory, converge, pyinfra_run, hub,
        git_url, repos, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    _, repo = repos
    bad_tag = repo.fault_tags[fault]

    def inventory(ref):
        return write_inventory({"rig1": rig_data(hub, git_url, {"a": profile(8081)}, ref=ref)})

    converge(inventory("b8"), env=env)
    proven_build, proven_binary = current_build(rig), running_binary(rig)
    assert tool_conversation(rig, 8081) == (200, 200)
    before = starts(rig, UNIT)

    failed = pyinfra_run(inventory(bad_tag), env=env, expect_ok=False)

    assert failed.hosts["rig1"].failed, failed.summary()
    text = failed.stderr
    assert f"{UNIT}: {step} failed: " in text and reason in text, text[-3000:]
    assert f"{UNIT}: NOT PROVEN ({step} failed:" in text
    assert "rolled back to b8-" in text and "serving again" in text
    # The old build serves again, proven, and `current` never moved.
    assert current_build(rig) == proven_build and running_binary(rig) == proven_binary
    assert service(rig, UNIT)["ActiveState"] == "active"
    assert tool_conversation(rig, 8081) == (200, 200)
    assert starts(rig, UNIT) == before + 2  # the new build once, the old one once
    recorded = sh(rig, f"sed -n 2p {STATE}/llama-server-a.failed")
    assert recorded.startswith(f"{step} failed: ")

    # The same inventory again: the recorded failure, no restart, nothing else changed.
    again = pyinfra_run(inventory(bad_tag), env=env, expect_ok=False)
    assert again.hosts["rig1"].failed
    assert f"{UNIT}: these inputs already failed their proof ({step} failed: " in again.stderr
    assert again.changes() == {} and starts(rig, UNIT) == before + 2
    assert running_binary(rig) == proven_binary

    # Back to the proven tag: nothing to restart, and the deploy converges.
    converge(inventory("b8"), env=env)
    assert starts(rig, UNIT) == before + 2 and running_binary(rig) == proven_binary


def test_a_first_deploy_that_fails_is_left_stopped_and_retried_on_request(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, repos, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    _, repo = repos
    bad = repo.fault_tags["tool_history_500"]
    hosts = {"rig1": rig_data(hub, git_url, {"a": profile(8081)}, ref=bad)}

    failed = pyinfra_run(write_inventory(hosts), env=env, expect_ok=False)

    assert "no earlier proven unit to go back to: left stopped" in failed.stderr
    state = service(rig, UNIT)
    assert (state["ActiveState"], state["UnitFileState"]) == ("inactive", "disabled")
    sh(rig, "sleep 12")  # longer than RestartSec: nothing restarts it behind our back
    assert service(rig, UNIT)["ActiveState"] == "inactive" and starts(rig, UNIT) == 1
    # Asked to, the same inputs are tried again (and fail again).
    hosts["rig1"]["services_retry_failed"] = True
    retried = pyinfra_run(write_inventory(hosts), env=env, expect_ok=False)
    assert "tool result failed" in retried.stderr and starts(rig, UNIT) == 2
    # A tool-less model: the tool turn off, the rest of the proof passes.
    hosts["rig1"]["services_retry_failed"] = False
    hosts["rig1"]["profiles"]["a"]["prove_tool_call"] = False
    first, _ = converge(write_inventory(hosts), env=env)
    assert f"{UNIT}: proven: healthy after" in first.stderr
    assert "tool call" not in first.stderr.split(f"{UNIT}: proven:")[1].splitlines()[0]


def test_a_cuda_build_that_falls_back_to_the_cpu_fails_its_proof(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    for path, (content, mode) in fake_gpu_files("rtx3090", 1, "12.8").items():
        rig.put_text(content.decode(), path, mode)
    env = controller_env(tmp_path)
    cuda = {**engine(git_url, "b8"), "cuda": True, "cuda_architectures": [86]}
    hidden = profile(8081, environment={"FIXTURE_LOAD_SECONDS": "0.3",
                                        "CUDA_VISIBLE_DEVICES": "-1"})
    hosts = {"rig1": rig_data(hub, git_url, {"a": hidden}, engines={"llama": cuda},
                              gpu_count=1)}

    failed = pyinfra_run(write_inventory(hosts), env=env, expect_ok=False)

    assert f"{UNIT}: gpu failed: CPU fallback" in failed.stderr
    assert "no CUDA-capable device is detected" in failed.stderr
    # With the GPU visible the same build is proven, layers on the GPU.
    hosts["rig1"]["profiles"]["a"] = profile(8081)
    first, _ = converge(write_inventory(hosts), env=env)
    line = first.stderr.split(f"{UNIT}: proven:")[1].splitlines()[0]
    assert "layers on 1 GPU(s)" in line
    report = json.loads(sh(rig, f"cat {STATE}/llama-server-a.proof.json"))
    assert report["ok"] and report["cuda_devices"] == 1


def test_deliberate_restarts_never_trip_the_start_limit(
        start_rigs, write_inventory, converge, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    converge(write_inventory({"rig1": rig_data(hub, git_url, {"a": profile(8081)})}),
             env=env)
    assert json.loads(sh(rig, f"cat {STATE}/llama-server-a.proof.json"))["ok"]
    command = ("/opt/llm-garage/bin/garage-server-check --unit llama-server-a.service "
               "--url http://127.0.0.1:8081 --alias a --timeout 30 --warmup 1 --restart")
    for _ in range(7):  # StartLimitBurst is 5 in 600 s
        out = rig.ssh(command, check=False)
        assert out.returncode == 0, out.stderr
    assert service(rig, UNIT)["ActiveState"] == "active"
    # The limit itself stays, for crash loops.
    assert "StartLimitBurst=5" in sh(rig, f"cat /etc/systemd/system/{UNIT}")

