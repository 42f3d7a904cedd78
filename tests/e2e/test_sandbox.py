"""The README's main command end to end: the sandbox runner's `up` (twice), `status`, `down`.

It runs under a fleet name and state file of its own, so a sandbox someone has up is left alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lab.rigs
from lab import sandbox
from lab.rigs.pyinfra_results import REPO_ROOT


def _runner(*args: str, env: dict[str, str], timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lab.sandbox", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"--- exit {proc.returncode}; stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@pytest.mark.e2e
def test_sandbox_up_answers_converges_reuses_and_down_leaves_nothing(tmp_path, converge):
    name = f"sbx-e2e-{os.getpid()}"
    state_file = tmp_path / "state" / "sandbox.json"
    env = {**os.environ, sandbox.NAME_ENV: name, sandbox.STATE_ENV: str(state_file)}
    work = sandbox.work_dir(name)
    state: dict = {}
    bridge = None
    try:
        up = _runner("up", env=env)
        assert up.returncode == 0, _output(up)
        state = json.loads(state_file.read_text())
        bridge = next(e["bridge"] for e in lab.rigs.list_fleets() if e["name"] == name)
        rig_ip = state["rig"]["ip"]

        # The runner showed the model answering on its port and a second deploy changing nothing.
        assert f"{sandbox.FIXTURE_ALIAS} answered:" in up.stdout, _output(up)
        assert state["last_up"]["answer"].strip()
        assert state["last_up"]["first_changed"] > 0
        assert state["last_up"]["second_changed"] == 0
        assert "no changes: all" in up.stdout
        assert f"./scripts/rigs ssh --name {name} sandbox" in up.stdout
        assert f"{sandbox.NAME_ENV}={name} ./scripts/sandbox down" in up.stdout

        # The first deploy showed the build's and the download's progress lines as the rig
        # printed them, with its prefix, while its operation ran (before its status).
        lines = up.stdout.splitlines()
        building = next(i for i, line in enumerate(lines)
                        if line.startswith("    [sandbox] Building llama (llama.cpp "))
        compiled = [i for i, line in enumerate(lines) if re.fullmatch(
            r"    \[sandbox\] garage-build: llama compiled: 100 % \(\d+ steps done\) in "
            r"(?:\d+ min )?\d+ s, ccache hits \d+/\d+", line)]
        compiling = [int(m.group(1)) for line in lines if (m := re.fullmatch(
            r"    \[sandbox\] garage-build: llama compiling: (\d+) % \(\d+ steps? done\), .*",
            line))]
        built = next(i for i, line in enumerate(lines)
                     if line.startswith("    [sandbox] Built llama "))
        assert len(compiled) == 1 and building < compiled[0] < built, _output(up)
        assert compiling == sorted(compiling) and all(p < 100 for p in compiling)
        assert re.search(r"^    Engines \| .+ \.\.\. changed$", "\n".join(lines[built:]),
                         re.M), _output(up)
        model = re.escape(sandbox.FIXTURE_MODEL_FILE)
        fetch = [line for line in lines if line.startswith("    [sandbox] garage-fetch: ")]
        assert re.fullmatch(rf"    \[sandbox\] garage-fetch: {model}: [\d.]+ [kMG]?B, "
                            r"downloading", fetch[1]), _output(up)
        assert any(re.fullmatch(rf"    \[sandbox\] garage-fetch: {model}: sha256 verified, "
                                r"in place \(.+ received in .+\)", line) for line in fetch)
        assert re.fullmatch(r"    \[sandbox\] garage-fetch: tiny: 1 file\(s\) downloaded, .+",
                            fetch[-2]), _output(up)
        print(up.stdout)  # the README's excerpt of a sandbox run comes from here

        # The gate, on the sandbox's own inventory, as a user would run it by hand.
        converge("inventory/sandbox.py", "deploy.py", env={sandbox.STATE_ENV: str(state_file)})

        answer = sandbox.chat(f"http://{rig_ip}:{sandbox.SERVE_PORT}/v1", sandbox.FIXTURE_ALIAS,
                              "Say hello.")
        assert answer.strip()
        login = subprocess.run(
            ["./scripts/rigs", "ssh", "--name", name, sandbox.RIG, "hostname"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert (login.returncode, login.stdout.strip()) == (0, sandbox.RIG), login.stderr
        rig = lab.rigs.Fleet.attach(name).rig(sandbox.RIG)
        opencode = json.loads(rig.ssh(f"cat {sandbox.OPENCODE_JSON}").stdout)
        assert sandbox.FIXTURE_ALIAS in json.dumps(opencode["provider"])
        assert f"http://{rig_ip}:{sandbox.SERVE_PORT}/v1" in json.dumps(opencode["provider"])
        limit = rig.ssh("nvidia-smi --query-gpu=power.limit --format=csv,noheader").stdout
        assert limit.strip() == "280.00 W"

        # `up` again: the same rig and stand-ins, and a deploy with nothing to do.
        again = _runner("up", env=env)
        assert again.returncode == 0, _output(again)
        assert "reusing rig sandbox" in again.stdout
        state_again = json.loads(state_file.read_text())
        assert state_again["fixtures"] == state["fixtures"]
        assert state_again["last_up"]["first_changed"] == 0, _output(again)
        assert "] garage-build: " not in again.stdout, _output(again)
        assert "] garage-fetch: " not in again.stdout, _output(again)

        status = _runner("status", env=env)
        assert status.returncode == 0, _output(status)
        assert f"rig sandbox     {rig_ip}" in status.stdout and "running" in status.stdout
        assert "/health: 200" in status.stdout
    finally:
        down = _runner("down", env=env, timeout=300)
    assert down.returncode == 0, _output(down)
    assert f"sandbox {name} is down" in down.stdout

    # Nothing left behind: fleet, rig, bridge, files, state, stand-in processes.
    assert all(e["name"] != name for e in lab.rigs.list_fleets())
    assert bridge and not Path(f"/sys/class/net/{bridge}").exists()
    assert not work.exists() and not state_file.exists()
    assert not (sandbox.state_root() / f"sandbox-{name}.lock").exists()
    for entry in state["fixtures"].values():
        assert not sandbox.proc_alive(entry)
        assert sandbox.find_procs(entry["marker"]) == []
    after = _runner("status", env=env)
    assert after.returncode == 1 and "down" in after.stdout
