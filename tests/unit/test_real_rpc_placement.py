"""The memory plan per device against the engine's own placement, without GPUs.

Real llama.cpp (the tree lab.standins.real_llama gives, b7001) built CPU-only with
GGML_RPC=ON (lab.rpc_engine); three local ggml-rpc-server processes on the CPU backend act as
three GPUs, in the order --rpc lists them. Real llama-server loads small GGUF models made with
lab.standins.gguf_gen across them with -ngl, -ts, -ot, --cpu-moe and --n-cpu-moe, and logs a
model buffer, a KV buffer and (hybrid models) a recurrent-state buffer per device; fit.plan,
fed the models' own headers and the same flags, must give every device the same weights, KV
and state (1 %, or the log's rounding to 0.01 MiB per figure). The hybrid model also loads on
the CPU alone (no --rpc), as on a rig without GPUs.

ccache lives outside the clone ($GARAGE_RPC_CCACHE, default /var/cache/llm-garage/rpc-ccache):
the build takes about 19 minutes cold on 2 busy cores, about 2 minutes warm; the loads take a
few seconds each. $GARAGE_RPC_BUILD names a folder to build in and keep: a finished build
there is reused as it is. Skipped where the llama.cpp tree cannot be had."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from lab import rpc_engine
from lab.standins.gguf_gen import write_hybrid_model, write_split_model, write_tiny_model
from lab.standins.real_llama import ensure_real_llama
from llm_garage import fit, gguf_header
from llm_garage.fit import MIB, Options

log = logging.getLogger("garage.tests")
DEVICES = 3
BUILD_ENV = "GARAGE_RPC_BUILD"  # a folder to build in and keep (reused when built)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        real = ensure_real_llama()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"no llama.cpp tree here: {error}")
    kept = os.environ.get(BUILD_ENV)
    made = rpc_engine.build(real, Path(kept) if kept else tmp_path_factory.mktemp("rpc-llama"))
    log.info("llama.cpp with GGML_RPC built in %.0f s (ccache hits %d, misses %d)",
             made.seconds, made.ccache_hits, made.ccache_misses)
    with rpc_engine.RpcServers(made, DEVICES, tmp_path_factory.mktemp("rpc-logs")) as servers:
        yield made, servers


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense llama model in 3 shards: 6 blocks of about 2.3 MiB (f32)."""
    return write_split_model(tmp_path_factory.mktemp("dense"), "Dense-F32", 3, n_layers=6,
                             vocab=2048, n_embd=256, n_ff=512)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A Qwen3.5 MoE (qwen35moe) of 8 blocks: full attention in blocks 3 and 7, gated delta
    net linear attention (recurrent state) in the others, 4 experts and a shared one."""
    return write_hybrid_model(tmp_path_factory.mktemp("hybrid") / "Hybrid-F32.gguf",
                              n_embd=256, key_length=64, n_ff_exp=128, vocab=1024,
                              state_size=32, v_heads=8, group_count=4)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A llama mixture of 4 experts, 4 blocks, one file."""
    return [write_tiny_model(tmp_path_factory.mktemp("moe") / "Moe-F32.gguf", n_layers=4,
                             vocab=1024, n_embd=128, n_head=4, n_head_kv=2, n_ff=256,
                             n_expert=4, name="Garage Tiny MoE")]


def layout_of(files: list[Path]) -> dict:
    headers = [gguf_header.parse(f.read_bytes(), f.stat().st_size) for f in files]
    return gguf_header.summarize(headers, [f.name for f in files])


def compare(engine, files: list[Path], tmp_path: Path, args: list[str], opts: Options,
            name: str) -> fit.Plan:
    """Load `files` on the RPC devices with `args`; every device's weights and KV as the
    plan has them for `opts` must match the engine's."""
    made, servers = engine
    servers = servers if opts.gpus else None  # no GPUs: the CPU alone, without --rpc
    text = rpc_engine.load(made, files[0], servers, args, tmp_path / f"{name}.log")
    reported = rpc_engine.device_figures(text, servers)
    lines = [line for line in text.splitlines() if "buffer size" in line]
    assert reported.get("CPU"), f"{name}: no load figures in the log:\n" + "\n".join(
        text.splitlines()[-40:])
    planned = fit.plan(layout_of(files), opts)
    log.info("%s: llama-server %s\n%s\nplan:\n%s", name, " ".join(args), "\n".join(lines),
             "\n".join(fit.table(planned)))
    for device in planned.devices:
        got = reported.get(device.name, {})
        for key, value in (("weights", device.weights), ("kv", device.kv),
                           ("state", device.recurrent)):
            figure = got.get(key, 0.0)
            slack = max(0.01 * figure, 0.005 * max(got.get(f"{key}_n", 0), 1))
            assert abs(value / MIB - figure) <= slack, (
                f"{name}: {device.name} {key}: plan {value / MIB:.4f} MiB, "
                f"engine {figure:.2f} MiB", lines)
    extra = set(reported) - {d.name for d in planned.devices}
    assert not extra, (name, extra, lines)
    return planned


