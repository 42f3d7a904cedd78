"""The fake Hugging Face endpoint speaks the Hub API that downloaders rely on."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from lab.standins.hf_server import HFServer

REPO = "unsloth/Tiny-GGUF"
SHARDS = {f"Q4/tiny-0000{i}-of-00003.gguf": bytes([i]) * (50_000 + i) for i in (1, 2, 3)}
FILES = {"README.md": b"# tiny\n", "config.json": b"{}\n", **SHARDS,
         "Q8/tiny-Q8_0.gguf": os.urandom(120_000)}
TOKEN = "hf_fixture_token_0123456789"


@pytest.fixture
def hub():
    server = HFServer(token=TOKEN, page_size=2)
    sha = server.add_repo(REPO, FILES)
    server.set_ref(REPO, "v1.0", sha)
    server.set_ref(REPO, "refs/pr/1", sha)
    server.add_repo("acme/gated", {"m.gguf": b"GGUF" + b"\0" * 1000}, gated=True)
    with server:
        yield server


def get(hub, path, **kw):
    kw.setdefault("allow_redirects", False)
    return requests.get(hub.url + path, timeout=10, **kw)


def test_fixture_hf_revision_by_branch_tag_sha_and_pr(hub):
    main = get(hub, f"/api/models/{REPO}/revision/main").json()
    assert main["id"] == REPO and len(main["sha"]) == 40
    assert sorted(s["rfilename"] for s in main["siblings"]) == sorted(FILES)
    for rev in ("v1.0", main["sha"], "refs%2Fpr%2F1"):
        assert get(hub, f"/api/models/{REPO}/revision/{rev}").json()["sha"] == main["sha"]
    assert get(hub, f"/api/models/{REPO}").json()["sha"] == main["sha"]
    blobs = get(hub, f"/api/models/{REPO}/revision/main?blobs=true").json()["siblings"]
    shard = next(s for s in blobs if s["rfilename"].endswith("00002-of-00003.gguf"))
    assert shard["size"] == 50_002
    assert shard["lfs"]["sha256"] == hashlib.sha256(bytes([2]) * 50_002).hexdigest()
    readme = next(s for s in blobs if s["rfilename"] == "README.md")
    assert "lfs" not in readme
    assert readme["blobId"] == hashlib.sha1(b"blob 7\0# tiny\n").hexdigest()


def test_fixture_hf_new_commit_moves_branch_and_keeps_old_sha(hub):
    old = hub.file(REPO, "README.md")
    new_sha = hub.add_commit(REPO, {"README.md": b"# tiny v2\n"}, refs=["main"])
    info = get(hub, f"/api/models/{REPO}/revision/main").json()
    assert info["sha"] == new_sha and [s["rfilename"] for s in info["siblings"]] == ["README.md"]
    assert get(hub, f"/api/models/{REPO}/revision/v1.0").json()["sha"] != new_sha
    assert old.oid != hub.file(REPO, "README.md").oid


def test_fixture_hf_tree_is_paginated_with_link_header(hub):
    url = f"{hub.url}/api/models/{REPO}/tree/main?recursive=true&expand=false"
    entries, pages = [], 0
    while url:
        r = requests.get(url, timeout=10)
        assert r.status_code == 200
        page = r.json()
        assert len(page) <= 2
        entries += page
        pages += 1
        url = r.links.get("next", {}).get("url")
    assert pages == 4
    files = {e["path"]: e for e in entries if e["type"] == "file"}
    assert set(files) == set(FILES)
    assert {e["path"] for e in entries if e["type"] == "directory"} == {"Q4", "Q8"}
    shard = files["Q4/tiny-00001-of-00003.gguf"]
    assert shard["size"] == 50_001
    assert shard["lfs"]["oid"] == hashlib.sha256(SHARDS["Q4/tiny-00001-of-00003.gguf"]).hexdigest()
    assert shard["lfs"]["size"] == 50_001 and shard["lfs"]["pointerSize"] > 100
    assert "lfs" not in files["README.md"]


def test_fixture_hf_tree_of_a_folder_and_non_recursive(hub):
    top = get(hub, f"/api/models/{REPO}/tree/main").json()
    url = f"{hub.url}/api/models/{REPO}/tree/main"
    names = []
    while url:
        r = requests.get(url, timeout=10)
        names += [(e["type"], e["path"]) for e in r.json()]
        url = r.links.get("next", {}).get("url")
    assert top[0]["type"] == "directory"
    assert sorted(names) == [("directory", "Q4"), ("directory", "Q8"), ("file", "README.md"),
                             ("file", "config.json")]
    sub = get(hub, f"/api/models/{REPO}/tree/v1.0/Q8?recursive=true").json()
    assert [e["path"] for e in sub] == ["Q8/tiny-Q8_0.gguf"]
    missing = get(hub, f"/api/models/{REPO}/tree/main/nope")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_fixture_hf_resolve_redirects_lfs_to_cdn(hub):
    path = "Q4/tiny-00003-of-00003.gguf"
    sha = get(hub, f"/api/models/{REPO}/revision/main").json()["sha"]
    head = requests.head(f"{hub.url}/{REPO}/resolve/main/{path}", timeout=10)
    assert head.status_code == 302
    digest = hashlib.sha256(SHARDS[path]).hexdigest()
    assert head.headers["X-Repo-Commit"] == sha
    assert head.headers["X-Linked-Etag"] == f'"{digest}"'
    assert head.headers["X-Linked-Size"] == "50003"
    assert head.headers["ETag"] != head.headers["X-Linked-Etag"]
    location = head.headers["Location"]
    assert location.startswith(hub.cdn_url + "/cdn/" + digest)
    assert hub.cdn_url != hub.url
    body = requests.get(location, timeout=10)
    assert body.status_code == 200 and body.content == SHARDS[path]
    assert body.headers["Accept-Ranges"] == "bytes"
    assert body.headers["Content-Length"] == "50003"
    tampered = requests.get(location.replace("Signature=", "Signature=0"), timeout=10)
    assert tampered.status_code == 403


def test_fixture_hf_resolve_small_file_directly(hub):
    r = get(hub, f"/{REPO}/resolve/main/README.md")
    assert r.status_code == 200 and r.content == b"# tiny\n"
    readme_oid = hashlib.sha1(b"blob 7\0# tiny\n").hexdigest()
    assert r.headers["ETag"] == f'"{readme_oid}"'
    assert "X-Linked-Etag" not in r.headers
    assert r.headers["X-Repo-Commit"] == get(hub, f"/api/models/{REPO}").json()["sha"]


def test_fixture_hf_range_requests(hub):
    path = "Q8/tiny-Q8_0.gguf"
    data = FILES[path]
    location = requests.head(f"{hub.url}/{REPO}/resolve/main/{path}", timeout=10).headers[
        "Location"]
    part = requests.get(location, headers={"Range": "bytes=100000-"}, timeout=10)
    assert part.status_code == 206
    assert part.headers["Content-Range"] == "bytes 100000-119999/120000"
    assert part.content == data[100000:]
    middle = requests.get(location, headers={"Range": "bytes=10-19"}, timeout=10)
    assert (middle.status_code, middle.content) == (206, data[10:20])
    suffix = requests.get(location, headers={"Range": "bytes=-5"}, timeout=10)
    assert suffix.content == data[-5:]
    beyond = requests.get(location, headers={"Range": "bytes=999999-"}, timeout=10)
    assert beyond.status_code == 416


def test_fixture_hf_token_is_not_sent_to_the_cdn(hub):
    url = f"{hub.url}/{REPO}/resolve/main/Q4/tiny-00001-of-00003.gguf"
    hub.stats.reset()
    r = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.content == SHARDS["Q4/tiny-00001-of-00003.gguf"]
    kinds = [(e["kind"], e["auth"], e["status"]) for e in hub.stats.requests]
    assert kinds == [("resolve", True, 302), ("cdn", False, 200)]


def test_fixture_hf_same_origin_cdn_records_a_leaked_token():
    with HFServer(cdn="same") as hub:
        hub.add_repo("a/b", {"m.gguf": b"GGUF1234"})
        r = requests.get(f"{hub.url}/a/b/resolve/main/m.gguf",
                         headers={"Authorization": "Bearer x"}, timeout=10)
        assert r.content == b"GGUF1234"
        assert [(e["kind"], e["auth"]) for e in hub.stats.requests] == [("resolve", True),
                                                                         ("cdn", True)]
        assert all("Bearer" not in json.dumps(e) for e in hub.stats.requests)


def test_fixture_hf_gated_repo_needs_the_token(hub):
    url = "/acme/gated/resolve/main/m.gguf"
    anonymous = get(hub, url)
    assert anonymous.status_code == 401
    assert anonymous.headers["X-Error-Code"] == "GatedRepo"
    assert "restricted" in anonymous.json()["error"]
    wrong = get(hub, url, headers={"Authorization": "Bearer hf_wrong"})
    assert wrong.status_code == 403
    right = get(hub, url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 302
    assert get(hub, "/api/models/acme/gated").json()["gated"] == "manual"


def test_fixture_hf_not_found_bodies(hub):
    repo = get(hub, "/api/models/nobody/nothing/revision/main")
    assert repo.status_code == 404
    assert repo.headers["X-Error-Code"] == "RepoNotFound"
    assert repo.json() == {"error": "Repository not found"}
    rev = get(hub, f"/api/models/{REPO}/revision/v9")
    assert (rev.status_code, rev.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    entry = get(hub, f"/{REPO}/resolve/main/missing.gguf")
    assert (entry.status_code, entry.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert get(hub, "/nobody/nothing/resolve/main/x").headers["X-Error-Code"] == "RepoNotFound"


def test_fixture_hf_drop_after_n_bytes_once_then_resume(hub):
    path = "Q8/tiny-Q8_0.gguf"
    hub.faults.drop_after(path, 30_000)
    hub.stats.reset()
    url = f"{hub.url}/{REPO}/resolve/main/{path}"
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, timeout=10).content  # noqa: B018
    assert hub.stats.bytes_served(path) == 30_000
    rest = requests.get(url, headers={"Range": "bytes=30000-"}, timeout=10)
    assert rest.status_code == 206 and rest.content == FILES[path][30000:]
    assert hub.stats.bytes_served(f"{REPO}/{path}") == 120_000


def test_fixture_hf_drop_always_and_fail_and_clear(hub):
    path = "Q4/tiny-00002-of-00003.gguf"
    hub.faults.drop_after(path, 10, times=None)
    url = f"{hub.url}/{REPO}/resolve/main/{path}"
    for _ in range(2):
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, timeout=10).content  # noqa: B018
    hub.faults.clear()
    hub.faults.fail(path, 503)
    assert requests.get(url, timeout=10).status_code == 503
    assert requests.get(url, timeout=10).content == SHARDS[path]


def test_fixture_hf_range_answered_with_200(hub):
    path = "Q8/tiny-Q8_0.gguf"
    hub.faults.ignore_range(path)
    url = f"{hub.url}/{REPO}/resolve/main/{path}"
    first = requests.get(url, headers={"Range": "bytes=100-"}, timeout=10)
    assert first.status_code == 200 and first.content == FILES[path]
    assert "Content-Range" not in first.headers
    second = requests.get(url, headers={"Range": "bytes=100-"}, timeout=10)
    assert second.status_code == 206


def test_fixture_hf_throttle_and_delay(hub):
    path = "Q4/tiny-00001-of-00003.gguf"
    hub.faults.throttle(path, 100_000)
    hub.faults.delay(path, 0.3, times=1)
    started = time.monotonic()
    r = requests.get(f"{hub.url}/{REPO}/resolve/main/{path}", timeout=10)
    assert r.content == SHARDS[path]
    assert time.monotonic() - started >= 0.7


def test_fixture_hf_control_endpoint(hub):
    path = "Q4/tiny-00001-of-00003.gguf"
    r = requests.post(f"{hub.url}/_control", json={"action": "drop_after", "file": path,
                                                   "bytes": 5, "times": 1}, timeout=10)
    assert r.json() == {"ok": True}
    url = f"{hub.url}/{REPO}/resolve/main/{path}"
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, timeout=10).content  # noqa: B018
    stats = requests.get(f"{hub.url}/_control/stats", timeout=10).json()
    assert stats["bytes_served"][f"{REPO}/{path}"] == 5
    bad = requests.post(f"{hub.url}/_control", json={"action": "explode"}, timeout=10)
    assert bad.status_code == 400
    requests.post(f"{hub.url}/_control", json={"action": "reset_stats"}, timeout=10)
    assert requests.get(f"{hub.url}/_control/stats", timeout=10).json()["bytes_served"] == {}


def test_fixture_hf_concurrent_downloads(hub):
    urls = [f"{hub.url}/{REPO}/resolve/main/{p}" for p in FILES] * 4
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda u: requests.get(u, timeout=20).content, urls))
    assert bodies == [FILES[p] for p in FILES] * 4


def test_fixture_hf_streams_files_from_disk(tmp_path):
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF")
        f.truncate(64 * 1024 * 1024)
    with HFServer() as hub:
        hub.add_repo("a/big", {"big.gguf": big})
        r = requests.get(f"{hub.url}/a/big/resolve/main/big.gguf", timeout=30, stream=True)
        h = hashlib.sha256()
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
        assert h.hexdigest() == hub.file("a/big", "big.gguf").sha256
        assert hub.stats.bytes_served("big.gguf") == 64 * 1024 * 1024


def test_fixture_hf_command_line_serves_a_directory(tmp_path):
    base = tmp_path / "hub/owner/model"
    (base / "main").mkdir(parents=True)
    (base / "main/model.gguf").write_bytes(b"GGUF-main")
    (base / "old").mkdir()
    (base / "old/model.gguf").write_bytes(b"GGUF-old")
    (base / "hfrepo.json").write_text(json.dumps({"gated": False, "commits": [
        {"dir": "old", "refs": ["v0.1"]}, {"dir": "main", "refs": ["main"]}]}))
    proc = subprocess.Popen([sys.executable, "-m", "lab.standins.hf_server", "--root",
                             str(tmp_path / "hub"), "--bind", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["repos"] == ["owner/model"]
        base_url = ready["url"]
        assert requests.get(f"{base_url}/owner/model/resolve/v0.1/model.gguf",
                            timeout=10).content == b"GGUF-old"
        assert requests.get(f"{base_url}/owner/model/resolve/main/model.gguf",
                            timeout=10).content == b"GGUF-main"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
