"""Refusals end a run with their message alone: the text, the classes raised as refusals, the
context manager outside pyinfra's CLI, and the real `pyinfra` CLI on an inventory it refuses
(the local machine as its one host; the run stops before any operation is added)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_garage.fleet import SettingsError
from llm_garage.hf import HfError
from llm_garage.lock import LockError
from llm_garage.operations.gpu import GpuError
from llm_garage.plans.engines import EngineError
from llm_garage.refusal import Refusal, refusal_text, refusals_end_the_run
from llm_garage.schema import SettingProblem

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).parent / "pyinfra"


def test_every_problem_found_while_preparing_is_a_refusal():
    for cls in (SettingsError, EngineError, LockError, HfError, GpuError):
        assert issubclass(cls, Refusal), cls


def test_refusal_text_says_nothing_changed_once():
    settings = SettingsError([SettingProblem("garage", "profiles.a.port", "70000 is too big",
                                             "1 to 65535")])
    assert refusal_text(settings) == (
        "1 settings problem(s); nothing was changed on any host:\n"
        "  - host 'garage': profiles.a.port: 70000 is too big (accepted: 1 to 65535)")
    gpu = GpuError("host 'garage': gpu_count is 2 but nvidia-smi lists 1 GPU(s) (0: RTX 3090); "
                   "set gpu_count to what the rig has")
    assert refusal_text(gpu) == (
        "host 'garage': gpu_count is 2 but nvidia-smi lists 1 GPU(s) (0: RTX 3090); set "
        "gpu_count to what the rig has\nNothing was changed on any host.")


def test_outside_pyinfras_cli_a_refusal_goes_on_unchanged(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyinfra_cli.exceptions", raising=False)
    error = LockError("the lock x.json is not valid JSON")
    with pytest.raises(LockError) as caught, refusals_end_the_run():
        raise error
    assert caught.value is error
    with pytest.raises(ValueError), refusals_end_the_run():  # not a refusal: not ours to show
        raise ValueError("boom")


def run_pyinfra(tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    inventory = tmp_path / "inventory.py"
    inventory.write_text(f"hosts = [('@local', {data!r})]\n")
    env = {**os.environ, "PYINFRA_PROGRESS": "off", "NO_COLOR": "1", "HF_TOKEN": ""}
    return subprocess.run([str(PYINFRA), "-y", str(inventory), "deploy.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_cli_prints_one_line_per_problem_and_nothing_else(tmp_path):
    profile = {"model": "m", "engine": "e", "port": 70000, "listen": "everywhere"}
    run = run_pyinfra(tmp_path, {"profiles": {"a": profile}, "power_limit_w": 300})

    assert run.returncode == 1
    # pyinfra's own lines up to the deploy file, then the refusal, and nothing after it.
    head, sep, tail = run.stderr.partition("--> Disconnecting from hosts...\n")
    assert sep and "Loading: deploy.py" in head
    assert tail == (
        "3 settings problem(s); nothing was changed on any host:\n"
        "  - host '@local': power_limit_w: unknown setting (did you mean "
        "'gpu_power_limit_w'?)\n"
        "  - host '@local': profiles.a.port: 70000 is out of range (accepted: a whole number "
        "from 1 to 65535)\n"
        "  - host '@local': profiles.a.listen: 'everywhere' is not an IP address (accepted: an "
        "IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::, or localhost)\n")
    for noise in ("pyinfra error", "Traceback", "deploy.py line", "fleet.py"):
        assert noise not in run.stderr + run.stdout
