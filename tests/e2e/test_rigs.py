"""The test-rig harness and the idempotence gate, on real rigs and on captured pyinfra output."""

from __future__ import annotations

import ctypes
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

import lab.rigs
from lab.rigs.pyinfra_results import (
    NotConvergedError,
    ResultParseError,
    converge_runs,
    parse_pyinfra_output,
)

SMOKE = "lab/deploys/smoke.py"
PR_SET_CHILD_SUBREAPER = 36

# ---------------------------------------------------------------------------------------------
# captured pyinfra 3.10 output (smoke deploy on two rigs)

TEXT_FIRST = """\
--> Loading config...
--> Loading inventory...
--> Connecting to hosts...
    [rig2] Connected
    [rig1] Connected

--> Preparing operation files...
    Loading: lab/deploys/smoke.py
    [rig1] Ready: lab/deploys/smoke.py
    [rig2] Ready: lab/deploys/smoke.py

--> Skipping change detection
--> Beginning operation run...
--> Starting operation: Write the smoke message
    [rig2] Success
    [rig1] Success

--> Starting operation: Install garage-smoke.service
    [rig2] Success
    [rig1] Success

--> Starting operation: Run garage-smoke.service
    [rig1] Success
    [rig2] Success

--> Results:
    Operation                      Hosts   Success   Error   No Change
    Write the smoke message        2       2         -       -
    Install garage-smoke.service   2       2         -       -
    Run garage-smoke.service       2       2         -       -
    Grand total                    6       6         -       -

--> Disconnecting from hosts...
"""

TEXT_ONE_CHANGE = """\
--> Loading config...
--> Loading inventory...
--> Connecting to hosts...
    [rig2] Connected
    [rig1] Connected

--> Preparing operation files...
    Loading: lab/deploys/smoke.py
    [rig1] Ready: lab/deploys/smoke.py
    [rig2] Ready: lab/deploys/smoke.py

--> Skipping change detection
--> Beginning operation run...
--> Starting operation: Write the smoke message
    [rig2] No changes
    [rig1] Success

--> Starting operation: Install garage-smoke.service
    [rig2] No changes
    [rig1] No changes

--> Starting operation: Run garage-smoke.service
    [rig2] No changes
    [rig1] No changes

--> Results:
    Operation                      Hosts   Success   Error   No Change
    Write the smoke message        2       1         -       1
    Install garage-smoke.service   2       -         -       2
    Run garage-smoke.service       2       -         -       2
    Grand total                    6       1         -       5

--> Disconnecting from hosts...
"""

TEXT_ABORTED = """\
--> Loading config...
--> Loading inventory...
--> Connecting to hosts...
    [rig1] Connected
    [rig2] Connected

--> Preparing exec operation...
    [rig1] Ready: shell
    [rig2] Ready: shell

--> Beginning operation run...
--> Starting operation: server.shell (false)
    [rig2] Error: executed 0 commands
    [rig1] Error: executed 0 commands

--> Disconnecting from hosts...
--> pyinfra error: No hosts remaining!
"""


TEXT_REFUSED = """\
--> Loading config...
--> Loading inventory...
--> Connecting to hosts...
    [rig1] Connected

--> Preparing operation files...
    Loading: deploy.py

--> Disconnecting from hosts...
1 settings problem(s); nothing was changed on any host:
  - host 'rig1': profiles.a.port: 70000 is out of range (accepted: a whole number from 1 to 65535)
"""


def _json_run(changed: dict[str, list[str]], hosts=("rig1", "rig2")) -> str:
    ops = ["Write the smoke message", "Install garage-smoke.service", "Run garage-smoke.service"]
    operations = []
    for op in ops:
        success = sorted(h for h in hosts if op in changed.get(h, []))
        operations.append(
            {
                "op_hash": op,
                "name": op,
                "names": [op],
                "args": [],
                "hosts": len(hosts),
                "success": success,
                "error": [],
                "no_change": sorted(set(hosts) - set(success)),
            }
        )
    n_changed = sum(len(v) for v in changed.values())
    return json.dumps(
        {
            "plan": [],
            "results": {
                "operations": operations,
                "totals": {
                    "hosts": len(ops) * len(hosts),
                    "success": n_changed,
                    "error": 0,
                    "no_change": len(ops) * len(hosts) - n_changed,
                },
                "failed_hosts": [],
            },
        }
    )


