"""garage-fetch, the rig-side downloader, run here against the fake Hugging Face endpoint:
blobs by sha256, a snapshot folder of links per revision, one writer at a time."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.standins.hf_server import HFServer

FETCH = Path(__file__).resolve().parents[2] / "llm_garage" / "files" / "garage-fetch"
TOKEN = "hf_fetch_test_token_5555aaaa9999"
REPO = "acme/Fetch-GGUF"
BIG = random.Random(1).randbytes(3_000_000)
BIG2 = random.Random(3).randbytes(3_000_000)  # the same shard, re-uploaded by a new revision
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


class Store:
    """A models_dir as on a rig: the blob store and one model folder."""

    def __init__(self, root: Path, model: str = "m"):
        self.models = root / "models"
        self.blobs = self.models / ".blobs"
        self.dir = self.models / model

    def blob(self, data: bytes) -> Path:
        return self.blobs / sha(data)

    def snapshot(self, commit: str) -> Path:
        return self.dir / commit[:12]

    def partial(self, data: bytes) -> Path:
        return self.blobs / f"{sha(data)}.partial"

    def stamp(self, data: bytes) -> list[str]:
        return (self.blobs / f"{sha(data)}.stamp").read_text().split()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def commit_of(hub, repo=REPO, ref="main") -> str:
    return hub._repo(repo).refs[ref]


def file_arg(hub, path, data, repo=REPO, sha256=None, size=None, commit=None):
    commit = commit or commit_of(hub, repo)
    url = f"{hub.url}/{repo}/resolve/{commit}/{path}"
    return ["--file", path.rsplit("/", 1)[-1], str(size if size is not None else len(data)),
            sha256 or sha(data), url]


def fetch_cmd(store: Store, *files, retries=0, extra=(), commit="0" * 40) -> list[str]:
    cmd = [sys.executable, str(FETCH), "--dir", str(store.dir), "--blobs", str(store.blobs),
           "--snapshot", str(store.snapshot(commit)), "--retries", str(retries), *extra]
    for f in files:
        cmd += f
    return cmd


def fetch(store: Store, *files, retries=0, extra=(), stdin=None, commit=None,
          hub=None) -> subprocess.CompletedProcess:
    commit = commit or (commit_of(hub) if hub else "0" * 40)
    return subprocess.run(fetch_cmd(store, *files, retries=retries, extra=extra, commit=commit),
                          capture_output=True, text=True, timeout=120,
                          input=stdin if stdin is not None else "")


def events(store: Store, kind=None) -> list[dict]:
    log = store.dir / ".garage" / "fetch.log"
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


def mtime_text(path: Path) -> str:
    ns = path.stat().st_mtime_ns
    return f"{ns // 10**9}.{ns % 10**9:09d}"  # stat -c %.9Y


def test_fetch_stores_blobs_by_sha256_and_links_the_snapshot(hub, store):
    out = fetch(store, big(hub), small(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    snap = store.snapshot(commit_of(hub))
    assert os.readlink(snap / "big.gguf") == str(store.blob(BIG))
    assert os.readlink(snap / "small.gguf") == str(store.blob(SMALL))
    assert (snap / "big.gguf").read_bytes() == BIG and (snap / "small.gguf").read_bytes() == SMALL
    assert not list(store.blobs.glob("*.partial"))
    assert store.blob(BIG).stat().st_mode & 0o777 == 0o644
    assert store.stamp(BIG) == [str(len(BIG)), mtime_text(store.blob(BIG)), sha(BIG)]
    assert served(hub, "big.gguf") == len(BIG)
    assert "big.gguf: 3.00 MB, downloading" in out.stdout
    assert "big.gguf: sha256 verified, in place" in out.stdout
    assert sorted(e["file"] for e in events(store, "done")) == ["big.gguf", "small.gguf"]
    assert sorted(e["file"] for e in events(store, "linked")) == ["big.gguf", "small.gguf"]


def test_fetch_later_run_trusts_stamps_hashes_nothing_and_touches_no_link(hub, store):
    assert fetch(store, big(hub), small(hub), hub=hub).returncode == 0
    link = store.snapshot(commit_of(hub)) / "big.gguf"
    before, inode = len(events(store)), link.lstat().st_ino
    hub.stats.reset()
    out = fetch(store, big(hub), small(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert [e["event"] for e in events(store)[before:]] == ["trusted", "trusted"]
    assert hub.stats.requests == [] and link.lstat().st_ino == inode
    assert "big.gguf: in place, stamp matches (3.00 MB)" in out.stdout


def test_fetch_resumes_a_partial_file_with_range(hub, store):
    store.blobs.mkdir(parents=True)
    store.partial(BIG).write_bytes(BIG[:MiB])
    out = fetch(store, big(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert store.blob(BIG).read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG) - MiB  # only the rest went over the wire
    assert [r["range"] for r in hub.stats.requests if r["kind"] == "cdn"] == [f"bytes={MiB}-"]
    hashed = events(store, "hashed")
    assert hashed == [dict(hashed[0], bytes=MiB, partial=True)]  # the partial, hashed first
    assert "resuming at 1.05 MB" in out.stdout


def test_fetch_starts_over_when_the_server_ignores_range(hub, store):
    store.blobs.mkdir(parents=True)
    store.partial(BIG).write_bytes(BIG[:MiB])
    hub.faults.ignore_range("q/big.gguf")
    out = fetch(store, big(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert store.blob(BIG).read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG)
    assert [e["reason"] for e in events(store, "restart")] == [
        "200 instead of 206 to a Range request"]


def test_fetch_dropped_connection_keeps_the_partial_and_the_next_run_resumes(hub, store):
    hub.faults.drop_after("q/big.gguf", 1_200_000)
    out = fetch(store, big(hub), hub=hub)
    assert out.returncode == 1
    assert "the partial file is kept: run again to resume" in out.stderr
    assert not store.blob(BIG).exists() and not store.snapshot(commit_of(hub)).exists()
    assert store.partial(BIG).stat().st_size == 1_200_000
    out = fetch(store, big(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert (store.snapshot(commit_of(hub)) / "big.gguf").read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG)  # nothing was transferred twice


def test_fetch_resumes_within_the_run_when_retries_allow(hub, store):
    hub.faults.drop_after("q/big.gguf", 2_000_000)
    out = fetch(store, big(hub), retries=2, hub=hub)
    assert out.returncode == 0, out.stderr
    assert store.blob(BIG).read_bytes() == BIG
    assert served(hub, "big.gguf") == len(BIG)
    assert len(events(store, "retry")) == 1


def test_fetch_never_puts_a_corrupt_download_in_place(hub, store):
    out = fetch(store, big(hub, sha256="0" * 64), hub=hub)
    assert out.returncode == 1
    assert "the download was discarded and nothing was put in place" in out.stderr
    assert sorted(p.name for p in store.blobs.iterdir()) == ["0" * 64 + ".lock"]
    assert not store.snapshot(commit_of(hub)).exists()


def test_fetch_bad_partial_is_found_after_resuming_and_the_file_fetched_again(hub, store):
    store.blobs.mkdir(parents=True)
    store.partial(BIG).write_bytes(b"\0" * MiB)
    out = fetch(store, big(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert store.blob(BIG).read_bytes() == BIG
    assert served(hub, "big.gguf") == (len(BIG) - MiB) + len(BIG)
    assert "sha256 mismatch after resuming: starting the file over" in out.stdout


def test_fetch_replaces_a_wrong_blob_by_a_rename_and_a_reader_keeps_its_bytes(hub, store):
    assert fetch(store, big(hub), small(hub), hub=hub).returncode == 0
    blob = store.blob(BIG)
    with open(blob, "r+b") as f:  # same size, new mtime: not trusted
        f.seek(1000)
        f.write(b"X")
    corrupted = blob.read_bytes()
    reader = open(store.snapshot(commit_of(hub)) / "big.gguf", "rb")  # a running server
    hub.stats.reset()
    out = fetch(store, big(hub), small(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert blob.read_bytes() == BIG and store.blob(SMALL).read_bytes() == SMALL
    assert [e["file"] for e in events(store, "bad")] == ["big.gguf"]
    assert served(hub, "big.gguf") == len(BIG) and served(hub, "small.gguf") == 0
    assert reader.read() == corrupted  # its open file was never written to
    reader.close()


def test_verify_only_finds_corruption_a_matching_stamp_hides_and_stamps_it_bad(hub, store):
    assert fetch(store, big(hub), small(hub), hub=hub).returncode == 0
    blob = store.blob(BIG)
    st = blob.stat()
    with open(blob, "r+b") as f:
        f.seek(5000)
        f.write(b"Y")
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as stamped
    out = fetch(store, big(hub), small(hub), hub=hub)
    assert out.returncode == 0 and "big.gguf: in place, stamp matches" in out.stdout
    out = fetch(store, big(hub), small(hub), extra=["--verify-only"], hub=hub)
    assert out.returncode == 0, out.stderr
    assert "2 file(s) checked, 1 wrong" in out.stdout
    assert blob.exists()  # left for a reader until its replacement is renamed over it
    bad = store.stamp(BIG)
    assert bad[2] != sha(BIG) and bad[3] == "verified"
    assert store.stamp(SMALL)[3] == "verified"
    assert sorted(e["file"] for e in events(store, "hashed")) == ["big.gguf", "small.gguf"]
    hub.stats.reset()
    out = fetch(store, big(hub), small(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert blob.read_bytes() == BIG and served(hub, "big.gguf") == len(BIG)
    assert "stamped sha256" in out.stdout  # known bad from its stamp: not hashed again
    assert len(events(store, "hashed")) == 2


def test_verify_hashes_each_blob_once_then_trusts_its_stamp(hub, store):
    assert fetch(store, big(hub), small(hub), hub=hub).returncode == 0
    assert len(store.stamp(BIG)) == 3  # downloaded: not read back from disk
    before = len(events(store))
    out = fetch(store, big(hub), small(hub), extra=["--verify"], hub=hub)
    assert out.returncode == 0, out.stderr
    assert [e["event"] for e in events(store)[before:]] == ["hashed", "verified"] * 2
    assert store.stamp(BIG)[3] == "verified"
    before = len(events(store))
    out = fetch(store, big(hub), small(hub), extra=["--verify"], hub=hub)
    assert [e["event"] for e in events(store)[before:]] == ["trusted", "trusted"]
    # a changed mtime is still noticed, and a corrupted stamp is not trusted
    os.utime(store.blob(BIG), ns=(0, 10**9))
    (store.blobs / f"{sha(SMALL)}.stamp").write_text("garbage\n")
    before = len(events(store))
    out = fetch(store, big(hub), small(hub), extra=["--verify"], hub=hub)
    assert out.returncode == 0, out.stderr
    assert [e["event"] for e in events(store)[before:]] == ["hashed", "verified"] * 2


def test_fetch_sends_the_token_to_the_endpoint_only_never_to_the_cdn(hub, store):
    gated = file_arg(hub, "g.gguf", SMALL, repo="acme/Gated-GGUF")
    out = fetch(store, gated, extra=["--auth-origin", hub.url, "--token-stdin"],
                stdin=TOKEN + "\n")
    assert out.returncode == 0, out.stderr
    assert store.blob(SMALL).read_bytes() == SMALL
    kinds = {(r["kind"], r["auth"]) for r in hub.stats.requests}
    assert kinds == {("resolve", True), ("cdn", False)}
    assert hub.url != hub.cdn_url
    logged = (store.dir / ".garage" / "fetch.log").read_text()
    assert TOKEN not in out.stdout + out.stderr + logged


def test_fetch_gated_without_token_is_refused(hub, store):
    out = fetch(store, file_arg(hub, "g.gguf", SMALL, repo="acme/Gated-GGUF"))
    assert out.returncode == 4
    assert "HTTP 401" in out.stderr and "gated or private: set HF_TOKEN" in out.stderr
    assert not list(store.blobs.glob(f"{sha(SMALL)}*[!k]"))  # nothing but its lock file


def test_fetch_token_file_must_be_private(hub, store, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    gated = file_arg(hub, "g.gguf", SMALL, repo="acme/Gated-GGUF")
    out = fetch(store, gated, extra=["--auth-origin", hub.url, "--token-file", str(token)])
    assert out.returncode == 2 and "readable by others: chmod 600" in out.stderr
    token.chmod(0o600)
    out = fetch(store, gated, extra=["--auth-origin", hub.url, "--token-file", str(token)])
    assert out.returncode == 0, out.stderr


def test_fetch_checks_free_space_before_downloading_anything(hub, store):
    huge = small(hub, size=10**15)
    out = fetch(store, big(hub), huge, hub=hub)
    assert out.returncode == 3
    assert "not enough disk space" in out.stderr and "GB still to download" in out.stderr
    assert hub.stats.requests == []
    assert not list(store.blobs.glob("*.partial")) and not store.blob(BIG).exists()


# --- one writer at a time ----------------------------------------------------------------------

def test_two_fetches_started_together_end_with_one_correct_file(hub, store):
    hub.faults.throttle("q/big.gguf", 3_000_000)  # about a second: both are running
    cmd = fetch_cmd(store, big(hub), small(hub), commit=commit_of(hub))
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    assert store.blob(BIG).read_bytes() == BIG and store.blob(SMALL).read_bytes() == SMALL
    assert served(hub, "big.gguf") == len(BIG)  # downloaded once, never appended twice
    assert (store.snapshot(commit_of(hub)) / "big.gguf").read_bytes() == BIG
    assert any("waiting for" in out for out, _ in outs)
    assert [e["event"] for e in events(store, "done")] == ["done", "done"]


def test_a_held_lock_times_out_naming_its_holder(hub, store):
    store.blobs.mkdir(parents=True)
    lock = store.blobs / f"{sha(BIG)}.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 (garage-fetch for /srv/models/other, since 2025-01-01 10:00:00)\n")
        held.flush()
        out = fetch(store, big(hub), extra=["--lock-timeout", "0.5"], hub=hub)
    assert out.returncode == 5
    assert f"{lock} is still locked after 0.5 s by pid 4242 (garage-fetch for " \
           "/srv/models/other" in out.stderr
    assert hub.stats.requests == [] and not store.partial(BIG).exists()


# --- revisions, shared files, the older layout -------------------------------------------------

def new_revision(hub) -> str:
    """A commit re-uploading big.gguf with other bytes under the same name."""
    return hub.add_commit(REPO, {"q/big.gguf": BIG2, "q/small.gguf": SMALL}, refs=["main"])


def test_a_new_revision_keeps_the_old_snapshot_readable_and_shares_unchanged_files(hub, store):
    old = commit_of(hub)
    assert fetch(store, big(hub), small(hub), commit=old).returncode == 0
    new = new_revision(hub)
    hub.stats.reset()
    out = fetch(store, file_arg(hub, "q/big.gguf", BIG2, commit=new),
                small(hub, commit=new), commit=new)
    assert out.returncode == 0, out.stderr
    assert served(hub, "small.gguf") == 0 and served(hub, "big.gguf") == len(BIG2)
    assert (store.snapshot(old) / "big.gguf").read_bytes() == BIG
    assert (store.snapshot(new) / "big.gguf").read_bytes() == BIG2
    assert os.readlink(store.snapshot(old) / "small.gguf") == os.readlink(
        store.snapshot(new) / "small.gguf")


def test_a_kill_mid_download_leaves_the_old_revision_intact_and_the_next_run_resumes(hub, store):
    old = commit_of(hub)
    assert fetch(store, big(hub), small(hub), commit=old).returncode == 0
    new = new_revision(hub)
    files = [file_arg(hub, "q/big.gguf", BIG2, commit=new), small(hub, commit=new)]
    hub.faults.throttle("q/big.gguf", 1_000_000)
    run = subprocess.Popen(fetch_cmd(store, *files, commit=new), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    partial = store.partial(BIG2)
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size >= 500_000):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    hub.faults.clear()
    assert (store.snapshot(old) / "big.gguf").read_bytes() == BIG
    assert (store.snapshot(old) / "small.gguf").read_bytes() == SMALL
    assert not store.blob(BIG2).exists() and not store.snapshot(new).exists()
    kept = partial.stat().st_size
    out = fetch(store, *files, commit=new)
    assert out.returncode == 0, out.stderr
    assert "resuming at" in out.stdout
    assert (store.snapshot(new) / "big.gguf").read_bytes() == BIG2
    assert (store.snapshot(old) / "big.gguf").read_bytes() == BIG
    ranges = [r["range"] for r in hub.stats.requests if r["kind"] == "cdn"]
    assert ranges[-1] == f"bytes={kept}-"


def test_identical_files_of_two_models_are_stored_once(hub, tmp_path):
    one, two = Store(tmp_path, "one"), Store(tmp_path, "two")
    assert fetch(one, big(hub), hub=hub).returncode == 0
    hub.stats.reset()
    out = fetch(two, small(hub), big(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert served(hub, "big.gguf") == 0
    blobs = sorted(p.name for p in one.blobs.iterdir() if len(p.name) == 64)
    assert blobs == sorted([sha(BIG), sha(SMALL)])
    a = (one.snapshot(commit_of(hub)) / "big.gguf").stat()
    b = (two.snapshot(commit_of(hub)) / "big.gguf").stat()
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def test_files_of_the_older_layout_are_adopted_without_downloading(hub, store):
    # <model dir>/<name> with .garage/<name>.stamp, as garage-fetch used to leave them
    (store.dir / ".garage").mkdir(parents=True)
    flat = store.dir / "big.gguf"
    flat.write_bytes(BIG)
    (store.dir / ".garage" / "big.gguf.stamp").write_text(
        f"{len(BIG)} {mtime_text(flat)} {sha(BIG)}\n")
    (store.dir / "small.gguf").write_bytes(SMALL)  # no stamp: hashed before it is taken
    out = fetch(store, big(hub), small(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert hub.stats.requests == []
    assert store.blob(BIG).stat().st_ino == flat.stat().st_ino  # a hard link: no copy
    assert flat.read_bytes() == BIG  # left where it was, for a unit that still names it
    assert (store.snapshot(commit_of(hub)) / "small.gguf").read_bytes() == SMALL
    assert [e["file"] for e in events(store, "hashed")] == ["small.gguf"]
    assert sorted(e["file"] for e in events(store, "adopted")) == ["big.gguf", "small.gguf"]


def test_a_wrong_file_of_the_older_layout_is_not_adopted(hub, store):
    store.dir.mkdir(parents=True)
    (store.dir / "big.gguf").write_bytes(BIG2)
    out = fetch(store, big(hub), hub=hub)
    assert out.returncode == 0, out.stderr
    assert store.blob(BIG).read_bytes() == BIG and served(hub, "big.gguf") == len(BIG)
    assert (store.dir / "big.gguf").read_bytes() == BIG2


# --- prune --------------------------------------------------------------------------------------

def prune(store: Store, *shas) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FETCH), "--prune", "--blobs", str(store.blobs), "--models-dir",
           str(store.models)]
    for s in shas:
        cmd += ["--drop-blob", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_prune_deletes_only_blobs_nothing_links_to_and_nobody_holds(hub, store):
    old = commit_of(hub)
    assert fetch(store, big(hub), small(hub), commit=old).returncode == 0
    new = new_revision(hub)
    assert fetch(store, file_arg(hub, "q/big.gguf", BIG2, commit=new), small(hub, commit=new),
                 commit=new).returncode == 0
    store.partial(b"abandoned").write_bytes(b"aband")
    # still linked from the old snapshot: kept
    out = prune(store, sha(BIG), sha(b"abandoned"))
    assert out.returncode == 0, out.stderr
    assert "still linked" in out.stdout and store.blob(BIG).exists()
    assert not store.partial(b"abandoned").exists()
    for link in store.snapshot(old).iterdir():
        link.unlink()
    store.snapshot(old).rmdir()
    with open(store.blobs / f"{sha(BIG)}.lock", "w") as held:  # a fetch at work on it
        fcntl.flock(held, fcntl.LOCK_EX)
        out = prune(store, sha(BIG))
    assert "held by" in out.stdout and store.blob(BIG).exists()
    out = prune(store, sha(BIG))
    assert out.returncode == 0 and "1 unused file(s) deleted" in out.stdout
    assert not list(store.blobs.glob(f"{sha(BIG)}*"))
    assert (store.snapshot(new) / "big.gguf").read_bytes() == BIG2
    assert (store.snapshot(new) / "small.gguf").read_bytes() == SMALL


# --- progress -----------------------------------------------------------------------------------

def script_module():
    """garage-fetch's own functions (a standalone script: loaded from its file)."""
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("garage_fetch_script", str(FETCH))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_pace_waits_for_the_interval_and_the_step_whichever_is_later():
    gf = script_module()
    pace = gf.Pace(20, 0.10, now=0.0)
    fed = [(5, 0.30), (19, 0.35), (20, 0.36), (30, 0.40), (45, 0.50), (46, 0.90), (60, 0.95),
           (70, 0.99), (80, 1.0)]
    printed = [(t, done) for t, done in fed if pace.due(done, t)]
    # 20 s passed but only at 0.36 ... 10 % more by 45 s; 0.90 waits for 65 s; never at the end
    assert printed == [(20, 0.36), (45, 0.50), (70, 0.99)]
    # a stall: no advance, but a line after 6 intervals without one
    stalled = gf.Pace(20, 0.10, now=0.0, done=0.5)
    assert [t for t in (30, 100, 119, 120, 200, 239, 240) if stalled.due(0.5, t)] == [120, 240]
    # interval 0: each step; progress off: nothing
    every = gf.Pace(0, 0.10, now=0.0)
    assert [d for d in (0.05, 0.1, 0.15, 0.21, 0.5) if every.due(d, 1.0)] == [0.1, 0.21, 0.5]
    off = gf.Pace(None, 0.10, now=0.0)
    assert not any(off.due(d, t) for t, d in fed)


