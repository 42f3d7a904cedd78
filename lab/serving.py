"""What the end-to-end tests of services, GPUs and opencode, and bench/rigs_bench.py, share: a
fixture engine repository (llama.cpp flavour, tags b6 and b8 that build, b9 to b12 that build
a faulty server), a fake Hugging Face hub with a tiny split model, host data for rigs that
serve it, and readings taken on the rigs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from lab.standins.engine_repo import FAULTS, EngineRepo, build_engine_repo
from lab.standins.gguf_gen import write_split_model
from lab.standins.gpu import fake_gpu_files
from lab.standins.hf_server import HFServer

MODEL_REPO = "garage/Tiny-GGUF"
MODEL = {"repo": MODEL_REPO, "revision": "main", "quant": "Q4_K_M"}
FIRST_SHARD_NAME = "Tiny-Q4_K_M-00001-of-00002.gguf"
API_KEY = "sk-garage-e2e-5b1f0c9a77d3"
API_KEY_ENV = "GARAGE_E2E_API_KEY"


def make_engine_repo(base: Path) -> EngineRepo:
    """llama.cpp with 8 commits: b3 does not compile, b4 fixes it, b6 and b8 build. Off b8, one
    tag per deliberate server fault (``repo.fault_tags``): b9 tool_history_500, b10
    arguments_object, b11 ctx_clamp, b12 crash_after_health."""
    repo = build_engine_repo(base, "llama.cpp", n_commits=8, n_units=2, unit_weight=2,
                             broken_at=3, faults=FAULTS)
    assert {"b6", "b8"} <= set(repo.tags)
    assert repo.fault_tags == {fault: f"b{9 + i}" for i, fault in enumerate(FAULTS)}
    return repo


def first_shard(hub: HFServer, models_dir: str = "/srv/models") -> str:
    """The file the tiny model's units load: its first shard in the snapshot of the commit
    `main` points at."""
    return f"{models_dir}/tiny/{hub._repo(MODEL_REPO).refs['main'][:12]}/{FIRST_SHARD_NAME}"


def make_hub(bind: str, root: Path) -> HFServer:
    shards = write_split_model(root / "Q4_K_M", "Tiny-Q4_K_M", 2)
    hub = HFServer(bind=bind)
    hub.add_repo(MODEL_REPO, {f"Q4_K_M/{p.name}": p for p in shards})
    return hub


def controller_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment pyinfra runs in: its own HF cache, no token, no API key unless given."""
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_ENDPOINT": "",
            API_KEY_ENV: "", **extra}


def engine(git_url: str, ref: str) -> dict:
    return {"kind": "llama.cpp", "ref": ref, "remote": f"{git_url}/llama.cpp.git", "cuda": False}


def profile(port: int, **settings) -> dict:
    """A profile serving the tiny model; the fixture server loads it in a fraction of a second."""
    return {"model": "tiny", "engine": "llama", "port": port, "ctx_size": 4096,
            "health_timeout_s": 60, "environment": {"FIXTURE_LOAD_SECONDS": "0.3"}, **settings}


def rig_data(hub: HFServer, git_url: str, profiles: dict, *, ref: str = "b6",
             engines: dict | None = None, **extra) -> dict:
    return {"hf_endpoint": hub.url, "models": {"tiny": MODEL},
            "engines": engines or {"llama": engine(git_url, ref)}, "profiles": profiles,
            **extra}


def install_fake_gpus(rig, model, count: int) -> None:
    for path, (content, mode) in fake_gpu_files(model, count).items():
        rig.put_text(content.decode(), path, mode)


def sh(rig, command: str) -> str:
    return rig.ssh(command).stdout.strip()


def service(rig, unit: str) -> dict[str, str]:
    """systemd's view of a unit: ActiveState, MainPID, ActiveEnterTimestampMonotonic..."""
    props = "ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic,UnitFileState,User"
    out = sh(rig, f"systemctl show -p {props} -- {shlex.quote(unit)}")
    return dict(line.split("=", 1) for line in out.splitlines())


def starts(rig, unit: str) -> int:
    """How many times systemd started the unit since boot (its journal)."""
    out = rig.ssh(f"journalctl -b -u {shlex.quote(unit)} -o cat --no-pager | "
                  f"grep -c '^Started {unit}' || true").stdout
    return int(out.strip() or 0)


def http(rig, port: int, path: str, key: str | None = None) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:<port><path> on the rig."""
    header = f"-H {shlex.quote('Authorization: Bearer ' + key)}" if key else ""
    out = rig.ssh(f"curl -s -o /tmp/body -w '%{{http_code}}' {header} "
                  f"http://127.0.0.1:{port}{path}; echo; cat /tmp/body", check=False).stdout
    status, _, body = out.partition("\n")
    return int(status or 0), body


def chat(rig, port: int, key: str | None = None) -> int:
    """HTTP status of a short chat request on the rig (it needs the key when one is set)."""
    header = f"-H {shlex.quote('Authorization: Bearer ' + key)}" if key else ""
    body = shlex.quote(json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 4}))
    out = rig.ssh(f"curl -s -o /dev/null -w '%{{http_code}}' {header} -H "
                  f"'Content-Type: application/json' -d {body} "
                  f"http://127.0.0.1:{port}/v1/chat/completions", check=False).stdout
    return int(out.strip() or 0)


def served_ids(rig, port: int, key: str | None = None) -> list[str]:
    status, body = http(rig, port, "/v1/models", key)
    assert status == 200, body
    return [m["id"] for m in json.loads(body)["data"]]


def gpu_state(rig) -> list[tuple[int, float, str]]:
    """(index, power limit W, persistence) per GPU, from the fake nvidia-smi."""
    out = sh(rig, "nvidia-smi --query-gpu=index,power.limit,persistence_mode "
                  "--format=csv,noheader,nounits")
    rows = [line.split(", ") for line in out.splitlines()]
    return [(int(i), float(w), p) for i, w, p in rows]


def nvidia_calls(rig) -> list[list[str]]:
    """argv of every mutating nvidia-smi call since boot."""
    out = rig.ssh("cat /run/fake-nvidia/calls.log 2>/dev/null || true").stdout
    return [json.loads(line)["argv"] for line in out.splitlines()]


def verify_units(rig, *units: str) -> None:
    """systemd-analyze verify on the rig passes, with nothing to say about our units."""
    paths = " ".join(f"/etc/systemd/system/{u}" for u in units)
    out = rig.ssh(f"systemd-analyze verify --man=no {paths}", check=False)
    assert out.returncode == 0, out.stderr
    complaints = [line for line in out.stderr.splitlines() if any(u in line for u in units)]
    assert complaints == [], out.stderr
