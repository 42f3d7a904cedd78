"""GGUF headers over HTTP Range: what a memory plan needs, without downloading the weights.

A GGUF file starts with its metadata (key/value pairs, the tokenizer among them) and the
tensor infos (name, shape, type, offset); the weights follow, from the end of the infos
rounded up to `general.alignment` (32 unless set). Reading that prefix is enough to know the
architecture, the attention and recurrent parameters and where every byte of weights goes.

- `parse(buf, file_size)` parses a prefix; it raises `NeedMore` when the prefix ends before
  the tensor infos do. It never needs a type table: each tensor's size is the distance from
  its offset to the next tensor's (the last one runs to the end of the file), so quant types
  this code has never heard of (ik_llama.cpp's IQ4_KSS = 146 and friends) size correctly.
- `read_header(url, size, …)` asks for the first `start` bytes (2 MiB) with `Range`, and
  asks again for twice as much until the parse completes, up to `cap` (64 MiB); a server that
  ignores `Range` (200) is read only as far as needed.
- `read_model(resolved, base, token)` reads every shard of a pinned model from the endpoint
  the downloads use (the token goes only to that endpoint, never to the CDN it redirects to)
  and returns its `summary`: a small JSON-able dict that the lock records and `fit` plans from.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Mapping
from typing import Any

import requests

from . import hf

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
START = 2 * 1024 * 1024
CAP = 64 * 1024 * 1024
SUMMARY_FORMAT = 1

# GGUF value types: fixed sizes and struct codes (little-endian).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays kept in the parsed metadata (per-layer parameters); longer ones (the tokenizer's) are
# skipped, their length kept.
SMALL_ARRAY = 4096
BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


class NeedMore(Exception):
    """The prefix ends before the tensor infos do."""


class HeaderError(Exception):
    """Not a GGUF file we can read; the message says why."""


@dataclasses.dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int  # ggml type id, as stored (unknown ids are fine)
    offset: int  # from the start of the tensor data
    nbytes: int = 0


@dataclasses.dataclass
class Header:
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]  # every array's length, kept or not
    tensors: list[Tensor]
    data_start: int  # bytes of header: what had to be read

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


class _Reader:
    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise NeedMore()
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, code: str):
        size = struct.calcsize("<" + code)
        return struct.unpack("<" + code, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise HeaderError(f"string of {n} bytes at offset {self.pos}: not a GGUF header")
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise NeedMore()
        self.pos += n

    def value(self, vtype: int, keep: bool = True):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        raise HeaderError(f"unknown GGUF value type {vtype} at offset {self.pos}")


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def parse(buf: bytes, file_size: int | None = None) -> Header:
    """Parse a GGUF prefix. Raises NeedMore when `buf` ends inside the header, HeaderError
    when it is not a GGUF file (or is one this reader does not know)."""
    r = _Reader(buf)
    if r.take(4) != MAGIC:
        raise HeaderError("not a GGUF file (no GGUF magic)")
    version = r.unpack("I")
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (2 and 3 are; a "
                          "big-endian file reads as a huge version)")
    n_tensors = r.unpack("Q")
    n_kv = r.unpack("Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise HeaderError(f"{n_tensors} tensors and {n_kv} keys: not a GGUF header")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("I")
        if vtype == _ARRAY:
            etype = r.unpack("I")
            count = r.unpack("Q")
            lengths[key] = count
            keep = count <= SMALL_ARRAY and not key.startswith("tokenizer.ggml.")
            if etype in _SCALARS and not keep:
                size = struct.calcsize("<" + _SCALARS[etype]) * count
                r.take(size)
                continue
            items = [r.value(etype, keep) for _ in range(count)]
            if keep:
                metadata[key] = items
        else:
            metadata[key] = r.value(vtype)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > 8:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions: not a GGUF header")
        shape = tuple(r.unpack("Q") for _ in range(n_dims))
        ttype = r.unpack("I")
        offset = r.unpack("Q")
        tensors.append(Tensor(name, shape, ttype, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_start = _align(r.pos, alignment)
    _sizes(tensors, data_start, file_size)
    return Header(version, metadata, lengths, tensors, data_start)


def _sizes(tensors: list[Tensor], data_start: int, file_size: int | None) -> None:
    """Each tensor's bytes: the next offset minus its own; the last runs to the file's end."""
    ordered = sorted(tensors, key=lambda t: t.offset)
    for t, nxt in zip(ordered, ordered[1:], strict=False):
        t.nbytes = nxt.offset - t.offset
    if ordered:
        last = ordered[-1]
        if file_size is None:
            last.nbytes = 0
        else:
            last.nbytes = file_size - data_start - last.offset
            if last.nbytes < 0:
                raise HeaderError(f"tensor {last.name!r} starts past the end of the file "
                                  f"({file_size} bytes)")


# --- over HTTP ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Fetched:
    header: Header
    bytes_read: int
    requests: int


def _ranged(session: requests.Session, url: str, start: int, end: int,
            headers: Mapping[str, str]) -> bytes:
    """Bytes start..end-1 of url (a server that ignores Range is read only that far)."""
    response = session.get(url, headers={**headers, "Range": f"bytes={start}-{end - 1}"},
                           stream=True, timeout=hf.TIMEOUT)
    with response:
        if response.status_code == 416:
            return b""
        if response.status_code not in (200, 206):
            raise HeaderError(f"HTTP {response.status_code} reading {_safe(url)}")
        skip = start if response.status_code == 200 else 0
        want = end - start
        out = bytearray()
        for chunk in response.iter_content(1 << 16):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            out += chunk
            if len(out) >= want:
                break
        return bytes(out[:want])


def _safe(url: str) -> str:
    return url.split("?", 1)[0]


def read_header(url: str, size: int, *, session: requests.Session | None = None,
                token: str | None = None, endpoint: str | None = None, start: int = START,
                cap: int = CAP) -> Fetched:
    """Read and parse one file's header over HTTP Range. The token goes only to `endpoint`'s
    origin (requests drops it on a redirect to another host)."""
    session = session or requests.Session()
    headers = {"User-Agent": "llm-garage"}
    if token and endpoint and hf.origin(url) == hf.origin(endpoint):
        headers["Authorization"] = f"Bearer {token}"
    buf = b""
    want = min(start, size)
    calls = 0
    while True:
        if want > len(buf):
            calls += 1
            buf += _ranged(session, url, len(buf), want, headers)
        try:
            return Fetched(parse(buf, size), len(buf), calls)
        except NeedMore:
            pass
        if len(buf) >= size:
            raise HeaderError(f"{_safe(url)}: the file ends inside its GGUF header") from None
        if want >= cap:
            raise HeaderError(f"{_safe(url)}: the GGUF header is larger than {cap} bytes "
                              "(the read limit)") from None
        want = min(want * 2, cap, size)


def read_model(resolved: hf.Resolved, base: str, token: str | None = None, *,
               session: requests.Session | None = None, start: int = START,
               cap: int = CAP) -> tuple[dict[str, Any], list[Fetched]]:
    """Every shard's header of a pinned model, merged into its `summary`; with what each
    read cost (bytes, requests)."""
    session = session or requests.Session()
    m = hf.SHARD_RE.fullmatch(resolved.main.name)
    if m:  # a split model: every shard of the main file's set, in order
        files = sorted((f for f in resolved.files if (s := hf.SHARD_RE.fullmatch(f.name))
                        and (s["prefix"], s["count"]) == (m["prefix"], m["count"])),
                       key=lambda f: f.name)
    else:
        files = [resolved.main]
    fetched = [read_header(resolved.url(base, f), f.size, session=session, token=token,
                           endpoint=base, start=start, cap=cap) for f in files]
    return summarize([x.header for x in fetched], [f.name for f in files]), fetched


# --- the summary --------------------------------------------------------------------------------

def _int_or_list(value):
    if isinstance(value, list):
        ints = [int(v) for v in value]
        return ints[0] if ints and all(v == ints[0] for v in ints) else ints
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summarize(headers: list[Header], names: list[str] | None = None) -> dict[str, Any]:
    """One model (all its shards) as the plan needs it. Keys:

    architecture, n_layer, n_vocab, n_embd, n_ctx_train, n_expert, chat_template (bool);
    attention: head_count, head_count_kv (int, or a list per layer), key_length, value_length,
    sliding_window, sliding_window_pattern; recurrent: full_attention_interval,
    recurrent_layers (list of bool), ssm conv_kernel, inner_size, state_size, group_count;
    weights: `blocks` [[first layer, last layer, {suffix: bytes}]] (runs of layers whose
    tensors are the same), `other` {name: bytes}; header_bytes per shard."""
    names = names or [f"shard {i + 1}" for i in range(len(headers))]
    first = headers[0]
    meta = first.metadata
    count = meta.get("split.count")
    if len(headers) > 1 or count not in (None, 0, 1):
        problems = []
        for i, h in enumerate(headers):
            no = h.get("split.no")
            if no is not None and no != i:
                problems.append(f"{names[i]} says split.no {no}")
        if count is not None and count != len(headers):
            problems.append(f"split.count {count} but {len(headers)} shard(s) read")
        total = meta.get("split.tensors.count")
        got = sum(len(h.tensors) for h in headers)
        if total is not None and total != got:
            problems.append(f"split.tensors.count {total} but the shards hold {got}")
        if problems:
            raise HeaderError("inconsistent split model: " + "; ".join(problems))
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise HeaderError("no general.architecture in the first file's header")

    def key(k, default=None):
        return meta.get(f"{arch}.{k}", default)

    n_layer = key("block_count")
    if not isinstance(n_layer, int) or n_layer <= 0:
        raise HeaderError(f"no {arch}.block_count in the header")
    n_embd = key("embedding_length")
    head_count = _int_or_list(key("attention.head_count"))
    head_count_kv = _int_or_list(key("attention.head_count_kv", key("attention.head_count")))
    n_vocab = key("vocab_size") or first.array_lengths.get("tokenizer.ggml.tokens")

    per_layer: list[dict[str, int]] = [{} for _ in range(n_layer)]
    other: dict[str, int] = {}
    for h in headers:
        for t in h.tensors:
            m = BLOCK_RE.fullmatch(t.name)
            if m and int(m[1]) < n_layer:
                per_layer[int(m[1])][m[2]] = t.nbytes
            else:
                other[t.name] = t.nbytes
    blocks: list[list] = []
    for i, tensors in enumerate(per_layer):
        if blocks and blocks[-1][2] == tensors and blocks[-1][1] == i - 1:
            blocks[-1][1] = i
        else:
            blocks.append([i, i, tensors])

    recurrent = key("attention.recurrent_layers")
    pattern = key("attention.sliding_window_pattern")
    summary = {
        "format": SUMMARY_FORMAT,
        "architecture": arch,
        "n_layer": n_layer,
        "n_vocab": n_vocab if isinstance(n_vocab, int) else None,
        "n_embd": n_embd if isinstance(n_embd, int) else None,
        "n_ctx_train": key("context_length"),
        "n_expert": key("expert_count"),
        "nextn_layers": key("nextn_predict_layers"),
        "chat_template": any(k == "tokenizer.chat_template"
                             or k.startswith("tokenizer.chat_template.") for k in meta),
        "attention": {
            "head_count": head_count,
            "head_count_kv": head_count_kv,
            "key_length": key("attention.key_length"),
            "value_length": key("attention.value_length"),
            "sliding_window": key("attention.sliding_window"),
            "sliding_window_pattern": ([bool(v) for v in pattern] if isinstance(pattern, list)
                                       else pattern),
        },
        "recurrent": {
            "full_attention_interval": key("full_attention_interval"),
            "recurrent_layers": ([bool(v) for v in recurrent] if isinstance(recurrent, list)
                                 else None),
            "conv_kernel": key("ssm.conv_kernel"),
            "inner_size": key("ssm.inner_size"),
            "state_size": key("ssm.state_size"),
            "group_count": key("ssm.group_count"),
        },
        "blocks": blocks,
        "other": other,
        "header_bytes": [h.data_start for h in headers],
    }
    return summary


def tensor_bytes(summary: Mapping[str, Any]) -> dict[str, int]:
    """Every tensor's name and bytes, expanded from a summary."""
    out = dict(summary["other"])
    for first, last, tensors in summary["blocks"]:
        for i in range(first, last + 1):
            out.update({f"blk.{i}.{suffix}": n for suffix, n in tensors.items()})
    return out
