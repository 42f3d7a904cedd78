"""Progress while long work runs: on a test rig, a build and a throttled download each show
paced progress lines in pyinfra's output as they run, with the rig's name; a no-op run shows
none; the Hugging Face token never appears."""

from __future__ import annotations

import re

import pytest

from lab.serving import controller_env
from lab.standins.engine_repo import GitDaemon, build_engine_repo
from lab.standins.gguf_gen import write_padded_model
from lab.standins.hf_server import HFServer

pytestmark = pytest.mark.e2e

TOKEN = "hf_progress_token_never_shown_51c0de"
GATED = "garage/Gated-Progress-GGUF"
FILE = "Progress-Q8_0.gguf"
SIZE = 24_000_000

DEPLOY = """\
from pyinfra import host

from llm_garage.fleet import rig_for
from tasks import base, engines, models

rig = rig_for(host)
base.prepare(rig)
engines.converge(rig)
models.converge(rig)
"""

BUILD = re.compile(r"^\[rig1\] +garage-build: llama (compiling|compiled): (\d+) % \((\d+) steps? "
                   r"done\)", re.M)
FETCH = re.compile(r"^\[rig1\] +garage-fetch: " + re.escape(FILE) +
                   r": ([\d.]+) MB of 24\.00 MB \((\d+) %\), [\d.]+ MB/s, about [\d.]+ s left$",
                   re.M)


def test_a_build_and_a_throttled_download_show_progress_and_a_noop_run_none(
        fleet, start_rigs, write_inventory, converge, tmp_path):
    repo = build_engine_repo(tmp_path / "engines", "llama.cpp", n_commits=6, n_units=8,
                             unit_weight=8)
    hub = HFServer(bind=fleet.host_ip, token=TOKEN)
    hub.add_repo(GATED, {FILE: write_padded_model(tmp_path / FILE, SIZE)}, gated=True)
    hub.faults.throttle(FILE, 6_000_000)  # about 4 s
    (rig,) = start_rigs("rig1")
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY)
    env = controller_env(tmp_path, HF_TOKEN=TOKEN, GARAGE_PROGRESS_INTERVAL="0.2",
                         GARAGE_PROGRESS_STEP="10")
    with GitDaemon(tmp_path / "engines", bind_ip=fleet.host_ip) as daemon, hub:
        inventory = write_inventory({"rig1": {
            "hf_endpoint": hub.url,
            "engines": {"llama": {"kind": "llama.cpp", "ref": "b6", "cuda": False,
                                  "remote": f"{daemon.url}/llama.cpp.git"}},
            "models": {"gated": {"repo": GATED, "revision": "main", "files": [FILE]}},
        }})
        first, second = converge(inventory, str(deploy), env=env)
    assert repo.tags["b6"]
    out = first.stderr
    # the build: paced lines that grow, then the one that ends at the whole target
    build = [(kind, int(pct), int(steps)) for kind, pct, steps in BUILD.findall(out)]
    assert len(build) >= 2, out
    assert [k for k, _, _ in build] == ["compiling"] * (len(build) - 1) + ["compiled"]
    percents = [p for _, p, _ in build]
    # a line after 6 intervals without a step may repeat the numbers; they never go back
    assert percents == sorted(percents) and len(set(percents)) >= 2
    assert percents[-1] == 100
    assert out.count("; log: /opt/llm-garage/builds/llama/") == 1  # the log path, once
    # the download: paced lines that grow, then the file's end line and the model's total
    fetch = [(float(mb), int(pct)) for mb, pct in FETCH.findall(out)]
    assert len(fetch) >= 2, out
    assert [mb for mb, _ in fetch] == sorted(mb for mb, _ in fetch)
    assert fetch[-1][0] < 24.0
    assert re.search(rf"\[rig1\] +garage-fetch: {re.escape(FILE)}: sha256 verified, in place "
                     r"\(24\.00 MB received in [\d.]+ s", out)
    assert re.search(r"\[rig1\] +garage-fetch: gated: 1 file\(s\) downloaded, 24\.00 MB in ", out)
    # the order the user sees: the build's progress while it builds, before the download
    assert out.index("garage-build: llama compiled") < out.index(f"garage-fetch: {FILE}: 24.00")
    # a no-op run: no work, so no progress
    for text in (second.stdout, second.stderr):
        assert "garage-build:" not in text and "garage-fetch:" not in text
    # the token went on stdin only: never in any output, nor in what the rig logged
    for result in (first, second):
        assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert TOKEN not in rig.ssh("cat /srv/models/gated/.garage/fetch.log "
                                "/opt/llm-garage/builds/llama/*/build.log").stdout
    assert "compiling:" not in rig.ssh("cat /opt/llm-garage/builds/llama/*/build.log").stdout
    # the README's excerpt of what a build and a download print comes from here
    print("\n".join(line for line in out.splitlines()
                    if re.search(r"\[rig1\] +(garage-build|garage-fetch|Building|Built|fetching)",
                                 line)))
