"""Where a profile's model lands, and how much memory each GPU needs: from the GGUF header
summary the lock records (`gguf_header.summarize`), before any byte of weights is downloaded.

Pure: no host, no network. The rules are llama.cpp's (`load_tensors` in src/llama-model.cpp,
the tensor overrides in src/llama-model-loader.cpp, the KV and recurrent caches in
src/llama-hparams.cpp and the per-architecture loaders); ik_llama.cpp places tensors the same
way for the flags llm-garage writes.

Weights
- `-ngl N` offloads the last N of the n_layer + 1 "layers" (the repeating blocks, then the
  output layer as index n_layer); the engine's default and 'auto'/'all' are taken as all.
- `-ts` splits **layers**, not bytes: the values are made cumulative and normalized, and
  layer i (counted from the first offloaded one) goes to the first GPU whose cumulative share
  exceeds i / offloaded, compared in float32 as the engine does. Without -ts the engine splits
  by each GPU's free memory at start, which the plan cannot know: it uses equal shares and
  says so.
- `token_embd` stays on the CPU; the output layer (`output.weight`, `output_norm`, …) goes
  with index n_layer; a model without `output.weight` (tied embeddings) gets a copy of
  `token_embd` there.
- Overrides in the order llama-server receives them (`--cpu-moe`, `--n-cpu-moe N`, then each
  `-ot`): the first rule whose regex is found in the tensor name decides; `CPU` or `CUDA<n>`.
- `--split-mode none` puts every offloaded layer on the first visible GPU; `row` keeps the
  layers (and their KV) on the first GPU and spreads each block's weights over the GPUs by the
  -ts shares (an approximation: the engine splits matrices only). ik_llama.cpp's `attn` and
  `graph` modes are planned as `layer`.
- `cuda_visible_devices` picks and orders the GPUs: CUDA<n> is the n-th one listed.

Caches
- KV: only layers with attention hold one (hybrid models: `recurrent_layers`, else one layer
  in `full_attention_interval`, default 4, for qwen3next/qwen35/qwen35moe), `ctx_size` cells
  in total whatever `parallel` is (padded to 256; without a unified cache, each of the
  `parallel` streams gets ctx / parallel padded to 256), K = key_length × head_count_kv(layer)
  elements per cell (V with value_length), at the cache type's bytes per element (f16 unless
  set). A sliding-window layer (only when the header declares the pattern) holds, per stream,
  min(cells, window × (parallel if unified else 1) + ubatch) padded to 256.
- Recurrent state (hybrid layers): f32, 4 × [(conv_kernel − 1) × (inner + 2 × groups ×
  state) + state × inner] bytes per layer and slot, × max(1, parallel).
- llama-server without `parallel` runs 4 slots sharing one (unified) KV cache; with
  `parallel` the cache is split per slot unless `--kv-unified` is among extra_args.
  ik_llama.cpp keeps one cache, `parallel` slots (default 1).

Compute: the engine's compute buffers have no closed formula. The plan charges an estimate:
the logits of one micro-batch (n_vocab × ubatch × 4 bytes) on the GPU holding the output
layer, the attention scores of one layer (n_head × ubatch × ctx × 4 bytes) on each GPU with
attention layers when flash attention is off, plus `gpu_compute_reserve_mib` on every GPU the
model uses. Keep that margin: real buffers grow with -b/-ub and differ between builds.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from .gguf_header import tensor_bytes

MIB = 1024 * 1024
GIB = 1024 * MIB
# Bytes per element of each KV cache type (block size 32 for the quantized ones).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32,
                 "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
                 "q6_0": 26 / 32}
EXPS_RE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX
HYBRID_ARCHS = ("qwen3next", "qwen35", "qwen35moe")
INPUT_TENSORS = re.compile(r"(token_embd|token_types|position_embd|token_embd_norm)\.")
DEFAULT_UBATCH = 512
CTX_STEP = 256  # llama.cpp pads the context (and each sequence's share of it) to 256 cells
CPU = "CPU"


def f32(x: float) -> float:
    """x rounded to float32, as the engine computes its split points."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


