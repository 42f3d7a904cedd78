"""The sandbox: its inventory and the runner's pure parts (state, options, SSH data, output)."""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
from pathlib import Path

import pytest

from lab import sandbox
from lab.rigs.pyinfra_results import REPO_ROOT
from llm_garage.settings import load_rig

INVENTORY = REPO_ROOT / "inventory" / "sandbox.py"

VAGRANT_SSH_CONFIG = """\
Host sandbox
  HostName 127.0.0.1
  User vagrant
  Port 2222
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "/home/me/llm-garage/.vagrant/machines/sandbox/virtualbox/private_key"
  IdentitiesOnly yes
  LogLevel FATAL
  PubkeyAcceptedKeyTypes +ssh-rsa
  HostKeyAlgorithms +ssh-rsa

"""


def _args(**kw) -> argparse.Namespace:
    base = {"real": False, "llama_source": None, "ref": None, "model": None, "vagrant": False}
    return argparse.Namespace(**{**base, **kw})


def _state(mode: str = "nspawn", **kw) -> dict:
    host_ip = "10.213.7.1" if mode == "nspawn" else sandbox.VAGRANT_HOST_IP
    rig_ip = "10.213.7.10" if mode == "nspawn" else sandbox.VAGRANT_IP
    if mode == "nspawn":
        ssh = {"ssh_hostname": rig_ip, "ssh_user": "root", "ssh_key": "/x/id_ed25519",
               "ssh_strict_host_key_checking": "no", "ssh_known_hosts_file": "/dev/null"}
    else:
        ssh = sandbox.vagrant_ssh_data(sandbox.parse_ssh_config(VAGRANT_SSH_CONFIG))
    args = _args(**kw)
    return sandbox.make_state(
        "sbx", mode, rig_ip=rig_ip, host_ip=host_ip, ssh=ssh,
        engine=sandbox.engine_config(args, host_ip, Path("/nonexistent")),
        model=sandbox.model_config(args, host_ip),
        fixtures={"git-daemon": {"pid": 1, "start": 1, "marker": "m", "argv": [], "log": "l"}},
    )


def _load_inventory(monkeypatch, state: dict | None, tmp_path: Path) -> dict:
    path = tmp_path / "sandbox.json"
    if state is not None:
        path.write_text(json.dumps(state))
    monkeypatch.setenv(sandbox.STATE_ENV, str(path))
    return runpy.run_path(str(INVENTORY))


def _host(monkeypatch, state: dict, tmp_path: Path) -> tuple[str, dict]:
    module = _load_inventory(monkeypatch, state, tmp_path)
    groups = {k: v for k, v in module.items() if not k.startswith("_") and isinstance(v, list)}
    assert list(groups) == ["sandbox"], "the inventory has one group, `sandbox`"
    [(name, data)] = groups["sandbox"]
    return name, data


def test_inventory_from_nspawn_state_is_valid(monkeypatch, tmp_path):
    name, data = _host(monkeypatch, _state(), tmp_path)
    rig, errors = load_rig(name, data)
    assert errors == []
    assert name == "sandbox" and rig.address == "10.213.7.10"
    assert data["ssh_hostname"] == "10.213.7.10" and "_sudo" not in data
    assert rig.data.gpu_count == 1 and rig.power_limits() == [280]
    engine = rig.engines["llama"]
    assert (engine.kind, engine.cuda) == ("llama.cpp", False)
    assert engine.remote == "git://10.213.7.1/llama.cpp.git"
    assert engine.ref == sandbox.FIXTURE_ENGINE_TAG and engine.cmake_extra == {}
    assert rig.hf_endpoint == "http://10.213.7.1:8090"
    model = rig.models["tiny"]
    assert (model.repo, model.revision, model.files) == (
        "llm-garage/tiny-chat-GGUF", "main", ["tiny-chat-F32.gguf"])
    profile = rig.profiles["tiny"]
    assert (profile.port, profile.model, profile.engine) == (8080, "tiny", "llama")
    assert rig.alias("tiny") == "tiny-chat" and profile.ctx_size == 2048
    assert rig.data.opencode_client is True
    # the rig document and the bench results go beside the state file, not into the clone
    assert Path(rig.data.bench_dir).parent == Path(rig.data.docs_dir).parent
    assert Path(rig.data.bench_dir).name == "bench-results"


def test_inventory_from_vagrant_state_uses_ssh_config_and_sudo(monkeypatch, tmp_path):
    name, data = _host(monkeypatch, _state("vagrant"), tmp_path)
    rig, errors = load_rig(name, data)
    assert errors == []
    assert data["_sudo"] is True
    assert (data["ssh_hostname"], data["ssh_port"], data["ssh_user"]) == (
        "127.0.0.1", 2222, "vagrant")
    assert data["ssh_key"].endswith("/machines/sandbox/virtualbox/private_key")
    # Clients reach the VM on its host-only address, not through the SSH port forward.
    assert rig.address == sandbox.VAGRANT_IP
    assert rig.engines["llama"].remote == f"git://{sandbox.VAGRANT_HOST_IP}/llama.cpp.git"


