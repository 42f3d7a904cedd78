# The local sandbox rig that `./scripts/sandbox` boots, as a pyinfra inventory:
#
#     ./scripts/sandbox                                  # boots it and deploys (twice)
#     .venv/bin/pyinfra -y inventory/sandbox.py deploy.py
#     .venv/bin/llm-garage check inventory/sandbox.py
#
# Where the rig is and what it serves come from the sandbox's state file, written by
# `./scripts/sandbox`: $GARAGE_SANDBOX_STATE, else
# <$GARAGE_RIG_STATE or /var/tmp/llm-garage-rigs>/<$GARAGE_SANDBOX_NAME or sandbox>/sandbox.json.
#
# One rig, `sandbox`: a CPU-only llama.cpp build, one small GGUF model served on port 8080,
# one (stand-in) RTX 3090 with a power limit, and opencode.json listing the model.

import json
import os
from pathlib import Path

_STATE_VERSION = 1


class SandboxNotUp(RuntimeError):
    """The sandbox's state file is missing or unreadable."""


def _state_path() -> Path:
    explicit = os.environ.get("GARAGE_SANDBOX_STATE")
    if explicit:
        return Path(explicit)
    root = Path(os.environ.get("GARAGE_RIG_STATE") or "/var/tmp/llm-garage-rigs")
    return root / (os.environ.get("GARAGE_SANDBOX_NAME") or "sandbox") / "sandbox.json"


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise SandboxNotUp(
            f"no sandbox state at {path}: the sandbox is not up. Run ./scripts/sandbox first "
            f"(or set GARAGE_SANDBOX_STATE to the state file of a sandbox that is up)."
        ) from None
    except (OSError, ValueError) as e:
        raise SandboxNotUp(f"cannot read the sandbox state {path} ({e}); run "
                           f"./scripts/sandbox down, then ./scripts/sandbox") from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise SandboxNotUp(f"{path} was written by another version of ./scripts/sandbox; run "
                           f"./scripts/sandbox down, then ./scripts/sandbox")
    return state


def _host_data(state: dict, docs_dir: Path | None = None) -> dict:
    """The sandbox host's data: SSH connection from the state, then the llm-garage settings;
    the rig document goes to `docs_dir` (beside the state file), bench results beside it."""
    engine, model = state["engine"], state["model"]
    data = dict(state["ssh"])
    if state.get("sudo"):
        data["_sudo"] = True
    if state.get("rig_address"):
        data["rig_address"] = state["rig_address"]
    data.update({
        "gpu_count": 1,  # one RTX 3090 (nvidia-smi stand-in): power limits 100-350 W
        "gpu_power_limit_w": 280,
        "hf_endpoint": model["hf_endpoint"],
        "engines": {
            "llama": {
                "kind": "llama.cpp",
                "remote": engine["remote"],
                "ref": engine["ref"],
                "cuda": False,  # CPU-only build: the sandbox has no real GPU
                **({"cmake_extra": engine["cmake_extra"]} if engine.get("cmake_extra") else {}),
            },
        },
        "models": {
            "tiny": {
                "repo": model["repo"],
                "revision": model["revision"],
                "files": [model["file"]],
            },
        },
        "profiles": {
            "tiny": {
                "model": "tiny",
                "engine": "llama",
                "port": 8080,
                "alias": model["alias"],
                "ctx_size": model.get("ctx_size", 2048),
            },
        },
        "opencode_client": True,
    })
    if docs_dir is not None:
        data["docs_dir"] = str(docs_dir)
        data["bench_dir"] = str(docs_dir.parent / "bench-results")  # `llm-garage bench`
    return data


_STATE = _state_path()
sandbox = [("sandbox", _host_data(_load_state(_STATE), _STATE.parent / "docs"))]
