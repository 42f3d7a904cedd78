"""GGUF header reads over HTTP Range and the offline memory plan, against the local Hugging
Face stand-in (no rig, no root).

    .venv/bin/python bench/header_bench.py [--repeat 5]

The models are header-only stand-ins with the published shapes of the example inventory's
models (lab.standins.gguf_gen.write_header_only_moe: real metadata with a 248,320-token
tokenizer, every tensor's info, and no weights: sparse files of the size the tensors give; the
routed experts Q6_K, TQ1_0 and Q4_K for the three, so sizes are near the real files'). Prints:

- the header read of a 6-shard Qwen3.5-397B-A17B (~212 GiB): per shard its header size, the
  bytes read and the requests made; the time of the whole read (median of --repeat);
- `llm-garage lock` of the example inventory (inventory/garage.py, copied beside a lock of
  its own) against the stand-in serving its three models (4 + 1 + 6 files): time, bytes read;
- `llm-garage check` of that inventory with the lock, offline: wall time (median of
  --repeat, target under 1 s) and CPU time, and the per-GPU tables it printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lab.standins.gguf_gen import (  # noqa: E402
    QWEN35_122B,
    QWEN35_397B,
    write_header_only_moe,
)
from lab.standins.hf_server import HFServer  # noqa: E402
from llm_garage import gguf_header  # noqa: E402
from llm_garage.hf import Resolver, Spec  # noqa: E402

FAKE_SHA = "ab" * 32  # the stand-in would otherwise hash hundreds of GB of sparse zeros


def repo_files(tmp: Path) -> dict[str, dict[str, Path]]:
    """The example inventory's three models, as header-only stand-ins."""
    q122 = write_header_only_moe(tmp / "q122", "Qwen3.5-122B-A10B-UD-Q6_K_XL", 4, QWEN35_122B,
                                 "Q6_K")
    tq1 = write_header_only_moe(tmp / "tq1", "Qwen3.5-397B-A17B-UD-TQ1_0", 1, QWEN35_397B,
                                "TQ1_0")
    iq4 = write_header_only_moe(tmp / "iq4", "Qwen3.5-397B-A17B-IQ4_KSS", 6, QWEN35_397B)
    return {
        "unsloth/Qwen3.5-122B-A10B-GGUF": {f"UD-Q6_K_XL/{p.name}": p for p in q122},
        "unsloth/Qwen3.5-397B-A17B-GGUF": {p.name: p for p in tq1},
        "ubergarm/Qwen3.5-397B-A17B-GGUF": {f"IQ4_KSS/{p.name}": p for p in iq4},
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def header_reads(hub: HFServer, repeat: int) -> None:
    resolver = Resolver(hub.url, hf_token=False, retries=0)
    resolved = resolver.resolve(Spec("ubergarm/Qwen3.5-397B-A17B-GGUF", "main", "quant",
                                     "IQ4_KSS"))
    total = sum(f.size for f in resolved.files)
    times, fetched = [], []
    for _ in range(repeat):
        hub.stats.reset()
        started = time.perf_counter()
        summary, fetched = gguf_header.read_model(resolved, hub.url)
        times.append(time.perf_counter() - started)
    served = sum(hub.stats.bytes_served().values())
    print(f"== header read: ubergarm/Qwen3.5-397B-A17B-GGUF IQ4_KSS, {len(fetched)} shards, "
          f"{total / 2**30:.1f} GiB, {summary['n_layer']} layers")
    print(f"   {'shard':<46} {'size':>10} {'header':>12} {'read':>12} {'requests':>8}")
    files = sorted(resolved.files, key=lambda f: f.name)
    for f, got in zip(files, fetched, strict=True):
        print(f"   {f.name:<46} {f.size / 2**30:>6.1f} GiB {mib(got.header.data_start):>12} "
              f"{mib(got.bytes_read):>12} {got.requests:>8}")
    read = sum(x.bytes_read for x in fetched)
    print(f"   read {mib(read)} in all ({read / total * 100:.5f} % of the model; the stand-in "
          f"served {mib(served)}), {sum(x.requests for x in fetched)} requests; "
          f"time median {statistics.median(times):.3f} s, min {min(times):.3f} s "
          f"over {repeat}")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the child, the result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    return wall, cpu, proc


def lock_and_check(hub: HFServer, tmp: Path, repeat: int) -> None:
    inventory = tmp / "inventory" / "garage.py"
    inventory.parent.mkdir()
    shutil.copy(REPO_ROOT / "inventory" / "garage.py", inventory)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "HF_ENDPOINT": hub.url,
           "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
    cli = [sys.executable, "-m", "llm_garage.cli"]
    hub.stats.reset()
    wall, cpu, proc = timed([*cli, "lock", str(inventory)], env)
    served = sum(hub.stats.bytes_served().values())
    print(f"\n== llm-garage lock inventory/garage.py (3 models, 11 files): {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU; header bytes read {mib(served)}")
    print("   " + proc.stdout.strip().replace("\n", "\n   "))
    offline = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing answers: offline
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu, proc = timed([*cli, "check", str(inventory)], offline)
        walls.append(wall)
        cpus.append(cpu)
    print(f"\n== llm-garage check inventory/garage.py with the lock: median "
          f"{statistics.median(walls):.2f} s wall (min {min(walls):.2f}), "
          f"{statistics.median(cpus):.2f} s CPU, over {repeat}")
    tables = [line for line in proc.stdout.splitlines()
              if line.strip().startswith(("device", "CUDA", "CPU", "profile", "rig "))]
    print("   " + "\n   ".join(tables))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="header-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        repos = repo_files(tmp)
        print(f"header-only stand-ins written in {time.perf_counter() - started:.1f} s")
        with HFServer(page_size=50) as hub:
            for repo, files in repos.items():
                hub.add_repo(repo, files, lfs=True, sha256s={p: FAKE_SHA for p in files})
            header_reads(hub, args.repeat)
            lock_and_check(hub, tmp, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
