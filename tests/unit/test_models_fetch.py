"""garage-fetch, the rig-side downloader, run here against the fake Hugging Face endpoint."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lab.standins.hf_server import HFServer

FETCH = Path(__file__).resolve().parents[2] / "llm_garage" / "files" / "garage-fetch"
TOKEN = "hf_fetch_test_token_5555aaaa9999"
REPO = "acme/Fetch-GGUF"
BIG = random.Random(1).randbytes(3_000_000)
SMALL = random.Random(2).randbytes(200_000)
MiB = 1 << 20


@pytest.fixture
def hub():
    server = HFServer(token=TOKEN)
    server.add_repo(REPO, {"q/big.gguf": BIG, "q/small.gguf": SMALL})
    server.add_repo("acme/Gated-GGUF", {"g.gguf": SMALL}, gated=True)
    with server:
        yield server


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_arg(hub, path, data, repo=REPO, sha256=None, size=None):
    commit = hub._repo(repo).refs["main"]
    url = f"{hub.url}/{repo}/resolve/{commit}/{path}"
    return ["--file", path.rsplit("/", 1)[-1], str(size if size is not None else len(data)),
            sha256 or sha(data), url]


def fetch(folder: Path, *files, retries=0, extra=(), stdin=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FETCH), "--dir", str(folder), "--retries", str(retries),
           *extra]
    for f in files:
        cmd += f
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          input=stdin if stdin is not None else "")


def events(folder: Path, kind=None) -> list[dict]:
    log = folder / ".garage" / "fetch.log"
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


def served(hub, name) -> int:
    return hub.stats.bytes_served(f"{REPO}/q/{name}")


def big(hub, **kw):
    return file_arg(hub, "q/big.gguf", BIG, **kw)


def small(hub, **kw):
    return file_arg(hub, "q/small.gguf", SMALL, **kw)


def test_fetch_downloads_verifies_renames_and_stamps(hub, tmp_path):
    out = fetch(tmp_path, big(hub), small(hub))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert (tmp_path / "small.gguf").read_bytes() == SMALL
    assert not list(tmp_path.glob("*.partial"))
    st = os.stat(tmp_path / "big.gguf")
    assert st.st_mode & 0o777 == 0o644
    stamp = (tmp_path / ".garage" / "big.gguf.stamp").read_text().split()
    mtime = f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"  # stat -c %.9Y
    assert stamp == [str(len(BIG)), mtime, sha(BIG)]
    assert served(hub, "big.gguf") == len(BIG)
    assert "big.gguf: 3.00 MB, downloading" in out.stdout
    assert "big.gguf: sha256 verified, in place" in out.stdout
    assert [e["file"] for e in events(tmp_path, "done")] == ["big.gguf", "small.gguf"]


def test_fetch_later_run_trusts_stamps_and_hashes_nothing(hub, tmp_path):
    assert fetch(tmp_path, big(hub), small(hub)).returncode == 0
    before = len(events(tmp_path))
    hub.stats.reset()
    out = fetch(tmp_path, big(hub), small(hub))
    assert out.returncode == 0, out.stderr
    new = events(tmp_path)[before:]
    assert [e["event"] for e in new] == ["trusted", "trusted"]
    assert hub.stats.requests == []
    assert "big.gguf: in place, stamp matches (3.00 MB)" in out.stdout


def test_fetch_resumes_a_partial_file_with_range(hub, tmp_path):
    (tmp_path / "big.gguf.partial").write_bytes(BIG[:MiB])
    out = fetch(tmp_path, big(hub))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG) - MiB  # only the rest went over the wire
    ranges = [r["range"] for r in hub.stats.requests if r["kind"] == "cdn"]
    assert ranges == [f"bytes={MiB}-"]
    hashed = events(tmp_path, "hashed")
    assert hashed == [dict(hashed[0], bytes=MiB, partial=True)]  # the partial, hashed first
    assert "resuming at 1.05 MB" in out.stdout


def test_fetch_starts_over_when_the_server_ignores_range(hub, tmp_path):
    (tmp_path / "big.gguf.partial").write_bytes(BIG[:MiB])
    hub.faults.ignore_range("q/big.gguf")
    out = fetch(tmp_path, big(hub))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG)
    assert "200 instead of 206" in out.stdout
    assert [e["reason"] for e in events(tmp_path, "restart")] == [
        "200 instead of 206 to a Range request"]


def test_fetch_dropped_connection_keeps_the_partial_and_the_next_run_resumes(hub, tmp_path):
    hub.faults.drop_after("q/big.gguf", 1_200_000)
    out = fetch(tmp_path, big(hub), retries=0)
    assert out.returncode == 1
    assert "the partial file is kept: run again to resume" in out.stderr
    assert not (tmp_path / "big.gguf").exists()
    assert (tmp_path / "big.gguf.partial").stat().st_size == 1_200_000
    assert served(hub, "big.gguf") == 1_200_000
    out = fetch(tmp_path, big(hub))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG)  # nothing was transferred twice


def test_fetch_resumes_within_the_run_when_retries_allow(hub, tmp_path):
    hub.faults.drop_after("q/big.gguf", 2_000_000)
    out = fetch(tmp_path, big(hub), retries=2)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG)
    assert len(events(tmp_path, "retry")) == 1


def test_fetch_never_puts_a_corrupt_download_in_place(hub, tmp_path):
    out = fetch(tmp_path, big(hub, sha256="0" * 64))
    assert out.returncode == 1
    assert "the download was discarded and nothing was put in place" in out.stderr
    assert not (tmp_path / "big.gguf").exists()
    assert not (tmp_path / "big.gguf.partial").exists()
    assert not (tmp_path / ".garage" / "big.gguf.stamp").exists()


def test_fetch_bad_partial_is_found_after_resuming_and_the_file_fetched_again(hub, tmp_path):
    (tmp_path / "big.gguf.partial").write_bytes(b"\0" * MiB)
    out = fetch(tmp_path, big(hub))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert served(hub, "big.gguf") == (len(BIG) - MiB) + len(BIG)
    assert "sha256 mismatch after resuming: starting the file over" in out.stdout


def test_fetch_replaces_a_wrong_file_in_place(hub, tmp_path):
    assert fetch(tmp_path, big(hub), small(hub)).returncode == 0
    with open(tmp_path / "big.gguf", "r+b") as f:  # same size, new mtime: not trusted
        f.seek(1000)
        f.write(b"X")
    (tmp_path / "small.gguf").write_bytes(b"short")
    hub.stats.reset()
    out = fetch(tmp_path, big(hub), small(hub))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "big.gguf").read_bytes() == BIG
    assert (tmp_path / "small.gguf").read_bytes() == SMALL
    assert [e["file"] for e in events(tmp_path, "bad")][-2:] == ["big.gguf", "small.gguf"]
    assert served(hub, "big.gguf") == len(BIG)


def test_verify_only_finds_corruption_a_matching_stamp_hides(hub, tmp_path):
    assert fetch(tmp_path, big(hub), small(hub)).returncode == 0
    path = tmp_path / "big.gguf"
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"Y")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as stamped
    out = fetch(tmp_path, big(hub), small(hub))
    assert out.returncode == 0 and "big.gguf: in place, stamp matches" in out.stdout
    out = fetch(tmp_path, big(hub), small(hub), extra=["--verify-only"])
    assert out.returncode == 0, out.stderr
    assert not path.exists() and (tmp_path / "small.gguf").read_bytes() == SMALL
    assert "2 file(s) checked, 1 removed" in out.stdout
    hashed = [e["file"] for e in events(tmp_path, "hashed")]
    assert hashed[-2:] == ["big.gguf", "small.gguf"]
    assert fetch(tmp_path, big(hub), small(hub)).returncode == 0
    assert path.read_bytes() == BIG


def test_fetch_sends_the_token_to_the_endpoint_only_never_to_the_cdn(hub, tmp_path):
    gated = file_arg(hub, "g.gguf", SMALL, repo="acme/Gated-GGUF")
    out = fetch(tmp_path, gated, extra=["--auth-origin", hub.url, "--token-stdin"],
                stdin=TOKEN + "\n")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "g.gguf").read_bytes() == SMALL
    kinds = {(r["kind"], r["auth"]) for r in hub.stats.requests}
    assert kinds == {("resolve", True), ("cdn", False)}
    assert hub.url != hub.cdn_url
    logged = (tmp_path / ".garage" / "fetch.log").read_text()
    assert TOKEN not in out.stdout + out.stderr + logged


def test_fetch_gated_without_token_is_refused(hub, tmp_path):
    out = fetch(tmp_path, file_arg(hub, "g.gguf", SMALL, repo="acme/Gated-GGUF"))
    assert out.returncode == 4
    assert "HTTP 401" in out.stderr and "gated or private: set HF_TOKEN" in out.stderr
    assert not list(tmp_path.glob("g.gguf*"))


def test_fetch_token_file_must_be_private(hub, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    gated = file_arg(hub, "g.gguf", SMALL, repo="acme/Gated-GGUF")
    folder = tmp_path / "m"
    out = fetch(folder, gated, extra=["--auth-origin", hub.url, "--token-file", str(token)])
    assert out.returncode == 2 and "readable by others: chmod 600" in out.stderr
    token.chmod(0o600)
    out = fetch(folder, gated, extra=["--auth-origin", hub.url, "--token-file", str(token)])
    assert out.returncode == 0, out.stderr


def test_fetch_checks_free_space_before_downloading_anything(hub, tmp_path):
    huge = small(hub, size=10**15)
    out = fetch(tmp_path, big(hub), huge)
    assert out.returncode == 3
    assert "not enough disk space" in out.stderr and "GB still to download" in out.stderr
    assert hub.stats.requests == []
    assert not list(tmp_path.glob("*.gguf*"))
