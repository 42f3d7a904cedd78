"""Folders and files installed several per operation (llm_garage/operations/paths.py), and
the fact reading them all in one command, run here on real files."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from pyinfra.api import FileUploadCommand
from pyinfra.api.exceptions import OperationError

from llm_garage.facts.paths import PathStates
from llm_garage.operations import paths
from tests.unit.ophelper import run_op

ROOT = {"user": "root", "group": "root", "mode": "755"}


def read_states(paths_, hash_files=True):
    fact = PathStates()
    out = subprocess.run(["sh", "-c", fact.command(paths_, hash_files)], check=True,
                         capture_output=True, text=True).stdout
    return fact.process(out.splitlines())


def test_fact_reads_every_kind_of_path_in_one_command(tmp_path):
    folder = tmp_path / "a dir"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    script = tmp_path / "script"
    script.write_text("echo hi\n")
    os.chmod(script, 0o700)
    link = tmp_path / "link"
    link.symlink_to(folder)
    missing = tmp_path / "missing"
    states = read_states([str(folder), str(script), str(link), str(missing)])
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert states[str(folder)] == {"type": "dir", "mode": "750", "user": user,
                                   "group": states[str(folder)]["group"], "sha256": None}
    assert states[str(script)]["type"] == "file"
    assert states[str(script)]["mode"] == "700"
    assert states[str(script)]["sha256"] == hashlib.sha256(b"echo hi\n").hexdigest()
    assert states[str(link)]["type"] == "link"
    assert str(missing) not in states
    assert read_states([str(script)], hash_files=False)[str(script)]["sha256"] is None


def test_folders_in_place_yield_nothing_and_say_so():
    facts = {"paths.PathStates": {"/a": {"type": "dir", "sha256": None, **ROOT},
                                  "/a/b": {"type": "dir", "sha256": None, **ROOT}}}
    run = run_op(paths.folders, facts, paths=["/a", "/a/b"], **ROOT)
    assert run.commands == []
    assert run.noop_description == "2 folder(s) in place (root:root 755): /a, /a/b"
    assert run.host.asked == [("paths.PathStates", {"paths": ["/a", "/a/b"],
                                                    "hash_files": False})]


def test_folders_create_what_is_missing_and_fix_what_differs():
    facts = {"paths.PathStates": {"/a": {"type": "dir", "user": "root", "group": "root",
                                         "mode": "700", "sha256": None}}}
    run = run_op(paths.folders, facts, paths=["/a", "/a/b"], **ROOT)
    assert run.raw == ["chmod 755 -- /a", "mkdir -p -- /a/b", "chown root:root -- /a/b",
                       "chmod 755 -- /a/b"]
    assert run.noops == []
    assert run.logs == ["/a set to root:root 755; /a/b created"]


def test_folders_refuse_a_path_that_is_not_a_folder():
    facts = {"paths.PathStates": {"/a": {"type": "link", "sha256": None, **ROOT}}}
    with pytest.raises(OperationError, match="/a exists and is not a directory"):
        run_op(paths.folders, facts, paths=["/a"], **ROOT)


def test_files_up_to_date_yield_nothing(tmp_path):
    src = tmp_path / "tool"
    src.write_text("#!/bin/sh\n")
    digest = hashlib.sha256(b"#!/bin/sh\n").hexdigest()
    facts = {"paths.PathStates": {"/bin/tool": {"type": "file", "sha256": digest, **ROOT}}}
    run = run_op(paths.files_installed, facts, files={"/bin/tool": str(src)}, **ROOT)
    assert run.commands == []
    assert run.noop_description == "1 file(s) in /bin up to date"


def test_files_that_differ_are_uploaded_beside_and_renamed(tmp_path):
    src = tmp_path / "tool"
    src.write_text("#!/bin/sh\n")
    same = tmp_path / "same"
    same.write_text("x\n")
    digest = hashlib.sha256(b"x\n").hexdigest()
    facts = {"paths.PathStates": {
        "/bin/tool": {"type": "file", "sha256": "0" * 64, **ROOT},
        "/bin/same": {"type": "file", "sha256": digest, "user": "root", "group": "root",
                      "mode": "644"}}}
    run = run_op(paths.files_installed, facts,
                 files={"/bin/tool": str(src), "/bin/same": str(same), "/bin/new": str(src)},
                 **ROOT)
    upload_new, *rest_new = run.commands[:4]
    assert isinstance(upload_new, FileUploadCommand)
    assert upload_new.dest == "/bin/new.tmp"
    assert [c.get_raw_value() for c in rest_new] == [
        "chown root:root -- /bin/new.tmp", "chmod 755 -- /bin/new.tmp",
        "mv -f -- /bin/new.tmp /bin/new"]
    assert run.raw[4] == "chmod 755 -- /bin/same"
    assert isinstance(run.commands[5], FileUploadCommand)
    assert run.raw[-1] == "mv -f -- /bin/tool.tmp /bin/tool"
    assert run.logs == ["new installed; same set to root:root 755; tool updated"]


def test_service_account_fact_reads_this_machine():
    from llm_garage.facts.paths import ServiceAccount
    fact = ServiceAccount()
    out = subprocess.run(["sh", "-c", fact.command("root", ["root", "no-such-group-x"], "/root")],
                         check=True, capture_output=True, text=True).stdout
    have = fact.process(out.splitlines())
    assert have["passwd"]["uid"] == "0"
    assert have["passwd"]["home"] == "/root"
    assert have["groups"] == ["root"]
    assert have["home"] == {"user": "root", "group": "root"}
    missing = fact.process(subprocess.run(
        ["sh", "-c", fact.command("no-such-user-x", [], "/nonexistent-x")], check=True,
        capture_output=True, text=True).stdout.splitlines())
    assert missing == {"passwd": None, "groups": [], "member_of": [], "home": None}


ACCOUNT = dict(user="llama", groups=["video", "render"], home="/opt/g/home",
               shell="/usr/sbin/nologin")
IN_PLACE = {"passwd": {"name": "llama", "uid": "999", "gid": "999", "home": "/opt/g/home",
                       "shell": "/usr/sbin/nologin"},
            "groups": ["video", "render"], "member_of": ["render", "video"],
            "home": {"user": "llama", "group": "llama"}}


def test_service_account_in_place_yields_nothing():
    run = run_op(paths.service_account, {"paths.ServiceAccount": IN_PLACE}, **ACCOUNT)
    assert run.commands == []
    assert run.noop_description == ("user llama exists (home /opt/g/home, shell "
                                    "/usr/sbin/nologin, groups video, render)")


def test_service_account_created_on_a_fresh_rig():
    fresh = {"passwd": None, "groups": ["video"], "member_of": [], "home": None}
    run = run_op(paths.service_account, {"paths.ServiceAccount": fresh}, **ACCOUNT)
    assert run.raw == [
        "groupadd -r render",
        "useradd -d /opt/g/home -s /usr/sbin/nologin -G video,render -r -M llama",
        "mkdir -p -- /opt/g/home", "chown llama:llama -- /opt/g/home"]
    assert run.logs == ["group render created; user llama created; /opt/g/home created"]


def test_service_account_drift_is_set_back():
    drift = {**IN_PLACE, "member_of": ["video"],
             "passwd": {**IN_PLACE["passwd"], "shell": "/bin/bash"},
             "home": {"user": "root", "group": "root"}}
    run = run_op(paths.service_account, {"paths.ServiceAccount": drift}, **ACCOUNT)
    assert run.raw == ["usermod -s /usr/sbin/nologin -G video,render llama",
                       "chown llama:llama -- /opt/g/home"]
    linked = run_op(paths.service_account, {"paths.ServiceAccount": {**IN_PLACE,
                                                                      "home": "link"}},
                    **ACCOUNT)
    assert linked.commands == []