# ---------------------------------------------------------------------------------------------
# unit tests: the parser and the gate, no rigs


@pytest.mark.parametrize("padding", ["", "    "])  # pyinfra pads table cells with spaces
def test_parser_reads_text_results_per_host(padding):
    text = "".join(line + padding + "\n" for line in TEXT_ONE_CHANGE.splitlines())
    result = parse_pyinfra_output("", text, 0)
    assert result.source == "text" and result.ok
    assert result.changes() == {"rig1": ["Write the smoke message"]}
    assert (result.hosts["rig1"].changed, result.hosts["rig1"].no_change) == (1, 2)
    assert (result.hosts["rig2"].changed, result.hosts["rig2"].no_change) == (0, 3)
    assert result.totals == {"hosts": 6, "success": 1, "error": 0, "no_change": 5}


def test_parser_reads_json_results_per_host():
    result = parse_pyinfra_output(_json_run({"rig2": ["Run garage-smoke.service"]}), "", 0)
    assert result.source == "json" and result.ok
    assert result.changes() == {"rig2": ["Run garage-smoke.service"]}
    assert result.hosts["rig1"].no_change == 3


def test_parser_reports_an_aborted_run_as_failed():
    result = parse_pyinfra_output("", TEXT_ABORTED, 1)
    assert not result.ok
    assert result.error == "No hosts remaining!"
    assert result.hosts["rig1"].error_ops == ["server.shell (false)"]
    assert result.hosts["rig2"].failed


def test_parser_reports_a_refused_run_with_its_message():
    result = parse_pyinfra_output("", TEXT_REFUSED, 1)
    assert not result.ok and result.source == "log-only" and result.hosts == {}
    assert result.error == "1 settings problem(s); nothing was changed on any host:"
    with pytest.raises(ResultParseError):  # the same words in a run that succeeded are no error
        parse_pyinfra_output("", TEXT_REFUSED, 0)


@pytest.mark.parametrize(
    "stdout, stderr, rc",
    [
        ("", "", 0),
        ("", "Segmentation fault\n", 0),
        ("", "--> Loading config...\n--> Beginning operation run...\n", 0),
        ("", "some unrelated failure\n", 1),
        ('{"plan": []', "", 0),  # truncated JSON
        ('{"plan": []}', "", 0),  # JSON without results
        ("", re.sub(r"\n +Grand total[^\n]*", "", TEXT_ONE_CHANGE), 0),  # table cut short
        (
            "",
            TEXT_ONE_CHANGE.replace("2       1         -       1", "2       one       -       1"),
            0,
        ),  # garbled cell
        (
            "",
            TEXT_ONE_CHANGE.replace(
                "Grand total                    6       1",
                "Grand total                    6       0",
            ),
            0,
        ),
        ("", TEXT_ONE_CHANGE.replace("    [rig1] Success\n", ""), 0),  # log and table disagree
    ],
)
def test_parser_rejects_output_it_cannot_read(stdout, stderr, rc):
    with pytest.raises(ResultParseError):
        parse_pyinfra_output(stdout, stderr, rc)


def _fake_runner(*outputs: tuple[str, str, int]):
    calls = list(outputs)

    def run(inventory, deploy, *extra_args, env=None):
        stdout, stderr, rc = calls.pop(0)
        return parse_pyinfra_output(stdout, stderr, rc, args=["pyinfra", str(inventory)])

    return run


def test_gate_fails_when_the_second_run_changes_something():
    runner = _fake_runner(("", TEXT_FIRST, 0), ("", TEXT_ONE_CHANGE, 0))
    with pytest.raises(NotConvergedError, match=r"(?s)not idempotent.*\[rig1\] Write the smoke"):
        converge_runs("inventory.py", SMOKE, runner=runner)


def test_gate_fails_when_the_second_run_changes_something_json():
    runner = _fake_runner(
        (_json_run({"rig1": ["x"]}), "", 0),
        (_json_run({"rig2": ["Install garage-smoke.service"]}), "", 0),
    )
    with pytest.raises(NotConvergedError, match=r"\[rig2\] Install garage-smoke.service"):
        converge_runs("inventory.py", SMOKE, runner=runner)


