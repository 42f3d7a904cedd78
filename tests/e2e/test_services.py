"""llama-server services on test rigs: units from profiles, restarts only on change and only
after health, a server that never gets ready, the API key kept secret."""

from __future__ import annotations

import pytest

from lab.serving import (
    API_KEY,
    API_KEY_ENV,
    chat,
    controller_env,
    engine,
    first_shard,
    profile,
    rig_data,
    served_ids,
    service,
    sh,
    starts,
    verify_units,
)
from llm_garage.facts.memory import COMMAND as MEMORY_COMMAND
from llm_garage.facts.memory import parse as parse_memory

pytestmark = pytest.mark.e2e

A, B, C = "llama-server-a.service", "llama-server-b.service", "llama-server-c.service"


def test_two_profiles_converge_then_restart_only_what_changed(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    awkward = "{# 100% of $HOME, \"quoted\" #}{{ messages }}"
    profiles = {"a": profile(8081, alias="tiny-a", extra_args=["--chat-template", awkward]),
                "b": profile(8082, alias="tiny-b", warmup_requests=2)}
    inventory = write_inventory({"rig1": rig_data(hub, git_url, profiles)})

    first, _ = converge(inventory, env=env)

    changed = first.changes()["rig1"]
    for unit in (A, B):
        assert f"Services | Wanted unit {unit}" in changed
        assert f"Services | Serve {unit}: (re)start when changed, prove, else roll back" \
            in changed
        state = service(rig, unit)
        assert (state["ActiveState"], state["UnitFileState"], state["User"]) == (
            "active", "enabled", "llama")
        assert starts(rig, unit) == 1  # a first start, no restart on top of it
    assert "gpus: no NVIDIA GPUs (gpu_count 0), power settings skipped" in first.stderr
    assert "garage-server-check: llama-server-b.service: proven: healthy after" in first.stderr
    assert "tool call and tool result OK" in first.stderr
    verify_units(rig, A, B)
    assert served_ids(rig, 8081) == ["tiny-a"] and served_ids(rig, 8082) == ["tiny-b"]
    pid = sh(rig, f"systemctl show -p MainPID --value {A}")
    # Each argument reached llama-server exactly as written in the inventory.
    argv = sh(rig, f"tr '\\0' '\\n' < /proc/{pid}/cmdline").split("\n")
    build = sh(rig, "readlink /opt/llm-garage/builds/llama/current")  # proven, so current
    assert argv[:3] == [f"/opt/llm-garage/builds/llama/{build}/bin/llama-server", "-m",
                        first_shard(hub)]
    assert argv[argv.index("--chat-template") + 1] == awkward
    assert sh(rig, f"ps -o user= -p {pid}") == "llama"
    # The memory fact finds both servers among the rig's processes, with what they hold.
    servers = parse_memory(sh(rig, MEMORY_COMMAND).splitlines())["servers"]
    assert {p: s["unit"] for p, s in servers.items()} == {
        int(service(rig, u)["MainPID"]): u for u in (A, B)}
    assert all(s["rss_kib"] > 0 for s in servers.values()), servers

    # No-op runs leave both servers alone.
    before = {u: service(rig, u) for u in (A, B)}
    third = pyinfra_run(inventory, env=env)
    assert third.changes() == {}
    assert {u: service(rig, u) for u in (A, B)} == before

    # An argument of one profile changes: that one restarts, once; the other is untouched.
    profiles["a"]["ctx_size"] = 8192
    converge(write_inventory({"rig1": rig_data(hub, git_url, profiles)}), env=env)
    assert service(rig, B) == before[B]
    assert service(rig, A)["MainPID"] != before[A]["MainPID"]
    assert starts(rig, A) == 2 and starts(rig, B) == 1
    assert "-c 8192" in sh(rig, f"ps -o args= -p {service(rig, A)['MainPID']}")


def test_engine_tag_bump_restarts_the_services_on_that_engine_once(
        start_rigs, write_inventory, converge, hub, git_url, repos, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    _, repo = repos

    def inventory(ref):
        engines = {"llama": engine(git_url, ref), "stable": engine(git_url, "b6")}
        profiles = {"a": profile(8081), "b": profile(8082),
                    "c": profile(8083, engine="stable")}
        return write_inventory({"rig1": rig_data(hub, git_url, profiles, engines=engines)})

    converge(inventory("b6"), env=env)
    before = {u: service(rig, u) for u in (A, B, C)}
    converge(inventory("b8"), env=env)

    version = sh(rig, "/opt/llm-garage/builds/llama/current/bin/llama-server --version 2>&1")
    assert f"version: 8 ({repo.short(repo.tags['b8'])})" in version
    for unit in (A, B):
        assert service(rig, unit)["MainPID"] != before[unit]["MainPID"]
        assert starts(rig, unit) == 2
    assert service(rig, C) == before[C] and starts(rig, C) == 1


def test_a_server_that_never_gets_ready_fails_the_run_and_the_others_stay_up(
        start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    rig1, rig2 = start_rigs("rig1", "rig2")
    env = controller_env(tmp_path)
    bad = profile(8081, health_timeout_s=4,
                  environment={"FIXTURE_LOAD_SECONDS": "0.3", "FIXTURE_NEVER_READY": "1"})
    hosts = {"rig1": rig_data(hub, git_url, {"a": bad, "b": profile(8082)}),
             "rig2": rig_data(hub, git_url, {"c": profile(8081)})}
    inventory = write_inventory(hosts)

    failed = pyinfra_run(inventory, env=env, expect_ok=False)

    assert not failed.ok and failed.hosts["rig1"].failed, failed.summary()
    assert "/health did not answer 200 within 4 s (last: 503 (model loading)" in failed.stderr
    assert f"--- last 40 lines of journalctl -u {A} ---" in failed.stderr
    assert "srv    load_model: loading model" in failed.stderr  # the journal itself
    assert f"failed to start or to answer: {A}" in failed.stderr
    # The other profile of that host and the other host converged and serve.
    assert failed.hosts["rig2"].errors == 0 and not failed.hosts["rig2"].failed
    assert served_ids(rig1, 8082) == ["b"] and served_ids(rig2, 8081) == ["c"]
    # Never proven, so nothing to roll back to: left stopped and disabled, not looping.
    assert "no earlier proven unit to go back to: left stopped" in failed.stderr
    assert (service(rig1, A)["ActiveState"], service(rig1, A)["UnitFileState"]) == (
        "inactive", "disabled")
    # The failure is recorded: the next run says so again without starting it again.
    tries = starts(rig1, A)
    again = pyinfra_run(inventory, env=env, expect_ok=False)
    assert again.hosts["rig1"].failed and not again.hosts["rig2"].failed
    assert f"{A}: these inputs already failed their proof (health failed: /health did not " \
        "answer 200 within 4 s" in again.stderr
    assert starts(rig1, A) == tries and again.changes() == {}

    # Disabling the profile stops and removes its service; the healthy one is not restarted.
    b_before = service(rig1, B)
    hosts["rig1"]["profiles"]["a"]["enabled"] = False
    first, _ = converge(write_inventory(hosts), env=env)
    assert ("Services | Stop and remove services of disabled or removed profiles"
            in first.changes()["rig1"])
    assert service(rig1, A)["ActiveState"] == "inactive"
    assert sh(rig1, f"ls /etc/systemd/system/{A} 2>&1 || true").endswith(
        "No such file or directory")
    assert service(rig1, B) == b_before


def test_the_api_key_stays_out_of_output_argv_and_readable_files(
        start_rigs, write_inventory, converge, hub, git_url, tmp_path):
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path, **{API_KEY_ENV: API_KEY})
    profiles = {"a": profile(8081, api_key_env=API_KEY_ENV)}
    inventory = write_inventory({"rig1": rig_data(hub, git_url, profiles)})

    first, second = converge(inventory, "deploy.py", "--diff", "-vv", env=env)

    for result in (first, second):
        assert API_KEY not in result.stdout + result.stderr
    assert (chat(rig, 8081), chat(rig, 8081, "wrong-key"), chat(rig, 8081, API_KEY)) == (
        401, 401, 200)
    # Not on any command line...
    assert API_KEY not in rig.ssh("ps -eo args").stdout
    assert API_KEY not in rig.ssh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '",
                                  check=False).stdout
    # ...nor in the unit, nor in any file others can read.
    assert API_KEY not in sh(rig, f"cat /etc/systemd/system/{A}")
    holders = sh(rig, f"grep -rlsF -- {API_KEY} /etc /opt /srv /var /tmp /root /run /home "
                      "|| true").split()
    assert "/etc/llm-garage/llama-server-a.key" in holders
    modes = sh(rig, "stat -c '%a %n' " + " ".join(holders)).splitlines()
    assert all(int(m.split()[0], 8) & 0o044 == 0 for m in modes), modes
    assert sh(rig, "stat -c '%a %U' /etc/llm-garage") == "700 root"
    # A new key restarts the server once, with the new key.
    new_key = API_KEY + "-rotated"
    converge(inventory, env={**env, API_KEY_ENV: new_key})
    assert (chat(rig, 8081, API_KEY), chat(rig, 8081, new_key)) == (401, 200)
    assert starts(rig, A) == 2
