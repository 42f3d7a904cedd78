"""CUDA build timings with the real nvcc on llama.cpp's real tree, sm_86 with FA_ALL_QUANTS,
on this machine (no rig): the deploy's plan and garage-build's own command line
(lab.cuda_build), CUDA 13.0 from NVIDIA's PyPI wheels. Not run by the tests.

    .venv/bin/python bench/cuda_bench.py --sample   # configure + 2 CUDA objects, cold then warm
    .venv/bin/python bench/cuda_bench.py --full     # every CUDA object (30-60+ min on 2 cores)

Both run cold (a fresh, empty ccache) and then warm: the same objects in a new build folder
at the next tag (b7002), as a tag bump on a rig. --full builds the `ggml-cuda` library (all
189 CUDA objects with FA_ALL_QUANTS), not the llama-server executable: linking that needs the
driver's libcuda, which this machine lacks (the stub only satisfies configure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.cuda_build import (  # noqa: E402
    ccache_env,
    ccache_hits,
    cuda_plan,
    garage_build,
    make_objects,
    zero_stats,
)
from lab.standins.cuda_wheels import ensure_cuda_wheels  # noqa: E402
from lab.standins.real_llama import BAD_TAG, GOOD_TAG, ensure_real_llama  # noqa: E402

SAMPLE = ["softmax", "template-instances/fattn-vec-instance-q4_0-q8_0"]


def one(root: Path, wheels, real, ref: str, ccache: Path, jobs: int, full: bool) -> dict:
    plan, toolkit = cuda_plan(root, wheels, real, ref=ref, ccache=ccache, jobs=jobs)
    started = time.monotonic()
    proc = garage_build(plan, "--configure-only")
    if proc.returncode:
        sys.exit(f"configure failed:\n{proc.stderr}")
    configured = time.monotonic() - started
    zero_stats(plan, wheels)
    started = time.monotonic()
    if full:
        made = subprocess.run(["cmake", "--build", plan.build_dir, "-j", str(jobs), "--target",
                               "ggml-cuda"], capture_output=True, text=True,
                              env=ccache_env(plan, wheels))
    else:
        made = make_objects(plan, wheels, SAMPLE)
    if made.returncode:
        sys.exit(f"build failed:\n{made.stdout[-3000:]}{made.stderr[-3000:]}")
    hits, misses = ccache_hits(plan, wheels)
    return {"ref": ref, "configure_s": configured, "build_s": time.monotonic() - started,
            "hits": hits, "misses": misses, "toolkit": toolkit["release"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sample", action="store_true", help="configure and 2 CUDA objects")
    what.add_argument("--full", action="store_true", help="every CUDA object (ggml-cuda)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    wheels, real = ensure_cuda_wheels(), ensure_real_llama()
    with tempfile.TemporaryDirectory(prefix="cuda-bench-") as tmp:
        ccache = Path(tmp) / "ccache"  # cold: nothing cached yet
        runs = [one(Path(tmp) / "garage", wheels, real, ref, ccache, args.jobs, args.full)
                for ref in (GOOD_TAG, BAD_TAG)]
    what = "ggml-cuda (all CUDA objects)" if args.full else " + ".join(SAMPLE)
    print(f"CUDA {runs[0]['toolkit']} (PyPI wheels), sm_86, FA_ALL_QUANTS, -j {args.jobs}: "
          f"{what}")
    for label, r in zip(("cold", "tag bump, warm ccache"), runs, strict=True):
        print(f"  {label:22} {r['ref']}: configure {r['configure_s']:6.1f} s, build "
              f"{r['build_s']:7.1f} s, ccache hits {r['hits']}/{r['hits'] + r['misses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
