"""The memory plan: placement by the engine's rules and the hybrid-aware caches, checked
against numbers worked out by hand."""

from __future__ import annotations

import pytest

from llm_garage import fit
from llm_garage.fit import GIB, MIB, Options
from llm_garage.settings import load_rig


def small(n_layer=4, tied=False):
    """4 layers: attn_k 100 B, experts 1000 B, router 10 B each; token_embd 1000 B,
    output 500 B, output_norm 4 B; 2 KV heads of 8."""
    other = {"token_embd.weight": 1000, "output_norm.weight": 4}
    if not tied:
        other["output.weight"] = 500
    return {
        "architecture": "llama", "n_layer": n_layer, "n_vocab": 100, "n_embd": 32,
        "n_ctx_train": 4096,
        "attention": {"head_count": 4, "head_count_kv": 2, "key_length": 8, "value_length": 8},
        "recurrent": {},
        "blocks": [[0, n_layer - 1, {"attn_k.weight": 100, "ffn_up_exps.weight": 1000,
                                     "ffn_gate_inp.weight": 10}]],
        "other": other,
    }


def weights(p):
    return {d.name: d.weights for d in p.devices}


def test_layers_split_by_count_output_on_the_last_gpu_token_embd_on_the_cpu():
    p = fit.plan(small(), Options(gpus=["0", "1"], tensor_split=[1, 1], ctx_size=1024))
    # 5 "layers" (4 blocks + output), splits 0.5/1.0: i/5 < 0.5 -> 0, 1, 2 on CUDA0
    assert p.device("CUDA0").layers == [0, 1, 2] and p.device("CUDA1").layers == [3, 4]
    assert weights(p) == {"CUDA0": 3 * 1110, "CUDA1": 1110 + 504, "CPU": 1000}
    # f16 KV: (8 x 2 + 8 x 2) elements x 2 bytes = 64 B per cell and layer
    assert (p.device("CUDA0").kv, p.device("CUDA1").kv, p.device("CPU").kv) == (
        3 * 65_536, 65_536, 0)


def test_ngl_keeps_the_first_layers_on_the_cpu():
    p = fit.plan(small(), Options(gpus=["0"], n_gpu_layers=2, ctx_size=1024))
    # the last 2 of 5: block 3 and the output
    assert p.device("CUDA0").layers == [3, 4]
    assert weights(p) == {"CUDA0": 1110 + 504, "CPU": 1000 + 3 * 1110}
    assert p.device("CPU").kv == 3 * 65_536


def test_cpu_moe_n_cpu_moe_and_ot_rules_first_match_wins():
    opts = dict(gpus=["0", "1"], tensor_split=[1, 1], ctx_size=1024)
    p = fit.plan(small(), Options(**opts, cpu_moe=True))
    assert weights(p) == {"CUDA0": 3 * 110, "CUDA1": 110 + 504, "CPU": 1000 + 4 * 1000}
    p = fit.plan(small(), Options(**opts, n_cpu_moe=1))
    assert weights(p) == {"CUDA0": 110 + 2 * 1110, "CUDA1": 1110 + 504, "CPU": 2000}
    # --cpu-moe comes first on the command line: the expert tensor of block 3 stays on the
    # CPU; the rest of block 3 moves to CUDA0
    p = fit.plan(small(), Options(**opts, cpu_moe=True, override_tensor=[r"blk\.3\.=CUDA0"]))
    assert weights(p) == {"CUDA0": 4 * 110, "CUDA1": 504, "CPU": 5000}
    p = fit.plan(small(), Options(**opts, override_tensor=[r"exps=CPU,blk\.0\.=CUDA1"]))
    assert weights(p) == {"CUDA0": 2 * 110, "CUDA1": 110 * 2 + 504, "CPU": 5000}


def test_tied_embeddings_put_a_copy_on_the_output_gpu():
    p = fit.plan(small(tied=True), Options(gpus=["0"], ctx_size=1024))
    assert weights(p) == {"CUDA0": 4 * 1110 + 4 + 1000, "CPU": 1000}


