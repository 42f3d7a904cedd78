"""Test-rig timings: boot one rig, then the real deploy and `exec -- true` on 1, 2 and 8 rigs.

    sudo .venv/bin/python bench/rigs_bench.py [--repeat 3] [--sizes 1,2,8] [--smoke]

Prints the time to create and boot one rig (and the base build, if this run had to do it),
then per fleet size: the first run of ``deploy.py``, its no-op re-run (median; every re-run
must change nothing on any rig) and ``pyinfra exec -- true`` (median), and the 8-rig / 1-rig
ratios. Each size gets its own fresh rigs, so every first run starts from the same state.
Per size it also shows the no-op run against `exec -- true` (goal for 2 rigs: <= 2.5x) and
where one more no-op run's time goes (lab/rigs/run_profile.py, from pyinfra's --debug log):
the prepare phase (the deploy file per host, one host after the other) with each fact's
commands and seconds, the execute phase with each operation's commands and seconds, and the
commands run on each rig.

The deploy runs on the stand-ins the end-to-end tests use (lab/serving.py): a small
llama.cpp-like fixture repository served by git daemon (one CPU-only engine at tag b6), the
Hugging Face stand-in serving a tiny split GGUF (one model, one profile), one stand-in
RTX 3090 per rig, and opencode_client on the first rig of each fleet. The first run builds
the engine on every rig at once, on this machine's cores: the table also shows each fleet's
slowest engine build (the `seconds` of the build stamps written on the rigs) and the first
run without it.

--smoke times lab/deploys/smoke.py (a file and a systemd unit) instead of deploy.py.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import lab.rigs  # noqa: E402
from lab.rigs.pyinfra_results import (  # noqa: E402
    NotConvergedError,
    PyinfraResult,
    check_first_run,
    check_no_changes,
    run_pyinfra,
)
from lab.rigs.run_profile import profile_run  # noqa: E402
from lab.serving import (  # noqa: E402
    controller_env,
    install_fake_gpus,
    make_engine_repo,
    make_hub,
    profile,
    rig_data,
)
from lab.standins.engine_repo import GitDaemon  # noqa: E402
from llm_garage.operations.engine import parse_stamp  # noqa: E402

SMOKE = "lab/deploys/smoke.py"
DEPLOY = "deploy.py"
SIZES = (1, 2, 8)
EXEC_TRUE = ("exec", "--", "true")

ENGINE_REF = "b6"  # of make_engine_repo's fixture: 8 commits, 2 small generated units
GPU_MODEL = "rtx3090"
GPU_POWER_LIMIT_W = 280  # the card allows 100-350 W
SERVE_PORT = 8080
CURRENT_STAMP = "/opt/llm-garage/builds/llama/current/stamp"  # engine `llama`, default root


def _timed(fn):
    start = time.monotonic()
    value = fn()
    return time.monotonic() - start, value


def _first_run(inventory: Path, deploy: str, names: list[str], env=None) -> PyinfraResult:
    """A first run: it succeeds and changes something on every rig."""
    result = run_pyinfra(inventory, deploy, env=env)
    check_first_run(result)
    idle = [name for name in names if name not in result.changes()]
    if idle:
        raise NotConvergedError(f"first run changed nothing on {idle}:\n{result.summary()}")
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu() -> float:
    """CPU seconds this machine's cores have been busy (all processes: the controller, the
    rigs and their sshd), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _medians(inventory: Path, deploy: str, names: list[str], repeat: int, env=None):
    """Medians of `repeat` no-op re-runs (each must change nothing), of the CPU time the
    pyinfra process used in them (on this machine, not on the rigs), of the CPU time the whole
    machine used in them (the rigs share its cores), and of `exec -- true`."""
    noops, cpus, machine, execs = [], [], [], []
    for _ in range(repeat):
        cpu, busy = _children_cpu(), _machine_cpu()
        result = run_pyinfra(inventory, deploy, env=env)
        cpus.append(_children_cpu() - cpu)
        machine.append(_machine_cpu() - busy)
        check_no_changes(result, expected_hosts=names)
        noops.append(result.duration)
    for _ in range(repeat):
        result = run_pyinfra(inventory, EXEC_TRUE)
        check_first_run(result)
        execs.append(result.duration)
    return (statistics.median(noops), statistics.median(cpus), statistics.median(machine),
            statistics.median(execs))