def test_gate_fails_when_the_first_run_fails():
    runner = _fake_runner(("", TEXT_ABORTED, 1), ("", TEXT_FIRST, 0))
    with pytest.raises(NotConvergedError, match="deploy failed"):
        converge_runs("inventory.py", SMOKE, runner=runner)


def test_gate_fails_on_unreadable_second_run():
    runner = _fake_runner(("", TEXT_FIRST, 0), ("", "garbage\n", 0))
    with pytest.raises(ResultParseError):
        converge_runs("inventory.py", SMOKE, runner=runner)


def test_gate_passes_when_the_second_run_changes_nothing():
    runner = _fake_runner(("", TEXT_FIRST, 0), (_json_run({}), "", 0))
    first, second = converge_runs("inventory.py", SMOKE, runner=runner)
    assert first.changed == 6 and second.changed == 0


GATE_TESTS = """
import pytest
from lab.rigs.pyinfra_results import parse_pyinfra_output

NO_CHANGES = {no_changes!r}

def runner(inventory, deploy, *extra_args, env=None):
    return parse_pyinfra_output(NO_CHANGES, "", 0)

@pytest.mark.e2e
def test_forgets_the_gate():
    pass

@pytest.mark.e2e
def test_passes_the_gate(converge):
    converge("inventory.py", "deploy.py", runner=runner)

def test_not_e2e():
    pass
"""


def test_e2e_tests_must_pass_the_gate(pytester, monkeypatch, repo_root):
    monkeypatch.setattr(lab.rigs, "missing_requirements", lambda: [])
    pytester.syspathinsert(repo_root)
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makepyfile(test_gate=GATE_TESTS.format(no_changes=_json_run({})))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_forgets_the_gate*never passed the idempotence gate*"])


def test_e2e_tests_fail_without_rig_tools_unless_skipped(pytester, monkeypatch, repo_root):
    monkeypatch.setattr(lab.rigs, "missing_requirements", lambda: ["command 'debootstrap'"])
    pytester.syspathinsert(repo_root)
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makepyfile(test_gate=GATE_TESTS.format(no_changes=_json_run({})))
    monkeypatch.delenv("GARAGE_SKIP_E2E", raising=False)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*e2e tests need command 'debootstrap'*"])
    monkeypatch.setenv("GARAGE_SKIP_E2E", "1")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)


# ---------------------------------------------------------------------------------------------
# e2e: real rigs


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(path))]


def _leftovers(entry: dict, pids: list[int]) -> list[str]:
    """Everything a fleet created that is still there."""
    found = [f"pid {pid}" for pid in pids if _pid_alive(pid)]
    found += (
        [f"netns {ns}" for ns in os.listdir("/run/netns") if ns.startswith(f"grg{entry['index']}-")]
        if os.path.isdir("/run/netns")
        else []
    )
    found += [f"mount {m}" for m in _mounts_under(Path(entry["dir"]))]
    if Path(f"/sys/class/net/{entry['bridge']}").exists():
        found.append(f"bridge {entry['bridge']}")
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    found += [
        f"iptables {line}" for line in rules.splitlines() if f"llm-garage {entry['bridge']}" in line
    ]
    if Path(entry["dir"]).exists():
        found.append(f"dir {entry['dir']}")
    if any(e["name"] == entry["name"] for e in lab.rigs.list_fleets()):
        found.append(f"registry entry {entry['name']}")
    return found


