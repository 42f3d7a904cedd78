"""Engine build timings on one test rig, with the fixture engine repository served by git daemon:
a cold build, a tag bump rebuilt into a new build folder with a warm ccache, a rollback to the
kept build, and the no-op converge. Prints the figures and their ratios.

    sudo .venv/bin/python bench/engine_bench.py [--units 40] [--weight 60] [--noop-runs 3]
                                                [--deploy deploy.py]

By default the deploy is base + engines only (so other tasks do not blur the figures); pass
`--deploy deploy.py` to time the whole deploy. Needs what the e2e tests need (root, rigs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lab.rigs  # noqa: E402
from lab.rigs.pyinfra_results import check_first_run, run_pyinfra  # noqa: E402
from lab.standins.engine_repo import GitDaemon, build_engine_repo  # noqa: E402

ENGINES_ONLY = """\
from pyinfra import host

from llm_garage.fleet import rig_for
from tasks import base, engines

rig = rig_for(host)
base.prepare(rig)
engines.converge(rig)
"""


def timed(inventory, deploy, *, must_change: bool | None = None):
    result = run_pyinfra(inventory, deploy)
    check_first_run(result)
    changed = result.changed
    if must_change is True and not changed:
        raise SystemExit(f"expected changes, got none:\n{result.summary()}")
    if must_change is False and changed:
        raise SystemExit(f"expected no changes:\n{result.summary()}")
    return result.duration


def stamp(rig, key):
    lines = rig.ssh(f"cat /opt/llm-garage/builds/llama/{key}/stamp").stdout.splitlines()
    return dict(line.split("=", 1) for line in lines[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=40, help="generated C++ files (40)")
    parser.add_argument("--weight", type=int, default=60, help="instantiations per file (60)")
    parser.add_argument("--noop-runs", type=int, default=3)
    parser.add_argument("--deploy", default=None, help="deploy file (default: base + engines)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        repo = build_engine_repo(tmp / "srv", "llama.cpp", n_commits=14, n_units=args.units,
                                 unit_weight=args.weight)
        print(f"fixture repository: {args.units} units x {args.weight}, "
              f"{time.monotonic() - t0:.1f}s to generate; tags {', '.join(repo.tags)}")
        deploy = args.deploy
        if deploy is None:
            deploy = str(tmp / "engines_only.py")
            Path(deploy).write_text(ENGINES_ONLY)

        with lab.rigs.Fleet() as fleet, GitDaemon(tmp / "srv", bind_ip=fleet.host_ip) as git:
            (rig,) = fleet.start(["bench"])

            def inventory(tag):
                data = {"engines": {"llama": {"kind": "llama.cpp", "ref": tag, "cuda": False,
                                              "remote": git.url_for("llama.cpp.git")}}}
                return fleet.write_inventory(tmp / "inventory.py", {"bench": data})

            def current():
                return rig.ssh("readlink /opt/llm-garage/builds/llama/current").stdout.strip()

            baseline = statistics.median(
                run_pyinfra(inventory("b6"), ("exec", "--", "true")).duration
                for _ in range(args.noop_runs))
            cold = timed(inventory("b6"), deploy, must_change=True)
            cold_stamp = stamp(rig, current())
            noop = statistics.median(timed(inventory("b6"), deploy, must_change=False)
                                     for _ in range(args.noop_runs))
            bump = timed(inventory("b11"), deploy, must_change=True)
            bump_stamp = stamp(rig, current())
            rollback = timed(inventory("b6"), deploy, must_change=True)

    cold_s, bump_s = int(cold_stamp["seconds"]), int(bump_stamp["seconds"])

    def rate(s):
        hits, misses = int(s["ccache_hits"]), int(s["ccache_misses"])
        return f"{hits}/{hits + misses} hits"

    print(f"{'run':<34}{'pyinfra wall':>14}{'build only':>12}  ccache")
    print(f"{'cold build (b6, empty cache)':<34}{cold:>13.1f}s{cold_s:>11}s  {rate(cold_stamp)}")
    print(f"{'tag bump (b11, new folder, warm)':<34}{bump:>13.1f}s{bump_s:>11}s  "
          f"{rate(bump_stamp)}")
    print(f"{'rollback to kept b6 build':<34}{rollback:>13.1f}s{'-':>12}")
    print(f"{'no-op converge (median)':<34}{noop:>13.1f}s{'-':>12}")
    print(f"{'pyinfra exec -- true (median)':<34}{baseline:>13.1f}s")
    print(f"ratios: bump/cold wall {bump / cold:.2f}, build {bump_s / max(cold_s, 1):.2f}; "
          f"rollback/cold {rollback / cold:.2f}; no-op/cold {noop / cold:.2f}; "
          f"no-op/exec-true {noop / baseline:.2f}")


if __name__ == "__main__":
    main()