def test_cache_types_bytes_per_element_and_split_mode_none():
    p = fit.plan(small(), Options(gpus=["0", "1"], split_mode="none", ctx_size=1024,
                                  cache_type_k="q8_0", cache_type_v="q4_0"))
    # K: 16 x 34/32 = 17 B, V: 16 x 18/32 = 9 B per cell and layer; all on CUDA0
    assert p.device("CUDA0").kv == 4 * 26_624 and p.device("CUDA1").layers == []


def test_48_layers_with_ts_0_9_and_five_ones():
    layout = small(n_layer=48)
    p = fit.plan(layout, Options(gpus=[str(i) for i in range(6)],
                                 tensor_split=[0.9, 1, 1, 1, 1, 1], ctx_size=1024))
    blocks = [len([x for x in d.layers if x < 48]) for d in p.gpus]
    assert blocks == [8, 8, 9, 8, 8, 7] and p.device("CUDA5").layers[-1] == 48
    # the engine logs 49/49 layers offloaded: CUDA5 holds 7 blocks and the output layer
    assert "CUDA5 (GPU 5)    7+out" in "\n".join(fit.table(p))


# Qwen3.5-397B-A17B's published shapes: 60 layers, one full-attention layer in 4, 2 KV heads
# of 256, gated delta net with conv kernel 4, 64 value heads x 128 (inner 8192), 16 key
# groups, state 128.
QWEN397 = {
    "architecture": "qwen35moe", "n_layer": 60, "n_vocab": 248320, "n_embd": 4096,
    "n_ctx_train": 262144,
    "attention": {"head_count": 32, "head_count_kv": 2, "key_length": 256,
                  "value_length": 256},
    "recurrent": {"full_attention_interval": 4, "conv_kernel": 4, "inner_size": 8192,
                  "state_size": 128, "group_count": 16},
    "blocks": [[0, 59, {"ffn_up_exps.weight": GIB}]],
    "other": {"token_embd.weight": 2 * GIB, "output.weight": 2 * GIB},
}


def test_qwen35_hybrid_kv_is_on_the_attention_layers_only():
    assert fit.recurrent_layers(QWEN397).count(False) == 15
    assert [i for i, r in enumerate(fit.recurrent_layers(QWEN397)) if not r][:3] == [3, 7, 11]
    p = fit.plan(QWEN397, Options(gpus=["0"], ctx_size=262144, cache_type_k="q8_0",
                                  cache_type_v="q8_0"))
    gpu = p.device("CUDA0")
    # 15 layers x (256 x 2) x 2 x 34/32 B = 16,320 B = 15.94 KiB per token; x 262,144
    assert gpu.kv == 15 * 1088 * 262144 == 4_278_190_080
    assert round(gpu.kv / GIB, 2) == 3.98
    # 45 layers x 4 x [3 x (8192 + 2 x 16 x 128) + 128 x 8192] B, one slot
    assert gpu.recurrent == 45 * 4 * (3 * 12288 + 128 * 8192) == 195_379_200
    assert round(gpu.recurrent / MIB) == 186
    f16 = fit.plan(QWEN397, Options(gpus=["0"], ctx_size=262144, parallel=2))
    assert f16.device("CUDA0").kv == 15 * 2048 * 262144 == 7.5 * GIB  # ctx shared by slots
    assert f16.device("CUDA0").recurrent == 2 * gpu.recurrent  # state per slot


def test_compute_estimate_and_capacity():
    opts = dict(gpus=["0"], ctx_size=262144, cache_type_k="q8_0", cache_type_v="q8_0",
                compute_reserve=1024 * MIB)
    p = fit.plan(QWEN397, Options(**opts))
    # logits of one 512-token micro-batch on the output GPU, plus the reserve
    assert p.device("CUDA0").compute == 248320 * 512 * 4 + 1024 * MIB
    off = fit.plan(QWEN397, Options(**opts, flash_attn="off"))
    assert off.device("CUDA0").compute - p.device("CUDA0").compute == 32 * 512 * 262144 * 4
    total = p.device("CUDA0").total
    fits = fit.plan(QWEN397, Options(**opts, capacities={"0": total}))
    assert fits.overfull() == [] and fits.device("CUDA0").headroom == 0
    short = fit.plan(QWEN397, Options(**opts, capacities={"0": total - 1}))
    assert [d.name for d in short.overfull()] == ["CUDA0"]