def test_progress_settings_and_lines():
    gf = script_module()
    assert gf.progress_settings({}) == (20.0, 0.10)
    assert gf.progress_settings({"GARAGE_PROGRESS_INTERVAL": "0.5",
                                 "GARAGE_PROGRESS_STEP": "25"}) == (0.5, 0.25)
    assert gf.progress_settings({"GARAGE_PROGRESS": "off"})[0] is None
    with pytest.raises(gf.Fatal):
        gf.progress_settings({"GARAGE_PROGRESS": "loud"})
    with pytest.raises(gf.Fatal):
        gf.progress_settings({"GARAGE_PROGRESS_INTERVAL": "soon"})
    # 1.2 GB of 3 GB; this run got 0.6 GB in 12 s (the rest was resumed): 50 MB/s, 36 s left
    assert gf.transfer_line("big.gguf", 1_200_000_000, 3_000_000_000, 600_000_000, 12.0) == \
        "big.gguf: 1.20 GB of 3.00 GB (40 %), 50.00 MB/s, about 36 s left"
    assert gf.transfer_line("x", 0, 10, 0, 0.0) == "x: 0 B of 10 B (0 %), no bytes yet"
    assert [gf.duration(s) for s in (0.42, 42, 190, 3720)] == \
        ["0.4 s", "42 s", "3 min 10 s", "1 h 02 min"]