@dataclasses.dataclass
class Device:
    name: str  # CUDA0, CUDA1, …, CPU
    gpu: str | None = None  # the rig's GPU (index or uuid) for a CUDA device
    layers: list[int] = dataclasses.field(default_factory=list)  # n_layer = the output layer
    weights: int = 0
    kv: int = 0
    recurrent: int = 0
    compute: int = 0
    capacity: int | None = None  # bytes usable (memory minus reserve); None = unknown
    memory_note: str = ""  # where the capacity comes from, for messages
    counts_weights: bool = True  # False: the CPU's weights are memory-mapped (page cache)

    @property
    def total(self) -> int:
        weights = self.weights if self.counts_weights else 0
        return weights + self.kv + self.recurrent + self.compute

    @property
    def label(self) -> str:
        return self.name if self.gpu is None else f"{self.name} (GPU {self.gpu})"

    @property
    def headroom(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.total


@dataclasses.dataclass
class Plan:
    devices: list[Device]
    notes: list[str]
    kv_cells: int
    n_layer: int

    @property
    def gpus(self) -> list[Device]:
        return [d for d in self.devices if d.name != CPU]

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def overfull(self) -> list[Device]:
        """The devices (GPUs, and the CPU when the RAM is known) that would run out."""
        return [d for d in self.devices if d.headroom is not None and d.headroom < 0]

    def shortfall(self) -> str:
        """Which devices are short and by how much, in one line."""
        parts = []
        for d in self.overfull():
            what = "RAM" if d.name == CPU else "memory"
            note = f" ({d.memory_note})" if d.memory_note else ""
            parts.append(f"{d.label} needs {mib(d.total)} of {what} but has {mib(d.capacity)}"
                         f"{note}: {mib(-d.headroom)} short")
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class Options:
    """The profile's flags that decide placement and caches (plain values, for tests)."""

    gpus: Sequence[str] = ()  # the visible GPUs in CUDA order (index or uuid)
    n_gpu_layers: int | str | None = None
    tensor_split: Sequence[float] | None = None
    split_mode: str | None = None
    override_tensor: Sequence[str] = ()
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    ctx_size: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    parallel: int | None = None
    ubatch_size: int | None = None
    flash_attn: str | None = None
    capacities: Mapping[str, int] = dataclasses.field(default_factory=dict)  # gpu -> bytes
    compute_reserve: int = 0  # bytes per used GPU
    memory_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # gpu -> source
    ram: int | None = None  # bytes of RAM the CPU's share may use; None = unknown
    ram_note: str = ""
    weights_in_ram: bool = False  # --no-mmap or --mlock: the CPU's weights count against RAM
    kv_unified: bool = True  # one KV stream shared by all sequences (else one per sequence)
    notes: Sequence[str] = ()  # said with the plan (how the options were chosen)


# --- layers -------------------------------------------------------------------------------------

def recurrent_layers(layout: Mapping[str, Any]) -> list[bool]:
    """Which layers keep a recurrent state instead of a KV cache."""
    n = layout["n_layer"]
    rec = layout.get("recurrent") or {}
    explicit = rec.get("recurrent_layers")
    if isinstance(explicit, list) and len(explicit) == n:
        return [bool(v) for v in explicit]
    interval = rec.get("full_attention_interval")
    if layout["architecture"] in HYBRID_ARCHS or interval:
        interval = interval or 4
        trunk = n - (layout.get("nextn_layers") or 0)
        return [i < trunk and (i + 1) % interval != 0 for i in range(n)]
    return [False] * n


def _per_layer(value, i: int):
    if isinstance(value, list):
        return value[i] if i < len(value) else None
    return value


def kv_bytes_per_cell(layout: Mapping[str, Any], i: int, cache_k: str, cache_v: str) -> float:
    """KV bytes one cell (token) costs in layer i (0 for a layer without attention)."""
    att = layout.get("attention") or {}
    hkv = _per_layer(att.get("head_count_kv"), i)
    head = _per_layer(att.get("head_count"), i)
    if not hkv:
        return 0.0
    n_embd = layout.get("n_embd") or 0
    k_len = att.get("key_length") or (n_embd // head if head else 0)
    v_len = att.get("value_length") or (n_embd // head if head else 0)
    return k_len * hkv * KV_TYPE_BYTES[cache_k] + v_len * hkv * KV_TYPE_BYTES[cache_v]


def recurrent_bytes(layout: Mapping[str, Any]) -> int:
    """f32 recurrent state of one hybrid layer for one sequence."""
    r = layout.get("recurrent") or {}
    conv, inner = r.get("conv_kernel") or 0, r.get("inner_size") or 0
    state, groups = r.get("state_size") or 0, r.get("group_count") or 0
    return 4 * (max(conv - 1, 0) * (inner + 2 * groups * state) + state * inner)


def swa_layers(layout: Mapping[str, Any]) -> list[bool]:
    n = layout["n_layer"]
    att = layout.get("attention") or {}
    pattern = att.get("sliding_window_pattern")
    if not att.get("sliding_window") or pattern is None:
        return [False] * n
    if isinstance(pattern, list):
        return [bool(pattern[i]) if i < len(pattern) else False for i in range(n)]
    if isinstance(pattern, int) and pattern > 0:
        return [i % pattern < pattern - 1 for i in range(n)]
    return [False] * n


def layer_devices(n_layer: int, n_gpu_layers: int, shares: Sequence[float]) -> list[int | None]:
    """Device index (into `shares`) of each layer 0..n_layer (n_layer = output); None = CPU."""
    if not shares:
        return [None] * (n_layer + 1)
    cumulative, total = [], f32(0.0)
    for s in shares:
        total = f32(total + f32(s))
        cumulative.append(total)
    splits = [f32(c / total) for c in cumulative]
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(None)
            continue
        x = f32((il - start) / act)
        out.append(min(next((g for g, s in enumerate(splits) if s > x), len(splits) - 1),
                       len(splits) - 1))
    return out


# --- the plan -----------------------------------------------------------------------------------

def _rules(opts: Options, notes: list[str]) -> list[tuple[re.Pattern, str]]:
    rules = []
    if opts.cpu_moe:
        rules.append((re.compile(EXPS_RE), CPU))
    for i in range(opts.n_cpu_moe or 0):
        rules.append((re.compile(rf"blk\.{i}{EXPS_RE}"), CPU))
    for rule in opts.override_tensor:
        for item in rule.split(","):  # PATTERN=BUFT[,PATTERN=BUFT]
            pattern, _, buft = item.rpartition("=")
            name = buft.strip()
            if re.fullmatch(r"CUDA\d+", name):
                if int(name[4:]) >= len(opts.gpus):
                    notes.append(f"-ot {item}: no {name} among {len(opts.gpus)} visible GPU(s); "
                                 "planned on the CPU")
                    name = CPU
            elif name.upper() != CPU:
                notes.append(f"-ot {item}: buffer type {name} is planned as the CPU")
                name = CPU
            rules.append((re.compile(pattern), name))
    return rules


def plan(layout: Mapping[str, Any], opts: Options) -> Plan:
    """Per device: which layers, weights, KV, recurrent state and compute (estimate)."""
    notes: list[str] = list(opts.notes)
    n_layer = layout["n_layer"]
    gpus = list(opts.gpus)
    devices = [Device(f"CUDA{i}", g, capacity=opts.capacities.get(g),
                      memory_note=opts.memory_notes.get(g, ""))
               for i, g in enumerate(gpus)] + [
        Device(CPU, capacity=opts.ram, memory_note=opts.ram_note,
               counts_weights=opts.weights_in_ram)]
    ngl = opts.n_gpu_layers
    if ngl is None or isinstance(ngl, str):
        if ngl == "auto":
            notes.append("n_gpu_layers 'auto' lets the engine fit layers at start; planned "
                         "as all layers on the GPUs")
        ngl = n_layer + 1
    mode = opts.split_mode or "layer"
    if not gpus:
        layer_gpu = [None] * (n_layer + 1)
    elif mode in ("none", "row"):
        layer_gpu = layer_devices(n_layer, ngl, [1.0])
    else:
        if mode not in ("layer",):
            notes.append(f"split_mode {mode} is planned as layer")
        shares = list(opts.tensor_split or [])
        if not shares or all(s == 0 for s in shares):
            shares = [1.0] * len(gpus)
            if len(gpus) > 1:
                notes.append("no tensor_split: the engine splits by each GPU's free memory at "
                             "start; planned as equal shares")
        layer_gpu = layer_devices(n_layer, ngl, shares)

    def dev_of_layer(il: int) -> Device:
        g = layer_gpu[il]
        return devices[-1] if g is None else devices[g]

    for il in range(n_layer + 1):
        dev_of_layer(il).layers.append(il)

    rules = _rules(opts, notes)
    tensors = tensor_bytes(layout)
    if "output.weight" not in tensors and "token_embd.weight" in tensors:
        tensors["output.weight"] = tensors["token_embd.weight"]  # tied: a copy
    row_shares = None
    if mode == "row" and len(gpus) > 1:
        s = list(opts.tensor_split or [1.0] * len(gpus))
        row_shares = [x / sum(s) for x in s]
    block = re.compile(r"blk\.(\d+)\.")
    for name, nbytes in tensors.items():
        target = next((dev for rx, dev in rules if rx.search(name)), None)
        if target is not None:
            devices[-1 if target == CPU else int(target[4:])].weights += nbytes
            continue
        m = block.match(name)
        if INPUT_TENSORS.match(name):
            devices[-1].weights += nbytes
        elif m and int(m[1]) < n_layer:
            dev = dev_of_layer(int(m[1]))
            if row_shares and dev is not devices[-1]:
                for d, share in zip(devices, row_shares, strict=False):
                    d.weights += round(nbytes * share)
            else:
                dev.weights += nbytes
        else:
            dev_of_layer(n_layer).weights += nbytes

    # caches
    ctx = opts.ctx_size or layout.get("n_ctx_train") or 4096
    if not opts.ctx_size:
        notes.append(f"no ctx_size: planned with the model's training context ({ctx})")
    cache_k = opts.cache_type_k or "f16"
    cache_v = opts.cache_type_v or "f16"
    n_seq = max(1, opts.parallel or 1)
    ubatch = opts.ubatch_size or DEFAULT_UBATCH
    recurrent = recurrent_layers(layout)
    swa = swa_layers(layout)
    window = (layout.get("attention") or {}).get("sliding_window") or 0
    per_stream, streams = kv_cells(ctx, n_seq, opts.kv_unified)
    swa_cells = streams * _pad(min(per_stream, window * (n_seq if opts.kv_unified else 1)
                                   + ubatch), CTX_STEP)
    state = recurrent_bytes(layout) * n_seq
    attention_devs = set()
    for il in range(n_layer):
        dev = dev_of_layer(il)
        if recurrent[il]:
            dev.recurrent += state
            continue
        cells = swa_cells if swa[il] else per_stream * streams
        per_cell = kv_bytes_per_cell(layout, il, cache_k, cache_v)
        dev.kv += math.ceil(per_cell * cells)
        if per_cell:
            attention_devs.add(dev.name)

    # compute (estimate)
    used = [d for d in devices[:-1] if d.layers or d.weights]
    n_vocab = layout.get("n_vocab") or 0
    out_dev = dev_of_layer(n_layer)
    if out_dev.name != CPU:
        out_dev.compute += n_vocab * ubatch * 4
    if opts.flash_attn == "off":
        heads = (layout.get("attention") or {}).get("head_count") or 0
        heads = max(heads) if isinstance(heads, list) else heads
        for d in used:
            if d.name in attention_devs:
                d.compute += heads * ubatch * ctx * 4
    for d in used:
        d.compute += opts.compute_reserve
    cpu = devices[-1]
    if cpu.capacity is not None and cpu.weights and not cpu.counts_weights:
        notes.append("the CPU's weights are memory-mapped (page cache), not counted against "
                     "RAM (no_mmap or mlock count them)")
    return Plan(devices, notes, per_stream * streams, n_layer)


def _pad(n: int, step: int) -> int:
    return -(-n // step) * step


def kv_cells(ctx: int, n_seq: int, unified: bool) -> tuple[int, int]:
    """(cells per stream, streams) of the KV cache, as llama.cpp sizes it (llama_context,
    llama_kv_cache): the context padded to 256; one stream when the cache is unified, else
    one per sequence of ctx / n_seq cells, padded to 256 again."""
    ctx = _pad(ctx, CTX_STEP)
    if unified or n_seq == 1:
        return ctx, 1
    return _pad(ctx // n_seq, CTX_STEP), n_seq


# --- fixes --------------------------------------------------------------------------------------

def fits(layout: Mapping[str, Any], opts: Options) -> bool:
    return not plan(layout, opts).overfull()


def _largest(lo: int, hi: int, ok) -> int | None:
    """The largest n in lo..hi with ok(n), for ok true up to some n and false above."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _smallest(lo: int, hi: int, ok) -> int | None:
    """The smallest n in lo..hi with ok(n), for ok false up to some n and true above."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def layer_costs(layout: Mapping[str, Any], opts: Options) -> tuple[list[int], int] | None:
    """What each offloaded layer (the output layer last) costs the GPU holding it, and the
    bytes every used GPU carries whatever it holds (the compute reserve), measured by the plan
    itself with one device per layer. None when the layers are not placed by -ts (split mode
    none/row, or -ot rules that name a CUDA device)."""
    if (opts.split_mode or "layer") != "layer" or any(
            re.search(r"=\s*CUDA\d+", rule) for rule in opts.override_tensor):
        return None
    n_layer = layout["n_layer"]
    ngl = opts.n_gpu_layers if isinstance(opts.n_gpu_layers, int) else n_layer + 1
    act = min(ngl, n_layer + 1)
    if act < 1:
        return None
    one_each = dataclasses.replace(opts, gpus=[f"layer{i}" for i in range(act)],
                                   tensor_split=[1.0] * act, capacities={}, memory_notes={})
    p = plan(layout, one_each)
    return [d.total - opts.compute_reserve for d in p.gpus], opts.compute_reserve


def balanced_split(costs: Sequence[int], fixed: int, capacities: Sequence[int]
                   ) -> list[int] | None:
    """Layers per GPU, in order (the engine keeps layers contiguous), that fit every GPU's
    capacity with the most headroom in proportion; None when no split fits."""
    def pack(ratio: float) -> list[int] | None:
        counts, i = [], 0
        for g, cap in enumerate(capacities):
            limit = ratio * cap - fixed
            used, n = 0, 0
            last = g == len(capacities) - 1
            while i < len(costs) and (last or used + costs[i] <= limit):
                used += costs[i]
                i, n = i + 1, n + 1
            if used > limit:
                return None
            counts.append(n)
        return counts if i == len(costs) else None

    if pack(1.0) is None:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pack(mid) is not None else (mid, hi)
    return pack(hi)


def fixes(layout: Mapping[str, Any], opts: Options) -> list[str]:
    """Settings that make this profile fit, each alone, each checked by `plan`: the largest
    ctx_size, q8_0 KV, a tensor_split, the fewest --n-cpu-moe layers (or --cpu-moe)."""
    if fits(layout, opts):
        return []
    out = []
    n_layer = layout["n_layer"]
    ctx = opts.ctx_size or layout.get("n_ctx_train") or 4096
    if ctx > CTX_STEP:
        steps = _largest(1, (ctx - 1) // CTX_STEP, lambda k: fits(
            layout, dataclasses.replace(opts, ctx_size=k * CTX_STEP)))
        if steps is not None:
            out.append(f"ctx_size: {steps * CTX_STEP}")
    quantized = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q6_0"}
    if not ({opts.cache_type_k, opts.cache_type_v} <= quantized):
        q8 = dataclasses.replace(opts, cache_type_k="q8_0", cache_type_v="q8_0")
        if fits(layout, q8):
            fa = ", flash_attn: on" if opts.flash_attn == "off" else ""
            out.append(f"cache_type_k: q8_0, cache_type_v: q8_0{fa}")
    if len(opts.gpus) > 1 and all(d in opts.capacities for d in opts.gpus):
        measured = layer_costs(layout, opts)
        if measured is not None:
            counts = balanced_split(measured[0], measured[1],
                                    [opts.capacities[g] for g in opts.gpus])
            if counts is not None and counts != list(opts.tensor_split or []):
                split = dataclasses.replace(opts, tensor_split=[float(c) for c in counts])
                if fits(layout, split):
                    out.append(f"tensor_split: {counts}")
    experts = any(re.search(EXPS_RE, name) for name in tensor_bytes(layout))
    if experts and not opts.cpu_moe:
        start = (opts.n_cpu_moe or 0) + 1
        n = _smallest(start, n_layer, lambda k: fits(
            layout, dataclasses.replace(opts, n_cpu_moe=k))) if start <= n_layer else None
        if n is not None:
            out.append(f"n_cpu_moe: {n}")
        elif fits(layout, dataclasses.replace(opts, cpu_moe=True)):
            out.append("cpu_moe: true")
    return out


def refusal(host: str, profile: str, p: Plan, layout: Mapping[str, Any], opts: Options
            ) -> str:
    """One line for a profile that does not fit: which device is short, by how much, and
    the settings that would make it fit."""
    line = f"{host}: profile {profile} does not fit: {p.shortfall()}"
    found = fixes(layout, opts)
    if found:
        line += "; it fits with any one of: " + " | ".join(found)
    return line


# --- from settings ------------------------------------------------------------------------------

def options_for(rig, profile_name: str, memory: Mapping[str, Any] | None = None) -> Options:
    """The plan's inputs from a validated rig's profile, and what each GPU has for it: from
    `memory` (the rig's `RigMemory` fact `with_gpus`: nvidia-smi's memory.total and
    memory.free, the memory our own servers that this deploy replaces hold, /proc/meminfo)
    where it answers,
    else from the gpu_memory_mib setting. An engine built without CUDA runs on the CPU."""
    p = rig.profiles[profile_name]
    d = rig.data
    engine = rig.engines.get(p.engine)
    gpus = list(p.cuda_visible_devices or [str(i) for i in range(d.gpu_count)])
    if engine is not None and not engine.cuda:
        gpus = []
    memory = memory or {}
    kept = kept_units(rig, profile_name)
    servers = memory.get("servers") or {}
    rows = memory.get("gpus") or []
    capacities, notes = {}, {}
    for g in gpus:
        reserve = _per_gpu(d.gpu_reserve_mib, g) or 0
        row = next((r for r in rows if g in (str(r["index"]), r["uuid"])), None)
        if row is not None and row.get("total_mib") is not None \
                and row.get("free_mib") is not None:
            ours = sum(a["used_mib"] or 0 for a in memory.get("apps") or ()
                       if a["uuid"] == row["uuid"]
                       and a["pid"] in servers and servers[a["pid"]]["unit"] not in kept)
            total, free = row["total_mib"], row["free_mib"] + ours
            capacities[g] = min(free, total - reserve) * MIB
            held = total - free
            notes[g] = f"nvidia-smi: {total:,} MiB total, {held:,} MiB held by others"
            if reserve > held:
                notes[g] += f", gpu_reserve_mib {reserve:,}"
            continue
        total = _per_gpu(d.gpu_memory_mib, g)
        if total is not None:
            capacities[g] = (total - reserve) * MIB
            notes[g] = f"gpu_memory_mib {total:,}" + (
                f" - gpu_reserve_mib {reserve:,}" if reserve else "")
    parallel, unified, said = p.parallel, True, []
    if (engine is None or engine.kind == "llama.cpp") and parallel is None:
        parallel = 4
        said.append("no parallel: llama-server's default, 4 slots sharing one KV cache")
    elif engine is None or engine.kind == "llama.cpp":
        unified = any(a in ("-kvu", "--kv-unified") for a in p.extra_args)
    ram, ram_note = None, ""
    info = memory.get("ram")
    if info and info.get("available_kib") is not None:
        ours = sum(s["rss_kib"] or 0 for s in servers.values() if s["unit"] not in kept)
        available = min(info["available_kib"] + ours, info.get("total_kib") or 1 << 62)
        ram = available * 1024
        ram_note = f"/proc/meminfo: {info.get('total_kib', 0) // 1024:,} MiB total"
    return Options(gpus=gpus, n_gpu_layers=p.n_gpu_layers, tensor_split=p.tensor_split,
                   split_mode=p.split_mode, override_tensor=tuple(p.override_tensor),
                   cpu_moe=p.cpu_moe, n_cpu_moe=p.n_cpu_moe, ctx_size=p.ctx_size,
                   cache_type_k=p.cache_type_k, cache_type_v=p.cache_type_v,
                   parallel=parallel, ubatch_size=p.ubatch_size, flash_attn=p.flash_attn,
                   capacities=capacities, compute_reserve=d.gpu_compute_reserve_mib * MIB,
                   memory_notes=notes, ram=ram, ram_note=ram_note,
                   weights_in_ram=bool(p.no_mmap or p.mlock), kv_unified=unified,
                   notes=tuple(said))


def kept_units(rig, profile_name: str) -> set[str]:
    """Our llama-server units that keep running beside this profile: the other enabled
    profiles'. The memory any other of ours holds counts as free: a deploy restarts this
    profile's own service and stops those no enabled profile names."""
    from .layout import service_name

    return {service_name(n) for n, p in rig.profiles.items() if p.enabled and n != profile_name}


def _per_gpu(value, gpu: str):
    if value is None:
        return None
    if isinstance(value, list):
        return value[int(gpu)] if gpu.isdigit() and int(gpu) < len(value) else None
    return value


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def mib(n: int) -> str:
    return f"{n / MIB:,.1f} MiB"


def table(p: Plan) -> list[str]:
    """The plan as text rows, in MiB: one per GPU, then the CPU (when it holds anything)."""
    def m(n):
        return f"{n / MIB:,.1f}"

    cols = ("weights", "KV", "state", "compute", "total", "memory", "free")
    rows = [f"{'device':<14} {'layers':>7} " + " ".join(f"{c:>10}" for c in cols) + "  MiB"]
    for d in p.devices:
        if d.name == CPU and not (d.weights or d.kv or d.recurrent):
            continue
        label = d.label
        layers = str(len([x for x in d.layers if x < p.n_layer]))
        if p.n_layer in d.layers:
            layers += "+out"
        memory = "?" if d.capacity is None else m(d.capacity)
        free = "" if d.headroom is None else m(d.headroom)
        if d.name == CPU and d.capacity is None:
            memory = "RAM"
        values = (m(d.weights), m(d.kv), m(d.recurrent), m(d.compute), m(d.total), memory, free)
        rows.append(f"{label:<14} {layers:>7} " + " ".join(f"{v:>10}" for v in values))
    return rows
