"""The opencode plan: limits the settings cannot give are read back from the servers' proof
reports (the `ProofReports` fact, run here in a local shell against report files)."""

from __future__ import annotations

import json
import subprocess

from llm_garage.facts.opencode import ProofReports
from llm_garage.plans import opencode as plan
from llm_garage.settings import load_rig


def rig(name, profiles, **data):
    raw = {"engines": {"e": {"kind": "llama.cpp", "ref": "b1", "cuda": False}},
           "models": {"m": {"repo": "o/m", "revision": "main", "files": ["m.gguf"]}},
           "profiles": {p: {"model": "m", "engine": "e", **v} for p, v in profiles.items()},
           **data}
    built, errors = load_rig(name, raw)
    assert errors == []
    return built


def test_proof_reports_fact_reads_each_report(tmp_path):
    good = tmp_path / "a.proof.json"
    good.write_text(json.dumps({"ok": True, "n_ctx": 2048, "slots": 2}))  # no newline at end
    broken = tmp_path / "b.proof.json"
    broken.write_text("{not json")
    fact = ProofReports()
    command = fact.command(reports={"a": str(good), "b": str(broken),
                                    "c d": str(tmp_path / "missing.json")})
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert fact.process(out.stdout.splitlines()) == {
        "a": {"ok": True, "n_ctx": 2048, "slots": 2}, "b": None, "c d": None}


def test_only_limits_the_settings_cannot_give_are_read_back_and_only_when_proven():
    box = rig("box", {
        "auto": {"port": 8001, "ctx_size": 4096},
        "set": {"port": 8002, "ctx_size": 8192, "parallel": 2},
        "failed": {"port": 8003, "ctx_size": 4096},
        "never": {"port": 8004},
        "local": {"port": 8005, "listen": "127.0.0.1", "ctx_size": 4096},
        "off": {"port": 8006, "enabled": False},
    })
    other = rig("other", {"x": {"port": 9000}})
    ws = rig("ws", {}, opencode_client=True)
    fleet = {"box": box, "other": other, "ws": ws}
    reports = {
        "auto": {"ok": True, "n_ctx": 2048, "slots": 2},
        "failed": {"ok": False, "n_ctx": 2048, "step": "props"},
        "never": None,
    }
    asked = []

    def read(name, paths):
        asked.append((name, paths))
        if name == "other":
            return None  # not in this run
        return {p: reports.get(p) for p in paths}

    assert plan.served_contexts(ws, fleet, read) == (
        {("box", "auto"): 2048}, {("box", "failed"), ("other", "x")})
    layout = box.layout
    assert asked == [
        ("box", {p: layout.proof_report(p) for p in ("auto", "failed", "never")}),
        ("other", {"x": other.layout.proof_report("x")}),
    ]
    providers = plan.providers(ws, fleet, read)
    assert providers["llm-garage-box-8001"]["models"]["auto"]["limit"]["context"] == 2048
    assert providers["llm-garage-box-8002"]["models"]["set"]["limit"]["context"] == 4096
    for pid, alias in (("llm-garage-box-8003", "failed"), ("llm-garage-box-8004", "never"),
                       ("llm-garage-other-9000", "x")):
        assert "limit" not in providers[pid]["models"][alias]
    # On its own rig the loopback server is listed, and read back too.
    asked.clear()
    assert ("box", "local") not in plan.served_contexts(box, fleet, read)[0]
    assert "local" in asked[0][1]


def test_a_server_that_cannot_say_now_keeps_the_limit_the_file_has():
    box = rig("box", {"auto": {"port": 8001, "ctx_size": 4096}})
    ws = rig("ws", {}, opencode_client=True)
    fleet = {"box": box, "ws": ws}
    written = {"provider": {"llm-garage-box-8001": {"models": {"auto": {
        "name": "auto (box)", "limit": {"context": 2048, "output": 2048}}}}}}

    def not_in_run(name, paths):
        return None

    kept = plan.providers(ws, fleet, not_in_run, written)
    assert kept["llm-garage-box-8001"]["models"]["auto"]["limit"] == {
        "context": 2048, "output": 2048}
    for existing in (None, {"provider": {}}, {"provider": {"llm-garage-box-8001": {"models": {
            "auto": {"limit": {"context": "2048"}}}}}}):
        assert "limit" not in plan.providers(ws, fleet, not_in_run, existing)[
            "llm-garage-box-8001"]["models"]["auto"]
    # A failed proof rolled the server back to the unit the file's limit came from.
    failed = plan.providers(ws, fleet, lambda name, paths: {
        "auto": {"ok": False, "n_ctx": 1024, "step": "props"}}, written)
    assert failed["llm-garage-box-8001"]["models"]["auto"]["limit"]["context"] == 2048
    # Read in this run, the server's report wins over the file.
    fresh = plan.providers(ws, fleet, lambda name, paths: {
        "auto": {"ok": True, "n_ctx": 4096, "slots": 1}}, written)
    assert fresh["llm-garage-box-8001"]["models"]["auto"]["limit"]["context"] == 4096
