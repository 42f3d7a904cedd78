"""The settings of one rig: every setting once, with its default, type and meaning.

Inventory and group data hold raw values; `load_rig` turns them into one validated `Rig` per
host, and tasks read only that object. Derived values (paths, cmake flags, the llama-server
command line) are computed here so that templates never compute."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import math
import os
import posixpath
import re
import shlex
from collections.abc import Mapping
from typing import Any

from .layout import Layout
from .schema import (
    Invalid,
    SettingProblem,
    build,
    either,
    is_abs_path,
    is_bool,
    is_int,
    is_number,
    is_str,
    list_of,
    mapping_of,
    one_of,
    optional,
    setting,
    unknown_key,
)

LLAMA_CPP = "llama.cpp"
IK_LLAMA_CPP = "ik_llama.cpp"
UPSTREAM_REMOTES = {
    LLAMA_CPP: "https://github.com/ggml-org/llama.cpp.git",
    IK_LLAMA_CPP: "https://github.com/ikawrakow/ik_llama.cpp.git",
}
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_CUDA_WHEEL_INDEX = "https://pypi.org/simple"
SHA_RE = re.compile(r"[0-9a-f]{40}")
NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# CMake variable names: mostly upper case, but find modules' cache variables are not
# (CUDA_cublas_LIBRARY, CUDAToolkit_ROOT).
CMAKE_NAME = r"[A-Za-z][A-Za-z0-9_]*"
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q6_0")
IK_ONLY_KV_TYPES = ("q6_0",)
UNQUANTIZED_KV_TYPES = ("f32", "f16", "bf16")
# models_dir is never inside a system tree, nor one of the system folders themselves (a folder
# of its own inside /srv, /var/lib or /mnt is fine): filling or pruning them breaks the rig.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/sbin", "/sys", "/usr")
SYSTEM_FOLDERS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp",
                  "/var", "/var/lib", "/var/tmp")
SPLIT_MODES = {
    LLAMA_CPP: ("none", "layer", "row"),
    IK_LLAMA_CPP: ("none", "layer", "attn", "graph"),
}


def _cuda_arch_entry(value):
    text = str(value)
    if not re.fullmatch(r"[0-9]{2,3}a?(-real|-virtual)?", text):
        raise Invalid(f"{text!r} is not a CUDA architecture", "e.g. 86, 89, 120, '120a-real'")
    return text


def _cuda_architectures(value):
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        value = [v for v in value.replace(",", ";").split(";") if v]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    return list_of(_cuda_arch_entry, min_len=1, what="architectures")(value)


def _cmake_value(value):
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{value} is not a finite number", "ON/OFF, true/false, a number or text")
    if isinstance(value, int | float | str) and "\n" not in str(value):
        return str(value)
    raise Invalid(f"{value!r} is not a CMake value", "ON/OFF, true/false, a number or text")


def _args(value):
    return list_of(is_str(accepts="a command-line argument"), what="arguments")(value)


GIT_REMOTE_ACCEPTS = ("a URL (https://, http://, git://, ssh://, file://), user@host:path "
                      "or an absolute path")
_GIT_REMOTE_RE = re.compile(r"(?:https?|git|ssh|file)://[^\s]+"
                            r"|[A-Za-z0-9_][\w.+-]*@[A-Za-z0-9_][\w.-]*:[^\s]+"
                            r"|/[^\n\r\x00]*")


def _git_remote(value):
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a git URL or path, got {value!r}", GIT_REMOTE_ACCEPTS)
    if value.startswith("-"):
        raise Invalid(f"{value!r} starts with '-' and would reach git as an option",
                      GIT_REMOTE_ACCEPTS)
    if not _GIT_REMOTE_RE.fullmatch(value):
        raise Invalid(f"{value!r} is not a git URL or absolute path", GIT_REMOTE_ACCEPTS)
    return value


def _ip_address(value):
    accepts = "an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::, or localhost"
    if value == "localhost":
        return value
    if not isinstance(value, str):
        raise Invalid(f"expected an IP address, got {value!r}", accepts)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid(f"{value!r} is not an IP address", accepts) from None


def _normal_path(value):
    """An absolute path with `.`, `..` and repeated slashes folded away."""
    path = is_abs_path(value)
    return posixpath.normpath("/" + path.lstrip("/"))


def _models_dir(value):
    path = _normal_path(value)
    if path in SYSTEM_FOLDERS or any(path == t or path.startswith(t + "/")
                                     for t in SYSTEM_TREES):
        raise Invalid(f"{path!r} is a system folder",
                      "a folder of its own, such as /srv/models or /data/models")
    return path


@dataclasses.dataclass(frozen=True)
class Engine:
    """engines.<name>: one inference engine to build from source."""

    kind: str = setting(doc="which engine this is", type="'llama.cpp' | 'ik_llama.cpp'",
                        check=one_of(LLAMA_CPP, IK_LLAMA_CPP))
    ref: str = setting(doc="the pin: a tag such as b8137 or a full 40-character commit SHA "
                           "(ik_llama.cpp has no release tags: commit only)", type="str",
                       check=is_str(r"[A-Za-z0-9][A-Za-z0-9._/-]*", "a tag or commit SHA"))
    follow: bool = setting(False, doc="ref names a branch to track; the resolved commit is "
                                      "recorded on the rig", type="bool", check=is_bool)
    remote: str | None = setting(None, doc="git remote to fetch from; empty = the upstream "
                                           "repository of `kind` (set it for a mirror)",
                                 type="str", check=optional(_git_remote))
    cuda: bool = setting(True, doc="build the CUDA backend (GGML_CUDA)", type="bool",
                         check=is_bool)
    fa_all_quants: bool = setting(True, doc="flash-attention kernels for every KV quant pair "
                                            "(GGML_CUDA_FA_ALL_QUANTS); needed for quantized "
                                            "or mixed -ctk/-ctv on the GPU", type="bool",
                                  check=is_bool)
    cuda_toolkit: str = setting(
        "system", doc="CUDA toolkit to build with: 'system' = nvcc in PATH, else "
                      "/usr/local/cuda/bin/nvcc; or a release such as '13.0', installed on "
                      "the rig from NVIDIA's PyPI wheels (cuda_wheel_index) into "
                      "<garage_root>/cuda/<release>; its full version is part of the build key",
        type="'system' | str",
        check=either(one_of("system"), is_str(r"[0-9]+\.[0-9]+", "a release such as 13.0"),
                     accepts="'system' or a CUDA release such as '13.0'"))
    cuda_architectures: str | list[str] = setting(
        "auto", doc="CUDA architectures to build for; 'auto' = from the rig's GPUs "
                    "(compute_cap 8.6 -> 86)", type="'auto' | list[str]",
        check=_cuda_architectures)
    rpc: bool = setting(False, doc="build the RPC backend and rpc-server (GGML_RPC)",
                        type="bool", check=is_bool)
    shared_libs: bool = setting(False, doc="build shared libraries (BUILD_SHARED_LIBS)",
                                type="bool", check=is_bool)
    build_type: str = setting("Release", doc="CMAKE_BUILD_TYPE", type="str",
                              check=one_of("Release", "RelWithDebInfo", "Debug"))
    cmake_extra: dict[str, str] = setting(
        {}, doc="further -D flags, e.g. {'GGML_NATIVE': 'OFF'}", type="dict[str, str]",
        check=mapping_of(_cmake_value, CMAKE_NAME, "a CMake variable name (letters, digits, _)"))
    build_jobs: str | int = setting("auto", doc="parallel compile jobs; 'auto' = the rig's "
                                                "core count (lower it if RAM runs out)",
                                    type="'auto' | int",
                                    check=either(one_of("auto"), is_int(1, 512),
                                                 accepts="'auto' or a whole number from 1"))
    keep_builds: int = setting(3, doc="builds kept on disk for instant rollback (the current "
                                      "one is never deleted)", type="int", check=is_int(1, 50))

    @property
    def git_remote(self) -> str:
        return self.remote or UPSTREAM_REMOTES[self.kind]

    @property
    def pinned_commit(self) -> str | None:
        return self.ref if SHA_RE.fullmatch(self.ref) else None

    def cmake_flags(self, architectures: list[str] | None) -> dict[str, str]:
        """The effective -D flags, in a stable order; `architectures` resolved from 'auto'."""
        flags = {
            "CMAKE_BUILD_TYPE": self.build_type,
            "BUILD_SHARED_LIBS": "ON" if self.shared_libs else "OFF",
            "GGML_CUDA": "ON" if self.cuda else "OFF",
        }
        if self.cuda:
            flags["GGML_CUDA_FA_ALL_QUANTS"] = "ON" if self.fa_all_quants else "OFF"
            flags["CMAKE_CUDA_ARCHITECTURES"] = ";".join(architectures or [])
        flags["GGML_RPC"] = "ON" if self.rpc else "OFF"
        flags["LLAMA_BUILD_TESTS"] = "OFF"
        if self.kind == LLAMA_CPP:
            # Newer configures download a prebuilt web UI at "latest": an unpinned build input.
            flags["LLAMA_USE_PREBUILT_UI"] = "OFF"
        flags.update(self.cmake_extra)
        return flags


OWNED_CMAKE_FLAGS = {
    "CMAKE_BUILD_TYPE": "build_type",
    "BUILD_SHARED_LIBS": "shared_libs",
    "GGML_CUDA": "cuda",
    "GGML_CUDA_FA_ALL_QUANTS": "fa_all_quants",
    "CMAKE_CUDA_ARCHITECTURES": "cuda_architectures",
    "GGML_RPC": "rpc",
}


def flags_hash(flags: Mapping[str, str], cuda_toolkit: str | None = None) -> str:
    """The build key's second half: the effective -D flags and, for a CUDA build, the full
    version of the toolkit that compiles it (e.g. 13.0.88), so that a toolkit change builds a
    new folder. A CPU-only build passes no toolkit: its hash depends on the flags alone."""
    data = dict(flags)
    if cuda_toolkit:
        data["@cuda_toolkit"] = cuda_toolkit
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Model:
    """models.<name>: one GGUF model from Hugging Face."""

    repo: str = setting(doc="Hugging Face repository, owner/name", type="str",
                        check=is_str(r"[A-Za-z0-9][\w.-]*/[\w.-]+", "owner/name"))
    revision: str = setting(doc="the pin: commit SHA, tag or branch; the lock file records "
                                "the commit it resolved to", type="str",
                            check=is_str(r"[\w./-]+", "a commit SHA, tag or branch"))
    quant: str | None = setting(None, doc="quant name, e.g. UD-Q6_K_XL: every .gguf whose "
                                          "folder or file name carries it",
                                type="str", check=optional(is_str(r"[\w.-]+", "a quant name")))
    include: str | None = setting(None, doc="glob over repository paths, e.g. 'IQ4_KSS/*.gguf'",
                                  type="str", check=optional(is_str(accepts="a glob")))
    files: list[str] | None = setting(None, doc="explicit repository paths", type="list[str]",
                                      check=optional(list_of(is_str(accepts="a path"), 1,
                                                             "paths")))
    dir: str | None = setting(None, doc="where the files live on the rig, a folder inside "
                                        "models_dir; empty = <models_dir>/<model name>",
                              type="path", check=optional(_normal_path))

    def selector(self) -> tuple[str, Any]:
        for kind in ("quant", "include", "files"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        raise AssertionError("validated models always have a selector")


def _number_list(value):
    if isinstance(value, str):
        try:
            value = [float(v) if "." in v else int(v) for v in value.replace("/", ",").split(",")]
        except ValueError:
            raise Invalid(f"{value!r} is not a list of numbers", "e.g. [0.9, 1, 1]") from None
    return list_of(is_number(lo=0), 1, "numbers")(value)


def _devices(value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    out = list_of(either(is_int(0, 63), is_str(r"GPU-[0-9a-f-]+|[0-9]+", "index or GPU uuid"),
                         accepts="a GPU index or uuid"), 1, "GPUs")(value)
    return [str(int(v)) if str(v).isdigit() else str(v) for v in out]


@dataclasses.dataclass(frozen=True)
class Profile:
    """profiles.<name>: one llama-server, run as a systemd service."""

    model: str = setting(doc="name of the model it serves (a key of `models`)", type="str",
                         check=is_str(NAME, "a model name"))
    engine: str = setting(doc="name of the engine it runs on (a key of `engines`)", type="str",
                          check=is_str(NAME, "an engine name"))
    port: int = setting(doc="TCP port llama-server listens on (--port)", type="int",
                        check=is_int(1, 65535))
    enabled: bool = setting(True, doc="run it; a disabled profile's service is stopped and "
                                      "disabled", type="bool", check=is_bool)
    alias: str | None = setting(None, doc="model id served by the API (--alias) and the "
                                          "opencode model key; empty = the profile name",
                                type="str", check=optional(is_str(r"[\w.:/-]+", "a model id")))
    listen: str = setting("0.0.0.0", doc="address llama-server binds (--host): an IPv4 or "
                                         "IPv6 address, or localhost", type="str",
                          check=_ip_address)
    ctx_size: int | None = setting(None, doc="context size in tokens (-c), shared by the "
                                             "parallel slots; opencode's limit.context is "
                                             "ctx_size / parallel when parallel is set, else "
                                             "the n_ctx the running server reports",
                                   type="int", flag="-c",
                                   check=optional(is_int(0)))
    n_gpu_layers: int | str | None = setting(None, doc="layers on the GPU (-ngl)",
                                             type="int | 'auto' | 'all'", flag="-ngl",
                                             check=optional(either(
                                                 is_int(0), one_of("auto", "all"),
                                                 accepts="a whole number, 'auto' or 'all'")))
    cache_type_k: str | None = setting(None, doc="KV cache type for K (-ctk)", type="str",
                                       flag="-ctk", check=optional(one_of(*KV_TYPES)))
    cache_type_v: str | None = setting(None, doc="KV cache type for V (-ctv)", type="str",
                                       flag="-ctv", check=optional(one_of(*KV_TYPES)))
    split_mode: str | None = setting(None, doc="how to split across GPUs (--split-mode)",
                                     type="str", flag="--split-mode",
                                     check=optional(one_of("none", "layer", "row", "attn",
                                                           "graph")))
    tensor_split: list[float] | None = setting(None, doc="share of the model per GPU (-ts), "
                                                         "one value per GPU",
                                               type="list[float]", flag="-ts",
                                               check=optional(_number_list))
    parallel: int | None = setting(None, doc="server slots (--parallel); empty = the engine's "
                                             "own choice (newer llama.cpp picks several)",
                                   type="int",
                                   flag="--parallel", check=optional(is_int(1)))
    flash_attn: str | None = setting(None, doc="flash attention (-fa)", type="'on'|'off'|'auto'",
                                     flag="-fa", check=optional(one_of("on", "off", "auto")))
    cpu_moe: bool = setting(False, doc="keep all MoE expert weights on the CPU (--cpu-moe)",
                            type="bool", flag="--cpu-moe", check=is_bool)
    n_cpu_moe: int | None = setting(None, doc="MoE experts of the first N layers on the CPU "
                                              "(--n-cpu-moe)", type="int", flag="--n-cpu-moe",
                                    check=optional(is_int(1)))
    override_tensor: list[str] = setting([], doc="tensor placement rules (-ot), e.g. "
                                                 "'blk\\.(2[0-9])\\.ffn_.*_exps=CPU'",
                                         type="list[str]", flag="-ot",
                                         check=list_of(is_str(r"[^=\s]+=[\w,]+",
                                                              "regex=BUFFER_TYPE"), 0, "rules"))
    threads: int | None = setting(None, doc="generation threads (--threads)", type="int",
                                  flag="--threads", check=optional(is_int(1)))
    threads_batch: int | None = setting(None, doc="prompt threads (--threads-batch)",
                                        type="int", flag="--threads-batch",
                                        check=optional(is_int(1)))
    batch_size: int | None = setting(None, doc="logical batch (-b)", type="int", flag="-b",
                                     check=optional(is_int(1)))
    ubatch_size: int | None = setting(None, doc="physical batch (-ub)", type="int", flag="-ub",
                                      check=optional(is_int(1)))
    no_mmap: bool = setting(False, doc="load the whole model into RAM (--no-mmap; "
                                       "--load-mode none where the build has --load-mode)",
                            type="bool", flag="--no-mmap", check=is_bool)
    mlock: bool = setting(False, doc="lock the model in RAM (--mlock; --load-mode mmap+mlock, "
                                     "or mlock with no_mmap, where the build has --load-mode; "
                                     "sets LimitMEMLOCK)",
                          type="bool", flag="--mlock", check=is_bool)
    jinja: bool | None = setting(None, doc="chat templates via Jinja: true = --jinja, false = "
                                           "--no-jinja on llama.cpp (Jinja is its default) and "
                                           "nothing on ik_llama.cpp (off by default there); "
                                           "empty = the engine's default",
                                 type="bool", flag="--jinja", check=optional(is_bool))
    no_warmup: bool = setting(False, doc="skip llama-server's own warm-up run (--no-warmup)",
                              type="bool", flag="--no-warmup", check=is_bool)
    temp: float | None = setting(None, doc="sampling temperature (--temp)", type="float",
                                 flag="--temp", check=optional(is_number(lo=0)))
    top_p: float | None = setting(None, doc="nucleus sampling (--top-p)", type="float",
                                  flag="--top-p", check=optional(is_number(0, 1)))
    top_k: int | None = setting(None, doc="top-k sampling (--top-k)", type="int",
                                flag="--top-k", check=optional(is_int(0)))
    min_p: float | None = setting(None, doc="min-p sampling (--min-p)", type="float",
                                  flag="--min-p", check=optional(is_number(0, 1)))
    repeat_penalty: float | None = setting(None, doc="repetition penalty (--repeat-penalty)",
                                           type="float", flag="--repeat-penalty",
                                           check=optional(is_number(lo=0)))
    extra_args: list[str] = setting([], doc="further llama-server arguments, one per item, "
                                            "e.g. ['--metrics']", type="list[str]", check=_args)
    cuda_visible_devices: list[str] | None = setting(
        None, doc="GPUs this server may use (CUDA_VISIBLE_DEVICES), by index or uuid",
        type="list[int | str]", check=optional(_devices))
    environment: dict[str, str] = setting(
        {}, doc="extra environment for the service, e.g. {'GGML_CUDA_P2P': '1'}",
        type="dict[str, str]", check=mapping_of(_cmake_value, r"[A-Z_][A-Z0-9_]*",
                                                "an environment variable name"))
    api_key_env: str | None = setting(None, doc="name of an environment variable on the "
                                                "machine running pyinfra that holds the API "
                                                "key (--api-key); never written in clear to "
                                                "the unit", type="str", secret=True,
                                      check=optional(is_str(r"[A-Za-z_][A-Za-z0-9_]*",
                                                            "an environment variable name")))
    health_timeout_s: int = setting(900, doc="seconds to wait for /health to answer 200 after a "
                                             "(re)start (big models load for minutes)",
                                    type="int", check=is_int(1, 86400))
    warmup_requests: int = setting(1, doc="chat requests sent after a (re)start to prove it "
                                          "answers", type="int", check=is_int(0, 100))
    memory_check: str = setting("refuse", doc="what `llm-garage check` and the deploy do "
                                              "when the memory plan puts more on a GPU (or, "
                                              "at deploy time, in RAM) than it has: refuse "
                                              "(check exits 1, the deploy stops before any "
                                              "download) or warn",
                                type="'refuse' | 'warn'", check=one_of("refuse", "warn"))
    prove_tool_call: bool = setting(True, doc="prove every (re)start with a tool-call "
                                              "conversation through the chat template (when "
                                              "the server uses Jinja); false for a model "
                                              "without tool support", type="bool",
                                    check=is_bool)


# The flags server_args writes before the profile's own, each with the setting that decides it;
# the unit adds --api-key-file for api_key_env.
SERVER_FLAGS = {"-m": "model", "--host": "listen", "--port": "port", "--alias": "alias"}
API_KEY_FLAGS = ("--api-key", "--api-key-file")
# Every other spelling llama.cpp and ik_llama.cpp accept for a flag we write (the key is the
# spelling we write). Each flag of SERVER_FLAGS and of a Profile setting needs an entry.
FLAG_SPELLINGS = {
    "-m": ("--model",),
    "--host": (),
    "--port": (),
    "--alias": ("-a",),
    "-c": ("--ctx-size",),
    "-ngl": ("--n-gpu-layers", "--gpu-layers"),
    "-ctk": ("--cache-type-k",),
    "-ctv": ("--cache-type-v",),
    "--split-mode": ("-sm",),
    "-ts": ("--tensor-split",),
    "--parallel": ("-np",),
    "-fa": ("--flash-attn", "-no-fa", "--no-flash-attn"),
    "--cpu-moe": ("-cmoe",),
    "--n-cpu-moe": ("-ncmoe",),
    "-ot": ("--override-tensor",),
    "--threads": ("-t",),
    "--threads-batch": ("-tb",),
    "-b": ("--batch-size",),
    "-ub": ("--ubatch-size",),
    "--no-mmap": ("--mmap", "--load-mode", "-lm"),
    "--mlock": (),
    "--jinja": ("--no-jinja",),
    "--no-warmup": ("--warmup",),
    "--temp": (),
    "--top-p": (),
    "--top-k": (),
    "--min-p": (),
    "--repeat-penalty": (),
}


# How a build's llama-server takes `no_mmap` and `mlock`: older llama.cpp and ik_llama.cpp
# spell them --no-mmap and --mlock; later llama.cpp replaced both with --load-mode and refuses
# the old flags. garage-build asks the built llama-server's --help which it takes and writes
# the matching `load_flags_env` to the build's load-flags.env; a unit that needs them reads that
# file and names the variable (with the older spelling as its default, for builds made before
# that file was written). (no_mmap, mlock) -> variable, older flags, --load-mode value.
LOAD_FLAGS = {
    (True, False): ("GARAGE_NO_MMAP", "--no-mmap", "none"),
    (False, True): ("GARAGE_MLOCK", "--mlock", "mmap+mlock"),
    (True, True): ("GARAGE_NO_MMAP_MLOCK", "--no-mmap --mlock", "mlock"),
}


def load_flags_env(load_mode: bool) -> str:
    """load-flags.env for a llama-server that takes --load-mode (True) or the older flags."""
    return "".join(f"{var}={'--load-mode ' + mode if load_mode else old}\n"
                   for var, old, mode in LOAD_FLAGS.values())


def _owned_flags() -> dict[str, str]:
    """Every spelling of every flag we write, with the setting that decides it."""
    owned = {flag: name for flag, name in SERVER_FLAGS.items()}
    owned.update({f.metadata["flag"]: f.name for f in dataclasses.fields(Profile)
                  if f.metadata.get("flag")})
    for flag, name in list(owned.items()):
        owned.update({spelling: name for spelling in FLAG_SPELLINGS[flag]})
    owned.update({flag: "api_key_env" for flag in API_KEY_FLAGS})
    return owned


OWNED_SERVER_FLAGS = _owned_flags()


@dataclasses.dataclass(frozen=True)
class RigData:
    """Host-level settings (inventory host data, group data or `all`)."""

    garage_root: str = setting("/opt/llm-garage", doc="where sources, builds, logs and state "
                                                      "live on the rig", type="path",
                               check=is_abs_path)
    models_dir: str = setting("/srv/models", doc="parent folder of the blob store (.blobs) and "
                                                 "the model folders (not a system folder such "
                                                 "as /, /etc or /usr)", type="path",
                              check=_models_dir)
    service_user: str = setting("llama", doc="system user that runs llama-server",
                                type="str", check=is_str(r"[a-z_][a-z0-9_-]{0,31}",
                                                         "a Unix user name"))
    service_groups: list[str] = setting(["video", "render"], doc="extra groups of the service "
                                                                 "user (GPU device access)",
                                        type="list[str]",
                                        check=list_of(is_str(r"[a-z_][a-z0-9_-]{0,31}",
                                                             "a group name"), 0, "groups"))
    engines: dict[str, Any] = setting({}, doc="engines to build, by name (see Engine)",
                                      type="dict[str, Engine]")
    models: dict[str, Any] = setting({}, doc="models to download, by name (see Model)",
                                     type="dict[str, Model]")
    profiles: dict[str, Any] = setting({}, doc="llama-server services, by name (see Profile)",
                                       type="dict[str, Profile]")
    hf_endpoint: str | None = setting(None, doc="Hugging Face endpoint for model resolution and "
                                                "downloads; empty = $HF_ENDPOINT, else "
                                                "https://huggingface.co", type="str",
                                      check=optional(is_str(r"https?://[^\s]+", "an http(s) URL")))
    cuda_wheel_index: str = setting(DEFAULT_CUDA_WHEEL_INDEX,
                                    doc="package index (PEP 503 'simple' URL) that a pinned "
                                        "cuda_toolkit's wheels are downloaded from, on the rig; "
                                        "each wheel's sha256 is pinned by llm-garage",
                                    type="str", check=is_str(r"https?://[^\s]+",
                                                             "an http(s) URL"))
    models_lock: str | None = setting(None, doc="the lock file pinning every model to a commit "
                                                "and exact files (written by `llm-garage lock`; "
                                                "deploys then never ask Hugging Face); every "
                                                "host of a run names the same file; a relative "
                                                "path is read from the folder pyinfra runs in; "
                                                "empty = no lock", type="path",
                                      check=optional(is_str(r"[^\s].*", "a file path")))
    docs_dir: str = setting("docs/rigs", doc="folder on the machine running pyinfra where each "
                                             "deploy writes the rig document <rig>.md and its "
                                             "data <rig>.json (rewritten only when they change); "
                                             "a relative path is read from the folder pyinfra "
                                             "runs in", type="path",
                            check=is_str(r"[^\s].*", "a folder path"))
    bench_dir: str = setting("bench-results", doc="folder on the machine running "
                                                  "`llm-garage bench` where each rig's "
                                                  "measurements are kept (<rig>.jsonl) with "
                                                  "their charts; a relative path is read from "
                                                  "the inventory file's folder", type="path",
                             check=is_str(r"[^\s].*", "a folder path"))
    models_prune: bool = setting(False, doc="delete model folders under models_dir that no "
                                            "model names any more (and the files nothing "
                                            "links to then)", type="bool", check=is_bool)
    models_verify: bool = setting(False, doc="re-hash every model file once, stamps "
                                             "notwithstanding; the stamp records it, so later "
                                             "runs with the setting still on change nothing",
                                  type="bool", check=is_bool)
    models_keep_revisions: int = setting(2, doc="revisions kept per model, the deployed one "
                                                "included (older snapshots and the files no "
                                                "snapshot links to are deleted; never one a "
                                                "llama-server unit names)",
                                         type="int", check=is_int(1, 100))
    deploy_lock_wait_s: int = setting(0, doc="seconds a deploy waits for another deploy "
                                             "running on the rig to finish; 0 = stop at once, "
                                             "saying who holds the rig", type="int",
                                      check=is_int(0, 86400))
    services_retry_failed: bool = setting(False, doc="start again a service whose exact "
                                                     "inputs already failed their proof (the "
                                                     "failure is recorded on the rig; by "
                                                     "default a rerun reports it without "
                                                     "restarting anything)", type="bool",
                                          check=is_bool)
    models_retries: int = setting(5, doc="times in a row a dropped model download is resumed "
                                         "within one run before the run fails (the partial "
                                         "file is kept and the next run resumes it)",
                                  type="int", check=is_int(0, 100))
    gpu_count: int = setting(0, doc="NVIDIA GPUs the rig must have (0 = none; power settings "
                                    "are skipped)", type="int", check=is_int(0, 64))
    gpu_power_limit_w: float | list[float] | None = setting(
        None, doc="power limit in watts: one value for every GPU, or one per GPU index; empty "
                  "= leave the limits alone", type="float | list[float]",
        check=optional(either(is_number(positive=True),
                              list_of(is_number(positive=True), 1, "watts"),
                              accepts="a positive number of watts, or a list of them")))
    gpu_memory_mib: int | list[int] | None = setting(
        None, doc="memory of each GPU in MiB, as nvidia-smi's memory.total reports it (RTX "
                  "3090: 24576): one value for every GPU, or one per GPU index; `llm-garage "
                  "check` compares each profile's memory plan with it, a deploy only where "
                  "the rig's nvidia-smi does not answer; empty = no comparison offline",
        type="int | list[int]",
        check=optional(either(is_int(1), list_of(is_int(1), 1, "MiB values"),
                              accepts="MiB as a whole number, or a list of them")))
    gpu_reserve_mib: int | list[int] = setting(
        0, doc="MiB of each GPU that something else holds (a display, another process): one "
               "value for every GPU, or one per GPU index; subtracted from gpu_memory_mib; "
               "at deploy time the larger of it and what nvidia-smi shows others hold",
        type="int | list[int]",
        check=either(is_int(0), list_of(is_int(0), 1, "MiB values"),
                     accepts="MiB as a whole number, or a list of them"))
    gpu_compute_reserve_mib: int = setting(
        1024, doc="MiB the memory plan keeps free on every GPU a model uses, for the engine's "
                  "compute buffers beyond the plan's estimate (they grow with -b/-ub)",
        type="int", check=is_int(0))
    gpu_persistence_mode: bool = setting(True, doc="turn on persistence mode", type="bool",
                                         check=is_bool)
    opencode_client: bool = setting(False, doc="write opencode.json here listing every served "
                                               "model of the inventory", type="bool",
                                    check=is_bool)
    opencode_config_path: str = setting("/root/.config/opencode/opencode.json",
                                        doc="opencode.json to merge into", type="path",
                                        check=is_abs_path)
    opencode_owner: str = setting("root", doc="user owning opencode.json", type="str",
                                  check=is_str(r"[a-z_][a-z0-9_-]{0,31}", "a Unix user name"))
    opencode_provider: str = setting("llm-garage", doc="prefix of our provider keys in "
                                                       "opencode.json, one provider per served "
                                                       "endpoint: <prefix>-<rig>-<port>; only "
                                                       "keys <prefix> and <prefix>-* are "
                                                       "rewritten", type="str",
                                     check=is_str(r"[\w.-]+", "a provider id"))
    opencode_provider_name: str = setting("llm-garage", doc="provider display name, shown as "
                                                            "'<name> (<rig>:<port>)'",
                                          type="str", check=is_str(accepts="text"))
    opencode_output_limit: int = setting(32768, doc="default limit.output for every model "
                                                    "(tokens)", type="int", check=is_int(1))
    opencode_output_limits: dict[str, int] = setting(
        {}, doc="limit.output per model alias, overriding opencode_output_limit",
        type="dict[str, int]", check=mapping_of(is_int(1), r"[\w.:/-]+", "a model alias"))
    rig_address: str | None = setting(None, doc="address opencode clients use to reach this "
                                                "rig; empty = ssh_hostname, else the "
                                                "inventory host name",
                                      type="str", check=optional(is_str(r"[\w.:-]+",
                                                                        "a host name or IP")))


@dataclasses.dataclass(frozen=True)
class Rig:
    """One host's validated settings, with everything derived from them."""

    name: str
    address: str  # how other hosts reach this rig: rig_address, else ssh_hostname, else name
    data: RigData
    engines: dict[str, Engine]
    models: dict[str, Model]
    profiles: dict[str, Profile]

    @functools.cached_property
    def layout(self) -> Layout:
        """Every path on this rig."""
        return Layout(garage_root=self.data.garage_root, models_dir=self.data.models_dir,
                      model_dirs={name: m.dir for name, m in self.models.items()})

    @property
    def hf_endpoint(self) -> str:
        endpoint = self.data.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
        return endpoint.rstrip("/")

    @property
    def enabled_profiles(self) -> dict[str, Profile]:
        return {n: p for n, p in self.profiles.items() if p.enabled}

    def alias(self, profile: str) -> str:
        return self.profiles[profile].alias or profile

    def power_limits(self) -> list[float] | None:
        """Power limit per GPU index, or None to leave limits alone."""
        limit = self.data.gpu_power_limit_w
        if limit is None or self.data.gpu_count == 0:
            return None
        if isinstance(limit, list):
            return list(limit)
        return [limit] * self.data.gpu_count

    def load_flags(self, profile: str) -> tuple[str, str, str] | None:
        """The profile's `LOAD_FLAGS` entry (variable, older flags, --load-mode value), or
        None when it sets neither no_mmap nor mlock."""
        p = self.profiles[profile]
        return LOAD_FLAGS.get((bool(p.no_mmap), bool(p.mlock)))

    def server_args(self, profile: str, model_path: str, *, load_flags: bool = True
                    ) -> list[str]:
        """llama-server's argv after the binary, from the structured profile; without
        `load_flags`, no_mmap and mlock are left out (the unit takes them from the build)."""
        p = self.profiles[profile]
        engine = self.engines.get(p.engine)
        kind = engine.kind if engine else LLAMA_CPP
        fixed = {"model": model_path, "listen": p.listen, "port": str(p.port),
                 "alias": self.alias(profile)}
        args = []
        for flag, name in SERVER_FLAGS.items():
            args += [flag, fixed[name]]
        for f in dataclasses.fields(Profile):
            flag = f.metadata.get("flag")
            value = getattr(p, f.name)
            if not flag or value is None or value == []:
                continue
            if f.name in ("no_mmap", "mlock") and not load_flags:
                continue
            if f.name == "jinja":
                # Jinja is on by default in llama.cpp; ik_llama.cpp has it off and no --no-jinja.
                if value:
                    args.append("--jinja")
                elif kind != IK_LLAMA_CPP:
                    args.append("--no-jinja")
            elif value is False:
                continue
            elif value is True:
                args.append(flag)
            elif f.name == "tensor_split":
                args += [flag, ",".join(_num(v) for v in value)]
            elif isinstance(value, list):
                for item in value:
                    args += [flag, str(item)]
            else:
                args += [flag, _num(value)]
        return args + list(p.extra_args)

    def server_command(self, profile: str, model_path: str) -> str:
        p = self.profiles[profile]
        return shlex.join([self.layout.server_binary(p.engine),
                           *self.server_args(profile, model_path)])


