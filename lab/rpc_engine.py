"""Real llama.cpp with its RPC backend on this machine: local ``rpc-server`` processes (CPU
backend, on 127.0.0.1 ports) act as the devices a rig's GPUs would be, so the real
``llama-server --rpc … -ngl … -ts … -ot …`` places tensors and caches across several devices
without a GPU, and logs a model buffer and a KV buffer per device. Used by
tests/unit/test_real_rpc_placement.py to hold the memory plan (llm_garage.fit) against the
engine's own placement.

The tree is llama.cpp as lab.standins.real_llama gives it (tag b7001), built CPU-only with
``GGML_RPC=ON`` (targets llama-server and ggml-rpc-server) in a folder the caller chooses,
through ccache in ``$GARAGE_RPC_CCACHE`` (default /var/cache/llm-garage/rpc-ccache) with
``base_dir`` set to that folder, so a later build anywhere else hits the cache.

``python -m lab.rpc_engine build DIR`` builds into DIR and prints the binaries' paths."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from lab.standins.real_llama import GOOD_TAG, RealLlama

CCACHE_ENV = "GARAGE_RPC_CCACHE"
DEFAULT_CCACHE = Path("/var/cache/llm-garage/rpc-ccache")
TARGETS = ("llama-server", "ggml-rpc-server")
FLAGS = {"CMAKE_BUILD_TYPE": "Release", "GGML_RPC": "ON", "GGML_CUDA": "OFF",
         "BUILD_SHARED_LIBS": "OFF", "LLAMA_CURL": "OFF", "LLAMA_USE_PREBUILT_UI": "OFF",
         "LLAMA_BUILD_TESTS": "OFF", "CMAKE_C_COMPILER_LAUNCHER": "ccache",
         "CMAKE_CXX_COMPILER_LAUNCHER": "ccache"}


def ccache_dir() -> Path:
    return Path(os.environ.get(CCACHE_ENV) or DEFAULT_CCACHE)


@dataclasses.dataclass
class RpcBuild:
    root: Path
    seconds: float
    ccache_hits: int
    ccache_misses: int

    @property
    def server(self) -> Path:
        return self.root / "build" / "bin" / "llama-server"

    @property
    def rpc_server(self) -> Path:
        return self.root / "build" / "bin" / "ggml-rpc-server"


def _ccache_env(root: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "CCACHE_DIR": str(cache), "CCACHE_BASEDIR": str(root),
            "CCACHE_NOHASHDIR": "1"}


def _ccache_counts(env: dict[str, str]) -> tuple[int, int]:
    stats = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True,
                           text=True).stdout
    counts = dict(line.split("\t")[:2] for line in stats.splitlines() if "\t" in line)
    hits = int(counts.get("direct_cache_hit", 0)) + int(counts.get("preprocessed_cache_hit", 0))
    return hits, int(counts.get("cache_miss", 0))


def build(real: RealLlama, root: Path, *, ref: str = GOOD_TAG, jobs: int = 2,
          cache: Path | None = None, timeout: float = 3600) -> RpcBuild:
    """llama-server and ggml-rpc-server of `ref`, CPU only with GGML_RPC, in root/build (the
    tree in root/src); reuses a finished build already there."""
    cache = cache or ccache_dir()
    root = Path(root)
    made = RpcBuild(root, 0.0, 0, 0)
    if made.server.is_file() and made.rpc_server.is_file():
        return made
    cache.mkdir(parents=True, exist_ok=True)
    src, out = root / "src", root / "build"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", str(real.path), "archive", ref],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    env = _ccache_env(root, cache)
    before = _ccache_counts(env)
    started = time.monotonic()
    log = root / "build.log"
    with open(log, "w") as f:
        steps = [["cmake", "-S", str(src), "-B", str(out),
                  *[f"-D{k}={v}" for k, v in FLAGS.items()]],
                 ["cmake", "--build", str(out), "-j", str(jobs), "--target", *TARGETS]]
        for argv in steps:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:3])} failed ({proc.returncode}); "
                                   f"log: {log}\n" + log.read_text()[-4000:])
    after = _ccache_counts(env)
    return RpcBuild(root, time.monotonic() - started, after[0] - before[0],
                    after[1] - before[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server on port {port} exited ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"rpc-server on port {port} did not listen within {timeout} s")


class RpcServers:
    """`n` ggml-rpc-server processes on the CPU backend, each one device; `endpoints` in the
    order they are given to --rpc. Stopped by PID on exit."""

    def __init__(self, made: RpcBuild, n: int, log_dir: Path):
        self.made, self.n, self.log_dir = made, n, Path(log_dir)
        self.procs: list[subprocess.Popen] = []
        self.endpoints: list[str] = []

    def __enter__(self) -> RpcServers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.n):
                port = free_port()
                log = open(self.log_dir / f"rpc-{i}.log", "w")
                proc = subprocess.Popen(
                    [str(self.made.rpc_server), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                log.close()
                self.procs.append(proc)
                _wait_port(port, proc)
                self.endpoints.append(f"127.0.0.1:{port}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def buffer_type(self, i: int) -> str:
        """The name llama.cpp gives device i's buffers (what -ot takes)."""
        return f"RPC0[{self.endpoints[i]}]"


