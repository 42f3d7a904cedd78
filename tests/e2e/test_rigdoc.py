"""The rig document on a test rig: after a converge it holds the rig's real values, a no-op
rerun leaves it byte-identical, and `llm-garage docs` renders it again offline; its "rebuild
by hand" section, run by itself on a second rig, gives the same binary, model bytes, unit and
answering server; a tag bump changes only the engine's lines."""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from lab.rigs.pyinfra_results import REPO_ROOT
from lab.serving import (
    API_KEY,
    API_KEY_ENV,
    chat,
    controller_env,
    first_shard,
    gpu_state,
    install_fake_gpus,
    profile,
    rig_data,
    served_ids,
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


def _by_hand(text: str) -> str:
    """The shell block of the document's "Rebuild by hand" section."""
    section = text.split("\n## Rebuild by hand\n", 1)[1]
    return section.split("\n```sh\n", 1)[1].split("\n```\n", 1)[0] + "\n"


def _sha256s(rig, folder: str) -> dict[str, str]:
    return dict(reversed(line.split("  ", 1)) for line in sh(
        rig, f"cd {folder} && sha256sum -- *").splitlines())


def test_the_rebuild_by_hand_section_run_on_a_fresh_rig_gives_the_same_rig(
        start_rigs, write_inventory, converge, hub, git_url, repos, tmp_path):
    rig1, rig2 = start_rigs("rig1", "rig2")
    for rig in (rig1, rig2):
        install_fake_gpus(rig, "rtx3090", 1)
    _, repo = repos
    env = controller_env(tmp_path, **{API_KEY_ENV: API_KEY})
    profiles = {"a": profile(8081, alias="tiny-a", api_key_env=API_KEY_ENV)}
    inventory = write_inventory({"rig1": rig_data(hub, git_url, profiles, gpu_count=1,
                                                  gpu_power_limit_w=280)})
    converge(inventory, env=env)
    text = (inventory.parent / "docs" / "rig1.md").read_text()
    data = json.loads((inventory.parent / "docs" / "rig1.json").read_text())
    script = _by_hand(text)
    assert API_KEY not in script

    # rig2 has nothing of llm-garage: no folders, no scripts, no units
    assert sh(rig2, "ls -d /opt/llm-garage /etc/llm-garage /srv/models "
                    "/etc/systemd/system/llama-server-* 2>/dev/null || true") == ""
    # a person runs the section as root, in order, with the key in the variable it names
    rig2.put_text(script, "/root/rebuild-by-hand.sh", 0o700)
    run = rig2.ssh(f"{API_KEY_ENV}={shlex.quote(API_KEY)} bash -e /root/rebuild-by-hand.sh",
                   check=False, timeout=900)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"

    # the same binary: --version reports the pinned commit, in the same build folder
    engine = data["engines"][0]
    server = engine["build_dir"] + "/bin/llama-server"
    versions = [next(line for line in sh(rig, f"{server} --version 2>&1").splitlines()
                     if "version:" in line) for rig in (rig1, rig2)]
    assert versions[0] == versions[1] == engine["stamp"]["version"]
    assert versions[1].endswith(f"({repo.tags['b6'][:7]})")
    # the same model bytes, in the same snapshot folder
    model = data["models"][0]
    want = {f["name"]: f["sha256"] for f in model["files"]}
    assert len(want) == 2 and _sha256s(rig1, model["snapshot"]) == want
    assert _sha256s(rig2, model["snapshot"]) == want
    # the same unit, byte for byte, running
    unit = "/etc/systemd/system/llama-server-a.service"
    assert sh(rig2, f"cat {unit}") == sh(rig1, f"cat {unit}")
    assert sh(rig2, "systemctl is-active llama-server-a.service") == "active"
    # the same GPU settings
    assert gpu_state(rig2) == gpu_state(rig1)
    # the server answers, with the key and only with it
    assert served_ids(rig2, 8081, API_KEY) == ["tiny-a"]
    assert chat(rig2, 8081, API_KEY) == 200
    assert chat(rig2, 8081) == 401
    # and none of llm-garage's own files was needed or made
    assert sh(rig2, "ls -d /opt/llm-garage/bin /opt/llm-garage/state /opt/llm-garage/ccache "
                    "2>/dev/null || true") == ""


def test_a_tag_bump_changes_only_the_engines_lines(
        start_rigs, write_inventory, converge, hub, git_url, repos, tmp_path):
    (rig,) = start_rigs("rig1")
    install_fake_gpus(rig, "rtx3090", 1)
    _, repo = repos
    env = controller_env(tmp_path)
    profiles = {"a": profile(8081, alias="tiny-a")}
    md, js = tmp_path / "docs" / "rig1.md", tmp_path / "docs" / "rig1.json"
    host = {"gpu_count": 1, "gpu_power_limit_w": 280}
    converge(write_inventory({"rig1": rig_data(hub, git_url, profiles, ref="b6", **host)}),
             env=env)
    before, old_engine = md.read_text(), json.loads(js.read_text())["engines"][0]
    converge(write_inventory({"rig1": rig_data(hub, git_url, profiles, ref="b8", **host)}),
             env=env)
    after, engine = md.read_text(), json.loads(js.read_text())["engines"][0]
    old, new = repo.tags["b6"], repo.tags["b8"]
    old_key, new_key = old_engine["key"], engine["key"]
    old_stamp, new_stamp = old_engine["stamp"], engine["stamp"]
    assert (old_engine["commit"], engine["commit"]) == (old, new)
    assert old_key == f"{old[:12]}-{old_key.split('-')[1]}"
    assert new_key == f"{new[:12]}-{old_key.split('-')[1]}"  # same flags, new commit
    assert (old_stamp["version"], new_stamp["version"]) == (f"version: 6 ({old[:7]})",
                                                            f"version: 8 ({new[:7]})")

    # Every line before, with the engine's values swapped (tag, commit, short commit, build
    # folder, build number), is the line after, but for the new build's stamp and the old
    # build, now kept for rollback.
    def bump(line: str) -> str:
        line = line.replace(old, new).replace(old_key, new_key).replace(old[:7], new[:7])
        return re.sub(r"\bb6\b", "b8", line).replace("version: 6 (", "version: 8 (")

    def changed(a: list[str], b: list[str]) -> list[str]:
        return [line for line in difflib.unified_diff(a, b, lineterm="", n=0)
                if line[:1] in "+-" and not line.startswith(("+++", "---"))]

    def built(text: str) -> str:
        return next(line for line in text.splitlines() if line.startswith("- built in "))

    kept_before = f"  - `{old_key}`: `{old_stamp['version']}`, finished " \
                  f"{old_stamp['finished']} (current)"
    assert kept_before in before.splitlines()
    assert re.fullmatch(r"- built in \d+ s with -j \d+, ccache \d+ hits / \d+ misses, "
                        r"finished " + re.escape(new_stamp["finished"]), built(after))
    assert new_stamp["finished"] != old_stamp["finished"]
    assert changed([bump(line) for line in before.splitlines()], after.splitlines()) == [
        "-" + bump(built(before)),
        "+" + built(after),
        "-" + bump(kept_before),
        f"+  - `{new_key}`: `{new_stamp['version']}`, finished {new_stamp['finished']} "
        "(current)",
        f"+  - `{old_key}`: `{old_stamp['version']}`, finished {old_stamp['finished']}",
    ]
    # the machine, GPUs and models are the same text; the diff itself is the engine's lines
    for part in ("## Machine", "## GPUs", "## Models"):
        start = before.index(part)
        assert before[start:before.index("\n## ", start + 1)] in after
    diff = changed(before.splitlines(), after.splitlines())
    assert f"-- pin: `b6 → {old}` from `{engine['remote']}`" in diff
    assert f"+- pin: `b8 → {new}` from `{engine['remote']}`" in diff
    assert f"+git -C /opt/llm-garage/src/llama checkout --detach {new}" in diff
    assert any(line.startswith(f"+ExecStart={engine['build_dir']}/bin/llama-server -m "
                               f"{first_shard(hub)} --host 0.0.0.0 --port 8081 ")
               for line in diff), "\n".join(diff)
    assert all(old[:7] in line or new[:7] in line or re.search(r"\bb[68]\b", line)
               or line[1:].startswith("- built in ") for line in diff), "\n".join(diff)
    print("\n".join(diff))
