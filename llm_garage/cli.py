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
    profiles with `memory_check: refuse` that put more on a GPU than it has."""
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
        plan = fit.plan(layout, fit.options_for(rig, name))
        out.append(f"  memory plan of {name}: {layout['architecture']}, {layout['n_layer']} "
                   f"layers, {plan.kv_cells} KV cells (compute is an estimate)")
        out += ["    " + row for row in fit.table(plan)]
        out += [f"    note: {n}" for n in plan.notes]
        over = plan.overfull()
        if over and not rig.data.gpu_memory_mib:
            continue
        for d in over:
            line = (f"{rig.name}: profile {name} does not fit: {d.name} (GPU {d.gpu}) needs "
                    f"{fit.mib(d.total)} of {fit.mib(d.capacity)}, {fit.mib(-d.headroom)} over")
            if p.enabled and p.memory_check == "refuse":
                refusals.append(line)
            else:
                out.append(f"    warning: {line.split(': ', 1)[1]}")
        if not rig.data.gpu_memory_mib and plan.gpus:
            out.append("    note: set gpu_memory_mib to compare with the GPUs' memory")
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
        print(f"llm-garage: {args.inventory}: {len(refusals)} GPU(s) would run out of memory "
              "(before any download; lower ctx_size, use cache_type q8_0, --n-cpu-moe N or "
              "another tensor_split, or set memory_check: warn):\n"
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