def gpus() -> list[str]:
    return [str(i) for i in range(DEVICES)]


def test_layers_by_tensor_split_and_ngl_per_device(engine, dense, tmp_path):
    # every layer offloaded, uneven shares: 6 blocks + output over 3 devices
    p = compare(engine, dense, tmp_path, ["-ngl", "99", "-ts", "0.9,1,1", "-c", "2048"],
                Options(gpus=gpus(), n_gpu_layers=99, tensor_split=[0.9, 1, 1],
                        ctx_size=2048, parallel=4), "ts-0.9-1-1")
    assert [len(d.layers) for d in p.gpus] == [3, 2, 2]  # the last carries the output
    # 4 of 7 layers offloaded: blocks 0..2 and their KV stay on the CPU; a zero share
    compare(engine, dense, tmp_path, ["-ngl", "4", "-ts", "2,0,1", "-c", "1024"],
            Options(gpus=gpus(), n_gpu_layers=4, tensor_split=[2, 0, 1], ctx_size=1024,
                    parallel=4), "ngl4-ts-2-0-1")


def test_kv_per_slot_streams_and_quantized_k_per_device(engine, dense, tmp_path):
    compare(engine, dense, tmp_path,
            ["-ngl", "99", "-ts", "1,1,1", "-c", "3000", "-np", "3", "-ctk", "q8_0"],
            Options(gpus=gpus(), n_gpu_layers=99, tensor_split=[1, 1, 1], ctx_size=3000,
                    parallel=3, cache_type_k="q8_0", kv_unified=False), "np3-q8_0")


def test_expert_overrides_per_device(engine, moe, tmp_path):
    made, servers = engine
    # Not memory-mapped (this tree's --load-mode none; older trees: --no-mmap), the CPU's
    # share is one buffer of exactly its tensors. Memory-mapped, the engine logs the file's
    # span from the first to the last CPU tensor (CPU_Mapped), which here holds blocks 0-1's
    # attention too (loaded onto the devices): page cache, which the plan does not count.
    base = Options(gpus=gpus(), n_gpu_layers=99, tensor_split=[1, 1, 1], ctx_size=1024,
                   parallel=4, weights_in_ram=True)
    args = ["-ngl", "99", "-ts", "1,1,1", "-c", "1024", "--load-mode", "none"]
    p = compare(engine, moe, tmp_path, [*args, "--n-cpu-moe", "2"],
                replace(base, n_cpu_moe=2), "n-cpu-moe-2")
    assert p.device("CPU").weights > p.device("CUDA0").weights
    compare(engine, moe, tmp_path, [*args, "--cpu-moe"],
            replace(base, cpu_moe=True), "cpu-moe")
    # -ot in order, the first match decides: block 3's experts to the first device (the plan
    # calls it CUDA0), then every up_exps to the CPU (block 3's stays where the first put it)
    rules = (r"blk\.3\.ffn_.*_exps=CUDA0", r"ffn_up_exps=CPU")
    engine_rules = [r.replace("CUDA0", servers.buffer_type(0)) for r in rules]
    compare(engine, moe, tmp_path, [*args, "-ot", engine_rules[0], "-ot", engine_rules[1]],
            replace(base, override_tensor=rules), "ot")


def test_hybrid_kv_on_attention_layers_and_recurrent_state_per_device(engine, hybrid, tmp_path):
    # 9 layers over 3 devices: blocks 0-2 (recurrent), 3-5 (3 is attention), 6-7 + output
    # (7 is attention); the KV follows the attention layers, the state the others; 4 slots
    p = compare(engine, hybrid, tmp_path, ["-ngl", "99", "-ts", "1,1,1", "-c", "4096"],
                Options(gpus=gpus(), n_gpu_layers=99, tensor_split=[1, 1, 1], ctx_size=4096,
                        parallel=4), "hybrid-ts-1-1-1")
    assert [d.kv > 0 for d in p.gpus] == [False, True, True]
    assert all(d.recurrent > 0 for d in p.gpus)
    # 2 slots, not unified (a KV stream per slot); the first 3 blocks' experts on the CPU,
    # not memory-mapped so the CPU's buffer is exactly its tensors
    compare(engine, hybrid, tmp_path,
            ["-ngl", "99", "-ts", "2,1,1", "-c", "4096", "-np", "2", "--n-cpu-moe", "3",
             "--load-mode", "none"],
            Options(gpus=gpus(), n_gpu_layers=99, tensor_split=[2, 1, 1], ctx_size=4096,
                    parallel=2, n_cpu_moe=3, kv_unified=False, weights_in_ram=True),
            "hybrid-np2-n-cpu-moe-3")


def test_hybrid_on_the_cpu_alone(engine, hybrid, tmp_path):
    p = compare(engine, hybrid, tmp_path, ["-c", "8192", "-np", "3", "-ctk", "q8_0",
                                           "--load-mode", "none"],
                Options(ctx_size=8192, parallel=3, cache_type_k="q8_0", kv_unified=False,
                        weights_in_ram=True), "hybrid-cpu")
    assert p.device("CPU").recurrent > 0 and p.device("CPU").kv > 0
