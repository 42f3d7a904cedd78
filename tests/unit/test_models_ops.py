"""The model store facts (their shell run here) and what the model operations decide from
them: fetch, verify, link, prune."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api import FunctionCommand, StringCommand
from pyinfra.api.exceptions import OperationError

from llm_garage.facts.models import (
    FileState,
    FolderState,
    ManagedModelFolders,
    ModelFiles,
    ModelStore,
    NamedByUnits,
    StoreState,
    stamp_line,
)
from llm_garage.facts.services import inputs_digest_command
from llm_garage.operations import models as ops
from tests.unit.ophelper import ShellHost, run_op

FETCH = Path(__file__).resolve().parents[2] / "llm_garage" / "files" / "garage-fetch"
SHA_A = hashlib.sha256(b"a" * 100).hexdigest()
BLOBS = "/srv/models/.blobs"


def run_fact(fact, **kwargs):
    out = subprocess.run(["sh", "-c", fact.command(**kwargs)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return fact.process(out.stdout.splitlines())


def fetch_in_place(models: Path, model: str, snapshot: str, files: dict[str, bytes]) -> None:
    """Let garage-fetch take files of the older layout into the store and link a snapshot,
    as on a rig (nothing is downloaded: they are in place)."""
    folder = models / model
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(FETCH), "--dir", str(folder), "--blobs", str(models / ".blobs"),
           "--snapshot", str(folder / snapshot)]
    for name, data in files.items():
        (folder / name).write_bytes(data)
        cmd += ["--file", name, str(len(data)), hashlib.sha256(data).hexdigest(),
                "http://unused/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for name in files:
        (folder / name).unlink()


def test_model_files_fact_reads_blobs_stamps_partials_links_without_hashing(tmp_path):
    models = tmp_path / "my models"
    fetch_in_place(models, "m", "aaaaaaaaaaaa", {"a b.gguf": b"a" * 100})
    blobs = models / ".blobs"
    sha_c, sha_d = "c" * 64, hashlib.sha256(b"d" * 5).hexdigest()
    (blobs / f"{sha_c}.partial").write_bytes(b"c" * 7)
    (models / "m" / "d.gguf").write_bytes(b"d" * 5)  # the older layout, no stamp
    files = [("a b.gguf", SHA_A), ("c.gguf", sha_c), ("d.gguf", sha_d), ("e.gguf", "e" * 64)]
    state = run_fact(ModelFiles(), path=str(models / "m"),
                     snapshot=str(models / "m" / "aaaaaaaaaaaa"), blobs=str(blobs), files=files)
    assert state.exists and not state.managed and state.free > 0
    a = state.file(0)
    assert a.size == 100 and a.trusted(100, SHA_A) and not a.trusted(100, "0" * 64)
    assert a.trusted(100, SHA_A, verify=True)  # hashed from disk when it was taken
    assert a.link == str(blobs / SHA_A) and not a.known_bad(SHA_A)
    assert state.file(1) == FileState(partial=7)
    d = state.file(2)
    assert d.size is None and d.flat_size == 5 and d.flat_stamp is None
    assert not d.adoptable(5, sha_d)  # no stamp: hashed by garage-fetch, not counted as free
    assert state.file(3) == FileState()
    os.utime(blobs / SHA_A, ns=(0, 10**9))  # touched: the stamp no longer matches
    state = run_fact(ModelFiles(), path=str(models / "m"), snapshot=str(models / "m" / "x"),
                     blobs=str(blobs), files=files[:1])
    assert not state.file(0).trusted(100, SHA_A) and state.file(0).link is None


def test_file_state_trust_verification_and_known_bad():
    plain = FileState(size=100, mtime="1.5", stamp=stamp_line(100, "1.5", SHA_A))
    assert plain.trusted(100, SHA_A) and not plain.trusted(100, SHA_A, verify=True)
    verified = FileState(size=100, mtime="1.5", stamp=stamp_line(100, "1.5", SHA_A, True))
    assert verified.trusted(100, SHA_A, verify=True)
    bad = FileState(size=100, mtime="1.5", stamp=stamp_line(100, "1.5", "f" * 64, True))
    assert bad.known_bad(SHA_A) and not bad.trusted(100, SHA_A)
    stale = FileState(size=100, mtime="2.5", stamp=stamp_line(100, "1.5", "f" * 64))
    assert not stale.known_bad(SHA_A)  # the stamp is about other bytes: hash again
    flat = FileState(flat_size=100, flat_mtime="3.0", flat_stamp=stamp_line(100, "3.0", SHA_A))
    assert flat.adoptable(100, SHA_A) and not flat.adoptable(100, "0" * 64)


def test_model_files_fact_on_a_missing_folder(tmp_path):
    state = run_fact(ModelFiles(), path=str(tmp_path / "none" / "deeper"),
                     snapshot=str(tmp_path / "none" / "deeper" / "s"),
                     blobs=str(tmp_path / "none" / ".blobs"), files=[("x.gguf", SHA_A)])
    assert not state.exists and state.free > 0 and state.file(0) == FileState()


def test_managed_model_folders_lists_only_marked_folders(tmp_path):
    for name, marked in (("ours", True), ("theirs", False), ("also ours", True)):
        (tmp_path / name / ".garage").mkdir(parents=True)
        if marked:
            (tmp_path / name / ".garage" / "managed").touch()
    assert run_fact(ManagedModelFolders(), models_dir=str(tmp_path)) == [
        str(tmp_path / "also ours"), str(tmp_path / "ours")]
    assert run_fact(ManagedModelFolders(), models_dir=str(tmp_path / "none")) == []


def test_model_store_fact_lists_blobs_snapshots_flat_files_and_links(tmp_path):
    models = tmp_path / "models"
    fetch_in_place(models, "m", "111111111111", {"x.gguf": b"x" * 10})
    fetch_in_place(models, "m", "222222222222", {"x.gguf": b"y" * 10})
    (models / "m" / "old.gguf").write_bytes(b"o")
    (models / "m" / "not-a-snapshot").mkdir()
    (models / ".blobs" / ("e" * 64 + ".partial")).write_bytes(b"ee")
    state = run_fact(ModelStore(), models_dir=str(models), blobs=str(models / ".blobs"),
                     folders=[str(models / "m"), str(models / "gone")])
    sx, sy = (hashlib.sha256(d * 10).hexdigest() for d in (b"x", b"y"))
    assert state.blobs == {sx: 10, sy: 10} and state.partials == {"e" * 64: 2}
    assert sorted(p for p, _ in state.snapshots[str(models / "m")]) == [
        str(models / "m" / "111111111111"), str(models / "m" / "222222222222")]
    assert state.flat == {str(models / "m"): [str(models / "m" / "old.gguf")]}
    assert state.links == {str(models / "m" / "111111111111" / "x.gguf"): str(models / ".blobs"
                                                                              / sx),
                           str(models / "m" / "222222222222" / "x.gguf"): str(models / ".blobs"
                                                                              / sy)}


def test_named_by_units_reads_every_unit_glob(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "etc" / "llama-server-a.service").write_text(
        "ExecStart=/bin/llama-server -m /srv/models/m/111111111111/x.gguf\n")
    (tmp_path / "state" / "llama-server-a.service.proven").write_text(
        'ExecStart=/bin/llama-server -m "/srv/models/100%%/x.gguf"\n')
    globs = [f"{tmp_path}/etc/llama-server-*.service",
             f"{tmp_path}/state/llama-server-*.service.proven", f"{tmp_path}/none/*.service"]
    needles = ["/srv/models/m/111111111111/", "/srv/models/m/222222222222/",
               "/srv/models/100%/", "/srv/models/m/x.gguf"]
    assert run_fact(NamedByUnits(), needles=needles, unit_files=globs) == {
        "/srv/models/m/111111111111/", "/srv/models/100%/"}


def test_inputs_digest_sees_a_changed_blob_behind_the_same_snapshot_link(tmp_path):
    unit = tmp_path / "unit"
    unit.write_text("ExecStart=...\n")
    snap = tmp_path / "m" / "111111111111"
    snap.mkdir(parents=True)
    (tmp_path / "b1").write_bytes(b"1")
    (tmp_path / "b2").write_bytes(b"22")
    (snap / "x.gguf").symlink_to(tmp_path / "b1")
    command = inputs_digest_command(str(unit), None, str(unit), str(snap / "x.gguf"))

    def digest():
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout

    first = digest()
    assert digest() == first
    (snap / "x.gguf").unlink()
    (snap / "x.gguf").symlink_to(tmp_path / "b2")
    assert digest() != first


# --- operation decisions ------------------------------------------------------------------------

FILES = [
    {"name": "m-00001-of-00002.gguf", "size": 100, "sha256": SHA_A, "url": "http://h/1"},
    {"name": "m-00002-of-00002.gguf", "size": 200, "sha256": "b" * 64, "url": "http://h/2"},
]
MTIME = "1700000000.000000001"
SNAP = "/srv/models/m/0123456789ab"


def run_files(state: FolderState, executing=False, **kwargs):
    """ops.model_files on a host whose model folder is `state`: (commands, no-op messages)."""
    def model_files(**fact_args):
        assert fact_args["files"] == [(f["name"], f["sha256"]) for f in FILES]
        return state

    run = run_op(ops.model_files, {"models.ModelFiles": model_files}, executing=executing,
                 path="/srv/models/m", snapshot=SNAP, blobs=BLOBS, files=FILES,
                 fetcher="/opt/g/bin/garage-fetch", **kwargs)
    return run.commands, run.noops


def in_place(i, stamped=True, size=None, linked=True, verified=False):
    f = FILES[i]
    size = f["size"] if size is None else size
    return FileState(size=size, mtime=MTIME,
                     stamp=stamp_line(size, MTIME, f["sha256"], verified) if stamped else None,
                     link=f"{BLOBS}/{f['sha256']}" if linked else None)


def fetch_args(command) -> str:
    assert isinstance(command, FunctionCommand)
    return str(command.args[0].get_raw_value())


def test_model_files_converged_is_a_noop_in_both_steps():
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: in_place(1)})
    for check_only in (True, False):
        commands, noops = run_files(state, check_only=check_only)
        assert commands == [] and len(noops) == 1
    assert "match their stamps" in run_files(state, check_only=True)[1][0]
    assert "stamps and links match" in run_files(state)[1][0]


def test_model_files_check_step_hashes_only_unstamped_files_and_sends_no_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: in_place(1, stamped=False)})
    commands, _ = run_files(state, check_only=True)
    [command] = commands
    args = fetch_args(command)
    assert "--verify-only" in args and "m-00002-of-00002.gguf" in args
    assert f"--blobs {BLOBS}" in args and "--snapshot" not in args
    assert "m-00001" not in args and "token" not in args and "hf_secret" not in args
    assert command.args[1] is False  # no token on stdin


def test_models_verify_hashes_once_then_the_recorded_verification_satisfies_it():
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: in_place(1)})
    [command], _ = run_files(state, check_only=True, verify=True)
    args = fetch_args(command)
    assert "--verify-only --verify" in args and "m-00001" in args and "m-00002" in args
    # the download step trusts the stamps the check step just wrote
    assert run_files(state, verify=True)[0] == []
    verified = FolderState(True, True, 10**9, {0: in_place(0, verified=True),
                                               1: in_place(1, verified=True)})
    for check_only in (True, False):
        assert run_files(verified, check_only=check_only, verify=True)[0] == []


def test_model_files_known_bad_blob_is_downloaded_again_without_hashing():
    bad = FileState(size=100, mtime=MTIME, stamp=stamp_line(100, MTIME, "f" * 64, True),
                    link=f"{BLOBS}/{SHA_A}")
    state = FolderState(True, True, 10**9, {0: bad, 1: in_place(1)})
    assert run_files(state, check_only=True)[0] == []  # nothing to hash
    [fetch] = run_files(state)[0]
    assert "fetching 1 of 2 file(s), 100 B to download: m-00001" in fetch.args[2]


def test_model_files_download_step_creates_the_folder_fetches_and_links(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    commands, _ = run_files(FolderState(False, False, 10**9, {}), auth_origin="http://h")
    mkdir, fetch = commands
    assert isinstance(mkdir, StringCommand)
    assert "install -d -m 755 -o root -g root /srv/models/m /srv/models/m/.garage" in str(
        mkdir.get_raw_value())
    assert "touch /srv/models/m/.garage/managed" in str(mkdir.get_raw_value())
    args = fetch_args(fetch)
    assert f"--dir /srv/models/m --blobs {BLOBS}" in args and f"--snapshot {SNAP}" in args
    assert "--auth-origin http://h --token-stdin" in args and "hf_secret" not in args
    assert "--file m-00001-of-00002.gguf 100 " + SHA_A + " http://h/1" in args
    assert fetch.args[1] is True and "300 B to download" in fetch.args[2]
    assert f"linking {SNAP}" in fetch.args[2]
    # every file goes to garage-fetch (it links them all), only what is missing is fetched
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: FileState(partial=50)})
    [fetch] = run_files(state, verify=True)[0]
    assert "m-00001" in fetch_args(fetch) and "150 B to download" in fetch.args[2]
    assert "m-00001" not in fetch.args[2] and "--verify" in fetch_args(fetch)


def test_model_files_missing_link_alone_is_made_without_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: in_place(1, linked=False)})
    [fetch] = run_files(state, auth_origin="http://h")[0]
    assert fetch.args[2] == f"linking {SNAP}" and fetch.args[1] is False


def test_model_files_without_a_token_sends_none(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    commands, _ = run_files(FolderState(True, True, 10**9, {}), auth_origin="http://h")
    assert "--token-stdin" not in fetch_args(commands[0]) and commands[0].args[1] is False


def test_model_files_refuses_to_start_without_the_disk_space():
    state = FolderState(True, True, 150, {0: in_place(0), 1: FileState(partial=50)})
    assert run_files(state)[0]  # 150 B missing, 150 B free: enough
    state = FolderState(True, True, 100, {0: in_place(0), 1: FileState(partial=50)})
    with pytest.raises(OperationError) as e:
        run_files(state)
    assert f"not enough disk space for {SNAP}: 150 B still to download, 100 B free" in str(
        e.value)
    # at execute time garage-fetch checks again itself
    assert run_files(state, executing=True)[0]


def test_model_files_wrong_blob_needs_room_for_its_replacement_beside_it():
    state = FolderState(True, True, 150, {0: in_place(0), 1: in_place(1, size=999)})
    with pytest.raises(OperationError):
        run_files(state)
    state = FolderState(True, True, 200, {0: in_place(0), 1: in_place(1, size=999)})
    [fetch] = run_files(state)[0]
    assert "m-00002" in fetch.args[2]


def test_model_files_of_the_older_layout_with_a_stamp_count_as_in_hand():
    old = FileState(flat_size=200, flat_mtime=MTIME, flat_stamp=stamp_line(200, MTIME, "b" * 64))
    state = FolderState(True, True, 0, {0: in_place(0), 1: old})
    [fetch] = run_files(state)[0]  # no free space needed: it is linked, not downloaded
    assert "taking 1 file(s) from /srv/models/m into the blob store" in fetch.args[2]
    assert "to download" not in fetch.args[2]


# --- prune --------------------------------------------------------------------------------------

M, N = "/srv/models/m", "/srv/models/n"
UNITS = ["/etc/systemd/system/llama-server-*.service"]


def snap(folder, i):
    return f"{folder}/{i:012x}"


def blob(i):
    return f"{i:064x}"


def run_prune(store: StoreState, named=(), managed=(), keep=2, current=None, wanted=(),
              prune_folders=False):
    current = current or {M: snap(M, 9)}
    run = run_op(ops.store_pruned, {"models.ModelStore": store,
                                    "models.NamedByUnits": set(named),
                                    "models.ManagedModelFolders": list(managed)},
                 models_dir="/srv/models", blobs=BLOBS, models=current, wanted=list(wanted),
                 keep_revisions=keep, unit_files=UNITS, fetcher="/opt/g/bin/garage-fetch",
                 prune_folders=prune_folders)
    return [str(c.get_raw_value()) for c in run.commands], run.host


def store_with(*snapshots, flat=(), extra_blobs=()):
    """Snapshots (folder, index, blob index) of one file each, linked to their blobs."""
    snaps, links, blobs = {}, {}, {}
    for folder, i, b in snapshots:
        snaps.setdefault(folder, []).append((snap(folder, i), f"{1000 + i}.0"))
        links[f"{snap(folder, i)}/x.gguf"] = f"{BLOBS}/{blob(b)}"
        blobs[blob(b)] = 10
    for b in extra_blobs:
        blobs[blob(b)] = 10
    return StoreState(blobs=blobs, partials={}, snapshots=snaps,
                      flat={M: list(flat)} if flat else {}, links=links)


def test_prune_keeps_the_newest_revisions_and_deletes_older_ones_and_their_blobs():
    store = store_with((M, 9, 9), (M, 8, 8), (M, 7, 7), (M, 6, 1))
    commands, fake = run_prune(store, wanted=[blob(9)])
    assert commands[:2] == [f"rm -rf -- {snap(M, 7)}", f"rm -rf -- {snap(M, 6)}"]
    assert commands[2] == ("python3 /opt/g/bin/garage-fetch --prune --blobs /srv/models/.blobs "
                           f"--models-dir /srv/models --drop-blob {blob(1)} --drop-blob {blob(7)}")
    named_asked = [kw for name, kw in fake.asked if name == "models.NamedByUnits"]
    assert named_asked == [{"needles": sorted([f"{snap(M, 7)}/", f"{snap(M, 6)}/"]),
                            "unit_files": UNITS}]
    assert run_prune(store, keep=4)[0] == []
    assert run_prune(store, keep=1)[0][:3] == [f"rm -rf -- {snap(M, s)}" for s in (8, 7, 6)]


def test_prune_never_deletes_a_snapshot_a_unit_names_nor_its_blob():
    store = store_with((M, 9, 9), (M, 8, 8), (M, 7, 7))
    commands, _ = run_prune(store, keep=1, named=[f"{snap(M, 7)}/"])
    assert commands == [f"rm -rf -- {snap(M, 8)}",
                        "python3 /opt/g/bin/garage-fetch --prune --blobs /srv/models/.blobs "
                        f"--models-dir /srv/models --drop-blob {blob(8)}"]


def test_prune_keeps_blobs_shared_with_a_kept_snapshot_and_wanted_ones():
    store = store_with((M, 9, 1), (M, 8, 2), (M, 7, 1), (N, 5, 2), extra_blobs=[3, 4])
    commands, _ = run_prune(store, keep=1, current={M: snap(M, 9), N: snap(N, 5)},
                            wanted=[blob(1), blob(2), blob(3)])
    assert commands == [f"rm -rf -- {snap(M, 8)}", f"rm -rf -- {snap(M, 7)}",
                        "python3 /opt/g/bin/garage-fetch --prune --blobs /srv/models/.blobs "
                        f"--models-dir /srv/models --drop-blob {blob(4)}"]


def test_prune_counts_the_older_layout_as_the_oldest_revision():
    flat = [f"{M}/x.gguf"]
    store = store_with((M, 9, 9), flat=flat)
    assert run_prune(store)[0] == []  # the deployed snapshot and the files before it: 2
    store = store_with((M, 9, 9), (M, 8, 8), flat=flat)
    assert run_prune(store)[0] == [f"rm -rf -- {M}/x.gguf {M}/.garage/x.gguf.stamp"]
    assert run_prune(store, named=[f"{M}/x.gguf"])[0] == []  # a unit still names it


def test_prune_folders_of_models_no_longer_named_only_with_models_prune():
    store = store_with((M, 9, 9), (N, 5, 5))
    assert run_prune(store, managed=[N])[0] == []
    commands, _ = run_prune(store, managed=[N], prune_folders=True)
    assert commands == [f"test -f {N}/.garage/managed && rm -rf -- {N}",
                        "python3 /opt/g/bin/garage-fetch --prune --blobs /srv/models/.blobs "
                        f"--models-dir /srv/models --drop-blob {blob(5)}"]
    assert run_prune(store, managed=[N], prune_folders=True, named=[f"{N}/"])[0] == []


def test_prune_with_nothing_to_do_is_a_noop():
    commands, fake = run_prune(store_with((M, 9, 9)))
    assert commands == [] and fake.noops == ["nothing to prune in /srv/models"]


def test_the_fetcher_streams_its_output_the_token_on_stdin_never_with_a_pty(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_on_stdin")
    monkeypatch.setenv("GARAGE_PROGRESS_STEP", "25")
    state = FolderState(True, True, 10**9, {0: FileState(), 1: FileState()})
    [command], _ = run_files(state, auth_origin="https://huggingface.co")
    assert command.function is ops._run_fetcher and command.args[1] is True
    # a deploy asking for a pty everywhere does not get one here: stdin would be echoed
    fake = ShellHost(global_args={"_get_pty": True, "_sudo": True})
    assert ops._run_fetcher(None, fake, *command.args) is True
    [(raw, kwargs)] = fake.calls
    assert "hf_secret_on_stdin" not in raw and "--token-stdin" in raw
    assert kwargs["_stdin"] == "hf_secret_on_stdin\n"
    assert kwargs["_get_pty"] is False and kwargs["print_output"] is True
    assert kwargs["_sudo"] is True and kwargs["_env"] == {"GARAGE_PROGRESS_STEP": "25"}
