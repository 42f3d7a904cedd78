"""Models on test rigs: GGUF files from the fake Hugging Face endpoint, pinned, verified,
resumed, replaced when corrupt, refused without a token, locked; stored once by sha256, one
snapshot folder per revision, old revisions pruned, the older flat layout adopted."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from lab.rigs.pyinfra_results import REPO_ROOT
from lab.standins.gguf_gen import write_padded_model, write_split_model
from lab.standins.hf_server import HFServer

pytestmark = pytest.mark.e2e

TOKEN = "hf_e2e_token_do_not_print_7f3a9c1e"
REPO = "garage/Tiny-GGUF"
GATED_REPO = "garage/Gated-GGUF"
PADDED = "Tiny-Padded-Q8_0.gguf"
PADDED_SIZE = 24_000_000
TINY = {"repo": REPO, "revision": "main", "quant": "UD-Q4_K_XL"}
PADDED_MODEL = {"repo": REPO, "revision": "main", "files": [PADDED]}
GATED = {"repo": GATED_REPO, "revision": "main", "quant": "Q8_0"}
MODELS = "/srv/models"
BLOBS = f"{MODELS}/.blobs"


@pytest.fixture
def hub(fleet, tmp_path):
    """The fake endpoint on the fleet's bridge, where the rigs reach it."""
    root = tmp_path / "hub"
    shards = write_split_model(root / "UD-Q4_K_XL", "Tiny-UD-Q4_K_XL", 3)
    padded = write_padded_model(root / PADDED, PADDED_SIZE)
    server = HFServer(bind=fleet.host_ip, token=TOKEN, page_size=3)
    server.add_repo(REPO, {**{f"UD-Q4_K_XL/{p.name}": p for p in shards}, PADDED: padded,
                           "README.md": b"# tiny\n"})
    server.add_repo(GATED_REPO, {"Gated-Q8_0.gguf": padded}, gated=True)
    with server:
        yield server


# Base and models only: what this file tests, without the services of other tasks.
MODELS_DEPLOY = """\
from pyinfra import host

from llm_garage.fleet import rig_for
from tasks import base, models

rig = rig_for(host)
base.prepare(rig)
models.converge(rig)
"""


@pytest.fixture
def deploy(tmp_path) -> str:
    path = tmp_path / "models_deploy.py"
    path.write_text(MODELS_DEPLOY)
    return str(path)


@pytest.fixture
def env(tmp_path):
    """The controller's environment: no token unless a test adds one."""
    (tmp_path / "hf-home").mkdir()
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_ENDPOINT": ""}


def host_data(hub, models, **extra):
    return {"hf_endpoint": hub.url, "models": models, **extra}


def on_rig_sha256(rig, path) -> str:
    return rig.ssh(f"sha256sum {path}").stdout.split()[0]


def expected(hub, path, repo=REPO) -> str:
    return hub.file(repo, path).sha256


def snapshot(hub, model, repo=REPO) -> str:
    """The snapshot folder of the commit `main` points at."""
    return f"{MODELS}/{model}/{hub._repo(repo).refs['main'][:12]}"


def fetch_log(rig, model) -> list[dict]:
    out = rig.ssh(f"cat {MODELS}/{model}/.garage/fetch.log 2>/dev/null || true").stdout
    return [json.loads(line) for line in out.splitlines()]


def requests(hub, *kinds) -> list[dict]:
    return [r for r in hub.stats.requests if r["kind"] in kinds]


def changed_ops(result, host="rig1") -> list[str]:
    return result.changes().get(host, [])


