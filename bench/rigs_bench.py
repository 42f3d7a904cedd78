"""Test-rig timings: boot one rig, then the smoke deploy and `exec -- true` on 1, 2 and 8 rigs.

    sudo .venv/bin/python bench/rigs_bench.py [--repeat 3]

Prints the time to create and boot one rig (and the base build, if this run had to do it),
then per fleet size: the smoke deploy's first run, its no-op re-run (median) and
``pyinfra exec -- true`` (median), and the 8-rig / 1-rig ratios. Each size gets its own
fresh rigs, so every first run starts from the same state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.rigs import harness  # noqa: E402
from tests.rigs.pyinfra_results import (  # noqa: E402
    check_first_run,
    check_no_changes,
    run_pyinfra,
)

SMOKE = "tests/e2e/deploys/smoke.py"
SIZES = (1, 2, 8)


def _timed(fn):
    start = time.monotonic()
    value = fn()
    return time.monotonic() - start, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per no-op median")
    args = parser.parse_args()

    had_base = harness.base_path().joinpath(".garage-base").is_file()
    base_s, _ = _timed(harness.ensure_base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, harness.Fleet() as fleet:
        boot_s, _ = _timed(lambda: fleet.start(["boot1"]))
        names = {n: [f"n{n}r{i}" for i in range(1, n + 1)] for n in SIZES}
        all_names = [name for n in SIZES for name in names[n]]
        parallel_s, _ = _timed(lambda: fleet.start(all_names))

        for n in SIZES:
            inventory = fleet.write_inventory(Path(tmp) / f"inv{n}.py", names[n])
            first = run_pyinfra(inventory, SMOKE)
            check_first_run(first)
            noops = []
            for _ in range(args.repeat):
                result = run_pyinfra(inventory, SMOKE)
                check_no_changes(result, expected_hosts=names[n])
                noops.append(result.duration)
            execs = []
            for _ in range(args.repeat):
                result = run_pyinfra(inventory, ("exec", "--", "true"))
                check_first_run(result)
                execs.append(result.duration)
            rows.append((n, first.duration, statistics.median(noops), statistics.median(execs)))

    print()
    if not had_base:
        print(f"base rootfs build (debootstrap, one-off): {base_s:7.2f} s")
    print(f"create + boot 1 rig (until SSH and systemd answer): {boot_s:7.2f} s")
    print(f"create + boot {len(all_names)} rigs in parallel:              {parallel_s:7.2f} s")
    print()
    print(f"smoke deploy ({SMOKE}), medians of {args.repeat}:")
    print(f"{'rigs':>5} {'first run':>10} {'no-op run':>10} {'exec true':>10}")
    for n, first_s, noop_s, exec_s in rows:
        print(f"{n:>5} {first_s:>9.2f}s {noop_s:>9.2f}s {exec_s:>9.2f}s")
    one, eight = rows[0], rows[-1]
    print(
        f"ratio 8/1: first run {eight[1] / one[1]:.2f}x, no-op run {eight[2] / one[2]:.2f}x, "
        f"exec true {eight[3] / one[3]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
