"""opencode.json on an opencode client of the test fleet: merged into the user's own file,
accepted by the real opencode CLI, its addresses reaching every served model from the client."""

from __future__ import annotations

import json

import pytest

from lab.opencode_cli import opencode_models
from lab.serving import (
    API_KEY,
    API_KEY_ENV,
    controller_env,
    profile,
    rig_data,
    sh,
)
from llm_garage import opencode

pytestmark = pytest.mark.e2e

CONFIG = "/home/alice/.config/opencode/opencode.json"
USER_FILE = """{
  // alice's own settings
  "$schema": "https://opencode.ai/config.json",
  "model": "mine/my-model",
  "autoupdate": false,
  "provider": {
    "mine": {"npm": "@ai-sdk/openai-compatible", "name": "Mine",
             "options": {"baseURL": "http://10.99.0.1:9999/v1"},
             "models": {"my-model": {"name": "My model"}}},
    "llm-garage-oldbox-9000": {"npm": "@ai-sdk/openai-compatible",
                               "options": {"baseURL": "http://10.99.0.2:9000/v1"},
                               "models": {"retired": {}}},
  },
}
"""


def test_opencode_json_merged_accepted_and_working(
        start_rigs, write_inventory, converge, fleet, hub, git_url, tmp_path):
    garage, epyc = start_rigs("garage", "epyc")
    epyc.ssh("useradd -m -s /bin/bash alice && "
             "install -d -o alice -g alice /home/alice/.config/opencode")
    epyc.put_text(USER_FILE, CONFIG, 0o600)
    epyc.ssh(f"chown alice:alice {CONFIG}")
    env = controller_env(tmp_path, **{API_KEY_ENV: API_KEY})
    hosts = {
        "garage": rig_data(hub, git_url, {"qwen": profile(8000, alias="qwen-tiny")}),
        "epyc": rig_data(hub, git_url, {"big": profile(8001, api_key_env=API_KEY_ENV),
                                        "local": profile(8002, listen="127.0.0.1")},
                         opencode_client=True, opencode_config_path=CONFIG,
                         opencode_owner="alice"),
    }

    first, _ = converge(write_inventory(hosts), env=env)

    assert f"opencode | Providers of the fleet in {CONFIG}" in first.changes()["epyc"]
    assert "garage" not in first.changes() or not any(
        op.startswith("opencode |") for op in first.changes()["garage"])
    text = sh(epyc, f"cat {CONFIG}")
    config = json.loads(text)
    assert API_KEY not in text
    # Alice's settings are all there, her provider untouched; the stale one of ours is gone.
    assert (config["model"], config["autoupdate"]) == ("mine/my-model", False)
    assert list(config["provider"]) == ["mine", "llm-garage-epyc-8001",
                                        "llm-garage-epyc-8002", "llm-garage-garage-8000"]
    garage_ip, epyc_ip = garage.ip, epyc.ip
    ours = {k: v for k, v in config["provider"].items() if k.startswith("llm-garage-")}
    assert ours["llm-garage-garage-8000"]["options"] == {"baseURL": f"http://{garage_ip}:8000/v1"}
    assert ours["llm-garage-epyc-8001"]["options"] == {
        "baseURL": f"http://{epyc_ip}:8001/v1", "apiKey": "{env:" + API_KEY_ENV + "}"}
    assert ours["llm-garage-epyc-8002"]["options"] == {"baseURL": "http://127.0.0.1:8002/v1"}
    assert ours["llm-garage-garage-8000"]["models"] == {
        "qwen-tiny": {"name": "qwen-tiny (garage)",
                      "limit": {"context": 4096, "output": 4096}}}
    # Written atomically, owned by alice with her mode, the original kept once.
    assert sh(epyc, f"stat -c '%U %G %a' {CONFIG}") == "alice alice 600"
    assert sh(epyc, f"cat {CONFIG}{opencode.BACKUP_SUFFIX}") == USER_FILE.rstrip("\n")
    assert sh(epyc, f"ls {CONFIG}.llm-garage.tmp 2>/dev/null || true") == ""

    # The real opencode accepts the file as written on the rig...
    listed = opencode_models(text, tmp_path)
    for model in ("llm-garage-garage-8000/qwen-tiny", "llm-garage-epyc-8001/big",
                  "llm-garage-epyc-8002/local", "mine/my-model"):
        assert model in listed
    assert not any(m.startswith("llm-garage-oldbox-9000/") for m in listed)

    # ...and from the client, every baseURL reaches the server of its model, and the keyed
    # server answers with the key opencode would send ({env:...} from the environment).
    for provider_id, provider in ours.items():
        url = provider["options"]["baseURL"]
        (alias,) = provider["models"]
        listed = json.loads(sh(epyc, f"curl -sf {url}/models"))
        assert [m["id"] for m in listed["data"]] == [alias]
        header = "-H 'Authorization: Bearer " + API_KEY + "'" if "apiKey" in provider[
            "options"] else ""
        body = json.dumps({"model": alias, "messages": [{"role": "user", "content": "hi"}]})
        status = sh(epyc, f"curl -s -o /dev/null -w '%{{http_code}}' {header} "
                          f"-H 'Content-Type: application/json' -d '{body}' "
                          f"{url}/chat/completions")
        assert status == "200", provider_id
    assert sh(epyc, f"curl -s -o /dev/null -w '%{{http_code}}' -d '{{}}' "
                    f"http://{epyc_ip}:8001/v1/chat/completions") == "401"