def test_inventory_real_mode_takes_source_and_model_from_state(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    state = _state(real=True, llama_source="https://git.example/llama.cpp.git", ref="b9999",
                   model="Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q8_0.gguf")
    name, data = _host(monkeypatch, state, tmp_path)
    rig, errors = load_rig(name, data)
    assert errors == []
    engine = rig.engines["llama"]
    assert (engine.remote, engine.ref, engine.cuda) == (
        "https://git.example/llama.cpp.git", "b9999", False)
    assert engine.cmake_extra == {"LLAMA_USE_PREBUILT_UI": "OFF"}
    assert rig.hf_endpoint == "https://huggingface.co"
    assert rig.models["tiny"].repo == "Qwen/Qwen3-0.6B-GGUF"
    assert rig.models["tiny"].files == ["Qwen3-0.6B-Q8_0.gguf"]
    assert rig.alias("tiny") == "qwen3-0.6b-q8_0"


def test_inventory_without_state_says_to_run_the_sandbox(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=r"no sandbox state at .*Run ./scripts/sandbox"):
        _load_inventory(monkeypatch, None, tmp_path)


def test_inventory_refuses_a_state_of_another_version(monkeypatch, tmp_path):
    state = {**_state(), "version": 99}
    with pytest.raises(RuntimeError, match="another version"):
        _load_inventory(monkeypatch, state, tmp_path)


def test_inventory_default_state_location_follows_the_sandbox_name(monkeypatch, tmp_path):
    monkeypatch.delenv(sandbox.STATE_ENV, raising=False)
    monkeypatch.setenv("GARAGE_RIG_STATE", str(tmp_path))
    monkeypatch.setenv(sandbox.NAME_ENV, "sbx")
    expected = tmp_path / "sbx" / "sandbox.json"
    assert sandbox.state_path("sbx") == expected
    with pytest.raises(RuntimeError, match=str(expected)):
        runpy.run_path(str(INVENTORY))
    expected.parent.mkdir()
    expected.write_text(json.dumps(_state()))
    assert runpy.run_path(str(INVENTORY))["sandbox"][0][0] == "sandbox"


def test_parse_ssh_config_reads_the_first_host_only():
    text = VAGRANT_SSH_CONFIG + "Host other\n  HostName 10.0.0.9\n  Port 22\n"
    options = sandbox.parse_ssh_config(text)
    assert options["hostname"] == "127.0.0.1" and options["port"] == "2222"
    assert options["identityfile"].startswith("/home/me/")  # quotes removed


def test_vagrant_ssh_data_needs_host_user_and_key():
    with pytest.raises(sandbox.SandboxError, match="identityfile"):
        sandbox.vagrant_ssh_data({"hostname": "127.0.0.1", "user": "vagrant"})


@pytest.mark.parametrize("spec,expected", [
    ("Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q8_0.gguf", ("Qwen/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q8_0.gguf")),
    ("o/n/Q4_K_M/model-00001-of-00002.gguf", ("o/n", "Q4_K_M/model-00001-of-00002.gguf")),
])
def test_split_model(spec, expected):
    assert sandbox.split_model(spec) == expected


@pytest.mark.parametrize("spec", ["Qwen/Qwen3-0.6B-GGUF", "a/b/c.bin", "a//b.gguf"])
def test_split_model_rejects(spec):
    with pytest.raises(sandbox.SandboxError, match="OWNER/NAME/FILE"):
        sandbox.split_model(spec)


def test_real_model_follows_hf_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080/")
    model = sandbox.model_config(_args(real=True), "10.0.0.1")
    assert model["hf_endpoint"] == "http://mirror.example:8080"
    assert (model["repo"], model["file"]) == ("Qwen/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q8_0.gguf")


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True)


