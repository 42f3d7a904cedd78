"""The model folder facts (their shell run here) and what the model operations decide from them."""

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
    stamp_line,
)
from llm_garage.operations import models as ops
from tests.unit.ophelper import run_op

FETCH = Path(__file__).resolve().parents[2] / "llm_garage" / "files" / "garage-fetch"
SHA_A = hashlib.sha256(b"a" * 100).hexdigest()


def run_fact(fact, **kwargs):
    out = subprocess.run(["sh", "-c", fact.command(**kwargs)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return fact.process(out.stdout.splitlines())


def stamp_with_fetch(folder: Path, name: str, data: bytes) -> None:
    """Let garage-fetch verify a file in place and stamp it, as on a rig."""
    (folder / name).write_bytes(data)
    out = subprocess.run([sys.executable, str(FETCH), "--dir", str(folder), "--file", name,
                          str(len(data)), hashlib.sha256(data).hexdigest(), "http://unused/"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_model_files_fact_reads_sizes_mtimes_stamps_partials_without_hashing(tmp_path):
    folder = tmp_path / "my model"
    folder.mkdir()
    stamp_with_fetch(folder, "a b.gguf", b"a" * 100)
    (folder / "c.gguf.partial").write_bytes(b"c" * 7)
    (folder / "d.gguf").write_bytes(b"d" * 5)
    state = run_fact(ModelFiles(), path=str(folder),
                     names=["a b.gguf", "c.gguf", "d.gguf", "e.gguf"])
    assert state.exists and not state.managed and state.free > 0
    a = state.file(0)
    assert a.size == 100 and a.trusted(100, SHA_A) and not a.trusted(100, "0" * 64)
    assert a.stamp == stamp_line(100, a.mtime, SHA_A) and "." in a.mtime
    assert state.file(1) == FileState(partial=7)
    assert state.file(2).size == 5 and state.file(2).stamp is None
    assert state.file(3) == FileState()
    os.utime(folder / "a b.gguf", ns=(0, 10**9))  # touched: the stamp no longer matches
    assert not run_fact(ModelFiles(), path=str(folder), names=["a b.gguf"]).file(0).trusted(
        100, SHA_A)


def test_model_files_fact_on_a_missing_folder(tmp_path):
    state = run_fact(ModelFiles(), path=str(tmp_path / "none" / "deeper"), names=["x.gguf"])
    assert not state.exists and state.free > 0 and state.file(0) == FileState()


def test_managed_model_folders_lists_only_marked_folders(tmp_path):
    for name, marked in (("ours", True), ("theirs", False), ("also ours", True)):
        (tmp_path / name / ".garage").mkdir(parents=True)
        if marked:
            (tmp_path / name / ".garage" / "managed").touch()
    assert run_fact(ManagedModelFolders(), models_dir=str(tmp_path)) == [
        str(tmp_path / "also ours"), str(tmp_path / "ours")]
    assert run_fact(ManagedModelFolders(), models_dir=str(tmp_path / "none")) == []


# --- operation decisions ------------------------------------------------------------------------

FILES = [
    {"name": "m-00001-of-00002.gguf", "size": 100, "sha256": SHA_A, "url": "http://h/1"},
    {"name": "m-00002-of-00002.gguf", "size": 200, "sha256": "b" * 64, "url": "http://h/2"},
]
MTIME = "1700000000.000000001"


def run_files(state: FolderState, executing=False, **kwargs):
    def model_files(path, names):
        assert names == [f["name"] for f in FILES]
        return state

    return run_op(ops.model_files, {"models.ModelFiles": model_files}, executing=executing,
                  path="/srv/models/m", files=FILES, fetcher="/opt/g/bin/garage-fetch", **kwargs)


def in_place(i, stamped=True, size=None):
    f = FILES[i]
    size = f["size"] if size is None else size
    return FileState(size=size, mtime=MTIME,
                     stamp=stamp_line(size, MTIME, f["sha256"]) if stamped else None)


def fetch_args(command) -> str:
    assert isinstance(command, FunctionCommand)
    return str(command.args[0].get_raw_value())


def test_model_files_converged_is_a_noop_in_both_steps():
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: in_place(1)})
    for check_only in (True, False):
        run = run_files(state, check_only=check_only)
        assert run.commands == [] and len(run.noops) == 1
    assert "match their stamps" in run_files(state, check_only=True).noop_description


def test_model_files_check_step_hashes_only_unstamped_files_and_sends_no_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: in_place(1, stamped=False)})
    [command] = run_files(state, check_only=True).commands
    args = fetch_args(command)
    assert "--verify-only" in args and "m-00002-of-00002.gguf" in args
    assert "m-00001" not in args and "token" not in args and "hf_secret" not in args
    assert command.args[1] is False  # no token on stdin
    commands = run_files(state, check_only=True, verify=True).commands
    assert "m-00001" in fetch_args(commands[0])  # verify: every file in place


def test_model_files_download_step_creates_the_folder_and_fetches_the_rest(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    mkdir, fetch = run_files(FolderState(False, False, 10**9, {}),
                             auth_origin="http://h").commands
    assert isinstance(mkdir, StringCommand)
    assert "install -d -m 755 -o root -g root /srv/models/m /srv/models/m/.garage" in str(
        mkdir.get_raw_value())
    assert "touch /srv/models/m/.garage/managed" in str(mkdir.get_raw_value())
    args = fetch_args(fetch)
    assert "--auth-origin http://h --token-stdin" in args and "hf_secret" not in args
    assert "--file m-00001-of-00002.gguf 100 " + SHA_A + " http://h/1" in args
    assert fetch.args[1] is True and "300 B to download" in fetch.args[2]
    # the verify flag belongs to the check step; downloads ignore it
    state = FolderState(True, True, 10**9, {0: in_place(0), 1: FileState(partial=50)})
    [fetch] = run_files(state, verify=True).commands
    assert "m-00001" not in fetch_args(fetch) and "150 B to download" in fetch.args[2]


def test_model_files_without_a_token_sends_none(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    commands = run_files(FolderState(True, True, 10**9, {}), auth_origin="http://h").commands
    assert "--token-stdin" not in fetch_args(commands[0]) and commands[0].args[1] is False


def test_model_files_refuses_to_start_without_the_disk_space():
    state = FolderState(True, True, 150, {0: in_place(0), 1: FileState(partial=50)})
    assert run_files(state).commands  # 150 B missing, 150 B free: enough
    state = FolderState(True, True, 100, {0: in_place(0), 1: FileState(partial=50)})
    with pytest.raises(OperationError) as e:
        run_files(state)
    assert "not enough disk space for /srv/models/m: 150 B still to download, 100 B free" in str(
        e.value)
    # at execute time garage-fetch checks again itself
    assert run_files(state, executing=True).commands


def test_model_files_wrong_file_is_fetched_and_its_space_counts_as_free():
    state = FolderState(True, True, 150, {0: in_place(0), 1: in_place(1, size=999)})
    [fetch] = run_files(state).commands
    assert "m-00002" in fetch_args(fetch)