def _num(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- loading and cross-checks ---------------------------------------------------------------

HOST_KEYS = {f.name for f in dataclasses.fields(RigData)}
# Host data keys that belong to pyinfra (connectors and global arguments), not to us.
PYINFRA_KEY_PREFIXES = ("ssh_", "_", "vagrant_", "docker_", "podman_", "chroot_", "local_",
                        "terraform_", "winrm_", "dockerssh_", "podmanssh_")


def raw_host_data(host) -> dict[str, Any]:
    """All data keys a pyinfra host sees (host, groups, all), first definition wins."""
    merged: dict[str, Any] = {}
    for data in host.data.datas:
        data = data() if callable(data) else data
        for key, value in dict(data).items():
            merged.setdefault(key, value)
    return merged


def load_rig(name: str, raw: Mapping[str, Any]) -> tuple[Rig | None, list[SettingProblem]]:
    errors: list[SettingProblem] = []
    ours = {}
    for key, value in raw.items():
        if key in HOST_KEYS:
            ours[key] = value
        elif not str(key).startswith(PYINFRA_KEY_PREFIXES):
            errors.append(unknown_key(name, "", key, HOST_KEYS))
    data = build(RigData, ours, host=name, path="", errors=errors)
    if data is None:
        return None, errors

    defined: set[str] = set()  # names defined, even if invalid: no follow-on "unknown" errors

    def section(key, cls):
        raw_section = getattr(data, key)
        if not isinstance(raw_section, Mapping):
            errors.append(SettingProblem(name, key, "expected a mapping of name: settings"))
            return {}
        out = {}
        for item_name, item in raw_section.items():
            defined.add(f"{key}.{item_name}")
            if not isinstance(item_name, str) or not re.fullmatch(NAME, item_name):
                errors.append(SettingProblem(name, f"{key}.{item_name}", "is not a valid name",
                                           "letters, digits, '.', '_' and '-'"))
                continue
            built = build(cls, item, host=name, path=f"{key}.{item_name}", errors=errors)
            if built is not None:
                out[item_name] = built
        return out

    engines = section("engines", Engine)
    models = section("models", Model)
    profiles = section("profiles", Profile)
    address = data.rig_address or raw.get("ssh_hostname") or name
    rig = Rig(name=name, address=str(address), data=data, engines=engines, models=models,
              profiles=profiles)
    _cross_check(rig, errors, defined)
    return rig, errors


def _cross_check(rig: Rig, errors: list[SettingProblem], defined: set[str]) -> None:
    def err(path, problem, accepts=""):
        errors.append(SettingProblem(rig.name, path, problem, accepts))

    d = rig.data
    for name, e in rig.engines.items():
        where = f"engines.{name}"
        short_sha = re.fullmatch(r"[0-9a-f]{7,39}", e.ref)
        if short_sha and not e.follow:
            err(f"{where}.ref", f"{e.ref!r} looks like a short commit SHA",
                "the full 40-character SHA")
        elif e.kind == IK_LLAMA_CPP and not e.follow and not e.pinned_commit:
            err(f"{where}.ref", f"{e.ref!r} is not a commit: ik_llama.cpp has no release tags, "
                                "so pin it by full commit SHA",
                "a 40-character commit SHA, or follow: true with a branch name")
        if e.follow and e.pinned_commit:
            err(f"{where}.follow", "follow: true needs a branch name in ref, not a commit",
                "a branch such as master or main")
        for key in e.cmake_extra:
            if key in OWNED_CMAKE_FLAGS:
                err(f"{where}.cmake_extra.{key}", "is set by its own setting",
                    f"engines.{name}.{OWNED_CMAKE_FLAGS[key]}")
        if e.cuda and e.cuda_architectures == "auto" and d.gpu_count == 0:
            err(f"{where}.cuda_architectures", "'auto' needs the rig's GPUs but gpu_count is 0",
                "set gpu_count, list architectures such as [86], or cuda: false")

    for name, m in rig.models.items():
        if m.dir is not None and not m.dir.startswith(d.models_dir + "/"):
            err(f"models.{name}.dir", f"{m.dir!r} is not inside models_dir {d.models_dir!r}",
                f"a folder under {d.models_dir}/, or empty for {d.models_dir}/{name}")
        chosen = [k for k in ("quant", "include", "files") if getattr(m, k) is not None]
        if len(chosen) != 1:
            err(f"models.{name}", "name the files with exactly one of quant, include or files"
                + (f" (got {', '.join(chosen)})" if chosen else ""),
                "quant: UD-Q6_K_XL | include: 'dir/*.gguf' | files: [path, ...]")

    limit = d.gpu_power_limit_w
    if isinstance(limit, list) and len(limit) != d.gpu_count:
        err("gpu_power_limit_w", f"{len(limit)} values for gpu_count {d.gpu_count}",
            "one value for all GPUs, or exactly one per GPU")
    if limit is not None and d.gpu_count == 0:
        err("gpu_power_limit_w", "is set but gpu_count is 0", "set gpu_count to the rig's GPUs")
    for key in ("gpu_memory_mib", "gpu_reserve_mib"):
        value = getattr(d, key)
        if isinstance(value, list) and len(value) != d.gpu_count:
            err(key, f"{len(value)} values for gpu_count {d.gpu_count}",
                "one value for every GPU, or one per GPU index")

    ports: dict[int, str] = {}
    for name, p in rig.profiles.items():
        where = f"profiles.{name}"
        engine = rig.engines.get(p.engine)
        if engine is None and f"engines.{p.engine}" not in defined:
            err(f"{where}.engine", f"unknown engine {p.engine!r}",
                ", ".join(sorted(rig.engines)) or "define one under engines")
        if p.model not in rig.models and f"models.{p.model}" not in defined:
            err(f"{where}.model", f"unknown model {p.model!r}",
                ", ".join(sorted(rig.models)) or "define one under models")
        gpus = len(p.cuda_visible_devices) if p.cuda_visible_devices else d.gpu_count
        if p.tensor_split is not None and len(p.tensor_split) != gpus:
            what = "cuda_visible_devices" if p.cuda_visible_devices else "gpu_count"
            err(f"{where}.tensor_split", f"{len(p.tensor_split)} values but {what} gives "
                                         f"{gpus} GPUs", "exactly one value per GPU")
        if p.cuda_visible_devices:
            _check_devices(p.cuda_visible_devices, d.gpu_count, f"{where}.cuda_visible_devices",
                           err)
        for item in p.extra_args:
            setting_name = OWNED_SERVER_FLAGS.get(item.split("=", 1)[0])
            if item.startswith("-") and setting_name:
                err(f"{where}.extra_args", f"{item!r} is set by its own setting",
                    f"{where}.{setting_name}")
        if engine and engine.kind == IK_LLAMA_CPP and p.n_gpu_layers in ("auto", "all"):
            err(f"{where}.n_gpu_layers", f"{p.n_gpu_layers!r} is not a number, and "
                                         "ik_llama.cpp's -ngl takes only a number",
                "a whole number of layers, e.g. 999 for all")
        for key in ("cache_type_k", "cache_type_v"):
            kv = getattr(p, key)
            if engine and engine.kind == LLAMA_CPP and kv in IK_ONLY_KV_TYPES:
                err(f"{where}.{key}", f"{kv!r} is a KV cache type of ik_llama.cpp only",
                    ", ".join(t for t in KV_TYPES if t not in IK_ONLY_KV_TYPES))
        if p.cache_type_v and p.cache_type_v not in UNQUANTIZED_KV_TYPES and (
                p.flash_attn == "off"):
            err(f"{where}.cache_type_v", f"a quantized V cache ({p.cache_type_v!r}) needs "
                                         "flash attention, but flash_attn is 'off'",
                "flash_attn: 'on' or 'auto', or cache_type_v: f16, bf16 or f32")
        if p.cpu_moe and p.n_cpu_moe is not None:
            err(f"{where}.n_cpu_moe", "cannot be combined with cpu_moe",
                "cpu_moe: true (all layers) or n_cpu_moe: N")
        if engine and p.split_mode and p.split_mode not in SPLIT_MODES[engine.kind]:
            err(f"{where}.split_mode", f"{p.split_mode!r} is not a split mode of {engine.kind}",
                ", ".join(SPLIT_MODES[engine.kind]))
        if p.api_key_env and not os.environ.get(p.api_key_env):
            err(f"{where}.api_key_env", f"environment variable {p.api_key_env} is not set "
                                        "where pyinfra runs",
                f"export {p.api_key_env}=<key> before the run")
        if p.enabled:
            if p.port in ports:
                err(f"{where}.port", f"port {p.port} is already used by enabled profile "
                                     f"{ports[p.port]!r}", "a free port, or enabled: false")
            ports[p.port] = name


def _check_devices(devices: list[str], gpu_count: int, where: str, err) -> None:
    """CUDA_VISIBLE_DEVICES: each GPU once, each index one of the rig's GPUs."""
    seen: set[str] = set()
    for dev in devices:
        if dev in seen:
            err(where, f"GPU {dev} is listed twice", "each GPU once")
            continue
        seen.add(dev)
        if dev.isdigit() and int(dev) >= gpu_count:
            err(where, f"GPU index {dev} is out of range for gpu_count {gpu_count}",
                f"indices 0 to {gpu_count - 1}" if gpu_count else
                "set gpu_count to the rig's GPUs")
