"""The real opencode CLI (npm opencode-ai, installed by scripts/setup), run on a config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPENCODE_VERSION = "1.18.33"
OPENCODE_CACHE_BIN = REPO / ".cache" / "opencode" / "node_modules" / ".bin" / "opencode"


def opencode_bin() -> str:
    """$OPENCODE_BIN, else the copy scripts/setup installs. Missing, the calling test fails
    where the CLI is expected (CI set, or OPENCODE_BIN named, as scripts/test and so .ci/run
    do) and is skipped elsewhere."""
    path = os.environ.get("OPENCODE_BIN") or str(OPENCODE_CACHE_BIN)
    if Path(path).exists() and os.access(path, os.X_OK):
        return path
    reason = (f"opencode CLI not found at {path}: run scripts/setup (npm install "
              f"opencode-ai@{OPENCODE_VERSION}) or set OPENCODE_BIN")
    if os.environ.get("CI") or os.environ.get("OPENCODE_BIN"):
        pytest.fail(reason)
    pytest.skip(reason)


def opencode_home(config: dict | str, tmp_path: Path) -> Path:
    """A HOME whose global opencode.json is `config` (a dict, or the file's text)."""
    home = tmp_path / "opencode-home"
    (home / ".config" / "opencode").mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config, indent=2)
    (home / ".config" / "opencode" / "opencode.json").write_text(text)
    return home


def run_opencode(home: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 180) -> subprocess.CompletedProcess:
    run_env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "OPENCODE_DISABLE_AUTOUPDATE": "1", **(env or {})}
    return subprocess.run([opencode_bin(), *args], capture_output=True, text=True, env=run_env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def opencode_models(config: dict | str, tmp_path: Path) -> list[str]:
    """`opencode models` with `config` as the user's opencode.json; fails on a config that
    opencode calls invalid."""
    proc = run_opencode(opencode_home(config, tmp_path), "models")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "invalid" not in output, output
    return proc.stdout.split()