class _HostServer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"garage-host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.e2e
def test_two_rigs_boot_converge_and_reboot(
    fleet, start_rigs, write_inventory, converge, pyinfra_run
):
    rigs = start_rigs("rig1", "rig2")
    assert [r.name for r in rigs] == ["rig1", "rig2"]
    assert fleet.rig("rig2") is rigs[1]

    server = http.server.ThreadingHTTPServer((fleet.host_ip, 0), _HostServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        facts = {}
        for rig in rigs:
            out = rig.ssh(
                "cat /proc/1/comm; systemctl is-system-running; hostname; cat /etc/machine-id;"
                " ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2;"
                f" curl -fsS --max-time 5 http://{fleet.host_ip}:{port}/"
            ).stdout.split()
            facts[rig.name] = out
            assert out[0] == "systemd", out
            assert out[1] in ("running", "degraded"), out
            assert out[2] == rig.name
            assert re.fullmatch(r"[0-9a-f]{32}", out[3])
            assert out[5] == "garage-host"
    finally:
        server.shutdown()
        server.server_close()
    assert facts["rig1"][3] != facts["rig2"][3], "machine-ids must differ"
    assert facts["rig1"][4] != facts["rig2"][4], "SSH host keys must differ"

    inventory = write_inventory(
        {
            "rig1": {"smoke_message": "one", "smoke_port": 8077},
            "rig2": {"smoke_message": "two 'quoted' \"data\""},
        }
    )
    first, second = converge(inventory, SMOKE)
    assert set(first.changes()) == {"rig1", "rig2"}
    assert first.hosts["rig1"].changed == 3
    for rig, message in ((rigs[0], "one"), (rigs[1], "two 'quoted' \"data\"")):
        with urllib.request.urlopen(f"http://{rig.ip}:8077/hello.txt", timeout=5) as resp:
            assert resp.read().decode() == message + "\n"

    # A change on one rig shows up, by host and operation, and converges back.
    rigs[0].ssh("rm /var/lib/garage-smoke/hello.txt")
    result = pyinfra_run(inventory, SMOKE)
    assert result.changes() == {"rig1": ["Write the smoke message"]}

    # Reboot: the disk (upper dir) survives, /run is a fresh tmpfs, enabled units come back.
    rigs[0].put_text("persisted\n", "/var/lib/garage-test/keep.txt", mode=0o600)
    rigs[0].ssh("echo gone > /run/garage-test-marker")
    boot_id = rigs[0].ssh("cat /proc/sys/kernel/random/boot_id").stdout
    rigs[0].reboot()
    assert rigs[0].ssh("cat /proc/sys/kernel/random/boot_id").stdout != boot_id
    assert rigs[0].ssh("cat /var/lib/garage-test/keep.txt").stdout == "persisted\n"
    assert rigs[0].ssh("stat -c %a /var/lib/garage-test/keep.txt").stdout.strip() == "600"
    assert rigs[0].ssh("test -e /run/garage-test-marker", check=False).returncode == 1
    assert rigs[0].ssh("systemctl is-active garage-smoke.service").stdout.strip() == "active"
    after_reboot = pyinfra_run(inventory, SMOKE)
    assert after_reboot.changed == 0, after_reboot.summary()


@pytest.mark.e2e
def test_teardown_and_crash_cleanup_leave_nothing_behind(tmp_path, converge, repo_root):
    with lab.rigs.Fleet() as fleet:
        rigs = fleet.start(["alpha", "beta"])
        entry = dict(fleet.entry)
        pids = [rig.pid for rig in rigs]
        assert all(_pid_alive(pid) for pid in pids)
        assert len(_mounts_under(fleet.dir)) == 2
        rigs[1].put(repo_root / "pyproject.toml", "/root/pyproject.toml")
        assert (
            rigs[1].ssh("md5sum < /root/pyproject.toml").stdout.split()[0]
            == subprocess.run(
                ["md5sum"], input=(repo_root / "pyproject.toml").read_bytes(), capture_output=True
            )
            .stdout.decode()
            .split()[0]
        )
        converge(fleet.write_inventory(tmp_path / "inventory.py", ["alpha", "beta"]), SMOKE)
    assert _leftovers(entry, pids) == []

    # A fleet whose owner dies (SIGKILL, no teardown) is cleaned up by the next fleet.
    script = (
        "import json, os, signal\n"
        "import lab.rigs\n"
        "fleet = lab.rigs.Fleet()\n"
        "rig, = fleet.start(['crash'])\n"
        "print(json.dumps({'entry': fleet.entry, 'pid': rig.pid}), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    # Orphans are adopted by this process rather than by init (which may not reap them), so
    # the killed rig does not linger as a zombie.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert proc.returncode == -9, proc.stderr
    crashed = json.loads(proc.stdout)
    assert _pid_alive(crashed["pid"]), "the crashed fleet's rig should outlive its owner"
    lab.rigs.cleanup_stale()  # (a concurrent session may have done it already)
    assert _leftovers(crashed["entry"], [crashed["pid"]]) == []
