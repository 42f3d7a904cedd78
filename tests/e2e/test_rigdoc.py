"""The rig document on a test rig: after a converge it holds the rig's real values, a no-op
rerun leaves it byte-identical, and `llm-garage docs` renders it again offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lab.rigs.pyinfra_results import REPO_ROOT
from lab.serving import (
    API_KEY,
    API_KEY_ENV,
    controller_env,
    first_shard,
    install_fake_gpus,
    profile,
    rig_data,
    sh,
)

pytestmark = pytest.mark.e2e


def test_the_rig_document_holds_the_rigs_real_values_and_a_noop_rewrites_nothing(
        start_rigs, write_inventory, converge, hub, git_url, repos, tmp_path):
    (rig,) = start_rigs("rig1")
    install_fake_gpus(rig, "rtx3090", 1)
    _, repo = repos
    env = controller_env(tmp_path, **{API_KEY_ENV: API_KEY})
    profiles = {"a": profile(8081, alias="tiny-a", api_key_env=API_KEY_ENV)}
    inventory = write_inventory({"rig1": rig_data(hub, git_url, profiles, gpu_count=1,
                                                  gpu_power_limit_w=280,
                                                  opencode_client=True)})
    docs = inventory.parent / "docs"

    first, second = converge(inventory, env=env)

    assert "Docs | Rig document" in " ".join(first.changes()["rig1"])
    md, js = docs / "rig1.md", docs / "rig1.json"
    text, data = md.read_text(), json.loads(js.read_text())
    # the engine: the commit the tag resolved to, as the binary reports it
    commit = repo.tags["b6"]
    version = sh(rig, "/opt/llm-garage/builds/llama/current/bin/llama-server --version 2>&1")
    version_line = next(line for line in version.splitlines() if "version:" in line)
    assert f"- pin: `b6 → {commit}`" in text
    assert f"- `--version`: `{version_line}`" in text
    assert data["engines"][0]["current"] == data["engines"][0]["key"]
    # the GPU, as nvidia-smi reports it
    uuid = sh(rig, "nvidia-smi --query-gpu=uuid --format=csv,noheader")
    assert f"| 0 | NVIDIA GeForce RTX 3090 | `{uuid}` |" in text
    assert "280 W (100 W–350 W) | on |" in text
    # every model file's sha256 is the one of the file on the rig
    snapshot = first_shard(hub).rsplit("/", 1)[0]
    on_rig = dict(reversed(line.split("  ", 1)) for line in sh(
        rig, f"cd {snapshot} && sha256sum -- *").splitlines())
    files = data["models"][0]["files"]
    assert len(files) == 2 and {f["name"]: f["sha256"] for f in files} == on_rig
    for name, sha in on_rig.items():
        assert f"`{sha}` | ok |" in text
        assert f"echo '{sha}  {snapshot}/{name}' | sha256sum -c -" in text
    # the service: ExecStart and the full unit text as installed, the proof's n_ctx
    unit = sh(rig, "cat /etc/systemd/system/llama-server-a.service")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert data["profiles"][0]["exec_start"] == exec_start.removeprefix("ExecStart=")
    assert f"  {exec_start.removeprefix('ExecStart=')}\n" in text
    assert unit + "\nLLM_GARAGE_UNIT\n" in text
    proof = json.loads(sh(rig, "cat /opt/llm-garage/state/services/llama-server-a.proof.json"))
    assert proof["ok"] and f"- last proof: ok, n_ctx {proof['n_ctx']}," in text
    assert "- `llm-garage-rig1-8081`: http://" in text
    # no secret in either file
    assert API_KEY not in text and API_KEY not in js.read_text()

    # the no-op rerun (converge's second run) rewrote nothing and reported no change
    assert second.changes() == {}
    assert md.read_text() == text and js.read_text() == json.dumps(data, indent=2,
                                                                   sort_keys=True,
                                                                   ensure_ascii=False) + "\n"

    # offline: rendered again from the JSON alone, byte for byte
    md.unlink()
    out = subprocess.run([sys.executable, "-m", "llm_garage.cli", "docs", str(inventory)],
                         cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert md.read_text() == text
    print(text)  # the excerpt the README shows comes from here
