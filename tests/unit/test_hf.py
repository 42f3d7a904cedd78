"""Resolving models on the controller against the fake Hugging Face endpoint."""

from __future__ import annotations

import hashlib
import logging
import socket

import pytest

from lab.standins.hf_server import HFServer
from llm_garage import hf
from llm_garage.hf import ResolveProblem, Resolver, Spec

TOKEN = "hf_unit_test_token_fedcba9876543210"
SPLIT = {f"UD-Q6_K_XL/Big-UD-Q6_K_XL-0000{i}-of-00004.gguf": bytes([i]) * (3000 + i)
         for i in (1, 2, 3, 4)}
FILES = {
    **SPLIT,
    "Big-Q6_K.gguf": b"q6k" * 1000,
    "Big-UD-TQ1_0.gguf": b"tq1" * 900,
    "mmproj-F16.gguf": b"proj" * 100,
    "Big-F16.gguf": b"f16" * 700,
    "README.md": b"# big\n",
    "params.json": b'{"temp": 0.6}\n',
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hub():
    server = HFServer(token=TOKEN, page_size=2)
    server.add_repo("unsloth/Big-GGUF", FILES)
    server.set_ref("unsloth/Big-GGUF", "v1", server._repo("unsloth/Big-GGUF").refs["main"])
    # an upload that stopped half way: shards 1 and 3 of 3
    server.add_repo("acme/Broken-GGUF", {"M-00001-of-00003.gguf": b"a" * 100,
                                         "M-00003-of-00003.gguf": b"c" * 100})
    server.add_repo("acme/Gated-GGUF", {"G-Q4_K_M.gguf": b"gated" * 200}, gated=True)
    server.add_repo("acme/Twins-GGUF", {"a/M-Q4.gguf": b"1" * 10, "b/M-Q4.gguf": b"2" * 10})
    with server:
        yield server


def resolver(hub, token=None, **kw) -> Resolver:
    return Resolver(hub.url, hf_token=token or False, retries=0, **kw)


def requests_of(hub, kind=None):
    return [r for r in hub.stats.requests if kind is None or r["kind"] == kind]


def problem(exc: pytest.ExceptionInfo) -> str:
    p = exc.value.problem
    return f"{p.problem} | fix: {p.fix}"


# --- endpoint and token ---------------------------------------------------------------------

def test_hf_endpoint_and_token_are_read_like_huggingface_hub(tmp_path):
    assert hf.endpoint({}) == "https://huggingface.co"
    assert hf.endpoint({"HF_ENDPOINT": "http://10.0.0.1:8080/"}) == "http://10.0.0.1:8080"
    assert hf.token({"HF_TOKEN": "  hf_a  ", "HF_HOME": str(tmp_path)}) == "hf_a"
    assert hf.token({"HUGGING_FACE_HUB_TOKEN": "hf_old", "HF_HOME": str(tmp_path)}) == "hf_old"
    (tmp_path / "token").write_text("hf_from_file\n")
    assert hf.token({"HF_HOME": str(tmp_path)}) == "hf_from_file"
    assert hf.token({"HF_TOKEN": "", "HF_HOME": str(tmp_path)}) == "hf_from_file"
    other = tmp_path / "elsewhere"
    other.write_text("hf_path\n")
    assert hf.token({"HF_TOKEN_PATH": str(other), "HF_HOME": str(tmp_path)}) == "hf_path"
    (tmp_path / "xdg" / "huggingface").mkdir(parents=True)
    (tmp_path / "xdg" / "huggingface" / "token").write_text("hf_xdg")
    assert hf.token({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == "hf_xdg"
    assert hf.token({"HF_HOME": str(tmp_path / "none")}) is None
    assert "HF_TOKEN" in hf.token_source({"HF_TOKEN": "x"})
    assert "x" not in hf.token_source({"HF_TOKEN": "x"}).replace("the HF_TOKEN", "")
    assert hf.offline({"HF_HUB_OFFLINE": "1"}) and not hf.offline({})


# --- resolution -----------------------------------------------------------------------------

def test_hf_quant_resolves_a_complete_shard_set_across_tree_pages(hub):
    hub.stats.reset()
    r = resolver(hub).resolve(Spec("unsloth/Big-GGUF", "main", "quant", "UD-Q6_K_XL"))
    assert r.commit == hub._repo("unsloth/Big-GGUF").refs["main"]
    assert [f.path for f in r.files] == sorted(SPLIT)
    assert r.main.name == "Big-UD-Q6_K_XL-00001-of-00004.gguf"
    assert [(f.size, f.sha256) for f in r.files] == [(len(v), sha(v)) for _, v in
                                                    sorted(SPLIT.items())]
    assert r.size == sum(len(v) for v in SPLIT.values()) and not r.needs_token
    tree_pages = [q for q in requests_of(hub, "api") if "/tree/" in q["path"]]
    assert len(tree_pages) >= 5  # 12 entries, 2 a page: the Link header was followed
    assert r.url(hub.url, r.main) == (f"{hub.url}/unsloth/Big-GGUF/resolve/{r.commit}/"
                                      "UD-Q6_K_XL/Big-UD-Q6_K_XL-00001-of-00004.gguf")


def test_hf_resolutions_are_cached_for_the_run(hub):
    res = resolver(hub)
    spec = Spec("unsloth/Big-GGUF", "main", "quant", "UD-Q6_K_XL")
    res.resolve(spec)
    calls = res.api_calls
    assert res.resolve(spec) is res.resolve(spec)
    res.resolve(Spec("unsloth/Big-GGUF", "main", "files", ("Big-UD-TQ1_0.gguf",)))
    assert res.api_calls == calls  # same repo and revision: no new request


def test_hf_quant_matches_whole_names_only_and_skips_mmproj(hub):
    res = resolver(hub)
    q6k = res.resolve(Spec("unsloth/Big-GGUF", "main", "quant", "Q6_K"))
    assert [f.path for f in q6k.files] == ["Big-Q6_K.gguf"]  # not the UD-Q6_K_XL shards
    f16 = res.resolve(Spec("unsloth/Big-GGUF", "v1", "quant", "f16"))
    assert [f.path for f in f16.files] == ["Big-F16.gguf"]  # not mmproj-F16.gguf


def test_hf_include_glob_and_explicit_files(hub):
    res = resolver(hub)
    r = res.resolve(Spec("unsloth/Big-GGUF", "main", "include", "UD-Q6_K_XL/*"))
    assert [f.path for f in r.files] == sorted(SPLIT)
    r = res.resolve(Spec("unsloth/Big-GGUF", "main", "files",
                         ("params.json", "Big-UD-TQ1_0.gguf")))
    # the model file goes first (it is what -m gets); a small non-LFS file gets its sha256
    assert [f.path for f in r.files] == ["Big-UD-TQ1_0.gguf", "params.json"]
    assert r.files[1].sha256 == sha(FILES["params.json"])
    shards = tuple(sorted(SPLIT, reverse=True))
    r = res.resolve(Spec("unsloth/Big-GGUF", "main", "files", shards))
    assert r.main.name.endswith("-00001-of-00004.gguf")


@pytest.mark.parametrize("kind, value, expected", [
    ("quant", "IQ4_KSS", "quant 'IQ4_KSS' matches no .gguf file"),
    ("include", "Q8_0/*.gguf", "include 'Q8_0/*.gguf' matches no file"),
    ("files", ("Big-Q8_0.gguf",), "Big-Q8_0.gguf not in the repository"),
    ("quant", "Big", "selects 4 models, expected one"),
    ("include", "*.gguf", "expected one"),
    ("files", (sorted(SPLIT)[0], sorted(SPLIT)[2]), "2 of 4 shards selected, missing"),
])
def test_hf_selection_problems_say_what_and_how_to_fix(hub, kind, value, expected):
    with pytest.raises(ResolveProblem) as e:
        resolver(hub).resolve(Spec("unsloth/Big-GGUF", "main", kind, value))
    text = problem(e)
    assert expected in text
    assert "fix:" in text and text.split("fix:")[1].strip()
    if kind == "files" and "shards" in expected:
        assert "00002-of-00004" in text and "00004-of-00004" in text


def test_hf_incomplete_upload_is_refused_with_the_missing_shard(hub):
    with pytest.raises(ResolveProblem) as e:
        resolver(hub).resolve(Spec("acme/Broken-GGUF", "main", "include", "*.gguf"))
    text = problem(e)
    assert "has 2 of 3 shards" in text and "M-00002-of-00003.gguf" in text
    assert "pin a revision where the upload is complete" in text


def test_hf_same_file_name_in_two_folders_is_refused(hub):
    with pytest.raises(ResolveProblem) as e:
        resolver(hub).resolve(Spec("acme/Twins-GGUF", "main", "files",
                                   ("a/M-Q4.gguf", "b/M-Q4.gguf")))
    assert "share the file name 'M-Q4.gguf'" in problem(e)


def test_hf_missing_repository_and_revision(hub):
    with pytest.raises(ResolveProblem) as e:
        resolver(hub).resolve(Spec("unsloth/Nope-GGUF", "main", "quant", "Q4"))
    assert "repository not found" in problem(e)
    assert f"{hub.url}/unsloth/Nope-GGUF" in problem(e)
    with pytest.raises(ResolveProblem) as e:
        resolver(hub).resolve(Spec("unsloth/Big-GGUF", "v9", "quant", "Q6_K"))
    assert "revision 'v9' does not exist" in problem(e)


def test_hf_gated_repository_needs_a_token_that_has_access(hub):
    spec = Spec("acme/Gated-GGUF", "main", "quant", "Q4_K_M")
    with pytest.raises(ResolveProblem) as e:
        resolver(hub).resolve(spec)
    assert "gated or private" in problem(e) and "HF_TOKEN" in problem(e)
    with pytest.raises(ResolveProblem) as e:
        resolver(hub, token="hf_wrong").resolve(spec)
    assert "HTTP 403" in problem(e) and "request access" in problem(e)
    r = resolver(hub, token=TOKEN).resolve(spec)
    assert r.needs_token and r.main.name == "G-Q4_K_M.gguf"


def test_hf_token_goes_only_to_the_endpoint_and_never_into_messages(hub, caplog):
    caplog.set_level(logging.DEBUG)
    hub.stats.reset()
    res = resolver(hub, token="hf_wrong")
    with pytest.raises(ResolveProblem) as e:
        res.resolve(Spec("acme/Gated-GGUF", "main", "quant", "Q4_K_M"))
    assert "hf_wrong" not in str(e.value) and "hf_wrong" not in caplog.text
    r = resolver(hub, token=TOKEN).resolve(Spec("unsloth/Big-GGUF", "main", "files",
                                                ("Big-F16.gguf", "README.md")))
    assert r.files[1].sha256 == sha(FILES["README.md"])
    assert TOKEN not in caplog.text
    assert all(q["auth"] for q in hub.stats.requests if q["kind"] in ("api", "resolve"))


def test_hf_resolve_all_lists_every_problem_with_its_users(hub):
    wanted = {
        Spec("unsloth/Big-GGUF", "main", "quant", "IQ9"): ["model 'a' on 'rig1'"],
        Spec("unsloth/Nope-GGUF", "main", "quant", "Q4"): ["model 'b' on 'rig1', 'rig2'"],
        Spec("unsloth/Big-GGUF", "main", "quant", "Q6_K"): ["model 'c' on 'rig2'"],
    }
    with pytest.raises(hf.HfError) as e:
        hf.resolve_all(resolver(hub), wanted)
    text = str(e.value)
    assert "2 model(s) cannot be resolved" in text and "nothing was changed" in text
    assert "model 'a' on 'rig1' (unsloth/Big-GGUF@main quant=IQ9)" in text
    assert "model 'b' on 'rig1', 'rig2'" in text and "model 'c'" not in text


def test_hf_unreachable_endpoint_suggests_the_lock():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = Resolver(f"http://127.0.0.1:{port}", hf_token=False, retries=0)
    with pytest.raises(ResolveProblem) as e:
        res.resolve(Spec("unsloth/Big-GGUF", "main", "quant", "Q6_K"))
    assert "cannot reach" in problem(e) and "llm-garage lock" in problem(e)