LOADED = ("listening on http", "server is listening")
BUFFER = re.compile(r"(\S+) (model|KV|RS) buffer size = +([\d.]+) MiB")
FIGURE = {"model": "weights", "KV": "kv", "RS": "state"}  # what each buffer holds


def load(made: RpcBuild, model: Path, servers: RpcServers | None, args: list[str],
         log: Path, timeout: float = 180) -> str:
    """Start llama-server on `model` with the RPC devices (none: the CPU only) and `args`,
    wait until it has loaded (or exited), stop it; its log."""
    devices = ["--rpc", ",".join(servers.endpoints)] if servers else []
    argv = [str(made.server), *devices, "-m", str(model),
            "--host", "127.0.0.1", "--port", str(free_port()), "--no-warmup", "-t", "1",
            "--log-verbosity", "4", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(mark in log.read_text(errors="replace") for mark in LOADED):
                break
            time.sleep(0.2)
        else:
            if proc.poll() is None:
                raise RuntimeError(f"llama-server did not load within {timeout} s: {log}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return log.read_text(errors="replace")


def device_figures(text: str, servers: RpcServers | None) -> dict[str, dict[str, float]]:
    """Per device, in MiB: `weights` (every model buffer, summed: one per file or buffer
    type), `kv` and `state` (a hybrid model's recurrent state, the RS buffers), and how many
    logged figures each sum holds (`weights_n`, `kv_n`, `state_n`: the log rounds each to
    0.01 MiB). RPC device i (in --rpc order) is named CUDA<i>, as the plan
    names the i-th GPU; CPU, CPU_Mapped, CPU_REPACK … are CPU."""
    by_endpoint = {ep: f"CUDA{i}" for i, ep in enumerate(servers.endpoints if servers else ())}
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {key: 0 for name in FIGURE.values() for key in (name, f"{name}_n")})
    for name, kind, mib in BUFFER.findall(text):
        m = re.fullmatch(r"RPC\d+\[(.+)\]", name)
        if m:
            device = by_endpoint[m[1]]
        elif name.startswith("CPU"):
            device = "CPU"
        else:
            raise ValueError(f"a buffer on an unexpected device: {name}")
        key = FIGURE[kind]
        out[device][key] += float(mib)
        out[device][f"{key}_n"] += 1
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    from lab.standins.real_llama import ensure_real_llama

    parser = argparse.ArgumentParser(prog="python -m lab.rpc_engine",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["build"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    made = build(ensure_real_llama(), args.dir, jobs=args.jobs)
    print(f"{made.server}\n{made.rpc_server}\nbuilt in {made.seconds:.0f} s, ccache hits "
          f"{made.ccache_hits}, misses {made.ccache_misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
