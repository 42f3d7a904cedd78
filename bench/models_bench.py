"""Model download and no-op timings on test rigs against the local Hugging Face stand-in.

    sudo .venv/bin/python bench/models_bench.py [--size-gb 4] [--repeat 3] [--noop-repeat 5]

Prints, on one rig:
- the time to download the same file (a GGUF padded to --size-gb) with plain `curl -L` and
  with garage-fetch (sha256 while downloading, fsync, atomic rename, stamp), and the
  throughput ratio garage-fetch / curl (target >= 0.9); also curl followed by an fsync of
  the file (`sync FILE`), the same durability garage-fetch gives;
- the no-op converge time (base + models tasks) of a rig holding a model of that size and of a
  rig holding a 4 MB model, medians, and their ratio (target <= 1.1).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import lab.rigs  # noqa: E402
from lab.rigs.pyinfra_results import (  # noqa: E402
    check_first_run,
    check_no_changes,
    run_pyinfra,
)
from lab.standins.gguf_gen import write_padded_model  # noqa: E402
from lab.standins.hf_server import HFServer  # noqa: E402

FETCH = REPO_ROOT / "llm_garage" / "files" / "garage-fetch"
REPO = "bench/Padded-GGUF"
SMALL_SIZE = 4_000_000
DEPLOY = """\
from pyinfra import host

from llm_garage.fleet import rig_for
from tasks import base, models

rig = rig_for(host)
base.prepare(rig)
models.converge(rig)
"""


def timed_on_rig(rig: lab.rigs.Rig, command: str) -> float:
    """Seconds `command` took on the rig, timed there (no SSH overhead)."""
    script = (f"s=$(date +%s.%N); {command} >/dev/null || exit 1; e=$(date +%s.%N); "
              'echo "$s $e"')
    start, end = rig.ssh(script, timeout=3600).stdout.split()
    return float(end) - float(start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3, help="downloads of each kind")
    parser.add_argument("--noop-repeat", type=int, default=5, help="no-op runs per rig")
    args = parser.parse_args()
    size = int(args.size_gb * 10**9)

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, lab.rigs.Fleet() as fleet:
        tmp = Path(tmp)
        big_rig, small_rig = fleet.start(["big", "small"])
        big_file = write_padded_model(tmp / "Padded-Big.gguf", size)
        small_file = write_padded_model(tmp / "Padded-Small.gguf", SMALL_SIZE, seed=1)
        with HFServer(bind=fleet.host_ip) as hub:
            commit = hub.add_repo(REPO, {"Padded-Big.gguf": big_file,
                                         "Padded-Small.gguf": small_file})
            url = f"{hub.url}/{REPO}/resolve/{commit}/Padded-Big.gguf"
            sha = hub.file(REPO, "Padded-Big.gguf").sha256

            # --- throughput -----------------------------------------------------------------
            big_rig.put(FETCH, "/opt/bench/garage-fetch", mode=0o755)
            big_rig.ssh("mkdir -p /srv/bench")
            curl, curl_sync, fetch = [], [], []
            for _ in range(args.repeat):
                out = "/srv/bench/curl.bin"
                curl.append(timed_on_rig(big_rig, f"curl -sS -L -o {out} {shlex.quote(url)}"))
                curl_sync.append(curl[-1] + timed_on_rig(big_rig, f"sync {out}"))
                big_rig.ssh(f"rm -f {out}")
                fetch.append(timed_on_rig(
                    big_rig, "python3 /opt/bench/garage-fetch --dir /srv/bench/gf/m --blobs "
                             "/srv/bench/gf/.blobs --snapshot /srv/bench/gf/m/s --file "
                             f"Padded-Big.gguf {size} {sha} {shlex.quote(url)}"))
                big_rig.ssh("rm -rf /srv/bench/gf")

            # --- no-op converge, big model vs small model -----------------------------------
            deploy = tmp / "models_deploy.py"
            deploy.write_text(DEPLOY)
            inventories = {}
            for rig, name in ((big_rig, "Padded-Big.gguf"), (small_rig, "Padded-Small.gguf")):
                model = {"repo": REPO, "revision": "main", "files": [name]}
                inventories[rig.name] = fleet.write_inventory(
                    tmp / f"{rig.name}.py", {rig.name: {"hf_endpoint": hub.url,
                                                        "models": {"m": model}}})
                check_first_run(run_pyinfra(inventories[rig.name], str(deploy)))
            noop = {"big": [], "small": []}
            for _ in range(args.noop_repeat):
                for name, inventory in inventories.items():
                    result = run_pyinfra(inventory, str(deploy))
                    check_no_changes(result, expected_hosts=[name])
                    noop[name].append(result.duration)

    mb_s = [size / t / 1e6 for t in fetch]
    curl_mb_s = [size / t / 1e6 for t in curl]
    gb = f"{size / 1e9:.2f} GB"
    print()
    print(f"download of one {gb} file from the local endpoint to one rig "
          f"(median of {args.repeat}):")
    print(f"  curl -L                  {statistics.median(curl):7.2f} s "
          f"{statistics.median(curl_mb_s):8.1f} MB/s")
    print(f"  curl -L, then sync FILE  {statistics.median(curl_sync):7.2f} s")
    print(f"  garage-fetch             {statistics.median(fetch):7.2f} s "
          f"{statistics.median(mb_s):8.1f} MB/s  (sha256 while downloading, fsync, rename, "
          "stamp)")
    ratio = statistics.median(curl) / statistics.median(fetch)
    ratio_sync = statistics.median(curl_sync) / statistics.median(fetch)
    print(f"  throughput ratio garage-fetch / curl: {ratio:.2f} (target >= 0.9); "
          f"against curl + sync: {ratio_sync:.2f}")
    print(f"  runs: curl {', '.join(f'{t:.2f}' for t in curl)}; "
          f"garage-fetch {', '.join(f'{t:.2f}' for t in fetch)}")
    print()
    big, small = statistics.median(noop["big"]), statistics.median(noop["small"])
    print(f"no-op converge (base + models tasks, one rig), median of {args.noop_repeat}:")
    print(f"  model of {SMALL_SIZE / 1e6:.0f} MB: {small:6.2f} s")
    print(f"  model of {gb}: {big:6.2f} s")
    print(f"  ratio: {big / small:.2f} (target <= 1.1)")
    print(f"  runs: small {', '.join(f'{t:.2f}' for t in noop['small'])}; "
          f"big {', '.join(f'{t:.2f}' for t in noop['big'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