def test_models_converge_on_two_rigs_and_a_rerun_hashes_nothing(
        hub, env, deploy, start_rigs, write_inventory, converge, pyinfra_run):
    rigs = start_rigs(2)
    inv = write_inventory({r.name: host_data(hub, {"tiny": TINY, "padded": PADDED_MODEL})
                           for r in rigs})
    hub.stats.reset()
    first, second = converge(inv, deploy, env=env)
    for rig in rigs:
        assert any(op.startswith("Models | Fetch tiny: garage/Tiny-GGUF@") for op in
                   changed_ops(first, rig.name))
        tiny = snapshot(hub, "tiny")
        for i in (1, 2, 3):
            name = f"Tiny-UD-Q4_K_XL-0000{i}-of-00003.gguf"
            sha = expected(hub, f"UD-Q4_K_XL/{name}")
            assert on_rig_sha256(rig, f"{tiny}/{name}") == sha
            assert rig.ssh(f"readlink {tiny}/{name}").stdout.strip() == f"{BLOBS}/{sha}"
        assert on_rig_sha256(rig, f"{snapshot(hub, 'padded')}/{PADDED}") == expected(hub, PADDED)
        owners = rig.ssh(f"stat -L -c '%U %a %n' {MODELS}/tiny {tiny} {BLOBS} {tiny}/*.gguf "
                         f"{BLOBS}/*[0-9a-f]").stdout
        assert all(line.startswith(("root 755", "root 644")) for line in owners.splitlines())
        assert len(owners.splitlines()) == 3 + 3 + 4  # folders, links, one blob per file
        # the service user reads every shard through its link
        assert rig.ssh(f"runuser -u llama -- cat {tiny}/*.gguf | wc -c").stdout.strip() != "0"
        assert rig.ssh(f"test -f {MODELS}/tiny/.garage/managed", check=False).returncode == 0
        assert rig.ssh(f"ls {MODELS}/tiny").stdout.split() == [tiny.rsplit("/", 1)[1]]
        assert not rig.ssh(f"ls {tiny} | grep -v gguf || true").stdout.strip()
    # progress per file, with sizes, in pyinfra's output
    assert f"garage-fetch: {PADDED}: 24.00 MB, downloading" in first.stderr
    assert f"garage-fetch: {PADDED}: sha256 verified, in place" in first.stderr
    # one API round for both rigs and both models (same repository): per run, one revision
    revisions = [r for r in requests(hub, "api") if "/revision/" in r["path"]]
    assert len(revisions) == 2  # two runs
    assert len(requests(hub, "cdn")) == 2 * 4  # four files to each rig, once
    # the no-op run: nothing fetched, garage-fetch never started (so nothing was hashed)
    logs = {rig.name: fetch_log(rig, "padded") for rig in rigs}
    assert [e["event"] for e in logs["rig1"]] == ["download", "done", "linked"]
    hub.stats.reset()
    third = pyinfra_run(inv, deploy, env=env)
    assert third.changed == 0
    assert {rig.name: fetch_log(rig, "padded") for rig in rigs} == logs
    assert requests(hub, "resolve", "cdn") == []


def test_models_dropped_connection_resumes_on_the_next_run(
        hub, env, deploy, start_rigs, write_inventory, converge, pyinfra_run):
    rig, = start_rigs(1)
    inv = write_inventory({"rig1": host_data(hub, {"padded": PADDED_MODEL}, models_retries=0)})
    hub.faults.drop_after(PADDED, 10_000_000)
    hub.stats.reset()
    failed = pyinfra_run(inv, deploy, env=env, expect_ok=False)
    assert not failed.ok
    assert "the partial file is kept: run again to resume" in failed.stderr
    partial = f"{BLOBS}/{expected(hub, PADDED)}.partial"
    assert rig.ssh(f"stat -c %s {partial}").stdout.strip() == "10000000"
    assert rig.ssh(f"test -e {snapshot(hub, 'padded')}", check=False).returncode == 1
    first, _ = converge(inv, deploy, env=env)
    assert on_rig_sha256(rig, f"{snapshot(hub, 'padded')}/{PADDED}") == expected(hub, PADDED)
    # every byte crossed the wire once: the rerun asked only for the rest
    assert hub.stats.bytes_served(f"{REPO}/{PADDED}") == PADDED_SIZE
    assert [r["range"] for r in requests(hub, "cdn")] == [None, "bytes=10000000-"]
    hashed = [e for e in fetch_log(rig, "padded") if e["event"] == "hashed"]
    assert [(e["bytes"], e["partial"]) for e in hashed] == [(10_000_000, True)]


def test_models_server_ignoring_range_restarts_the_file(
        hub, env, deploy, start_rigs, write_inventory, converge, pyinfra_run):
    rig, = start_rigs(1)
    inv = write_inventory({"rig1": host_data(hub, {"padded": PADDED_MODEL}, models_retries=0)})
    hub.faults.drop_after(PADDED, 6_000_000)
    hub.stats.reset()
    assert not pyinfra_run(inv, deploy, env=env, expect_ok=False).ok
    hub.faults.ignore_range(PADDED)
    converge(inv, deploy, env=env)
    assert on_rig_sha256(rig, f"{snapshot(hub, 'padded')}/{PADDED}") == expected(hub, PADDED)
    assert hub.stats.bytes_served(f"{REPO}/{PADDED}") == 6_000_000 + PADDED_SIZE
    restarts = [e for e in fetch_log(rig, "padded") if e["event"] == "restart"]
    assert [e["reason"] for e in restarts] == ["200 instead of 206 to a Range request"]


