"""The memory plan at deploy time, on a test rig whose fake GPU is almost full of another
process: the deploy refuses the profile while the run is prepared (no byte fetched, nothing
changed), suggests a ctx_size that fits, deploys with it, and with `memory_check: warn` only
warns."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

from lab.rigs.pyinfra_results import REPO_ROOT
from lab.serving import controller_env
from lab.standins.gguf_gen import write_hybrid_model
from lab.standins.gpu import fake_gpu_files
from lab.standins.hf_server import HFServer
from llm_garage import fit
from llm_garage.fit import MIB
from llm_garage.lock import Lock
from llm_garage.settings import load_rig

pytestmark = pytest.mark.e2e
log = logging.getLogger("garage.tests")

REPO = "garage/Hybrid-GGUF"
MODEL = {"repo": REPO, "revision": "main", "quant": "Q4"}
# An RTX 3090 (24576 MiB, 243 reserved by the driver) where another program holds 24272 MiB:
# 60 MiB are free. The hybrid model's 2 attention layers cost 512 B of f16 KV per token:
# 128 MiB at 262,144 tokens.
HELD_BY_OTHERS = 24272
FREE = 24576 - 243 - 1 - HELD_BY_OTHERS

# Memory check, base and models: what this file tests, without building an engine.
FIT_DEPLOY = """\
from pyinfra import host

from llm_garage.fleet import rig_for
from tasks import base, memory, models

rig = rig_for(host)
memory.check(rig)
base.prepare(rig)
models.converge(rig)
"""


@pytest.fixture
def hub(fleet, tmp_path):
    files = write_hybrid_model(tmp_path / "Hybrid-Q4.gguf")
    server = HFServer(bind=fleet.host_ip)
    server.add_repo(REPO, {f"Q4/{p.name}": p for p in files})
    with server:
        yield server


def test_a_profile_that_does_not_fit_is_refused_before_any_download(
        hub, start_rigs, write_inventory, converge, pyinfra_run, tmp_path):
    rig, = start_rigs(1)
    for path, (content, mode) in fake_gpu_files("rtx3090", 1).items():
        rig.put_text(content.decode(), path, mode)
    rig.put_text(json.dumps({"gpus": [{"model": "rtx3090", "processes": [
        {"pid": 999999, "name": "/usr/bin/other-program", "used_memory_mib": HELD_BY_OTHERS}]}]}),
        "/etc/fake-nvidia/gpus.json")
    deploy = tmp_path / "fit_deploy.py"
    deploy.write_text(FIT_DEPLOY)
    env = controller_env(tmp_path)
    lock_path = tmp_path / "inventory.lock.json"

    def data(**settings):
        profile = {"model": "hybrid", "engine": "llama", "port": 8000, "ctx_size": 262144,
                   **settings}
        return {
            "hf_endpoint": hub.url, "gpu_count": 1,
            "gpu_compute_reserve_mib": 0, "models_lock": str(lock_path),
            # what the inventory declares is not what the rig has: the rig's nvidia-smi wins
            "gpu_memory_mib": 24576,
            "engines": {"llama": {"kind": "llama.cpp", "ref": "b1"}},
            "models": {"hybrid": MODEL}, "profiles": {"h": profile}}

    def inventory(**settings):
        return write_inventory({"rig1": data(**settings)})

    inv = inventory()
    locked = subprocess.run([sys.executable, "-m", "llm_garage.cli", "lock", str(inv)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                            env={"PATH": "/usr/bin:/bin", **env})
    assert locked.returncode == 0, locked.stderr
    hub.stats.reset()

    refused = pyinfra_run(inv, str(deploy), env=env, expect_ok=False)

    assert not refused.ok and refused.changed == 0
    text = refused.stdout + refused.stderr
    assert "host rig1: 1 profile(s) would run out of memory; nothing was changed on any host " \
           "and no model file was downloaded" in text, text[-3000:]
    short = re.search(
        r"rig1: profile h does not fit: CUDA0 \(GPU 0\) needs ([\d,.]+) MiB of memory but has "
        rf"{FREE}\.0 MiB \(nvidia-smi: 24,576 MiB total, 24,516 MiB held by others\): "
        r"([\d,.]+) MiB short; it fits with any one of: ctx_size: (\d+)", text)
    assert short, text[-3000:]
    log.info("refusal:\n%s", text[text.index("host rig1: 1 profile(s)"):])
    needs, missing, ctx = float(short[1].replace(",", "")), short[2], int(short[3])
    settings, errors = load_rig("rig1", data())
    assert not errors, errors
    planned = fit.plan(Lock.load(lock_path).layouts["hybrid"],
                       fit.options_for(settings, "h")).device("CUDA0")
    assert planned.kv == 128 * MIB and needs == round(planned.total / MIB, 1)
    assert float(missing) == pytest.approx(needs - FREE, abs=0.1)
    assert ctx % 256 == 0 and 100_000 < ctx < FREE * 2048  # 512 B per token
    assert [r for r in hub.stats.requests if r["kind"] in ("resolve", "cdn")] == []
    assert rig.ssh("test -e /srv/models", check=False).returncode == 1

    # the suggested context fits: the deploy goes on and fetches the model
    converge(inventory(ctx_size=ctx), str(deploy), env=env)
    assert rig.ssh("ls /srv/models/hybrid/*/Hybrid-Q4.gguf", check=False).returncode == 0

    warned = pyinfra_run(inventory(memory_check="warn"), str(deploy), env=env)
    assert "rig1: profile h does not fit: CUDA0 (GPU 0)" in warned.stderr
    assert "(memory_check: warn: deploying anyway)" in warned.stderr