def test_real_engine_from_a_local_repository_is_served_by_the_git_daemon(tmp_path):
    repo = tmp_path / "llama.cpp"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "CMakeLists.txt").write_text("project(x)\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "x")
    _git(repo, "tag", "b1234")
    engine = sandbox.engine_config(
        _args(real=True, llama_source=str(repo), ref="b1234"), "10.213.7.1", tmp_path / "git")
    name = sandbox.local_repo_name(repo.resolve())
    assert engine["remote"] == f"git://10.213.7.1/{name}"
    assert (engine["source"], engine["path"], engine["ref"]) == ("local", str(repo), "b1234")
    git_dir = tmp_path / "git"
    git_dir.mkdir()
    sandbox.link_local_source(git_dir, engine)
    assert (git_dir / name).resolve() == repo.resolve()
    sandbox.link_local_source(git_dir, engine)  # again: unchanged
    with pytest.raises(sandbox.SandboxError, match="no tag 'b1'"):
        sandbox.engine_config(_args(real=True, llama_source=str(repo), ref="b1"), "x",
                              tmp_path / "git")


def test_real_engine_defaults_to_upstream_at_a_tag():
    engine = sandbox.engine_config(_args(real=True), "10.0.0.1", Path("/nonexistent"))
    assert engine["remote"] == "https://github.com/ggml-org/llama.cpp.git"
    assert engine["ref"] == sandbox.REAL_REF and engine["source"] == "url"


def test_options_for_real_need_real():
    with pytest.raises(SystemExit):
        sandbox.main(["up", "--ref", "b1"])


PYINFRA_TEXT = """\
--> Loading config...
--> Loading inventory...
--> Connecting to hosts...
    [sandbox] Connected

--> Beginning operation run...
--> Starting operation: Base | Install base tools
    [sandbox] No changes

--> Starting operation: Services | Unit llama-server-tiny.service
    [sandbox] Success

--> Results:
    Operation                                   Hosts   Success   Error   No Change
    Base | Install base tools                   1       -         -       1
    Services | Unit llama-server-tiny.service   1       1         -       -
    Grand total                                 2       1         -       1

--> Disconnecting from hosts...
"""


@pytest.mark.parametrize("show_all", [True, False])
def test_run_deploy_prints_one_line_per_operation_and_reads_the_results(
        tmp_path, monkeypatch, capsys, show_all):
    fake = tmp_path / "pyinfra"
    fake.write_text(f"#!/bin/sh\necho \"$GARAGE_SANDBOX_STATE\" >&2\ncat <<'EOF'\n"
                    f"{PYINFRA_TEXT}EOF\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "pyinfra_bin", lambda: fake)
    logfile = tmp_path / "deploy.log"
    result = sandbox.run_deploy(tmp_path / "state.json", logfile, show_all=show_all,
                                verbose=False)
    out = capsys.readouterr().out
    assert result.ok and result.changed == 1
    assert result.changes() == {"sandbox": ["Services | Unit llama-server-tiny.service"]}
    assert "    Services | Unit llama-server-tiny.service ... changed\n" in out
    assert ("    Base | Install base tools ... ok\n" in out) is show_all
    assert "Grand total" not in out
    assert logfile.read_text().startswith(str(tmp_path / "state.json"))


PROGRESS_TEXT = """\
--> Beginning operation run...
--> Starting operation: Engines | Build llama
    [sandbox] Building llama (llama.cpp b36 = 0123456789ab), CPU only, -j 2; log: /b/build.log
[sandbox] garage-build: llama compiling: 45 % (9 steps done), 2 s elapsed, about 3 s left
[sandbox] garage-build: llama compiled: 100 % (21 steps done) in 5 s, ccache hits 0/16
    [sandbox] Built llama 0123456789ab in 0 min 6 s, ccache hits 0/16 (0 %)
    [sandbox] Success

--> Starting operation: Models | tiny
[sandbox] garage-fetch: tiny-chat-F32.gguf: 1.20 MB, downloading
    [sandbox] Success

--> Results:
    Operation            Hosts   Success   Error   No Change
    Engines | Build llama   1       1         -       -
    Models | tiny        1       1         -       -
    Grand total          2       2         -       -

--> Disconnecting from hosts...
"""


@pytest.mark.parametrize("show_all", [True, False])
def test_run_deploy_shows_the_progress_of_builds_and_downloads_with_the_rigs_prefix(
        tmp_path, monkeypatch, capsys, show_all):
    fake = tmp_path / "pyinfra"
    fake.write_text("#!/bin/sh\necho \"interval=$GARAGE_PROGRESS_INTERVAL\" >&2\n"
                    f"cat <<'EOF'\n{PROGRESS_TEXT}EOF\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "pyinfra_bin", lambda: fake)
    monkeypatch.delenv("GARAGE_PROGRESS_INTERVAL", raising=False)
    logfile = tmp_path / "deploy.log"
    result = sandbox.run_deploy(tmp_path / "state.json", logfile, show_all=show_all,
                                verbose=False)
    out = capsys.readouterr().out.splitlines()[1:]  # after the command line
    assert result.ok and result.changed == 2
    build = [line for line in PROGRESS_TEXT.splitlines()
             if "garage-build" in line or "Built" in line or "Building" in line]
    fetch = [line for line in PROGRESS_TEXT.splitlines() if "garage-fetch" in line]
    # each progress line, as pyinfra printed it, then the operation's status on its own line
    assert out == [
        *(["    Engines | Build llama ... "] if show_all else []),
        *["    " + line.strip() for line in build],
        "    Engines | Build llama ... changed",
        *(["    Models | tiny ... "] if show_all else []),
        *["    " + line.strip() for line in fetch],
        "    Models | tiny ... changed",
    ]
    # the sandbox's short builds get a progress line every 2 s, unless the user chose
    assert logfile.read_text().startswith("interval=2\n")
    monkeypatch.setenv("GARAGE_PROGRESS_INTERVAL", "7")
    sandbox.run_deploy(tmp_path / "state.json", logfile, show_all=show_all, verbose=False)
    assert logfile.read_text().startswith("interval=7\n")