def test_models_corrupted_file_is_detected_and_replaced(
        hub, env, deploy, start_rigs, write_inventory, converge, pyinfra_run):
    rig, = start_rigs(1)
    models = {"padded": PADDED_MODEL}
    inv = write_inventory({"rig1": host_data(hub, models)})
    converge(inv, deploy, env=env)
    good = expected(hub, PADDED)
    path = f"{BLOBS}/{good}"  # what the snapshot's link points at

    def corrupt(keep_mtime: bool):
        mtime = rig.ssh(f"stat -c %.9Y {path}").stdout.strip()
        rig.ssh(f"printf X | dd of={path} bs=1 seek=4096 conv=notrunc status=none")
        if keep_mtime:
            rig.ssh(f"touch -m -d @{mtime} {path}")
        assert on_rig_sha256(rig, path) != good

    # a changed mtime is noticed: the file is hashed, found wrong, fetched again
    corrupt(keep_mtime=False)
    fixed = pyinfra_run(inv, deploy, env=env)
    assert on_rig_sha256(rig, path) == good
    assert any(op.startswith("Models | Fetch padded") for op in changed_ops(fixed))
    assert [e["event"] for e in fetch_log(rig, "padded")][-3:] == ["bad", "download", "done"]
    # same size and mtime: the stamp is trusted (no hashing) until models_verify asks
    corrupt(keep_mtime=True)
    assert pyinfra_run(inv, deploy, env=env).changed == 0
    # models_verify hashes once, finds it, fetches it again; the setting left on is then
    # satisfied by what the stamps record (the second run of converge changes nothing)
    inv = write_inventory({"rig1": host_data(hub, models, models_verify=True)})
    verified, _ = converge(inv, deploy, env=env)
    assert on_rig_sha256(rig, path) == good
    assert any(op.startswith("Models | Fetch padded") for op in changed_ops(verified))
    assert rig.ssh(f"cat {path}.stamp").stdout.split()[2:] == [good, "verified"]
    # a corrupted stamp is not trusted: the blob is hashed again, found good, nothing fetched
    rig.ssh(f"echo garbage > {path}.stamp")
    hub.stats.reset()
    checked, _ = converge(inv, deploy, env=env)
    assert "Models | Check padded files in place (hash only what has no matching stamp)" in \
        changed_ops(checked)
    assert requests(hub, "resolve", "cdn") == []


def test_models_gated_without_token_refused_and_token_never_shown(
        hub, env, deploy, start_rigs, write_inventory, converge, pyinfra_run):
    rig, = start_rigs(1)
    inv = write_inventory({"rig1": host_data(hub, {"gated": GATED})})
    hub.stats.reset()
    refused = pyinfra_run(inv, deploy, env=env, expect_ok=False)
    assert not refused.ok and refused.changed == 0
    text = refused.stdout + refused.stderr
    assert "is gated or private and no Hugging Face token is set" in text
    assert "nothing was changed on any host" in text
    assert rig.ssh(f"test -e {MODELS}/gated", check=False).returncode == 1
    assert requests(hub, "resolve", "cdn") == []

    with_token = {**env, "HF_TOKEN": TOKEN}
    hub.faults.throttle("Gated-Q8_0.gguf", 3_000_000)  # about 8 s: time to look at ps
    seen: list[str] = []
    result = {}
    run = threading.Thread(target=lambda: result.update(
        r=pyinfra_run(inv, deploy, "-vvv", env=with_token)))
    run.start()
    while run.is_alive():
        seen.append(rig.ssh("ps -eo args", check=False).stdout)
        time.sleep(0.2)
    run.join()
    hub.faults.clear()
    downloading = [ps for ps in seen if "garage-fetch" in ps and "Gated-Q8_0.gguf" in ps]
    assert downloading, "never saw garage-fetch running"
    assert not any(TOKEN in ps for ps in seen)
    assert TOKEN not in result["r"].stdout + result["r"].stderr
    assert on_rig_sha256(rig, f"{snapshot(hub, 'gated', GATED_REPO)}/Gated-Q8_0.gguf") == \
        expected(hub, "Gated-Q8_0.gguf", GATED_REPO)
    assert {(r["kind"], r["auth"]) for r in requests(hub, "resolve", "cdn")} == {
        ("resolve", True), ("cdn", False)}
    leaked = rig.ssh(f"grep -rl {TOKEN} /etc /opt /srv /root /tmp /var/tmp 2>/dev/null || true")
    assert leaked.stdout.strip() == ""
    converge(inv, deploy, env=with_token)


