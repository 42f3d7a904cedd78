"""llm_garage.readahead with the real pyinfra CLI on @local (lab/deploys/readahead_probe.py):
one command reads every declared fact; facts with the same command share one run of it; an
answer is used only until an operation runs a command; odd outputs keep their shape; a fact
that fails in a batch is read again, alone if need be; a second run changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")


def run(tmp_path: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PYINFRA), "-y", "--debug", "@local", "lab/deploys/readahead_probe.py",
         "--data", f"probe_dir={tmp_path}", "--data", f"probe_out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYINFRA_PROGRESS": "off", "NO_COLOR": "1"})


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_one_command_reads_what_the_operations_declared_until_one_changes_the_rig(tmp_path):
    (tmp_path / "a").write_text("old text\n")
    (tmp_path / "b").write_text("b\n")
    out = tmp_path / "out.jsonl"
    proc = run(tmp_path, out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    seen = {r["label"]: r["value"] for r in map(json.loads, out.read_text().splitlines())}
    assert seen["a before"] == sha("old text\n") and seen["b"] == sha("b\n")
    assert seen["a after"] == sha("new text\n")  # read again after the write
    for label, batch in (("odd 1", 1), ("odd 2", 2)):
        no_newline, silent, failing, runs, runs_text = seen[label]
        assert no_newline == ["one", "two"] and silent == []
        assert failing == [f"answered at try {batch + 2}"]
        # two facts, one command: run once per batch, both read that run
        assert (runs, runs_text) == (batch, f"run {batch}")
    assert (tmp_path / "runs").read_text() == "2\n"
    batches = re.findall(r"read ahead: (\d+) of (\d+) fact\(s\) in one command \((\d+) run",
                         log)
    # all 7 declared facts (6 commands) at the first read, the failing one (twice) ...
    assert batches[0] == ("6", "7", "6") and batches[1] == ("0", "1", "1"), batches
    # ... read alone by pyinfra once; after the write, what was still to be read, at once
    # (the deploy file runs as a module named builtins)
    assert len(re.findall(r"Getting fact: builtins\.Failing", log)) == 1, log[-4000:]
    assert batches[2] == ("6", "6", "5") and len(batches) == 3, batches
    # nothing else read one fact at a time
    assert not re.findall(r"Getting fact: (?!builtins\.Failing)", log)

    out.unlink()
    again = run(tmp_path, out)
    assert again.returncode == 0
    assert "write a" in again.stderr + again.stdout
    seen = {r["label"]: r["value"] for r in map(json.loads, out.read_text().splitlines())}
    assert seen["a before"] == seen["a after"] == sha("new text\n")
    assert "holds the rendered text" in again.stdout + again.stderr
