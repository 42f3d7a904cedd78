"""opencode.json: providers from the fleet, merge into the user's file, and acceptance by the
real opencode CLI (npm opencode-ai, see opencode_bin below)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import FileUploadCommand

from lab.opencode_cli import opencode_models
from llm_garage import opencode
from llm_garage.operations import opencode as opencode_ops
from llm_garage.settings import load_rig
from tests.unit.ophelper import run_op

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def garage(garage_fleet):
    return garage_fleet


def rig(name, profiles, **data):
    raw = {"engines": {"e": {"kind": "llama.cpp", "ref": "b1", "cuda": False}},
           "models": {"m": {"repo": "o/m", "revision": "main", "files": ["m.gguf"]}},
           "profiles": {p: {"model": "m", "engine": "e", **v} for p, v in profiles.items()},
           **data}
    built, errors = load_rig(name, raw)
    assert errors == []
    return built


# --- providers -----------------------------------------------------------------------------

def test_providers_of_the_reference_fleet(garage):
    # epyc's profile sets no `parallel`: its limit is what its server reported (read back).
    providers = opencode.providers_for(garage["epyc"], garage, {("epyc", "qwen397"): 262144})
    assert providers == {
        "llm-garage-epyc-8000": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "llm-garage (epyc:8000)",
            "options": {"baseURL": "http://192.168.1.51:8000/v1"},
            "models": {"qwen3.5-397b-iq4kss": {
                "name": "qwen3.5-397b-iq4kss (epyc)",
                "limit": {"context": 262144, "output": 32768}}},
        },
        "llm-garage-garage-8000": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "llm-garage (garage:8000)",
            "options": {"baseURL": "http://192.168.1.50:8000/v1"},
            "models": {"qwen3.5-122b": {
                "name": "qwen3.5-122b (garage)",
                "limit": {"context": 262144, "output": 32768}}},
        },
    }


def test_limits_keys_loopback_and_addresses(monkeypatch):
    monkeypatch.setenv("BOX_KEY", "never-written")
    box = rig("box", {
        "a": {"port": 8001, "ctx_size": 65536, "alias": "model-a", "api_key_env": "BOX_KEY"},
        "b": {"port": 8002, "ctx_size": 4096},
        "c": {"port": 8003},
        "local": {"port": 8004, "listen": "127.0.0.1", "ctx_size": 8192},
        "off": {"port": 8005, "enabled": False},
    }, rig_address="fd00::7")
    ws = rig("ws", {}, opencode_client=True, opencode_provider="garage",
             opencode_provider_name="Garage", opencode_output_limit=16384,
             opencode_output_limits={"model-a": 8192})
    fleet = {"box": box, "ws": ws}
    served = {("box", "a"): 65536, ("box", "b"): 4096, ("box", "local"): 8192}
    mine = opencode.providers_for(ws, fleet, served)
    assert sorted(mine) == ["garage-box-8001", "garage-box-8002", "garage-box-8003"]
    assert mine["garage-box-8001"]["options"] == {"baseURL": "http://[fd00::7]:8001/v1",
                                                  "apiKey": "{env:BOX_KEY}"}
    assert mine["garage-box-8001"]["models"] == {
        "model-a": {"name": "model-a (box)", "limit": {"context": 65536, "output": 8192}}}
    assert mine["garage-box-8002"]["models"]["b"]["limit"] == {"context": 4096, "output": 4096}
    assert mine["garage-box-8003"]["models"] == {"c": {"name": "c (box)"}}
    # The rig itself also reaches its loopback-bound server.
    own = opencode.providers_for(box, fleet, served)
    assert own["llm-garage-box-8004"]["options"] == {"baseURL": "http://127.0.0.1:8004/v1"}
    assert own["llm-garage-box-8004"]["models"]["local"]["limit"]["context"] == 8192
    assert "never-written" not in json.dumps(own)


def test_limit_context_is_what_one_request_gets():
    # With parallel set, llama-server gives each slot -c / parallel: from the settings.
    # Without it the engine chooses: only what the running server reported, never a guess.
    box = rig("box", {
        "four": {"port": 8001, "ctx_size": 131072, "parallel": 4},
        "one": {"port": 8002, "ctx_size": 131072, "parallel": 1},
        "auto": {"port": 8003, "ctx_size": 131072},
        "odd": {"port": 8004, "ctx_size": 10000, "parallel": 3},
        "small": {"port": 8005, "ctx_size": 65536, "parallel": 8},
        "unread": {"port": 8006, "ctx_size": 4096},
        "default": {"port": 8007},
    })
    # what the servers reported: "auto" got 4 slots, "default" the model's own context
    served = {("box", "auto"): 32768, ("box", "default"): 40960, ("box", "four"): 1}

    def limits(served):
        return {p["name"].split(":")[1].rstrip(")"): next(iter(p["models"].values())).get(
                "limit") for p in opencode.providers_for(box, {"box": box}, served).values()}

    assert limits(served) == {
        "8001": {"context": 32768, "output": 32768},  # the settings say it: not read back
        "8002": {"context": 131072, "output": 32768},
        "8003": {"context": 32768, "output": 32768},
        "8004": {"context": 3333, "output": 3333},
        "8005": {"context": 8192, "output": 8192},
        "8006": None,
        "8007": {"context": 40960, "output": 32768},
    }
    assert limits(None) == {**limits(served), "8003": None, "8007": None}


def test_output_limit_default_is_the_documented_one():
    box = rig("box", {"p": {"port": 8001, "ctx_size": 262144, "parallel": 1}})
    entry = opencode.model_entry(box, box, "p")
    assert entry["limit"] == {"context": 262144, "output": 32768}
    readme = (REPO / "README.md").read_text()
    assert "| `opencode_output_limit` | int | `32768` |" in readme


# --- merge ---------------------------------------------------------------------------------

USER_CONFIG = {
    "$schema": "https://opencode.ai/config.json",
    "model": "llm-garage-garage-8000/qwen3.5-122b",
    "autoupdate": False,
    "provider": {
        "llm-garage-old-9000": {"npm": "@ai-sdk/openai-compatible", "models": {"gone": {}}},
        "llm-garage": {"npm": "@ai-sdk/openai-compatible", "models": {"older": {}}},
        "mine": {"npm": "@ai-sdk/openai-compatible", "name": "My server",
                 "options": {"baseURL": "http://10.0.0.9:9999/v1"},
                 "models": {"my-model": {"name": "Mine"}}},
        "llm-garagex": {"npm": "@ai-sdk/openai-compatible", "models": {"not-ours": {}}},
    },
    "mcp": {"files": {"type": "local", "command": ["true"], "enabled": False}},
}


def test_merge_keeps_the_user_and_replaces_only_ours(garage):
    ours = opencode.providers_for(garage["epyc"], garage)
    merged = opencode.merge(USER_CONFIG, ours, "llm-garage")
    assert list(merged) == list(USER_CONFIG)
    for key in ("$schema", "model", "autoupdate", "mcp"):
        assert merged[key] == USER_CONFIG[key]
    assert list(merged["provider"]) == ["mine", "llm-garagex", "llm-garage-epyc-8000",
                                        "llm-garage-garage-8000"]
    assert merged["provider"]["mine"] == USER_CONFIG["provider"]["mine"]
    assert opencode.merge(merged, ours, "llm-garage") == merged  # idempotent
    assert USER_CONFIG["provider"]["llm-garage"] == {"npm": "@ai-sdk/openai-compatible",
                                                     "models": {"older": {}}}  # not mutated


def test_merge_into_nothing_and_into_a_file_without_providers():
    ours = {"llm-garage-r-1": {"npm": "x"}}
    assert opencode.merge(None, ours, "llm-garage") == {
        "$schema": opencode.SCHEMA_URL, "provider": ours}
    assert opencode.merge({"theme": "x"}, ours, "llm-garage") == {"theme": "x",
                                                                   "provider": ours}
    with pytest.raises(opencode.OpencodeConfigError):
        opencode.merge({"provider": []}, ours, "llm-garage")


def test_loads_accepts_what_opencode_accepts():
    text = '{\n  // mine\n  "theme": "a // b", /* block */\n  "provider": {"x": [1, 2,],},\n}\n'
    assert opencode.loads(text) == ({"theme": "a // b", "provider": {"x": [1, 2]}}, True)
    assert opencode.loads('{"a": "\\"/*"}') == ({"a": '"/*'}, False)
    for bad in ("{", "[]", ""):
        with pytest.raises(opencode.OpencodeConfigError):
            opencode.loads(bad)


# --- the operation -------------------------------------------------------------------------

def run_merge(fact, **kwargs):
    return run_op(opencode_ops.config_merged, {"opencode.ConfigFile": fact}, host_name="epyc",
                  **kwargs)


PROVIDERS = {"llm-garage-r-8000": {"npm": "@ai-sdk/openai-compatible",
                                   "options": {"baseURL": "http://r:8000/v1"},
                                   "models": {"a": {"name": "a (r)"}}}}


def test_op_writes_through_a_temporary_file_after_a_backup():
    fact = {"real": "/home/u/dots/opencode.json", "mode": "640",
            "text": json.dumps({"theme": "x"})}
    run = run_merge(fact, path="/home/u/.config/opencode/opencode.json",
                    providers=PROVIDERS, prefix="llm-garage", owner="u")
    strings = [c for c in run.raw if isinstance(c, str)]
    upload = next(c for c in run.commands if isinstance(c, FileUploadCommand))
    assert upload.dest == "/home/u/dots/opencode.json.llm-garage.tmp"
    assert json.loads(upload.src.getvalue()) == {"theme": "x", "provider": PROVIDERS}
    assert strings[1].endswith(" - /home/u/dots/opencode.json "
                               "/home/u/dots/opencode.json.llm-garage.orig")
    assert "mv -f -- \"$2.tmp\" \"$2\"" in strings[1]  # the backup is written atomically too
    assert strings[-4:] == [
        "chmod 640 /home/u/dots/opencode.json.llm-garage.tmp",
        "chown u: /home/u/dots/opencode.json.llm-garage.tmp",
        "sync -- /home/u/dots/opencode.json.llm-garage.tmp",
        "mv -f -- /home/u/dots/opencode.json.llm-garage.tmp /home/u/dots/opencode.json"]


def test_op_noop_when_merged_already():
    text = opencode.dumps(opencode.merge({"theme": "x"}, PROVIDERS, "llm-garage"))
    run = run_merge({"real": "/r/o.json", "mode": "644", "text": text}, path="/r/o.json",
                    providers=PROVIDERS, prefix="llm-garage", owner="root")
    assert run.commands == [] and run.noops == ["/r/o.json already lists our providers"]


def test_op_new_file_has_no_backup_and_default_mode():
    run = run_merge({"real": "/r/o.json", "mode": None, "text": None}, path="/r/o.json",
                    providers=PROVIDERS, prefix="llm-garage", owner="root")
    strings = [c for c in run.raw if isinstance(c, str)]
    assert not any(".llm-garage.orig" in s for s in strings)
    assert "chmod 644 /r/o.json.llm-garage.tmp" in strings


def test_op_gives_a_providers_function_the_file_as_it_is():
    seen = []

    def providers(existing):
        seen.append(existing)
        return PROVIDERS

    text = opencode.dumps({"theme": "x"})
    run = run_merge({"real": "/r/o.json", "mode": "644", "text": text}, path="/r/o.json",
                    providers=providers, prefix="llm-garage", owner="root")
    upload = next(c for c in run.commands if isinstance(c, FileUploadCommand))
    assert json.loads(upload.src.getvalue()) == {"theme": "x", "provider": PROVIDERS}
    assert seen == [{"theme": "x"}]
    seen.clear()
    run_merge({"real": "/r/o.json", "mode": None, "text": None}, path="/r/o.json",
              providers=providers, prefix="llm-garage", owner="root")
    assert seen == [None]


def test_op_refuses_a_broken_file_without_touching_it():
    commands = run_merge({"real": "/r/o.json", "mode": "644", "text": "{oops"},
                         path="/r/o.json", providers=PROVIDERS, prefix="llm-garage",
                         owner="root").commands
    assert len(commands) == 1
    assert commands[0].get_raw_value().startswith("echo '/r/o.json: not valid JSON")
    assert commands[0].get_raw_value().endswith("exit 1")


def test_op_merge_script_runs(tmp_path):
    """The shell of the write, run here as the current user: folders created, backup once,
    atomic rename, content as merged."""
    owner = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    target = tmp_path / "a" / "b" / "opencode.json"
    commands = run_merge({"real": str(target), "mode": None, "text": None}, path=str(target),
                         providers=PROVIDERS, prefix="llm-garage", owner=owner).commands
    for command in commands:
        if isinstance(command, FileUploadCommand):
            Path(command.dest).write_text(command.src.getvalue())
        else:
            out = subprocess.run(command.get_raw_value(), shell=True, capture_output=True,
                                 text=True)
            assert out.returncode == 0, (command.get_raw_value(), out.stderr)
    assert json.loads(target.read_text())["provider"] == PROVIDERS
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert not Path(str(target) + ".llm-garage.tmp").exists()


# --- the real opencode CLI -----------------------------------------------------------------

def test_real_opencode_accepts_the_reference_fleet_merged_into_user_settings(garage, tmp_path):
    ours = opencode.providers_for(garage["epyc"], garage)
    user = {k: v for k, v in USER_CONFIG.items() if k != "mcp"}
    listed = opencode_models(opencode.merge(user, ours, "llm-garage"), tmp_path)
    assert "llm-garage-garage-8000/qwen3.5-122b" in listed
    assert "llm-garage-epyc-8000/qwen3.5-397b-iq4kss" in listed
    assert "mine/my-model" in listed
    assert not any(m.startswith(("llm-garage-old-9000/", "llm-garage/")) for m in listed)


def test_real_opencode_accepts_keys_loopback_and_models_without_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("GARAGE_TEST_KEY", "x")
    box = rig("box", {
        "a": {"port": 8001, "ctx_size": 65536, "alias": "org/model-a:q4",
              "api_key_env": "GARAGE_TEST_KEY"},
        "c": {"port": 8003},
        "local": {"port": 8004, "listen": "127.0.0.1", "ctx_size": 8192},
    }, rig_address="fd00::7", opencode_client=True)
    listed = opencode_models(opencode.merge(None, opencode.providers_for(box, {"box": box}),
                                            "llm-garage"), tmp_path)
    for model in ("llm-garage-box-8001/org/model-a:q4", "llm-garage-box-8003/c",
                  "llm-garage-box-8004/local"):
        assert model in listed


def test_real_opencode_refuses_a_limit_without_output(tmp_path):
    """The check above can fail: opencode rejects what it does not accept."""
    config = {"provider": {"x": {"npm": opencode.NPM_PACKAGE,
                                 "options": {"baseURL": "http://127.0.0.1:1/v1"},
                                 "models": {"m": {"limit": {"context": 1}}}}}}
    with pytest.raises(AssertionError, match="limit.output"):
        opencode_models(config, tmp_path)

