"""Generated GGUF files are valid, split like gguf-split, and padded to exact sizes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gguf import GGUFReader

from lab.standins.gguf_gen import (
    CHATML_TEMPLATE,
    QWEN35_122B,
    read_metadata,
    write_header_only_moe,
    write_padded_model,
    write_split_model,
    write_tiny_model,
)


def test_fixture_gguf_tiny_model_is_a_llama(tmp_path):
    path = write_tiny_model(tmp_path / "tiny.gguf")
    meta = read_metadata(path)
    assert path.read_bytes()[:4] == b"GGUF"
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == CHATML_TEMPLATE
    assert meta["llama.vocab_size"] == 320
    assert path.stat().st_size < 1_000_000
    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 320
    names = {t.name: t for t in reader.tensors}
    assert "blk.1.ffn_down.weight" in names and "output.weight" in names
    assert [int(x) for x in names["token_embd.weight"].shape] == [64, 320]
    assert [int(x) for x in names["blk.0.attn_k.weight"].shape] == [64, 32]
    assert np.isfinite(names["output.weight"].data).all()


def test_fixture_gguf_seed_changes_content(tmp_path):
    a = write_tiny_model(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_tiny_model(tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b and a != c


@pytest.mark.parametrize("n_shards", [2, 3, 5])
def test_fixture_gguf_split_model(tmp_path, n_shards):
    shards = write_split_model(tmp_path, "Tiny-Q8_0", n_shards)
    assert [p.name for p in shards] == [f"Tiny-Q8_0-{i:05d}-of-{n_shards:05d}.gguf"
                                        for i in range(1, n_shards + 1)]
    metas = [read_metadata(p) for p in shards]
    assert [m["split.no"] for m in metas] == list(range(n_shards))
    assert {m["split.count"] for m in metas} == {n_shards}
    total = metas[0]["split.tensors.count"]
    assert sum(m["tensor_count"] for m in metas) == total
    assert metas[0]["general.architecture"] == "llama"
    assert "general.architecture" not in metas[1]


def test_fixture_gguf_padded_model_is_exact_and_fast(tmp_path):
    started = time.monotonic()
    path = write_padded_model(tmp_path / "big.gguf", 3 * 1024**3 + 7)
    assert time.monotonic() - started < 5
    assert path.stat().st_size == 3 * 1024**3 + 7
    assert path.stat().st_blocks * 512 < 64 * 1024**2  # sparse where the filesystem allows
    assert read_metadata(path)["general.architecture"] == "llama"
    with pytest.raises(ValueError):
        write_padded_model(tmp_path / "small.gguf", 1000)


def test_fixture_gguf_tool_model_prefers_ending_then_a_tool_call(tmp_path):
    from gguf import TokenType

    from lab.standins.gguf_gen import QWEN_TOOL_TOKENS, write_tool_model

    path = write_tool_model(tmp_path / "tool.gguf", "{{ messages }}")
    assert read_metadata(path)["tokenizer.chat_template"] == "{{ messages }}"
    reader = GGUFReader(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = {tokens[n]: int(types.parts[i][0]) for n, i in enumerate(types.data)}
    assert len(tokens) == 320
    assert {kinds[t] for t in QWEN_TOOL_TOKENS} == {TokenType.USER_DEFINED}
    assert kinds["<|im_end|>"] == TokenType.CONTROL
    tensors = {t.name: t.data for t in reader.tensors}
    # A hidden state normalised the way the model's is: the constant first component of
    # every token embedding dominates it.
    embd = tensors["token_embd.weight"]
    assert np.all(embd[:, 0] == 1.0)
    hidden = embd[tokens.index("h")] / np.sqrt(np.mean(embd[tokens.index("h")] ** 2))
    logits = tensors["output.weight"] @ hidden
    ranked = [tokens[i] for i in np.argsort(-logits)]
    assert ranked[:2] == ["<|im_end|>", "<tool_call>"]
    assert logits[tokens.index("<tool_call>")] - np.sort(logits)[-3] > 15


def test_moe_llama_has_routed_experts(tmp_path):
    path = write_tiny_model(tmp_path / "moe.gguf", n_layers=2, n_embd=64, n_ff=32, n_expert=4)
    meta = read_metadata(path)
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    names = {t.name: t for t in GGUFReader(path).tensors}
    assert "blk.0.ffn_up.weight" not in names
    # ggml order: [n_embd, n_ff, n_expert] and [n_ff, n_embd, n_expert]
    assert [int(x) for x in names["blk.1.ffn_up_exps.weight"].shape] == [64, 32, 4]
    assert [int(x) for x in names["blk.1.ffn_down_exps.weight"].shape] == [32, 64, 4]
    assert [int(x) for x in names["blk.1.ffn_gate_inp.weight"].shape] == [64, 4]


def test_header_only_moe_is_a_real_header_over_a_sparse_file(tmp_path):
    from llm_garage import gguf_header

    shape = {**QWEN35_122B, "n_layer": 8, "n_embd": 512, "n_expert": 8, "vocab": 3000}
    paths = write_header_only_moe(tmp_path, "H", 3, shape, expert_type="Q6_K")
    assert [p.name for p in paths] == [f"H-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    headers = []
    for p in paths:
        header = gguf_header.parse(p.read_bytes(), p.stat().st_size)
        # every byte after the header is a tensor's: the file ends where the last one does
        assert header.data_start + sum(t.nbytes for t in header.tensors) <= p.stat().st_size
        assert p.stat().st_blocks * 512 < p.stat().st_size  # sparse: no weights written
        sizes = {t.name: int(t.n_bytes) for t in GGUFReader(p).tensors}
        assert sizes == {t.name: t.nbytes for t in header.tensors}
        headers.append(header)
    summary = gguf_header.summarize(headers)
    assert summary["architecture"] == "qwen35moe" and summary["n_layer"] == 8
    assert summary["n_vocab"] == 3000 and summary["recurrent"]["full_attention_interval"] == 4
    up = gguf_header.tensor_bytes(summary)["blk.0.ffn_up_exps.weight"]
    assert up == 512 * 1024 * 8 // 256 * 210  # Q6_K: 210 bytes a block of 256
