"""The lock file: written on purpose, used instead of the API, refused when it disagrees."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.standins.hf_server import HFServer
from llm_garage import hf, lock
from llm_garage.lock import Lock, LockError
from llm_garage.settings import load_rig

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_lock_test_token_0123456789abcdef"
SHARDS = {f"Q4_K_M/M-Q4_K_M-0000{i}-of-00002.gguf": bytes([i]) * 2000 for i in (1, 2)}


@pytest.fixture
def hub():
    server = HFServer(token=TOKEN, page_size=2)
    server.add_repo("acme/M-GGUF", {**SHARDS, "M-Q8_0.gguf": b"q8" * 1500})
    server.add_repo("acme/Gated-GGUF", {"G-Q4.gguf": b"g" * 500}, gated=True)
    with server:
        yield server


def make_rig(name, models, **data):
    rig, errors = load_rig(name, {"models": models, **data})
    assert not errors, errors
    return rig


def fleet(hub, **models_by_host):
    return {h: make_rig(h, models, hf_endpoint=hub.url) for h, models in models_by_host.items()}


Q4 = {"repo": "acme/M-GGUF", "revision": "main", "quant": "Q4_K_M"}
Q8 = {"repo": "acme/M-GGUF", "revision": "main", "files": ["M-Q8_0.gguf"]}


def no_api(endpoint):
    raise AssertionError("the API must not be asked")


def test_lock_path_comes_from_the_models_lock_setting():
    with_lock = {"models_lock": "inventory/garage.lock.json"}
    rigs = [make_rig("a", {"q4": Q4}, **with_lock), make_rig("b", {"q8": Q8}, **with_lock)]
    assert lock.lock_path_of(rigs) == Path("inventory/garage.lock.json")
    assert lock.lock_path_of([make_rig("a", {"q4": Q4})]) is None


def test_lock_path_must_be_one_file_for_the_whole_run():
    a = make_rig("a", {"q4": Q4}, models_lock="one.lock.json")
    b = make_rig("b", {"q8": Q8}, models_lock="two.lock.json")
    with pytest.raises(LockError, match="hosts name different lock files in models_lock: "
                                        "one.lock.json, two.lock.json"):
        lock.lock_path_of([a, b])
    with pytest.raises(LockError, match="models_lock is set on some hosts but not on c"):
        lock.lock_path_of([a, make_rig("c", {"q8": Q8})])


def test_lock_round_trip_is_exact_and_stable(hub, tmp_path):
    rigs = fleet(hub, rig1={"q4": Q4, "q8": Q8})
    new, changes, dropped = lock.relock(rigs, tmp_path / "inv.lock.json", lock.resolvers())
    assert [c.status for c in changes] == ["added", "added"] and dropped == []
    new.save()
    text = (tmp_path / "inv.lock.json").read_text()
    data = json.loads(text)
    entry = data["models"]["q4"]
    assert entry["repo"] == "acme/M-GGUF" and entry["revision"] == "main"
    assert entry["selector"] == {"quant": "Q4_K_M"}
    assert entry["commit"] == hub._repo("acme/M-GGUF").refs["main"]
    assert [f["path"] for f in entry["files"]] == sorted(SHARDS)
    assert entry["files"][0]["size"] == 2000 and len(entry["files"][0]["sha256"]) == 64
    assert data["models"]["q8"]["selector"] == {"files": ["M-Q8_0.gguf"]}
    loaded = Lock.load(tmp_path / "inv.lock.json")
    assert loaded.models == new.models
    assert loaded.dumps() == text


def test_lock_is_used_without_asking_the_api(hub, tmp_path):
    rigs = fleet(hub, rig1={"q4": Q4}, rig2={"q4": Q4, "q8": Q8})
    new, _, _ = lock.relock(rigs, tmp_path / "l.json", lock.resolvers())
    new.save()
    hub.stop()  # the endpoint is gone
    pinned = lock.pins(rigs, Lock.load(tmp_path / "l.json"), no_api, "inv.py",
                       have_token=False)
    assert set(pinned) == {("rig1", "q4"), ("rig2", "q4"), ("rig2", "q8")}
    assert pinned[("rig1", "q4")] is pinned[("rig2", "q4")]
    assert pinned[("rig2", "q8")].main.name == "M-Q8_0.gguf"
    hub.start()


def test_lock_that_disagrees_or_lacks_a_model_stops_the_deploy(hub, tmp_path):
    new, _, _ = lock.relock(fleet(hub, rig1={"q4": Q4}), tmp_path / "l.json", lock.resolvers())
    changed = fleet(hub, rig1={"q4": {**Q4, "quant": "Q8_0"}, "q8": Q8})
    with pytest.raises(LockError) as e:
        lock.pins(changed, new, no_api, "inventory/garage.py", have_token=True)
    text = str(e.value)
    assert "2 model pin problem(s); nothing was changed on any host" in text
    assert ("model 'q4' on 'rig1': the lock " in text
            and "pins acme/M-GGUF@main quant=Q4_K_M but the inventory asks for "
                "acme/M-GGUF@main quant=Q8_0" in text)
    assert "model 'q8' on 'rig1' (acme/M-GGUF@main files=M-Q8_0.gguf) is not in the lock" in text
    assert text.count("run `llm-garage lock inventory/garage.py`") == 2


def test_relock_keeps_unchanged_pins_and_updates_on_request(hub, tmp_path):
    path = tmp_path / "l.json"
    rigs = fleet(hub, rig1={"q4": Q4, "q8": Q8})
    first, _, _ = lock.relock(rigs, path, lock.resolvers())
    first.save()
    old_commit = first.models["q4"].commit
    # main moves on: a new upload
    new_commit = hub.add_commit("acme/M-GGUF", {**SHARDS, "M-Q8_0.gguf": b"Q8" * 1600},
                                refs=["main"])
    again, changes, _ = lock.relock(rigs, path, lock.resolvers())
    assert [c.status for c in changes] == ["kept", "kept"]
    assert again.models["q4"].commit == old_commit
    updated, changes, _ = lock.relock(rigs, path, lock.resolvers(), update=["q8"])
    assert {c.name: c.status for c in changes} == {"q4": "kept", "q8": "updated"}
    assert updated.models["q8"].commit == new_commit
    assert updated.models["q8"].main.size == 3200
    assert f"(was {old_commit[:12]})" in changes[1].line()
    everything, changes, _ = lock.relock(rigs, path, lock.resolvers(), update=None)
    assert {c.status for c in changes} == {"updated"}
    smaller = fleet(hub, rig1={"q4": {**Q4, "revision": old_commit}})
    pruned, changes, dropped = lock.relock(smaller, path, lock.resolvers())
    assert dropped == ["q8"] and changes[0].status == "changed"
    assert set(pruned.models) == {"q4"} and pruned.models["q4"].commit == old_commit


def test_relock_refuses_one_name_meaning_two_models(hub, tmp_path):
    rigs = fleet(hub, rig1={"m": Q4}, rig2={"m": Q8})
    with pytest.raises(LockError) as e:
        lock.relock(rigs, tmp_path / "l.json", lock.resolvers())
    assert "model 'm' means different things" in str(e.value)
    assert "on 'rig1'" in str(e.value) and "on 'rig2'" in str(e.value)


def test_pins_without_a_lock_resolve_each_model_once(hub):
    rigs = fleet(hub, rig1={"q4": Q4}, rig2={"q4": Q4}, rig3={"q4": Q4, "q8": Q8})
    cached = lock.resolvers()
    asked = []

    def resolver_for(endpoint):
        asked.append(endpoint)
        return cached(endpoint)

    pinned = lock.pins(rigs, None, resolver_for, have_token=False)
    assert len(pinned) == 4 and set(asked) == {hub.url}
    resolver = cached(hub.url)
    assert resolver.api_calls == 1 + 2  # one revision, two tree pages: for every rig at once


def test_gated_model_in_the_lock_needs_a_token_before_any_host_changes(hub, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rigs = fleet(hub, rig1={"g": {"repo": "acme/Gated-GGUF", "revision": "main",
                                  "quant": "Q4"}})
    new, _, _ = lock.relock(rigs, tmp_path / "l.json", lock.resolvers())
    assert new.models["g"].needs_token
    new.save()
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LockError) as e:
        lock.pins(rigs, Lock.load(tmp_path / "l.json"), no_api, have_token=False)
    assert "acme/Gated-GGUF is gated or private" in str(e.value)
    assert "HF_TOKEN" in str(e.value) and TOKEN not in str(e.value)


def test_a_token_the_endpoint_refuses_stops_the_run_while_it_is_prepared(hub, tmp_path,
                                                                         monkeypatch):
    from llm_garage.plans.models import check_token

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rigs = fleet(hub, rig1={"g": {"repo": "acme/Gated-GGUF", "revision": "main",
                                  "quant": "Q4"}, "q4": Q4})
    new, _, _ = lock.relock(rigs, tmp_path / "l.json", lock.resolvers())
    pinned = lock.pins(rigs, new, no_api, have_token=True)
    check_token(rigs, pinned)  # the right token: nothing to say
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_0123456789")
    with pytest.raises(hf.HfError) as e:
        check_token(rigs, pinned)
    text = str(e.value)
    assert f"acme/Gated-GGUF: {hub.url} refused the Hugging Face token from the HF_TOKEN " \
           "environment variable (HTTP 403)" in text and "nothing was changed on any host" in text
    assert "hf_wrong" not in text and "acme/M-GGUF" not in text  # only gated repos are asked
    hub.stop()
    check_token(rigs, pinned)  # an endpoint out of reach is no refusal (files may be there)


@pytest.mark.parametrize("mangle, expected", [
    (lambda d: "{not json", "is not valid JSON"),
    (lambda d: {**d, "version": 9}, "is not a version 1 or 2 llm-garage lock"),
    (lambda d: {**d, "models": {"q4": {**d["models"]["q4"], "layout": [1]}}},
     "model 'q4': layout is not a GGUF header summary"),
    (lambda d: {**d, "models": {"q4": {**d["models"]["q4"], "commit": "abc"}}},
     "commit 'abc' is not a 40-character SHA"),
    (lambda d: {**d, "models": {"q4": {**d["models"]["q4"], "files": [
        {"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]}}},
     "is not a repository path"),
])
def test_lock_that_cannot_be_read_says_how_to_rewrite_it(hub, tmp_path, mangle, expected):
    path = tmp_path / "garage.lock.json"
    new, _, _ = lock.relock(fleet(hub, rig1={"q4": Q4}), path, lock.resolvers())
    data = json.loads(new.dumps())
    mangled = mangle(data)
    path.write_text(mangled if isinstance(mangled, str) else json.dumps(mangled))
    with pytest.raises(LockError) as e:
        Lock.load(path, "inventory/garage.py")
    assert expected in str(e.value)
    assert "run `llm-garage lock inventory/garage.py` to rewrite it" in str(e.value)


def test_lock_command_writes_the_lock_and_check_lists_the_files(hub, tmp_path):
    inv = tmp_path / "inventory" / "garage.py"
    inv.parent.mkdir()
    inv.write_text(
        "from pathlib import Path\n"
        "rigs = [('rig1', {'ssh_hostname': '10.9.9.9', "
        "'models_lock': str(Path(__file__).with_name('garage.lock.json')), "
        f"'hf_endpoint': {hub.url!r}, 'models': {{'q4': {Q4!r}}}}})]\n")
    env = {**os.environ, "HF_TOKEN": ""}
    cli = [sys.executable, "-m", "llm_garage.cli"]
    out = subprocess.run([*cli, "lock", str(inv)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    path = inv.with_name("garage.lock.json")
    commit = hub._repo("acme/M-GGUF").refs["main"]
    assert f"q4: acme/M-GGUF@main quant=Q4_K_M -> {commit[:12]}, 2 file(s)" in out.stdout
    assert f"wrote {path}" in out.stdout
    assert Lock.load(path).models["q4"].commit == commit
    check = subprocess.run([*cli, "check", str(inv)], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=120)
    assert check.returncode == 0, check.stderr
    assert f"    locked at commit {commit}:" in check.stdout
    assert "      Q4_K_M/M-Q4_K_M-00002-of-00002.gguf (2.00 kB)" in check.stdout
    inv.write_text(inv.read_text().replace("Q4_K_M", "Q8_0"))
    check = subprocess.run([*cli, "check", str(inv)], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=120)
    assert "differs from the lock: run `llm-garage lock`" in check.stdout
    assert check.returncode == 1  # a stale lock fails the check, as it would fail a deploy
    assert f"does not pin what the inventory asks for (rig1: q4); run `llm-garage lock {inv}`" \
        in check.stderr


# --- the GGUF header summary a memory plan needs -------------------------------------------------

@pytest.fixture
def gguf_hub(tmp_path):
    from lab.standins.gguf_gen import write_hybrid_model, write_tiny_model

    files = {f"Q4/{p.name}": p for p in write_hybrid_model(tmp_path / "H-Q4.gguf",
                                                             split_max_tensors=40)}
    server = HFServer(page_size=50)
    server.add_repo("acme/Hybrid-GGUF", files, lfs=True)
    server.add_repo("acme/Tiny-GGUF", {"T-Q8_0.gguf": write_tiny_model(tmp_path / "t.gguf")})
    with server:
        yield server


HYBRID = {"repo": "acme/Hybrid-GGUF", "revision": "main", "quant": "Q4"}
TINY = {"repo": "acme/Tiny-GGUF", "revision": "main", "quant": "Q8_0"}


def test_lock_records_each_models_gguf_header_summary(gguf_hub, tmp_path):
    path = tmp_path / "inv.lock.json"
    rigs = fleet(gguf_hub, rig1={"hybrid": HYBRID, "tiny": TINY})
    new, changes, _ = lock.relock(rigs, path, lock.resolvers())
    assert "GGUF header read (qwen35moe, 8 layers;" in changes[0].line()
    assert "from 4 file(s))" in changes[0].line()
    new.save()
    data = json.loads(path.read_text())
    assert data["version"] == 2
    layout = data["models"]["hybrid"]["layout"]
    assert layout["architecture"] == "qwen35moe" and layout["n_layer"] == 8
    assert data["models"]["tiny"]["layout"]["architecture"] == "llama"
    assert Lock.load(path).layouts == {"hybrid": layout, "tiny": data["models"]["tiny"]["layout"]}

    # unchanged pins keep their summary: no file is read again
    gguf_hub.stats.reset()
    again, changes, _ = lock.relock(rigs, path, lock.resolvers())
    assert again.layouts == Lock.load(path).layouts
    assert [r for r in gguf_hub.stats.requests if r["kind"] in ("resolve", "cdn")] == []
    assert all("GGUF header" not in c.line() for c in changes)


def test_a_version_1_lock_still_works_and_relocking_adds_the_summary(gguf_hub, tmp_path):
    path = tmp_path / "inv.lock.json"
    rigs = fleet(gguf_hub, rig1={"tiny": TINY})
    new, _, _ = lock.relock(rigs, path, lock.resolvers())
    data = json.loads(new.dumps())
    data["version"] = 1
    del data["models"]["tiny"]["layout"]
    path.write_text(json.dumps(data))
    old = Lock.load(path)
    assert old.layouts == {} and old.models["tiny"] == new.models["tiny"]
    assert lock.pins(rigs, old, no_api, have_token=False)[("rig1", "tiny")] == new.models["tiny"]
    again, changes, _ = lock.relock(rigs, path, lock.resolvers())
    assert changes[0].status == "kept" and "GGUF header read (llama" in changes[0].line()
    assert again.layouts["tiny"]["n_layer"] == 2


def test_a_file_that_is_not_gguf_is_locked_without_a_summary(hub, tmp_path):
    new, changes, _ = lock.relock(fleet(hub, rig1={"q8": Q8}), tmp_path / "l.json",
                                  lock.resolvers())
    assert new.layouts == {} and "q8" in new.models
    assert "no memory plan: cannot read the GGUF header (not a GGUF file" in changes[0].line()


def test_check_prints_the_memory_plan_and_refuses_what_does_not_fit(gguf_hub, tmp_path):
    inv = tmp_path / "inventory" / "garage.py"
    inv.parent.mkdir()
    profile = {"model": "hybrid", "engine": "e", "port": 8000, "ctx_size": 8192,
               "tensor_split": [1, 1], "cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    rig = {"ssh_hostname": "10.9.9.9", "hf_endpoint": gguf_hub.url, "gpu_count": 2,
           "gpu_memory_mib": 8, "gpu_compute_reserve_mib": 0,
           "engines": {"e": {"kind": "llama.cpp", "ref": "b8137", "cuda_architectures":
                             ["86"]}},
           "models": {"hybrid": HYBRID}, "profiles": {"h": profile}}

    def write(rig):
        inv.write_text("from pathlib import Path\n"
                       "rigs = [('rig1', {'models_lock': "
                       f"str(Path(__file__).with_name('garage.lock.json')), **{rig!r}}})]\n")

    env = {**os.environ, "HF_TOKEN": ""}
    cli = [sys.executable, "-m", "llm_garage.cli"]

    def run(*args):
        return subprocess.run([*cli, *args, str(inv)], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=120)

    write(rig)
    assert run("lock").returncode == 0
    gguf_hub.stats.reset()
    check = run("check")
    assert check.returncode == 0, check.stderr
    assert gguf_hub.stats.requests == []  # planned from the lock: nothing asked, nothing fetched
    assert "  memory plan of h: qwen35moe, 8 layers, 8192 KV cells" in check.stdout
    # 9 layers (8 blocks + output) split 1:1: i/9 < 0.5 for blocks 0-4
    assert "CUDA0 (GPU 0)        5" in check.stdout and "CUDA1 (GPU 1)    3+out" in check.stdout

    rig["gpu_memory_mib"] = [2, 8]
    write(rig)
    check = run("check")
    assert check.returncode == 1
    assert "1 profile(s) would run out of memory (found before any download" in check.stderr
    fix = re.search(r"rig1: profile h does not fit: CUDA0 \(GPU 0\) needs \d\.\d MiB of "
                    r"memory but has 2\.0 MiB \(gpu_memory_mib 2\): \d\.\d MiB short; it fits "
                    r"with any one of: ctx_size: (\d+) \| tensor_split: \[(\d), (\d)\]"
                    r"(?: \| n_cpu_moe: (\d+))?$",
                    check.stderr.strip())
    assert fix, check.stderr
    # each suggestion fits, as the plan computes it; one more step of context does not
    ctx, ts = int(fix[1]), [int(fix[2]), int(fix[3])]
    cpu_moe = [({"n_cpu_moe": int(fix[4])}, 0)] if fix[4] else []
    for change, code in (({"ctx_size": ctx}, 0), ({"ctx_size": ctx + 256}, 1),
                         ({"tensor_split": ts}, 0), *cpu_moe):
        write({**rig, "profiles": {"h": {**profile, **change}}})
        assert run("check").returncode == code, (change, code)
    write(rig)

    profile["memory_check"] = "warn"
    write(rig)
    check = run("check")
    assert check.returncode == 0 and "    warning: profile h does not fit: CUDA0" in check.stdout

    data = json.loads(inv.with_name("garage.lock.json").read_text())
    data["version"] = 1
    del data["models"]["hybrid"]["layout"]
    inv.with_name("garage.lock.json").write_text(json.dumps(data))
    check = run("check")
    assert check.returncode == 0, check.stderr
    assert "re-lock (`llm-garage lock`) to see the memory plan" in check.stdout