def test_models_lock_written_then_used_with_the_api_down(
        hub, env, deploy, start_rigs, write_inventory, converge, pyinfra_run, tmp_path):
    rig, = start_rigs(1)
    lock_path = tmp_path / "inventory.lock.json"
    inv = write_inventory({"rig1": host_data(hub, {"tiny": TINY, "padded": PADDED_MODEL},
                                             models_lock=str(lock_path))})
    lock = subprocess.run([sys.executable, "-m", "llm_garage.cli", "lock", str(inv)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **env})
    assert lock.returncode == 0, lock.stderr
    assert lock_path == inv.with_name("inventory.lock.json")
    pins = json.loads(lock_path.read_text())["models"]
    assert [f["path"] for f in pins["tiny"]["files"]] == [
        f"UD-Q4_K_XL/Tiny-UD-Q4_K_XL-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    hub.stats.reset()
    converge(inv, deploy, env=env)
    assert requests(hub, "api") == []  # pins came from the lock
    assert on_rig_sha256(rig, f"{snapshot(hub, 'padded')}/{PADDED}") == expected(hub, PADDED)
    hub.stop()  # no endpoint at all: a converged fleet deploys from the lock alone
    converge(inv, deploy, env=env)
    inv = write_inventory({"rig1": host_data(hub, {"tiny": {**TINY, "quant": "Q8_0"}},
                                             models_lock=str(lock_path))})
    stale = pyinfra_run(inv, deploy, env=env, expect_ok=False)
    assert not stale.ok and stale.changed == 0
    assert "run `llm-garage lock <inventory>` to update it" in stale.stdout + stale.stderr


def test_models_removed_model_keeps_its_files_until_pruned(
        hub, env, deploy, start_rigs, write_inventory, converge):
    rig, = start_rigs(1)
    inv = write_inventory({"rig1": host_data(hub, {"tiny": TINY, "padded": PADDED_MODEL})})
    converge(inv, deploy, env=env)
    padded_blob = f"{BLOBS}/{expected(hub, PADDED)}"
    rig.ssh(f"mkdir -p {MODELS}/by-hand && echo x > {MODELS}/by-hand/own.gguf")
    inv = write_inventory({"rig1": host_data(hub, {"tiny": TINY})})
    converge(inv, deploy, env=env)
    assert rig.ssh(f"test -f {snapshot(hub, 'padded')}/{PADDED}", check=False).returncode == 0
    inv = write_inventory({"rig1": host_data(hub, {"tiny": TINY}, models_prune=True)})
    first, _ = converge(inv, deploy, env=env)
    assert ("Models | Prune /srv/models: old revisions, unused files, folders no model names"
            in changed_ops(first))
    assert rig.ssh(f"test -e {MODELS}/padded", check=False).returncode == 1
    assert rig.ssh(f"test -e {padded_blob}", check=False).returncode == 1  # nothing links it
    assert rig.ssh(f"test -f {MODELS}/by-hand/own.gguf", check=False).returncode == 0
    assert rig.ssh(f"test -f {MODELS}/tiny/.garage/managed", check=False).returncode == 0


def test_models_new_revisions_keep_the_old_snapshot_until_pruned_never_one_a_unit_names(
        hub, env, deploy, start_rigs, write_inventory, converge, tmp_path):
    rig, = start_rigs(1)
    inv = write_inventory({"rig1": host_data(hub, {"tiny": TINY})})
    converge(inv, deploy, env=env)
    shard = "Tiny-UD-Q4_K_XL-00002-of-00003.gguf"
    first = snapshot(hub, "tiny")
    old_sha = on_rig_sha256(rig, f"{first}/{shard}")
    files = {p: hub.file(REPO, p) for p in hub._repo(REPO).commits[
        hub._repo(REPO).refs["main"]]}

    def revision(seed: int) -> str:
        """A commit re-uploading the second shard under the same name, other bytes."""
        new = write_padded_model(tmp_path / f"rev{seed}.gguf", 2_000_000, seed=seed)
        tree = {p: f.source for p, f in files.items()}
        tree[f"UD-Q4_K_XL/{shard}"] = new
        hub.add_commit(REPO, tree, refs=["main"])
        return snapshot(hub, "tiny")

    # a unit on the rig names the first revision (as a running llama-server would)
    rig.ssh(f"printf '# Generated by llm-garage\\nExecStart=/x -m {first}/x.gguf\\n' "
            "> /etc/systemd/system/llama-server-old.service")
    hub.stats.reset()
    second = revision(1)
    converge(inv, deploy, env=env)
    # only the changed shard crossed the wire; the old snapshot still reads its old bytes
    assert [r["file"] for r in requests(hub, "cdn")] == [f"{REPO}/UD-Q4_K_XL/{shard}"]
    assert on_rig_sha256(rig, f"{first}/{shard}") == old_sha
    assert on_rig_sha256(rig, f"{second}/{shard}") == expected(hub, f"UD-Q4_K_XL/{shard}")
    third = revision(2)
    converge(inv, deploy, env=env)  # keep 2: the second and third; the first is named
    listed = rig.ssh(f"ls {MODELS}/tiny").stdout.split()
    assert sorted(listed) == sorted(s.rsplit("/", 1)[1] for s in (first, second, third))
    rig.ssh("rm /etc/systemd/system/llama-server-old.service")
    converge(inv, deploy, env=env)
    assert rig.ssh(f"ls {MODELS}/tiny").stdout.split() == sorted(
        s.rsplit("/", 1)[1] for s in (second, third))
    assert rig.ssh(f"test -e {BLOBS}/{old_sha}", check=False).returncode == 1
    assert on_rig_sha256(rig, f"{second}/{shard}") != on_rig_sha256(rig, f"{third}/{shard}")


def test_models_flat_layout_is_adopted_without_downloading(
        hub, env, deploy, start_rigs, write_inventory, converge):
    rig, = start_rigs(1)
    # the files as the layout before snapshots left them: <model dir>/<name>, stamped
    folder = f"{MODELS}/padded"
    sha = expected(hub, PADDED)
    rig.ssh(f"mkdir -p {folder}/.garage && touch {folder}/.garage/managed")
    rig.put(hub.file(REPO, PADDED).source, f"{folder}/{PADDED}", mode=0o644)
    rig.ssh(f"cd {folder} && echo \"$(stat -c '%s %.9Y' {PADDED}) {sha}\" "
            f"> .garage/{PADDED}.stamp")
    inode = rig.ssh(f"stat -c %i {folder}/{PADDED}").stdout.strip()
    hub.stats.reset()
    inv = write_inventory({"rig1": host_data(hub, {"padded": PADDED_MODEL})})
    first, _ = converge(inv, deploy, env=env)
    assert requests(hub, "cdn") == []  # nothing downloaded
    assert (f"garage-fetch: {PADDED}: taken from {folder}/{PADDED} into the blob store "
            "(nothing downloaded)") in first.stderr
    assert rig.ssh(f"stat -c %i {BLOBS}/{sha}").stdout.strip() == inode  # a hard link
    assert on_rig_sha256(rig, f"{snapshot(hub, 'padded')}/{PADDED}") == sha
    # the old file stays for a unit that may still name it: the older layout counts as the
    # previous revision (models_keep_revisions 2); with 1 it goes, the blob stays
    assert rig.ssh(f"test -f {folder}/{PADDED}", check=False).returncode == 0
    inv = write_inventory({"rig1": host_data(hub, {"padded": PADDED_MODEL},
                                             models_keep_revisions=1)})
    converge(inv, deploy, env=env)
    assert rig.ssh(f"test -e {folder}/{PADDED}", check=False).returncode == 1
    assert rig.ssh(f"test -e {folder}/.garage/{PADDED}.stamp", check=False).returncode == 1
    assert on_rig_sha256(rig, f"{snapshot(hub, 'padded')}/{PADDED}") == sha
