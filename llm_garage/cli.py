"""`llm-garage`: offline checks and plans for an inventory (no host is contacted)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .fleet import SettingsError, load_fleet
from .layout import service_name
from .settings import Rig

if TYPE_CHECKING:  # imported where used: requests must load after pyinfra's gevent patching
    from .lock import Lock


def load_inventory(path: str):
    """Load a pyinfra inventory file the way the pyinfra CLI does, without connecting."""
    from pyinfra.api import Config, State
    from pyinfra.context import ctx_inventory, ctx_state
    from pyinfra_cli.inventory import make_inventory

    if not Path(path).is_file():
        raise SystemExit(f"llm-garage: no inventory file at {path}")
    state = State(check_for_changes=False)
    state.cwd = os.getcwd()
    ctx_state.set(state)
    inventory = make_inventory(path, cwd=state.cwd)
    ctx_inventory.set(inventory)
    state.init(inventory, Config())
    return inventory


def plan_lines(rig: Rig, locked: Lock | None = None) -> list[str]:
    """What a deploy converges this rig to, in words a reader can check (with the lock's
    files when `locked` is given)."""
    d = rig.data
    out = [f"rig {rig.name}"]
    gpus = f"{d.gpu_count} NVIDIA GPU(s)" if d.gpu_count else "no NVIDIA GPUs"
    out.append(f"  gpus: {gpus}")
    limits = rig.power_limits()
    if limits:
        out.append("    power limits: " + ", ".join(f"GPU{i} {w:g} W" for i, w in
                                                    enumerate(limits))
                   + " (re-applied at boot)")
    if d.gpu_count:
        out.append(f"    persistence mode: {'on' if d.gpu_persistence_mode else 'left alone'}")
    for name, e in sorted(rig.engines.items()):
        follow = " (following the branch)" if e.follow else ""
        out.append(f"  engine {name}: {e.kind} {e.ref}{follow} from {e.git_remote}")
        arches = None if e.cuda_architectures == "auto" else e.cuda_architectures
        flags = e.cmake_flags(arches)
        if e.cuda and arches is None:
            flags["CMAKE_CUDA_ARCHITECTURES"] = "<auto: from nvidia-smi compute_cap>"
        out.append("    cmake " + " ".join(f"-D{k}={v}" for k, v in flags.items()))
        if e.cuda:
            out.append("    " + cuda_line(rig, e.cuda_toolkit))
        out.append(f"    builds in {rig.layout.engine_builds_dir(name)}/<commit>-<flags>, "
                   f"-j {e.build_jobs}, keeps {e.keep_builds}")
    for name, m in sorted(rig.models.items()):
        kind, value = m.selector()
        out.append(f"  model {name}: {m.repo}@{m.revision} {kind}={value} -> "
                   f"{rig.layout.model_dir(name)}")
        out += model_lock_lines(name, m, locked)
    for name, p in sorted(rig.profiles.items()):
        state = "enabled" if p.enabled else "disabled"
        out.append(f"  profile {name} ({state}) as {service_name(name)}, "
                   f"http://{rig.address}:{p.port}/v1 model {rig.alias(name)}")
        model_path = f"{rig.layout.model_dir(p.model)}/<commit12>/<first file of {p.model}>"
        out.append("    " + rig.server_command(name, model_path))
    if d.opencode_client:
        out.append(f"  opencode.json: {d.opencode_config_path} (providers "
                   f"{d.opencode_provider}-<rig>-<port>, one per served endpoint)")
    return out


def cuda_line(rig: Rig, pin: str) -> str:
    """Which CUDA toolkit an engine builds with, as the deploy will find or install it."""
    from .plans.engines import CUDA_WHEELS
    if pin == "system":
        return "CUDA: the rig's nvcc (PATH, else /usr/local/cuda/bin/nvcc)"
    wheels = CUDA_WHEELS.get(pin)
    if wheels is None:
        return (f"CUDA {pin}: no pinned wheels for it (the deploy refuses it; pinned: "
                f"{', '.join(sorted(CUDA_WHEELS))})")
    return (f"CUDA {pin} (nvcc {wheels.release}): installed from {len(wheels.wheels)} NVIDIA "
            f"wheels on {rig.data.cuda_wheel_index} into {rig.layout.cuda_toolkit_dir(pin)}")


def pinned_as_asked(name: str, model, locked: Lock | None) -> bool:
    """The lock pins this model as the inventory asks (True when there is no lock)."""
    from .hf import Spec

    if locked is None:
        return True
    pinned = locked.models.get(name)
    return pinned is not None and pinned.spec == Spec.of(model)


def model_lock_lines(name: str, model, locked: Lock | None) -> list[str]:
    if locked is None:
        return []
    from .hf import human_size

    pinned = locked.models.get(name)
    if not pinned_as_asked(name, model, locked):
        what = "is not in the lock" if pinned is None else "differs from the lock"
        return [f"    {what}: run `llm-garage lock` before deploying"]
    return [f"    locked at commit {pinned.commit}:"] + [
        f"      {f.path} ({human_size(f.size)})" for f in pinned.files]


def memory_lines(rig: Rig, locked: Lock | None) -> tuple[list[str], list[str]]:
    """Each profile's memory plan (from the lock's GGUF summaries), and the refusals: enabled
    profiles with `memory_check: refuse` that put more on a GPU than gpu_memory_mib leaves."""
    from . import fit

    out, refusals = [], []
    for name, p in sorted(rig.profiles.items()):
        layout = locked.layouts.get(p.model) if locked is not None else None
        if locked is None:
            continue
        if layout is None or not pinned_as_asked(p.model, rig.models[p.model], locked):
            out.append(f"  memory plan of {name}: none in the lock for {p.model}; re-lock "
                       "(`llm-garage lock`) to see the memory plan")
            continue
        opts = fit.options_for(rig, name)
        plan = fit.plan(layout, opts)
        out.append(f"  memory plan of {name}: {layout['architecture']}, {layout['n_layer']} "
                   f"layers, {plan.kv_cells} KV cells (compute is an estimate)")
        out += ["    " + row for row in fit.table(plan)]
        out += [f"    note: {n}" for n in plan.notes]
        if plan.overfull():
            line = fit.refusal(rig.name, name, plan, layout, opts)
            if p.enabled and p.memory_check == "refuse":
                refusals.append(line)
            else:
                out.append(f"    warning: {line.split(': ', 1)[1]}")
        if plan.gpus and len(opts.capacities) < len(plan.gpus):
            out.append("    note: set gpu_memory_mib to compare with the GPUs' memory (a "
                       "deploy compares with what nvidia-smi reports on the rig)")
    return out, refusals


def cmd_check(args) -> int:
    inventory = load_inventory(args.inventory)
    from .lock import Lock, LockError, lock_path_of

    try:
        rigs = load_fleet(inventory)
        path = lock_path_of(rigs)
        locked = Lock.load(path, args.inventory) if path and path.exists() else None
    except (SettingsError, LockError) as e:
        print(f"llm-garage: {args.inventory}: {e}", file=sys.stderr)
        return 1
    stale, refusals = [], []
    for rig in rigs.values():
        stale += [f"{rig.name}: {name}" for name in sorted(rig.models)
                  if not pinned_as_asked(name, rig.models[name], locked)]
        print("\n".join(plan_lines(rig, locked)))
        lines, refused = memory_lines(rig, locked)
        if lines:
            print("\n".join(lines))
        refusals += refused
        print()
    if stale:
        print(f"llm-garage: {args.inventory}: the lock {path} does not pin what the inventory "
              f"asks for ({', '.join(stale)}); run `llm-garage lock "
              f"{args.inventory}`", file=sys.stderr)
        return 1
    if refusals:
        print(f"llm-garage: {args.inventory}: {len(refusals)} profile(s) would run out of "
              "memory (found before any download; change what a line suggests, or set "
              "memory_check: warn to only warn):\n"
              + "\n".join(f"  - {r}" for r in refusals), file=sys.stderr)
        return 1
    print(f"{args.inventory}: {len(rigs)} rig(s) valid")
    return 0


def cmd_lock(args) -> int:
    inventory = load_inventory(args.inventory)
    from .hf import HfError
    from .lock import LockError, lock_path_of, relock, resolvers

    # --update absent: keep unchanged pins; --update alone: all; --update a b: those
    update = () if args.update is None else (args.update or None)
    try:
        rigs = load_fleet(inventory)
        path = lock_path_of(rigs)
        if path is None:
            raise LockError("no host sets models_lock, so there is no lock to write; set it "
                            "on every host, e.g. models_lock: "
                            f"{str(Path(args.inventory).with_suffix('')) + '.lock.json'}")
        new, changes, dropped = relock(rigs, path, resolvers(), update=update,
                                       inventory=args.inventory)
    except (SettingsError, LockError, HfError) as e:
        print(f"llm-garage: {args.inventory}: {e}", file=sys.stderr)
        return 1
    for change in changes:
        print(change.line())
    for name in dropped:
        print(f"{name}: no longer in the inventory [removed from the lock]")
    new.save()
    print(f"wrote {path}")
    return 0


def cmd_docs(args) -> int:
    inventory = load_inventory(args.inventory)
    from . import rigdoc

    try:
        rigs = load_fleet(inventory)
    except SettingsError as e:
        print(f"llm-garage: {args.inventory}: {e}", file=sys.stderr)
        return 1
    missing = 0
    for name, rig in sorted(rigs.items()):
        md, js = rigdoc.doc_paths(rig.data.docs_dir, name)
        data = rigdoc.load(js)
        if data is None or data.get("format") != rigdoc.FORMAT:
            print(f"{name}: no readable {js}: deploy once to collect it", file=sys.stderr)
            missing += 1
            continue
        if rigdoc.write_markdown(md, data):
            print(f"{name}: wrote {md}")
        else:
            print(f"{name}: {md} is up to date")
    return 1 if missing else 0


def cmd_bench(args) -> int:
    inventory = load_inventory(args.inventory)
    from . import bench, rigdoc
    from .settings import raw_host_data

    try:
        rigs = load_fleet(inventory)
        if args.limit:
            missing = [n for n in args.limit if n not in rigs]
            if missing:
                raise bench.BenchError(f"no rig {', '.join(missing)} in the inventory "
                                       f"(rigs: {', '.join(sorted(rigs))})")
            rigs = {n: rigs[n] for n in args.limit}
        dirs = sorted({bench.bench_dir(rig, args.inventory) for rig in rigs.values()})
        if args.list or args.compare:
            runs = bench.load_runs(p for d in dirs for p in sorted(d.glob("*.jsonl")))
            if args.list:
                for recs in runs.values():
                    print(bench.describe(recs))
                return 0
            a, b = (bench.find_run(runs, w) for w in args.compare)
            print("\n".join(bench.compare_report(runs[a], runs[b])))
            png = dirs[0] / f"compare-{a}-vs-{b}.png"
            try:
                bench.chart({a: runs[a], b: runs[b]}, png)
                print(f"\nchart: {png}")
            except bench.BenchError as e:
                print(f"\nno chart: {e}", file=sys.stderr)
            return 0
        depths = bench.parse_depths(args.depths)
        if args.gen < 1 or args.repeat < 1:
            raise bench.BenchError("--gen and --repeat must be at least 1")
        hosts = {host.name: host for host in inventory}
        plans = [(rig, bench.choose_profile(rig, args.profile))
                 for _, rig in sorted(rigs.items()) if rig.enabled_profiles or args.limit]
        if not plans:
            raise bench.BenchError("no rig serves an enabled profile")
    except (SettingsError, bench.BenchError) as e:
        print(f"llm-garage: {args.inventory}: {e}", file=sys.stderr)
        return 1
    failed = 0
    for rig, profile in plans:
        run_id, records, ended = bench.measure(
            rig, profile, raw_host_data(hosts[rig.name]), depths, args.gen, args.repeat,
            bench.say_stderr)
        directory = bench.bench_dir(rig, args.inventory)
        if any(r["kind"] == "result" for r in records):
            path = bench.results_file(directory, rig.name)
            bench.append(path, records)
            lines = bench.run_report(records)
            print("\n".join(lines))
            print(f"\n{len(records)} record(s) appended to {path}")
            try:
                bench.chart({run_id: records}, directory / f"{run_id}.png")
                print(f"chart: {directory / f'{run_id}.png'}")
            except bench.BenchError as e:
                print(f"no chart: {e}", file=sys.stderr)
            for written in rigdoc.set_bench(rig.data.docs_dir, rig.name, run_id, str(path),
                                            lines):
                print(f"wrote {written}")
        if ended:
            print(f"llm-garage: {rig.name}: {profile}: the bench ended early: {ended}; the "
                  "server was left running as it was", file=sys.stderr)
            failed += 1
            if ended.startswith("stopped"):
                return 130
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-garage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate an inventory and print each rig's plan "
                                         "(offline, no host contacted)")
    check.add_argument("inventory", help="pyinfra inventory file, e.g. inventory/garage.py")
    check.set_defaults(func=cmd_check)
    lock = sub.add_parser("lock", help="pin every model of an inventory (Hugging Face commit, "
                                       "files, sizes, sha256) in the file the "
                                       "models_lock setting names; deploys then use the "
                                       "lock and not the API")
    lock.add_argument("inventory", help="pyinfra inventory file, e.g. inventory/garage.py")
    lock.add_argument("--update", nargs="*", metavar="MODEL",
                      help="re-resolve these models (all when none is named), e.g. to follow "
                           "a branch; without it, unchanged models keep their pins")
    lock.set_defaults(func=cmd_lock)
    docs = sub.add_parser("docs", help="render every rig's document (<docs_dir>/<rig>.md) "
                                       "again from the data the last deploy collected "
                                       "(<rig>.json); offline, no host contacted")
    docs.add_argument("inventory", help="pyinfra inventory file, e.g. inventory/garage.py")
    docs.set_defaults(func=cmd_docs)
    from .bench import DEFAULT_DEPTHS, DEFAULT_GEN, DEFAULT_REPEAT

    bench = sub.add_parser("bench", help="measure a deployed, proven server by context depth "
                                         "(prefill and decode t/s, TTFT, GPU power) without "
                                         "restarting it; store the runs beside the inventory "
                                         "(bench_dir), print the table, draw the chart; or "
                                         "compare two stored runs")
    bench.add_argument("inventory", help="pyinfra inventory file, e.g. inventory/garage.py")
    bench.add_argument("--limit", action="append", metavar="RIG",
                       help="only this rig (repeat for more); default every rig serving")
    bench.add_argument("--profile", help="the profile to measure; default the rig's only "
                                         "enabled profile")
    bench.add_argument("--depths", default=DEFAULT_DEPTHS,
                       help=f"prompt sizes in tokens, e.g. 4k,16k,1000 (default {DEFAULT_DEPTHS}"
                            "; 262k is 262,144); depths beyond the context are skipped")
    bench.add_argument("--gen", type=int, default=DEFAULT_GEN,
                       help=f"tokens generated per request (default {DEFAULT_GEN})")
    bench.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                       help=f"requests per depth (default {DEFAULT_REPEAT})")
    bench.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="compare two stored runs (ids, or parts of ids naming one run)")
    bench.add_argument("--list", action="store_true", help="list the stored runs")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
