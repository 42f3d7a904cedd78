"""llama-server services: input digests, restart decisions, secret files, removal, and the
rig-side check script against a stand-in server."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pyinfra.api import FileUploadCommand, StringCommand

from llm_garage import units
from llm_garage.facts.services import (
    GarageUnits,
    UnitPresence,
    inputs_digest_command,
)
from llm_garage.operations import services as ops
from llm_garage.plans.services import check_command, local_url
from llm_garage.settings import load_rig
from tests.unit.ophelper import run_op

CHECK_SCRIPT = Path(__file__).resolve().parents[2] / "llm_garage" / "files" / "garage-server-check"


def sh(command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, **kw)


# --- the inputs digest ---------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path):
    builds = tmp_path / "builds"
    for build in ("aaa", "bbb"):
        (builds / build / "bin").mkdir(parents=True)
        (builds / build / "bin" / "llama-server").write_text(build)
    (builds / "current").symlink_to("aaa")
    models = tmp_path / "models" / "m"
    models.mkdir(parents=True)
    (models / "m-00001-of-00002.gguf").write_text("1")
    (models / "m-00002-of-00002.gguf").write_text("2")
    unit = tmp_path / "u.service"
    unit.write_text("[Service]\n")
    key = tmp_path / "k.key"
    key.write_text("secret\n")
    paths = dict(unit=str(unit), key_file=str(key),
                 binary=str(builds / "aaa" / "bin" / "llama-server"),
                 model=str(models / "m-00001-of-00002.gguf"))
    return tmp_path, paths


def digest(paths):
    out = sh(inputs_digest_command(**paths))
    assert out.returncode == 0, out.stderr
    value = out.stdout.strip()
    assert len(value) == 64
    return value


def test_digest_is_stable(inputs):
    _, paths = inputs
    assert digest(paths) == digest(paths)


@pytest.mark.parametrize("change", ["unit", "key", "engine", "shard", "partial", "rebuild",
                                    "unit path"])
def test_digest_follows_every_input(inputs, change):
    tmp, paths = inputs
    before = digest(paths)
    if change == "unit":
        Path(paths["unit"]).write_text("[Service]\nRestart=no\n")
    elif change == "key":
        Path(paths["key_file"]).write_text("other\n")
    elif change == "engine":  # the unit runs another build
        paths = dict(paths, binary=str(tmp / "builds/bbb/bin/llama-server"))
    elif change == "shard":  # a second shard replaced by a verified download (new inode)
        shard = tmp / "models/m/m-00002-of-00002.gguf"
        (tmp / "new").write_text("22")
        os.replace(tmp / "new", shard)
    elif change == "partial":  # a download in progress is not an input
        (tmp / "models/m/m-00002-of-00002.gguf.partial").write_text("x")
        assert digest(paths) == before
        return
    elif change == "unit path":  # only the content counts: the wanted unit and its copies
        other = tmp / "elsewhere.service"
        other.write_text(Path(paths["unit"]).read_text())
        assert digest(dict(paths, unit=str(other))) == before
        return
    elif change == "rebuild":  # same build folder, new binary
        binary = tmp / "builds/aaa/bin/llama-server"
        (tmp / "new").write_text("rebuilt")
        os.replace(tmp / "new", binary)
    assert digest(paths) != before


def test_digest_of_missing_inputs_still_answers(tmp_path):
    value = digest(dict(unit=str(tmp_path / "no.service"), key_file=None,
                        binary=str(tmp_path / "none/x"),
                        model=str(tmp_path / "nowhere/m.gguf")))
    assert len(value) == 64


def test_garage_units_fact_lists_only_marked_units(tmp_path):
    (tmp_path / "llama-server-a.service").write_text(units.GENERATED_MARKER + " x\n[Unit]\n")
    (tmp_path / "llama-server-b.service").write_text("# hand written\n")
    (tmp_path / "other.service").write_text(units.GENERATED_MARKER + "\n")
    command = GarageUnits().command(str(tmp_path), "llama-server-*.service",
                                    units.GENERATED_MARKER)
    out = sh(command)
    assert out.returncode == 0
    assert GarageUnits().process(out.stdout.splitlines()) == ["llama-server-a.service"]
    missing = sh(GarageUnits().command(str(tmp_path / "nope"), "*.service", "#"))
    assert missing.returncode == 0 and missing.stdout == ""


def test_unit_presence_fact(tmp_path):
    (tmp_path / "a").write_text("")
    out = sh(UnitPresence().command("no-such-unit.service", [str(tmp_path / "a"),
                                                             str(tmp_path / "b")]))
    assert out.returncode == 0
    assert UnitPresence().process(out.stdout.splitlines()) == {
        "active": False, "enabled": False, "present": [str(tmp_path / "a")]}


# --- operations with facts given -----------------------------------------------------------

class Meta:
    """Stands in for an OperationMeta of an earlier operation."""

    def __init__(self, will=False, did=False, error=False):
        self.will_change, self._did, self._error = will, did, error

    def is_complete(self):
        return True

    def did_change(self):
        return self._did

    def did_error(self):
        return self._error


def test_secret_file_unchanged_is_a_noop():
    content = "k3y\n"
    facts = {"files.Sha256File": hashlib.sha256(content.encode()).hexdigest()}
    run = run_op(ops.secret_file, facts, path="/etc/llm-garage/a.key",
                 content=content)
    assert run.commands == [] and run.noops == ["/etc/llm-garage/a.key is up to date"]


def test_secret_file_is_private_before_it_holds_anything():
    run = run_op(ops.secret_file, {"files.Sha256File": None}, path="/etc/llm-garage/a.key",
                 content="k3y\n")
    mkdir, create, upload, rename = run.commands
    assert [mkdir.get_raw_value()] == ["install -d -m 700 -o root -g root /etc/llm-garage"]
    assert "umask 077" in create.get_raw_value() and "chmod 600" in create.get_raw_value()
    assert create.get_raw_value().endswith(" - /etc/llm-garage/a.key.tmp")
    assert isinstance(upload, FileUploadCommand) and upload.dest == "/etc/llm-garage/a.key.tmp"
    assert upload.remote_temp_filename is None
    # renamed over the key only once complete: a kill never leaves half a key in place
    assert rename.get_raw_value().endswith(" - /etc/llm-garage/a.key.tmp /etc/llm-garage/a.key")
    assert upload.src.getvalue() == "k3y\n"
    assert not any("k3y" in c.get_raw_value() for c in run.commands if isinstance(c, StringCommand))


def test_secret_file_with_sudo_prepares_a_private_temporary_file():
    run = run_op(ops.secret_file, {"files.Sha256File": "0" * 64}, global_args={"_sudo": True},
                 path="/etc/llm-garage/a.key", content="k3y\n")
    temp_cmd, upload, _rename = run.commands[-3:]
    assert upload.remote_temp_filename and upload.remote_temp_filename.startswith("/tmp/")
    assert temp_cmd.get_raw_value().endswith(upload.remote_temp_filename)
    assert temp_cmd.connector_arguments["_sudo"] is False


def test_unit_absent():
    paths = ["/etc/systemd/system/x.service", "/etc/llm-garage/x.key"]
    facts = {"services.UnitPresence": {"active": True, "enabled": True, "present": paths[:1]}}
    run = run_op(ops.unit_absent, facts, service="x.service", paths=paths)
    assert run.raw == ["systemctl disable --now -- x.service",
                       "rm -f -- /etc/systemd/system/x.service"]
    facts = {"services.UnitPresence": {"active": False, "enabled": False, "present": []}}
    run = run_op(ops.unit_absent, facts, service="x.service", paths=paths)
    assert run.commands == [] and run.noops == ["x.service is absent"]


def test_stale_units_removed_keeps_enabled_and_removes_disabled_and_gone():
    def presence(service, paths):
        return {"active": service != "llama-server-off.service", "enabled": False,
                "present": list(paths)}

    facts = {"services.GarageUnits": ["llama-server-gone.service", "llama-server-on.service"],
             "services.UnitPresence": presence}
    run = run_op(ops.stale_units_removed, facts, keep=["llama-server-on.service"],
                 also=["llama-server-off.service"], unit_dir="/u",
                 pattern="llama-server-*.service", marker="#",
                 companions={"/s": ".key"})
    assert run.raw == [
        "systemctl disable --now -- llama-server-gone.service",
        "rm -f -- /u/llama-server-gone.service /s/llama-server-gone.key",
        "rm -f -- /u/llama-server-off.service /s/llama-server-off.key",
    ]


def test_all_proven_names_the_failed_services():
    checks = {"a.service": Meta(), "b.service": Meta(error=True)}
    run = run_op(ops.all_proven, {}, checks=checks)
    assert run.commands == [] and run.noops
    run = run_op(ops.all_proven, {}, executing=True, checks=checks)
    assert run.raw == [
        "echo 'llama-server service(s) failed to start or to answer: b.service (their journal "
        "is printed above)' >&2; exit 1"]
    run = run_op(ops.all_proven, {}, executing=True, checks={"a.service": Meta()})
    assert run.commands == []


# --- task helpers --------------------------------------------------------------------------

@pytest.mark.parametrize("listen, url", [
    ("0.0.0.0", "http://127.0.0.1:8000"), ("::", "http://[::1]:8000"),
    ("192.168.1.50", "http://192.168.1.50:8000"), ("fe80::1", "http://[fe80::1]:8000"),
    ("localhost", "http://localhost:8000"),
])
def test_local_url(listen, url):
    assert local_url(listen, 8000) == url


def test_check_command_carries_no_key(monkeypatch):
    monkeypatch.setenv("K", "s3cret")
    rig, errors = load_rig("r", {
        "engines": {"e": {"kind": "llama.cpp", "ref": "b1", "cuda": False}},
        "models": {"m": {"repo": "o/m", "revision": "main", "files": ["m.gguf"]}},
        "profiles": {"p": {"model": "m", "engine": "e", "port": 9000, "api_key_env": "K",
                           "health_timeout_s": 60, "warmup_requests": 2}}})
    assert errors == []
    assert list(check_command(rig, "p")) == [
        "/opt/llm-garage/bin/garage-server-check", "--unit", "llama-server-p.service",
        "--url", "http://127.0.0.1:9000", "--alias", "p", "--timeout", "60", "--warmup", "2",
        "--report", "/opt/llm-garage/state/services/llama-server-p.proof.json",
        "--key-file", "/etc/llm-garage/llama-server-p.key", "--tool-call"]
    assert "s3cret" not in " ".join(check_command(rig, "p"))


# --- the check script against a stand-in llama-server --------------------------------------

class StandIn(http.server.BaseHTTPRequestHandler):
    ready_after = 2  # /health answers 503 this many times first
    key = None
    alias = "tiny"
    props = None  # /props answers 404 unless set
    health_calls = 0
    chats: list = []

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self):
        return self.key is None or self.headers.get("Authorization") == f"Bearer {self.key}"

    def do_GET(self):
        cls = type(self)
        if self.path == "/health":
            cls.health_calls += 1
            if cls.ready_after is None or cls.health_calls <= cls.ready_after:
                return self._send(503, {"error": {"message": "Loading model"}})
            return self._send(200, {"status": "ok"})
        if self.path == "/v1/models":
            if not self._authorized():
                return self._send(401, {"error": "Invalid API Key"})
            return self._send(200, {"object": "list", "data": [{"id": cls.alias}]})
        if self.path == "/props" and cls.props is not None:
            return self._send(200, cls.props)
        self._send(404, {})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        if not self._authorized():
            return self._send(401, {"error": "Invalid API Key"})
        type(self).chats.append(body)
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": "hi"}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    handler = type("Handler", (StandIn,), {"health_calls": 0, "chats": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def check(url, *extra, timeout="20"):
    argv = [sys.executable, str(CHECK_SCRIPT), "--unit", "llama-server-t.service", "--url", url,
            "--alias", "tiny", "--timeout", timeout, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_check_waits_for_health_then_lists_and_warms_up(stand_in, tmp_path):
    handler, url = stand_in
    handler.key = "k-123"
    key_file = tmp_path / "key"
    key_file.write_text("\nk-123\n")
    out = check(url, "--warmup", "2", "--key-file", str(key_file))
    assert out.returncode == 0, out.stderr
    assert handler.health_calls == 3
    assert [c["model"] for c in handler.chats] == ["tiny", "tiny"]
    assert "healthy after" in out.stderr and "k-123" not in out.stdout + out.stderr


@pytest.mark.parametrize("ctx_size, slots, n_ctx, proven", [
    (4096, 1, 4096, True),
    (4096, 2, 2048, True),       # each of 2 slots gets half
    (4096, 4, 4096, True),       # a unified cache: every slot may use all of it
    (10000, 3, 3584, True),      # 10000 / 3 cells per slot, rounded up to 256 by the engine
    (10000, 1, 10240, True),     # rounded up, never down
    (10000, 3, 3072, False),     # less than a third: clamped
    (131072, 1, 40960, False),   # clamped to the model's training context
])
def test_check_accepts_the_context_rounded_up_never_clamped(stand_in, tmp_path, ctx_size,
                                                            slots, n_ctx, proven):
    handler, url = stand_in
    handler.ready_after = 0
    handler.props = {"default_generation_settings": {"n_ctx": n_ctx}, "total_slots": slots}
    report = tmp_path / "proof.json"
    out = check(url, "--ctx-size", str(ctx_size), "--report", str(report))
    assert out.returncode == (0 if proven else 1), out.stderr
    assert json.loads(report.read_text())["n_ctx"] == n_ctx
    if not proven:
        assert (f"the server runs with n_ctx {n_ctx} per request, but the profile asks for "
                f"ctx_size {ctx_size} ({slots} slot(s)): the context was clamped") in out.stderr


def test_check_fails_with_the_journal_when_never_ready(stand_in):
    handler, url = stand_in
    handler.ready_after = None
    out = check(url, timeout="2")
    assert out.returncode == 1
    assert "/health did not answer 200 within 2 s (last: 503 (model loading)" in out.stderr
    assert "--- last 40 lines of journalctl -u llama-server-t.service ---" in out.stderr


def test_check_fails_when_the_alias_is_missing_or_the_key_wrong(stand_in, tmp_path):
    handler, url = stand_in
    handler.ready_after = 0
    handler.alias = "other"
    out = check(url)
    assert out.returncode == 1 and "does not list 'tiny' (it lists other)" in out.stderr
    handler.alias = "tiny"
    handler.key = "right"
    key_file = tmp_path / "key"
    key_file.write_text("wrong\n")
    out = check(url, "--key-file", str(key_file))
    assert out.returncode == 1 and "GET /v1/models answered 401" in out.stderr
    assert "wrong" not in out.stderr


def test_check_restart_failure_prints_the_journal(stand_in, tmp_path):
    """--restart runs systemctl first; here a stand-in systemctl that refuses."""
    _, url = stand_in
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("systemctl", "echo 'Job for x failed.' >&2; exit 1"),
                       ("journalctl", "echo 'x: status=226/NAMESPACE'")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    argv = [sys.executable, str(CHECK_SCRIPT), "--unit", "x.service", "--url", url, "--alias",
            "tiny", "--timeout", "5", "--restart"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "x.service: start failed: systemctl restart failed: Job for x failed." in out.stderr
    assert "x: status=226/NAMESPACE" in out.stderr


def test_check_fails_fast_when_nothing_listens():
    out = check("http://127.0.0.1:9", timeout="1")
    assert out.returncode == 1 and "last: no answer" in out.stderr


def test_facts_without_output_have_usable_defaults():
    """pyinfra gives a fact its default when the command prints nothing."""
    assert UnitPresence.default() == {"active": False, "enabled": False, "present": []}
    assert GarageUnits.default() == []
    out = sh(UnitPresence().command("no-such-unit.service", ["/nonexistent/x"]))
    assert out.stdout == ""  # so the default above is what the operation sees


def test_secret_file_absent():
    run = run_op(ops.secret_file, {"files.Sha256File": "0" * 64}, path="/etc/llm-garage/a.key",
                 content=None)
    assert run.raw == ["rm -f -- /etc/llm-garage/a.key"]
    run = run_op(ops.secret_file, {"files.Sha256File": None}, path="/etc/llm-garage/a.key",
                 content=None)
    assert run.commands == [] and run.noops == ["no /etc/llm-garage/a.key"]


def test_unit_installed_only_when_it_differs_and_atomically():
    def unit(digest):
        return {"type": "file", "mode": "644", "user": "root", "group": "root",
                "sha256": digest}

    same = {"paths.PathStates": lambda paths, **_: {p: unit("a" * 64) for p in paths}}
    run = run_op(ops.unit_installed, same, source="/opt/g/state/x.service",
                 unit_file="/etc/systemd/system/x.service")
    assert run.commands == []
    assert run.noops == ["/etc/systemd/system/x.service is the rendered unit"]
    # Both files are read by one fact (one command on the rig).
    assert run.host.asked == [("paths.PathStates", {"paths": [
        "/opt/g/state/x.service", "/etc/systemd/system/x.service"]})]
    changed = {"paths.PathStates": {"/opt/g/state/x.service": unit("a" * 64),
                                    "/etc/systemd/system/x.service": unit("b" * 64)}}
    assert len(run_op(ops.unit_installed, changed, source="/opt/g/state/x.service",
                      unit_file="/etc/systemd/system/x.service").commands) == 1
    differs = {"paths.PathStates": {"/opt/g/state/x.service": unit("a" * 64)}}
    run = run_op(ops.unit_installed, differs, source="/opt/g/state/x.service",
                 unit_file="/etc/systemd/system/x.service")
    (command,) = run.raw
    assert 'mv -f -- "$2.tmp" "$2" && systemctl daemon-reload' in command
    assert command.endswith(" - /opt/g/state/x.service /etc/systemd/system/x.service")


def test_boot_unit_installed_and_enabled_from_one_fact():
    def unit(digest):
        return {"type": "file", "mode": "644", "user": "root", "group": "root",
                "sha256": digest}

    where = dict(source="/opt/g/state/x.service", unit_file="/etc/systemd/system/x.service",
                 service="x.service")
    both = {"/opt/g/state/x.service": unit("a" * 64),
            "/etc/systemd/system/x.service": unit("a" * 64)}
    run = run_op(ops.unit_installed, {"services.InstalledUnit": {"files": both,
                                                                 "enabled": "enabled"}},
                 **where)
    assert run.commands == []
    assert run.noops == ["/etc/systemd/system/x.service is the rendered unit, x.service is "
                         "enabled at boot"]
    run = run_op(ops.unit_installed, {"services.InstalledUnit": {"files": both,
                                                                 "enabled": "disabled"}},
                 **where)
    assert run.raw == ["systemctl enable -- x.service"]
    fresh = {"/opt/g/state/x.service": unit("a" * 64)}
    run = run_op(ops.unit_installed, {"services.InstalledUnit": {"files": fresh,
                                                                 "enabled": ""}}, **where)
    assert len(run.raw) == 2 and run.raw[0].startswith("sh -c ")
    assert run.raw[1] == "systemctl enable -- x.service"
    assert run.noops == []


def test_installed_unit_fact_reads_files_and_enablement_here(tmp_path):
    from llm_garage.facts.services import InstalledUnit
    source = tmp_path / "x.service"
    source.write_text("[Unit]\n")
    fact = InstalledUnit()
    out = subprocess.run(["sh", "-c", fact.command(str(source), str(tmp_path / "none"),
                                                   "no-such-unit-x.service")],
                         capture_output=True, text=True, check=True).stdout
    found = fact.process(out.splitlines())
    assert list(found["files"]) == [str(source)]
    assert found["files"][str(source)]["sha256"] == hashlib.sha256(b"[Unit]\n").hexdigest()
    assert found["enabled"] != "enabled"