def test_options_come_from_the_profile_and_the_gpu_settings():
    rig, errors = load_rig("r", {
        "gpu_count": 3, "gpu_memory_mib": [24576, 24576, 12288], "gpu_reserve_mib": [512, 0, 0],
        "gpu_compute_reserve_mib": 256,
        "engines": {"e": {"kind": "llama.cpp", "ref": "b8137"}},
        "models": {"m": {"repo": "a/b", "revision": "main", "quant": "Q4"}},
        "profiles": {"p": {"model": "m", "engine": "e", "port": 8000, "ctx_size": 1000,
                           "cuda_visible_devices": [2, 0], "tensor_split": [1, 3],
                           "cpu_moe": True}}})
    assert not errors, errors
    opts = fit.options_for(rig, "p")
    assert opts.gpus == ["2", "0"] and opts.compute_reserve == 256 * MIB
    assert opts.capacities == {"2": 12288 * MIB, "0": (24576 - 512) * MIB}
    p = fit.plan(small(), opts)
    assert p.device("CUDA0").gpu == "2" and p.device("CUDA0").capacity == 12288 * MIB
    assert p.device("CUDA0").layers == [0, 1]  # 1/4 of 5 layers: i/5 < 0.25


@pytest.mark.parametrize("key, value", [("gpu_memory_mib", [24576]),
                                        ("gpu_reserve_mib", [0, 0, 0])])
def test_per_gpu_memory_lists_must_match_gpu_count(key, value):
    _, errors = load_rig("r", {"gpu_count": 2, key: value})
    assert any(key in str(e) and "values for gpu_count 2" in str(e) for e in errors), errors


def test_kv_cells_are_padded_and_split_per_slot_as_the_engine_does():
    assert fit.kv_cells(1000, 1, True) == (1024, 1)
    assert fit.kv_cells(262144, 4, True) == (262144, 1)  # one stream shared by 4 slots
    assert fit.kv_cells(10000, 3, False) == (3584, 3)  # pad(pad(10000) / 3) = pad(3413)
    p = fit.plan(small(), Options(gpus=["0"], ctx_size=10000, parallel=3, kv_unified=False))
    assert p.kv_cells == 3 * 3584 and p.device("CUDA0").kv == 4 * 64 * 3 * 3584
    swa = {**small(), "attention": {**small()["attention"], "sliding_window": 128,
                                    "sliding_window_pattern": 2}}
    # layers 0 and 2 slide: pad(min(cells, 128 x 3 + 512)) = 1024 unified, 768 per stream
    unified = fit.plan(swa, Options(gpus=["0"], ctx_size=10000, parallel=3))
    assert unified.device("CUDA0").kv == 64 * (2 * 10240 + 2 * 1024)
    split = fit.plan(swa, Options(gpus=["0"], ctx_size=10000, parallel=3, kv_unified=False))
    assert split.device("CUDA0").kv == 64 * 3 * (2 * 3584 + 2 * 768)


def test_llama_server_default_slots_and_kv_unified_from_the_profile():
    def opts(kind="llama.cpp", **settings):
        rig, errors = load_rig("r", {
            "gpu_count": 1, "engines": {"e": {"kind": kind, "ref": "b8137" if kind == "llama.cpp"
                                              else "a" * 40}},
            "models": {"m": {"repo": "a/b", "revision": "main", "quant": "Q4"}},
            "profiles": {"p": {"model": "m", "engine": "e", "port": 8000, **settings}}})
        assert not errors, errors
        return fit.options_for(rig, "p")

    auto = opts()
    assert (auto.parallel, auto.kv_unified) == (4, True) and "4 slots" in auto.notes[0]
    assert fit.plan(QWEN397, auto).device("CUDA0").recurrent == 4 * 195_379_200
    assert (opts(parallel=2).parallel, opts(parallel=2).kv_unified) == (2, False)
    assert opts(parallel=2, extra_args=["--kv-unified"]).kv_unified
    ik = opts("ik_llama.cpp")
    assert (ik.parallel, ik.kv_unified, ik.notes) == (None, True, ())