LINE = re.compile(r"^garage-fetch: big\.gguf: ([\d.]+) (MB|kB) of 3\.00 MB \((\d+) %\), "
                  r"[\d.]+ (?:kB|MB)/s, about [\d.]+ s left$")


def progress(stdout: str) -> list[tuple[float, int]]:
    out = []
    for m in map(LINE.match, stdout.splitlines()):
        if m:
            scale = 10**6 if m.group(2) == "MB" else 10**3
            out.append((float(m.group(1)) * scale, int(m.group(3))))
    return out


def test_a_throttled_download_prints_paced_progress_and_a_summary(hub, store):
    hub.faults.throttle("q/big.gguf", 1_500_000)  # 3 MB: about 2 s
    env = {**os.environ, "GARAGE_PROGRESS_INTERVAL": "0.3", "GARAGE_PROGRESS_STEP": "20"}
    proc = subprocess.run(fetch_cmd(store, big(hub), small(hub), commit=commit_of(hub)),
                          capture_output=True, text=True, timeout=60, input="", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = progress(proc.stdout)
    assert len(lines) >= 2
    done = [d for d, _ in lines]
    percents = [p for _, p in lines]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert all(b - a >= 20 for a, b in zip(percents, percents[1:], strict=False))
    assert done[-1] < 3_000_000
    out = proc.stdout.splitlines()
    # the file's end line, then the run's total: both files, every byte, time and rate
    assert any(re.fullmatch(r"garage-fetch: big\.gguf: sha256 verified, in place \(3\.00 MB "
                            r"received in [\d.]+ s, [\d.]+ (kB|MB)/s\)", line) for line in out)
    assert re.fullmatch(r"garage-fetch: m: 2 file\(s\) downloaded, 3\.20 MB in [\d.]+ s "
                        r"\([\d.]+ (kB|MB)/s\)", out[-2]), out
    assert store.blob(BIG).read_bytes() == BIG
    # progress off: the lines that start and end each file, and the total
    store2 = Store(store.models.parent / "other")
    env["GARAGE_PROGRESS"] = "off"
    proc = subprocess.run(fetch_cmd(store2, big(hub), commit=commit_of(hub)),
                          capture_output=True, text=True, timeout=60, input="", env=env)
    assert proc.returncode == 0, proc.stderr
    assert progress(proc.stdout) == []
    assert "big.gguf: 3.00 MB, downloading" in proc.stdout
    assert "m: 1 file(s) downloaded, 3.00 MB in" in proc.stdout


def test_a_resumed_download_says_where_it_resumed_and_counts_only_new_bytes(hub, store):
    hub.faults.drop_after("q/big.gguf", 1_200_000)
    assert fetch(store, big(hub), hub=hub).returncode == 1
    hub.faults.throttle("q/big.gguf", 1_000_000)
    env = {**os.environ, "GARAGE_PROGRESS_INTERVAL": "0.2", "GARAGE_PROGRESS_STEP": "10"}
    proc = subprocess.run(fetch_cmd(store, big(hub), commit=commit_of(hub)),
                          capture_output=True, text=True, timeout=60, input="", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "garage-fetch: big.gguf: 3.00 MB, resuming at 1.20 MB (40 %)" in proc.stdout
    lines = progress(proc.stdout)
    assert len(lines) >= 2 and lines[0][0] > 1_200_000
    assert "m: 1 file(s) downloaded, 1.80 MB in" in proc.stdout