def test_limit_context_is_read_back_from_the_server_when_parallel_is_unset(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    """`auto` sets no `parallel`, and its environment makes the server pick 2 slots itself (as
    newer llama.cpp does): each request gets 2048 of its 4096, which only the server can say.
    `set` gives parallel: the limit comes from the settings. The client is another rig."""
    garage, ws = start_rigs("garage", "ws")
    env = controller_env(tmp_path)
    two_slots = {"FIXTURE_LOAD_SECONDS": "0.3", "LLAMA_ARG_N_PARALLEL": "2"}
    hosts = {
        "garage": rig_data(hub, git_url, {
            "auto": profile(8000, alias="auto", environment=two_slots),
            "set": profile(8001, alias="set", ctx_size=8192, parallel=2)}),
        "ws": rig_data(hub, git_url, {"own": profile(8002, alias="own", ctx_size=2048)},
                       opencode_client=True),
    }

    converge(write_inventory(hosts), env=env)

    config = json.loads(sh(ws, "cat /root/.config/opencode/opencode.json"))
    limits = {pid: next(iter(p["models"].values()))["limit"]
              for pid, p in config["provider"].items()}
    assert limits == {
        "llm-garage-garage-8000": {"context": 2048, "output": 2048},
        "llm-garage-garage-8001": {"context": 4096, "output": 4096},
        "llm-garage-ws-8002": {"context": 2048, "output": 2048},
    }
    report = json.loads(sh(garage, "cat /opt/llm-garage/state/services/"
                                   "llama-server-auto.proof.json"))
    assert (report["ok"], report["n_ctx"], report["slots"]) == (True, 2048, 2)

    # The server's own choice changes (one slot now): the limit follows once it is proven.
    hosts["garage"]["profiles"]["auto"]["environment"] = {"FIXTURE_LOAD_SECONDS": "0.3"}
    first, _ = converge(write_inventory(hosts), env=env)
    assert "opencode | Providers of the fleet in /root/.config/opencode/opencode.json" in \
        first.changes()["ws"]
    config = json.loads(sh(ws, "cat /root/.config/opencode/opencode.json"))
    assert config["provider"]["llm-garage-garage-8000"]["models"]["auto"]["limit"] == {
        "context": 4096, "output": 4096}
