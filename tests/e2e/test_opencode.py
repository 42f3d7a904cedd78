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
