"""The model settings the models task reads."""

import pytest

from llm_garage.settings import load_rig

MODEL = {"repo": "acme/M-GGUF", "revision": "main", "quant": "Q4_K_M"}


def test_models_retries_defaults_to_five_and_is_bounded():
    rig, errors = load_rig("rig1", {"models": {"m": MODEL}})
    assert not errors and rig.data.models_retries == 5
    rig, errors = load_rig("rig1", {"models_retries": 0})
    assert not errors and rig.data.models_retries == 0
    for bad in (-1, 101, "many"):
        _, errors = load_rig("rig1", {"models_retries": bad})
        assert [e.path for e in errors] == ["models_retries"], bad


def test_model_folder_defaults_under_models_dir():
    rig, errors = load_rig("rig1", {"models_dir": "/data/models", "models": {"m": MODEL}})
    assert not errors and rig.layout.model_dir("m") == "/data/models/m"
    rig, errors = load_rig("rig1", {"models_dir": "/fast", "models": {
        "m": {**MODEL, "dir": "/fast/qwen/./q6/"}}})
    assert not errors and rig.layout.model_dir("m") == "/fast/qwen/q6"


def messages(**data):
    return [str(e) for e in load_rig("rig1", data)[1]]


@pytest.mark.parametrize("folder, shown", [
    ("/fast/qwen", "/fast/qwen"),
    ("/srv/models/../../etc", "/etc"),
    ("/srv/models", "/srv/models"),
    ("/srv/modelsx/m", "/srv/modelsx/m"),
    ("/", "/"),
])
def test_model_folder_must_be_inside_models_dir(folder, shown):
    assert messages(models={"m": {**MODEL, "dir": folder}}) == [
        f"host 'rig1': models.m.dir: {shown!r} is not inside models_dir '/srv/models' "
        "(accepted: a folder under /srv/models/, or empty for /srv/models/m)"]


@pytest.mark.parametrize("folder, shown", [
    ("/", "/"), ("/etc", "/etc"), ("/usr/share/models", "/usr/share/models"),
    ("/var", "/var"), ("/srv/../boot", "/boot"), ("//proc/x", "/proc/x"), ("/sys", "/sys"),
    ("/dev/shm", "/dev/shm"), ("/lib", "/lib"), ("/bin/", "/bin"), ("/home", "/home"),
])
def test_models_dir_is_never_a_system_folder(folder, shown):
    assert messages(models_dir=folder) == [
        f"host 'rig1': models_dir: {shown!r} is a system folder "
        "(accepted: a folder of its own, such as /srv/models or /data/models)"]


def test_models_dir_is_absolute_and_may_live_anywhere_else():
    assert messages(models_dir="models") == [
        "host 'rig1': models_dir: expected an absolute path, got 'models' "
        "(accepted: a path starting with /)"]
    for ok in ("/var/lib/models", "/home/me/models", "/mnt/nvme/models", "/opt/models"):
        assert messages(models_dir=ok) == [], ok


def test_models_keep_revisions_defaults_to_two_and_keeps_at_least_the_deployed_one():
    rig, errors = load_rig("rig1", {"models": {"m": MODEL}})
    assert not errors and rig.data.models_keep_revisions == 2
    for bad in (0, -1, 101, "all"):
        _, errors = load_rig("rig1", {"models_keep_revisions": bad})
        assert [e.path for e in errors] == ["models_keep_revisions"], bad


def test_model_plan_points_into_the_revisions_snapshot(monkeypatch):
    from llm_garage import hf
    from llm_garage.plans import models as model_plan

    rig, errors = load_rig("rig1", {"models_dir": "/data/models", "models": {
        "m": MODEL, "q": {**MODEL, "dir": "/data/models/big/q"}}})
    assert not errors
    commit = "0123456789abcdef" * 2 + "01234567"
    shards = tuple(hf.RemoteFile(f"Q4_K_M/m-0000{i}-of-00002.gguf", 10 * i, f"{i}" * 64)
                   for i in (1, 2))
    spec = hf.Spec(MODEL["repo"], "main", "quant", "Q4_K_M")
    monkeypatch.setattr(model_plan, "pins_for", lambda state: {
        ("rig1", n): hf.Resolved(spec, commit, shards) for n in ("m", "q")})
    plans = model_plan.plan(rig, object())
    assert plans["m"].folder == "/data/models/m"
    assert plans["m"].snapshot == "/data/models/m/0123456789ab"
    assert plans["m"].path == "/data/models/m/0123456789ab/m-00001-of-00002.gguf"
    assert plans["q"].path == "/data/models/big/q/0123456789ab/m-00001-of-00002.gguf"
    assert plans["m"].blobs == plans["q"].blobs == "/data/models/.blobs"
    assert [f["sha256"] for f in plans["m"].files] == ["1" * 64, "2" * 64]
    assert rig.layout.server_unit_files == (
        "/etc/systemd/system/llama-server-*.service",
        "/opt/llm-garage/state/services/llama-server-*.service",
        "/opt/llm-garage/state/services/llama-server-*.service.proven")
