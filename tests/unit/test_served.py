"""The proof step of a service: when it restarts, what it proves, how it rolls back."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from pyinfra.api import FunctionCommand, StringCommand

from llm_garage.operations import services as ops
from llm_garage.plans.services import ServicePlan, check_command, expects_gpu, uses_jinja
from llm_garage.settings import load_rig
from tests.unit.ophelper import ShellHost, run_op

PLAN = ServicePlan(
    profile="p", engine="llama", model="m", service="llama-server-p.service",
    unit_file="/etc/systemd/system/llama-server-p.service", unit={},
    wanted_unit="/opt/g/state/services/llama-server-p.service",
    proven_unit="/opt/g/state/services/llama-server-p.service.proven",
    key_file="/etc/llm-garage/llama-server-p.key", api_key=None,
    inputs="/opt/g/state/services/llama-server-p.inputs",
    failed="/opt/g/state/services/llama-server-p.failed",
    report="/opt/g/state/services/llama-server-p.proof.json", build_key="0123456789ab-a1b2c3d4e5",
    binary="/opt/g/builds/llama/0123456789ab-a1b2c3d4e5/bin/llama-server",
    model_path="/srv/models/m/m.gguf",
    check=("/opt/g/bin/garage-server-check", "--unit", "llama-server-p.service"))

CONVERGED = dict(active="active", enabled=True, proven="d1", inputs="d1", installed=True,
                 proven_unit=True, failed=None, failure=None)


class Meta:
    """Stands in for an OperationMeta of an earlier operation."""

    def __init__(self, will=False, did=False):
        self.will_change, self._did = will, did

    def is_complete(self):
        return True

    def did_change(self):
        return self._did


def served(state=None, plan=PLAN, executing=False, changed=()):
    run = run_op(ops.served, {"services.ServiceState": {**CONVERGED, **(state or {})}},
                 executing=executing, plan=plan, changed=list(changed))
    return run.commands, run


def test_converged_service_is_left_alone():
    commands, fake = served()
    assert commands == []
    assert fake.noops == ["llama-server-p.service is running with the inputs it was proven with"]


def test_a_disabled_but_proven_service_is_only_enabled():
    commands, _ = served({"enabled": False})
    assert [c.get_raw_value() for c in commands] == ["systemctl enable -- llama-server-p.service"]


@pytest.mark.parametrize("state, changed, executing, reason", [
    ({"proven": None}, [], False, "never proven"),
    ({"proven": "old"}, [], False, "its unit, API key, engine build or model files changed"),
    ({"installed": False}, [], False, "its installed unit is not the wanted one"),
    ({"active": "failed"}, [], False, "it is failed"),
    ({}, [Meta(will=True)], False, "its engine or model changed in this run"),
    ({}, [Meta(did=True)], True, "its engine or model changed in this run"),
])
def test_restart_reasons(state, changed, executing, reason):
    commands, fake = served(state, executing=executing, changed=changed)
    (prove,) = commands
    assert isinstance(prove, FunctionCommand) and prove.function is ops._prove_or_roll_back
    assert reason in fake.logs[0]


def test_inputs_that_failed_before_are_reported_without_a_restart():
    commands, _ = served({"proven": "old", "inputs": "bad",
                          "failed": ops.attempt_key("bad", PLAN),
                          "failure": "tool result failed: answered 500", "installed": False})
    (command,) = commands
    assert isinstance(command, StringCommand)
    text = command.get_raw_value()
    assert "these inputs already failed their proof (tool result failed: answered 500)" in text
    assert text.endswith("exit 1") and "--restart" not in text


def test_retry_failed_tries_again():
    plan = dataclasses.replace(PLAN, retry_failed=True)
    commands, _ = served({"proven": "old", "inputs": "bad",
                          "failed": ops.attempt_key("bad", plan)}, plan=plan)
    assert isinstance(commands[0], FunctionCommand)


def test_a_different_proof_of_the_same_inputs_is_a_new_attempt():
    """e.g. prove_tool_call turned off for a model without tool support"""
    plan = dataclasses.replace(PLAN, check=PLAN.check + ("--tool-call",))
    commands, _ = served({"proven": "old", "inputs": "bad",
                          "failed": ops.attempt_key("bad", plan)})
    assert isinstance(commands[0], FunctionCommand)


def test_the_attempt_key_is_what_the_rig_records(tmp_path):
    """The rig hashes `inputs NL proof NL` with sha256sum; the controller must agree."""
    out = subprocess.run(["sh", "-c", 'printf "%s\\n%s\\n" "$1" "$2" | sha256sum | cut -c1-64',
                          "-", "d1", ops.proof_text(PLAN)], capture_output=True, text=True)
    assert out.stdout.strip() == ops.attempt_key("d1", PLAN)


def test_other_failed_inputs_do_not_block_a_new_change():
    commands, _ = served({"proven": "old", "inputs": "new", "failed": "bad"})
    assert isinstance(commands[0], FunctionCommand)


def prove_or_roll_back(results, keep_running=False):
    fake = ShellHost(results)
    ok = ops._prove_or_roll_back(None, fake, PLAN, "echo d", keep_running)
    return ok, fake.ran


def test_proven_change_is_recorded_and_enabled():
    ok, ran = prove_or_roll_back([(True, "")] * 3)
    assert ok
    install, prove, record = ran
    assert install.endswith(f"- {PLAN.wanted_unit} {PLAN.unit_file}")
    assert "systemctl daemon-reload" in install and "mv -f" in install
    assert prove.endswith("llama-server-p.service --restart")
    assert record.endswith(f"{PLAN.unit_file} {PLAN.proven_unit} {PLAN.inputs} {PLAN.failed} "
                           "llama-server-p.service")
    assert "systemctl enable" in record


def test_failed_change_is_recorded_then_rolled_back_and_proven_again():
    report = '{"ok": false, "step": "tool result", "reason": "answered 500"}'
    results = [(True, ""), (False, ""), (True, report), (True, ""), (True, ""), (True, ""),
               (True, ""), (True, '{"ok": true, "build_info": "b1-abc1234"}')]
    ok, ran = prove_or_roll_back(results)
    assert not ok
    install, prove, read, record_failed, has_proven, reinstall, reprove, reread = ran
    assert prove.endswith("--restart") and reprove.endswith("--restart")
    assert record_failed.endswith(f"{PLAN.failed} 'tool result failed: answered 500' "
                                  f"'{ops.proof_text(PLAN)}'")
    assert has_proven.endswith(PLAN.proven_unit)
    assert reinstall.endswith(f"- {PLAN.proven_unit} {PLAN.unit_file}")


def test_failed_first_start_leaves_the_service_stopped():
    results = [(True, ""), (False, ""), (True, '{"step": "health", "reason": "never ready"}'),
               (True, ""), (False, ""), (True, "")]
    ok, ran = prove_or_roll_back(results)
    assert not ok
    assert "systemctl disable --now" in ran[-1]
    assert not any(PLAN.proven_unit in r and "daemon-reload" in r for r in ran)


def test_a_unit_proven_before_copies_were_kept_is_kept_first():
    ok, ran = prove_or_roll_back([(True, "")] * 4, keep_running=True)
    assert ok and ran[0].endswith(f"{PLAN.unit_file} {PLAN.proven_unit}")


def rig_with(engine, profile, gpu_count=1):
    rig, errors = load_rig("r", {
        "gpu_count": gpu_count,
        "engines": {"e": {"ref": "b1" if engine.get("kind", "llama.cpp") == "llama.cpp"
                          else "a" * 40, **engine}},
        "models": {"m": {"repo": "o/m", "revision": "main", "files": ["m.gguf"]}},
        "profiles": {"p": {"model": "m", "engine": "e", "port": 9000, "ctx_size": 8192,
                           **profile}}})
    assert errors == [], errors
    return rig


@pytest.mark.parametrize("engine, profile, jinja, gpu", [
    ({"kind": "llama.cpp"}, {}, True, True),
    ({"kind": "llama.cpp"}, {"jinja": False}, False, True),
    ({"kind": "llama.cpp", "cuda": False}, {}, True, False),
    ({"kind": "llama.cpp"}, {"n_gpu_layers": 0}, True, False),
    ({"kind": "ik_llama.cpp"}, {}, False, False),
    ({"kind": "ik_llama.cpp"}, {"jinja": True, "n_gpu_layers": 99}, True, True),
])
def test_what_the_proof_asks_for(engine, profile, jinja, gpu):
    rig = rig_with(engine, profile)
    assert uses_jinja(rig, "p") is jinja and expects_gpu(rig, "p") is gpu
    command = check_command(rig, "p", "f" * 40)
    assert ("--tool-call" in command) is jinja and ("--expect-gpu" in command) is gpu
    assert command[command.index("--ctx-size") + 1] == "8192"
    assert command[command.index("--commit") + 1] == "f" * 40
    assert ("--ik" in command) is (engine["kind"] == "ik_llama.cpp")


def test_tool_turn_can_be_turned_off_but_not_the_rest():
    command = check_command(rig_with({"kind": "llama.cpp"}, {"prove_tool_call": False}), "p")
    assert "--tool-call" not in command and "--expect-gpu" in command
    no_gpus = rig_with({"kind": "llama.cpp", "cuda_architectures": [86]}, {}, gpu_count=0)
    assert "--expect-gpu" not in check_command(no_gpus, "p")
