"""`llm-garage bench` on a test rig: the fixture engine evaluates prompts at 2000 tokens/s and
generates at 50, writing its phase where the stand-in nvidia-smi reads it (two RTX 3090s at
300 W while evaluating, 200 W while generating). The sweep must find those numbers, store them
keyed by what the rig runs, leave the server as it was, and stop cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab.rigs.pyinfra_results import REPO_ROOT
from lab.serving import (
    API_KEY,
    API_KEY_ENV,
    controller_env,
    first_shard,
    profile,
    rig_data,
    sh,
)
from lab.standins.gpu import fake_gpu_files

pytestmark = pytest.mark.e2e

PHASE_FILE = "/dev/shm/fixture-engine-phase"
DRAW = {"prefill": 300, "decode": 200, "idle": 25}


def bench_cli(inventory, *args, env):
    return subprocess.run([sys.executable, "-m", "llm_garage.cli", "bench", str(inventory),
                           *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def server_pid(rig) -> str:
    return sh(rig, "systemctl show -p MainPID --value llama-server-a.service")


def test_the_sweep_measures_the_running_server_and_compares_runs(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, repos, tmp_path):
    (rig,) = start_rigs("rig1")
    for path, (content, mode) in fake_gpu_files(
            "rtx3090", 2, power_draw_by_phase=DRAW, phase_file=PHASE_FILE).items():
        rig.put_text(content.decode(), path, mode)
    _, repo = repos
    env = controller_env(tmp_path, **{API_KEY_ENV: API_KEY})
    profiles = {"a": profile(8081, alias="tiny-a", api_key_env=API_KEY_ENV, environment={
        "FIXTURE_LOAD_SECONDS": "0.3", "FIXTURE_PHASE_FILE": PHASE_FILE,
        "FIXTURE_PREFILL_TPS": "2000", "FIXTURE_DECODE_TPS": "50"})}
    inventory = write_inventory({"rig1": rig_data(hub, git_url, profiles, gpu_count=2,
                                                  gpu_power_limit_w=280)})
    converge(inventory, env=env)
    pid = server_pid(rig)

    out = bench_cli(inventory, "--depths", "512,1k,2k,8k", "--gen", "32", "--repeat", "2",
                    env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)  # the README's table comes from here
    assert API_KEY not in out.stdout + out.stderr
    # the progress line, once per measurement
    assert "[####################] 6/6  2K #2: prefill" in out.stderr
    assert "skipped 8K: 8192 tokens and 32 generated exceed the 4096 tokens" in out.stderr

    # the records: measured on the rig, keyed by what it runs
    results = inventory.parent / "bench-results" / "rig1.jsonl"
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert API_KEY not in results.read_text()
    measured = [r for r in recs if r["kind"] == "result"]
    assert [(r["depth"], r["repeat"]) for r in measured] == [
        (512, 1), (512, 2), (1024, 1), (1024, 2), (2048, 1), (2048, 2)]
    assert [r["label"] for r in recs if r["kind"] == "skip"] == ["8K"]
    snapshot = first_shard(hub).rsplit("/", 1)[0]
    on_rig = dict(reversed(line.split("  ", 1)) for line in sh(
        rig, f"cd {snapshot} && sha256sum -- *").splitlines())
    for r in measured:
        assert r["rig"] == "rig1" and r["profile"] == "a" and r["alias"] == "tiny-a"
        assert r["engine"]["commit"] == repo.tags["b6"]
        assert r["engine"]["build"].startswith(repo.tags["b6"][:12] + "-")
        assert r["model"]["files"] == on_rig
        assert r["power_limit_w"] == [280.0, 280.0]
        assert r["gpus"] == ["0: NVIDIA GeForce RTX 3090", "1: NVIDIA GeForce RTX 3090"]
        assert r["n_ctx"] == 4096 and r["gen"] == 32
        assert r["prompt_n"] == r["depth"] and r["cache_n"] == 0 and r["predicted_n"] == 32
        assert r["prefill_tps"] == pytest.approx(2000, rel=0.25)
        assert r["decode_tps"] == pytest.approx(50, rel=0.25)
        assert r["ttft_ms"] == pytest.approx(r["depth"] / 2, rel=0.25)
        assert r["decode_w"] == pytest.approx(400.37, abs=20)
        assert r["decode_tokens_per_kwh"] == pytest.approx(
            r["decode_tps"] * 3.6e6 / r["decode_w"])
        assert r["notes"] == []
    assert [r["prefill_w"] for r in measured if r["depth"] == 2048] == [
        pytest.approx(600.37, abs=30)] * 2
    run_id = measured[0]["run"]
    assert (inventory.parent / "bench-results" / f"{run_id}.png").stat().st_size > 10_000
    assert "| Context | Prefill t/s | Decode t/s | TTFT ms | Power W | Decode tokens/kWh |" \
        in out.stdout
    # the rig document shows the table, and a deploy keeps it (nothing changes)
    doc = (inventory.parent / "docs" / "rig1.md").read_text()
    assert "## Benchmark" in doc and f"`{run_id}`" in doc
    assert pyinfra_run(inventory, env=env).changes() == {}
    assert "## Benchmark" in (inventory.parent / "docs" / "rig1.md").read_text()
    # the server was measured as it ran: not restarted
    assert server_pid(rig) == pid
    assert sh(rig, "systemctl is-active llama-server-a.service") == "active"

    # another power limit (a GPU setting: the server is not restarted), a second run, then
    # the two compared
    inventory = write_inventory({"rig1": rig_data(hub, git_url, profiles, gpu_count=2,
                                                  gpu_power_limit_w=350)})
    pyinfra_run(inventory, env=env)
    assert server_pid(rig) == pid
    out = bench_cli(inventory, "--depths", "1k,2k", "--gen", "32", "--repeat", "1", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = bench_cli(inventory, "--list", env=env).stdout.splitlines()
    assert len(runs) == 2 and runs[0].startswith(run_id)
    second = runs[1].split(":")[0]
    assert second != run_id
    out = bench_cli(inventory, "--compare", run_id, second[-12:], env=env)
    assert out.returncode == 0, out.stderr
    print(out.stdout)  # the README's comparison comes from here
    assert "- power limits (W): 280.0, 280.0 → 350.0, 350.0" in out.stdout
    assert "- engine" not in out.stdout and "- model files" not in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 1K | "))
    assert row.count("→") == 5
    assert "Measured in one run only: 512" in out.stdout
    assert (inventory.parent / "bench-results" / f"compare-{run_id}-vs-{second}.png").exists()

    # Ctrl-C: the run stops on the rig too, the sampler with it; the server keeps serving
    # 50 repeats of 9 s: far longer than the test waits, however slow this machine is
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_garage.cli", "bench", str(inventory), "--depths", "2k",
         "--gen", "400", "--repeat", "50"], cwd=REPO_ROOT, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: a test run started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while "garage-bench" not in sh(rig, "ps -eo args") and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert "garage-bench" in sh(rig, "ps -eo args"), "garage-bench never started on the rig"
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "the bench ended early: stopped" in stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [line for line in sh(rig, "ps -eo args").splitlines()
                if "garage-bench" in line or "nvidia-smi" in line]
        if not left:
            break
        time.sleep(0.5)
    assert left == []
    assert server_pid(rig) == pid
    assert sh(rig, "systemctl is-active llama-server-a.service") == "active"
