"""GGUF headers read over HTTP Range, from files the gguf package wrote, served by the Hub
stand-in."""

from __future__ import annotations

import pytest
from gguf import GGUFReader

from lab.standins.gguf_gen import (
    set_tensor_type,
    write_hybrid_model,
    write_split_model,
    write_tiny_model,
)
from lab.standins.hf_server import HFServer
from llm_garage import gguf_header
from llm_garage.gguf_header import HeaderError, NeedMore
from llm_garage.hf import Resolver, Spec

TOKEN = "hf_header_test_token_0123456789"


def reader_sizes(path) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}


def test_header_sizes_every_tensor_like_the_gguf_package(tmp_path):
    path = write_tiny_model(tmp_path / "t.gguf", n_layers=3)
    data = path.read_bytes()
    header = gguf_header.parse(data, len(data))
    assert {t.name: t.nbytes for t in header.tensors} == reader_sizes(path)
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["llama.block_count"] == 3
    assert header.array_lengths["tokenizer.ggml.tokens"] == 320
    assert "tokenizer.ggml.tokens" not in header.metadata  # the tokenizer is skipped
    assert header.data_start % 32 == 0 and header.data_start < len(data)
    with pytest.raises(NeedMore):
        gguf_header.parse(data[:header.data_start - 40], len(data))
    with pytest.raises(HeaderError, match="no GGUF magic"):
        gguf_header.parse(b"PK\x03\x04" + data[4:], len(data))


def test_header_tolerates_tensor_types_it_does_not_know(tmp_path):
    path = write_tiny_model(tmp_path / "ik.gguf")
    expected = reader_sizes(path)
    set_tensor_type(path, "blk.0.ffn_down.weight", 146)  # ik_llama.cpp's IQ4_KSS
    with pytest.raises(ValueError):
        GGUFReader(path)  # the gguf package's reader does not know the id
    data = path.read_bytes()
    header = gguf_header.parse(data, len(data))
    down = next(t for t in header.tensors if t.name == "blk.0.ffn_down.weight")
    assert down.type == 146
    assert {t.name: t.nbytes for t in header.tensors} == expected


def test_hybrid_summary_has_what_the_plan_needs(tmp_path):
    path, = write_hybrid_model(tmp_path / "h.gguf", n_layers=8, interval=4)
    data = path.read_bytes()
    s = gguf_header.summarize([gguf_header.parse(data, len(data))])
    assert s["architecture"] == "qwen35moe" and s["n_layer"] == 8 and s["n_vocab"] == 320
    assert s["chat_template"] is True
    assert s["attention"] == {"head_count": 4, "head_count_kv": 2, "key_length": 32,
                              "value_length": 32, "sliding_window": None,
                              "sliding_window_pattern": None}
    assert s["recurrent"]["full_attention_interval"] == 4
    assert (s["recurrent"]["conv_kernel"], s["recurrent"]["inner_size"],
            s["recurrent"]["state_size"], s["recurrent"]["group_count"]) == (4, 128, 16, 2)
    # runs of identical layers: 0-2 linear, 3 attention, 4-6 linear, 7 attention
    assert [(b[0], b[1]) for b in s["blocks"]] == [(0, 2), (3, 3), (4, 6), (7, 7)]
    assert "attn_k.weight" in s["blocks"][1][2] and "ssm_out.weight" in s["blocks"][0][2]
    assert gguf_header.tensor_bytes(s) == reader_sizes(path)


@pytest.fixture
def hub(tmp_path):
    files = {}
    for p in write_hybrid_model(tmp_path / "H-Q4.gguf", n_layers=8, split_max_tensors=40):
        files[f"Q4/{p.name}"] = p
    tiny = write_tiny_model(tmp_path / "T-Q8_0.gguf")
    server = HFServer(token=TOKEN, page_size=50)
    server.add_repo("acme/Hybrid-GGUF", files, lfs=True)
    server.add_repo("acme/Gated-GGUF", {"T-Q8_0.gguf": tiny}, gated=True, lfs=True)
    with server:
        yield server, files


def resolve(server, repo, selector, token=None):
    (kind, value), = selector.items()
    resolver = Resolver(server.url, hf_token=token or False, retries=0)
    return resolver.resolve(Spec(repo, "main", kind, value))


def test_split_model_headers_are_read_by_range_and_merged(hub):
    server, files = hub
    resolved = resolve(server, "acme/Hybrid-GGUF", {"quant": "Q4"})
    assert len(resolved.files) == 4
    server.stats.reset()
    summary, fetched = gguf_header.read_model(resolved, server.url, start=2048)
    expected = {}
    for p in files.values():
        expected.update(reader_sizes(p))
    assert gguf_header.tensor_bytes(summary) == expected
    assert summary["n_layer"] == 8 and summary["recurrent"]["full_attention_interval"] == 4
    # only the headers were read: shard 1 (the tokenizer) grew 2 KiB -> 4 -> 8 -> 16 KiB
    for f, got in zip(sorted(resolved.files, key=lambda f: f.name), fetched, strict=True):
        assert got.header.data_start <= got.bytes_read < f.size
    assert 8192 < fetched[0].header.data_start <= 16384
    assert fetched[0].requests == 4 and fetched[0].bytes_read == 16384
    served = server.stats.bytes_served()
    assert sum(served.values()) == sum(x.bytes_read for x in fetched)
    cdn = [r for r in server.stats.requests if r["kind"] == "cdn"]
    assert cdn and all(r["range"] and r["status"] == 206 for r in cdn)
    assert summary["header_bytes"] == [x.header.data_start for x in fetched]


def test_a_server_that_ignores_range_is_read_only_as_far_as_needed(hub):
    server, files = hub
    resolved = resolve(server, "acme/Hybrid-GGUF", {"quant": "Q4"})
    server.faults.ignore_range(None, times=None)
    summary, fetched = gguf_header.read_model(resolved, server.url, start=4096)
    assert summary["n_layer"] == 8
    assert all(x.bytes_read < f.size for x, f in zip(fetched, resolved.files, strict=True))


def test_the_read_stops_at_the_cap(hub):
    server, _ = hub
    resolved = resolve(server, "acme/Hybrid-GGUF", {"quant": "Q4"})
    with pytest.raises(HeaderError, match="larger than 4096 bytes"):
        gguf_header.read_model(resolved, server.url, start=1024, cap=4096)


def test_gated_headers_need_the_token_which_goes_to_the_endpoint_only(hub):
    server, _ = hub
    resolved = resolve(server, "acme/Gated-GGUF", {"files": ("T-Q8_0.gguf",)}, token=TOKEN)
    with pytest.raises(HeaderError, match="HTTP 401"):
        gguf_header.read_model(resolved, server.url)
    server.stats.reset()
    summary, _ = gguf_header.read_model(resolved, server.url, TOKEN)
    assert summary["architecture"] == "llama"
    by_kind = {r["kind"]: r["auth"] for r in server.stats.requests}
    assert by_kind == {"resolve": True, "cdn": False}


def test_split_model_with_a_missing_shard_is_refused(tmp_path):
    paths = write_split_model(tmp_path, "S", 3)
    headers = [gguf_header.parse(p.read_bytes(), p.stat().st_size) for p in paths[:2]]
    with pytest.raises(HeaderError, match="split.count 3 but 2 shard"):
        gguf_header.summarize(headers)
