"""A fresh minimal Debian 12 rig (systemd, SSH and python3; no git, curl, CA certificates,
compilers, cmake or ccache, and no apt package lists): the first deploy installs what it
needs, builds the engine from its pin, downloads the model, proves the server, and a second
run changes nothing. Before that, a refused run prints its message alone and touches
nothing."""

from __future__ import annotations

import json

import pytest

import lab.rigs
from lab.serving import controller_env, profile, rig_data, served_ids, service, sh
from llm_garage.layout import Layout

pytestmark = pytest.mark.e2e

UNIT = "llama-server-tiny.service"
ABSENT = ("git", "cmake", "cc", "gcc", "c++", "make", "ccache", "curl", "openssl")


@pytest.fixture
def fleet():
    """This module's rigs boot the minimal image (overrides the suite's `fleet`)."""
    with lab.rigs.Fleet(image=lab.rigs.MINIMAL) as fleet:
        yield fleet


def missing_tools(rig) -> list[str]:
    out = rig.ssh("for t in " + " ".join(ABSENT) + "; do command -v $t >/dev/null || echo $t; "
                  "done").stdout
    return out.split()


def test_first_deploy_on_a_minimal_debian_12_converges(
        fleet, start_rigs, write_inventory, converge, pyinfra_run, hub, git_url, tmp_path):
    (rig,) = start_rigs("bare")
    assert fleet.base.name.startswith("minimal-")
    assert missing_tools(rig) == list(ABSENT)
    assert rig.ssh("test -e /etc/ssl/certs/ca-certificates.crt", check=False).returncode == 1
    # No package lists either, as on a fresh cloud or container image.
    assert sh(rig, "ls /var/lib/apt/lists | grep -c _Packages || true") == "0"

    # A refusal first: its message alone, exit status 1, and nothing done on the rig.
    bad = rig_data(hub, git_url, {"tiny": profile(70000)})
    refused = pyinfra_run(write_inventory({"bare": bad}), env=controller_env(tmp_path),
                          expect_ok=False)
    assert refused.returncode == 1 and not refused.ok
    assert refused.stderr.endswith(
        "--> Disconnecting from hosts...\n"
        "1 settings problem(s); nothing was changed on any host:\n"
        "  - host 'bare': profiles.tiny.port: 70000 is out of range (accepted: a whole number "
        "from 1 to 65535)\n")
    assert "pyinfra error" not in refused.stderr and "Traceback" not in refused.stderr
    assert refused.error == "1 settings problem(s); nothing was changed on any host:"
    assert rig.ssh("test -e /opt/llm-garage", check=False).returncode == 1

    inventory = write_inventory({"bare": rig_data(hub, git_url, {"tiny": profile(8080)})})

    first, _ = converge(inventory, env=controller_env(tmp_path))

    changed = first.changes()["bare"]
    for op in ("Base | Install base tools", "Engines | Install build tools",
               f"Services | Serve {UNIT}: (re)start when changed, prove, else roll back"):
        assert op in changed
    assert any(op.startswith("Engines | Build llama b6 ") for op in changed)
    assert "resolved from the controller (no git on the rig yet)" in first.stderr
    assert missing_tools(rig) == []
    assert service(rig, UNIT)["ActiveState"] == "active"
    assert served_ids(rig, 8080) == ["tiny"]
    report = Layout("/opt/llm-garage", "/srv/models").proof_report("tiny")
    proof = json.loads(sh(rig, f"cat {report}"))
    assert proof["ok"] is True and proof["n_ctx"] == 4096