def smoke_rows(fleet: lab.rigs.Fleet, names: dict[int, list[str]], tmp: Path, repeat: int,
               sizes=SIZES):
    rows = []
    for n in sizes:
        inventory = fleet.write_inventory(tmp / f"inv{n}.py", names[n])
        first = _first_run(inventory, SMOKE, names[n])
        noop, _, _, exec_true = _medians(inventory, SMOKE, names[n], repeat)
        rows.append({"n": n, "first": first.duration, "noop": noop, "exec": exec_true})
    return rows


def build_stamp(rig: lab.rigs.Rig) -> dict[str, str]:
    """The stamp of the engine build in use on the rig (written by garage-build)."""
    return parse_stamp(rig.ssh(f"cat {CURRENT_STAMP}").stdout.splitlines())


def deploy_rows(fleet: lab.rigs.Fleet, names: dict[int, list[str]], tmp: Path, repeat: int,
                sizes=SIZES):
    make_engine_repo(tmp / "engines")
    with GitDaemon(tmp / "engines", bind_ip=fleet.host_ip) as git, \
            make_hub(fleet.host_ip, tmp / "hub") as hub:
        rows = []
        for n in sizes:
            hosts = {}
            for i, name in enumerate(names[n]):
                install_fake_gpus(fleet.rigs[name], GPU_MODEL, 1)
                client = {"opencode_client": True} if i == 0 else {}
                hosts[name] = rig_data(hub, git.url, {"tiny": profile(SERVE_PORT)},
                                       ref=ENGINE_REF, gpu_count=1,
                                       gpu_power_limit_w=GPU_POWER_LIMIT_W, **client)
            inventory = fleet.write_inventory(tmp / f"inv{n}.py", hosts)
            controller = tmp / f"controller{n}"
            controller.mkdir()
            env = controller_env(controller)

            first = _first_run(inventory, DEPLOY, names[n], env=env)
            stamps = [build_stamp(fleet.rigs[name]) for name in names[n]]
            builds = [int(s["seconds"]) for s in stamps]
            hits = sum(int(s["ccache_hits"]) for s in stamps)
            compiles = hits + sum(int(s["ccache_misses"]) for s in stamps)
            noop, noop_cpu, noop_machine, exec_true = _medians(inventory, DEPLOY, names[n],
                                                               repeat, env=env)
            run_prof, status, log = profile_run(inventory, DEPLOY, env=env)
            if status != 0:
                raise NotConvergedError(f"profiled no-op run exited {status}:\n{log[-4000:]}")
            rows.append({"n": n, "first": first.duration, "builds": builds,
                         "rest": first.duration - max(builds), "noop": noop, "noop_cpu": noop_cpu,
                         "noop_machine": noop_machine,
                         "exec": exec_true, "changed": first.changed,
                         "ccache": f"{hits}/{compiles}", "profile": run_prof})
        return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per median (3)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"time {SMOKE} instead of {DEPLOY}")
    parser.add_argument("--sizes", type=lambda v: tuple(int(n) for n in v.split(",")),
                        default=SIZES, help="fleet sizes, comma-separated (1,2,8)")
    args = parser.parse_args()

    had_base = lab.rigs.base_path().joinpath(".garage-base").is_file()
    base_s, _ = _timed(lab.rigs.ensure_base)
    with tempfile.TemporaryDirectory(prefix="rigs-bench-") as tmp, lab.rigs.Fleet() as fleet:
        boot_s, _ = _timed(lambda: fleet.start(["boot1"]))
        names = {n: [f"n{n}r{i}" for i in range(1, n + 1)] for n in args.sizes}
        all_names = [name for n in args.sizes for name in names[n]]
        parallel_s, _ = _timed(lambda: fleet.start(all_names))
        measure = smoke_rows if args.smoke else deploy_rows
        rows = measure(fleet, names, Path(tmp), args.repeat, args.sizes)

    print()
    if not had_base:
        print(f"base rootfs build (debootstrap, one-off): {base_s:7.2f} s")
    print(f"create + boot 1 rig (until SSH and systemd answer): {boot_s:7.2f} s")
    print(f"create + boot {len(all_names)} rigs in parallel:              {parallel_s:7.2f} s")
    print()
    one, eight = rows[0], rows[-1]
    if args.smoke:
        print(f"smoke deploy ({SMOKE}), medians of {args.repeat}:")
        print(f"{'rigs':>5} {'first run':>10} {'no-op run':>10} {'exec true':>10}")
        for r in rows:
            print(f"{r['n']:>5} {r['first']:>9.2f}s {r['noop']:>9.2f}s {r['exec']:>9.2f}s")
        print(f"ratio {eight['n']}/{one['n']}: first run {eight['first'] / one['first']:.2f}x, "
              f"no-op run {eight['noop'] / one['noop']:.2f}x, "
              f"exec true {eight['exec'] / one['exec']:.2f}x")
        return 0

    print(f"real deploy ({DEPLOY}): CPU-only llama.cpp fixture at {ENGINE_REF} (cold build on "
          f"every rig), tiny split GGUF from the Hugging Face stand-in, one profile, one "
          f"stand-in {GPU_MODEL.upper()} per rig, opencode_client on one rig; no-op run and "
          f"exec true: medians of {args.repeat}, every no-op run with 0 changes")
    print(f"{'rigs':>5} {'first run':>10} {'slowest build':>14} {'first - build':>14} "
          f"{'no-op run':>10} {'no-op CPU':>10} {'rigs CPU':>9} {'exec true':>10} "
          f"{'changed ops':>12}  ccache hits")
    for r in rows:
        rigs_cpu = r["noop_machine"] - r["noop_cpu"]
        print(f"{r['n']:>5} {r['first']:>9.2f}s {max(r['builds']):>13d}s {r['rest']:>13.2f}s "
              f"{r['noop']:>9.2f}s {r['noop_cpu']:>9.2f}s {rigs_cpu:>8.2f}s {r['exec']:>9.2f}s "
              f"{r['changed']:>12}  {r['ccache']}")
    for r in rows:
        print(f"  engine build per rig, {r['n']} rig(s): "
              + ", ".join(f"{s}s" for s in r["builds"]))
    for r in rows:
        goal = " (goal: <= 2.5x)" if r["n"] == 2 else ""
        print(f"  no-op of {r['n']} rig(s): {r['noop'] / r['exec']:.2f}x exec true{goal}; "
              "one profiled no-op run (pyinfra --debug):")
        print("\n".join("    " + line for line in r["profile"].table()))
    print(f"ratio {eight['n']}/{one['n']}: first run {eight['first'] / one['first']:.2f}x, "
          f"first run without the engine build {eight['rest'] / one['rest']:.2f}x, "
          f"slowest build {max(eight['builds']) / max(max(one['builds']), 1):.2f}x, "
          f"no-op run {eight['noop'] / one['noop']:.2f}x (goal for 8/1: <= 1.5x; its pyinfra CPU "
          f"{eight['noop_cpu'] / one['noop_cpu']:.2f}x), exec true "
          f"{eight['exec'] / one['exec']:.2f}x")
    print("  no-op CPU: user + system time of the pyinfra process on this machine during a "
          "no-op run (median),\n  not counting the rigs' side; next to the wall time it shows "
          "how much of the run is the\n  controller working rather than waiting on rigs.")
    print(f"  rigs CPU: the rest of this machine's busy CPU time during a no-op run (median): "
          f"the rigs' commands\n  and sshd, and anything else running; the rigs share this "
          f"machine's {os.cpu_count()} cores with the controller,\n  so the no-op of "
          f"{eight['n']} rigs waits on {eight['noop_machine']:.2f} s of CPU work in all "
          f"({eight['noop_machine'] / os.cpu_count():.2f} s on {os.cpu_count()} cores), "
          f"{one['n']} rig on {one['noop_machine']:.2f} s.")
    print("  slowest build: the largest `seconds` in the rigs' build stamps (garage-build: "
          "fetch, configure, compile, verify;\n  whole seconds). pyinfra runs each operation "
          "on all rigs at once and waits for the last, so the build\n  operation lasts about "
          "as long as the slowest rig's build; first - build is the rest of the first run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
