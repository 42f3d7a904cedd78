"""The lock file: every model of an inventory pinned to a commit and exact files.

Where: the `models_lock` setting names it (the example inventories put it next to themselves:
`inventory/garage.py` -> `inventory/garage.lock.json`); every host of a run names the same
file. `llm-garage lock inventory/garage.py` writes it, `llm-garage check` and deploys read it.
Without the setting there is no lock.

What a deploy does with it:
- lock present: every model comes from the lock and Hugging Face is not asked (reproducible,
  works offline). A model missing from the lock, or whose repo, revision or selector differs
  from the inventory, stops the deploy before any host changes, telling the user to run
  `llm-garage lock <inventory>`.
- no lock: models are resolved through the API for this run, and the deploy says how to lock.

`llm-garage lock` keeps the pins of models whose settings did not change (so adding one model
does not move the others), resolves new or changed ones, drops models no longer named, and
re-resolves everything (or the named models) with `--update`. A model name means one thing
across the inventory: two hosts giving one name different settings cannot be locked."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import gguf_header, hf
from .refusal import Refusal
from .settings import Rig

LOCK_VERSION = 2
# Version 1 had no `layout` (the GGUF header summary a memory plan needs); it still loads.
READABLE_VERSIONS = (1, 2)
COMMENT = ("Written by `llm-garage lock <inventory>`: the Hugging Face commit and exact files "
           "of every model. Commit it; deploys use these pins and do not ask the API.")


class LockError(Refusal):
    """A lock that cannot be used as it is; the message says how to fix it."""


def lock_path_of(rigs: Mapping[str, Rig] | Iterable[Rig]) -> Path | None:
    """The lock the hosts' `models_lock` setting names; None when none names one. Raises
    LockError when hosts name different files (one lock pins one run)."""
    rigs = list(rigs.values()) if isinstance(rigs, Mapping) else list(rigs)
    named = {rig.data.models_lock for rig in rigs if rig.data.models_lock}
    if len(named) > 1:
        raise LockError("hosts name different lock files in models_lock: "
                        + ", ".join(sorted(named)) + "; every host of a run must name the same")
    if named and any(not rig.data.models_lock for rig in rigs if rig.models):
        unset = sorted(rig.name for rig in rigs if rig.models and not rig.data.models_lock)
        raise LockError(f"models_lock is set on some hosts but not on {', '.join(unset)}; "
                        "set it on every host (the same file)")
    return Path(named.pop()) if named else None


# --- the lock data ------------------------------------------------------------------------------

def entry_of(resolved: hf.Resolved, layout: dict[str, Any] | None = None) -> dict[str, Any]:
    s = resolved.spec
    entry = {
        "repo": s.repo,
        "revision": s.revision,
        "selector": s.selector,
        "commit": resolved.commit,
        "needs_token": resolved.needs_token,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in resolved.files],
    }
    if layout is not None:
        entry["layout"] = layout
    return entry


def _resolved_of(name: str, entry: Any) -> hf.Resolved:
    """Parse one entry; raises ValueError saying what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("is not an object")
    for key in ("repo", "revision", "commit"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ValueError(f"{key} is missing")
    if not hf.SHA1_RE.fullmatch(entry["commit"]):
        raise ValueError(f"commit {entry['commit']!r} is not a 40-character SHA")
    selector = entry.get("selector")
    if not isinstance(selector, dict) or len(selector) != 1:
        raise ValueError("selector must have exactly one of quant, include, files")
    (kind, value), = selector.items()
    if kind in ("quant", "include") and isinstance(value, str):
        pass
    elif kind == "files" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = tuple(value)
    else:
        raise ValueError(f"selector {selector!r} is not quant, include or files")
    files = entry.get("files")
    if not isinstance(files, list) or not files:
        raise ValueError("files is empty")
    out = []
    for f in files:
        if not isinstance(f, dict):
            raise ValueError("a file is not an object")
        path, size, sha = f.get("path"), f.get("size"), f.get("sha256")
        if not isinstance(path, str) or not path or ".." in path.split("/"):
            raise ValueError(f"file path {path!r} is not a repository path")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{path}: size {size!r} is not a byte count")
        if not isinstance(sha, str) or not hf.SHA256_RE.fullmatch(sha):
            raise ValueError(f"{path}: sha256 {sha!r} is not 64 hex digits")
        out.append(hf.RemoteFile(path, size, sha))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ValueError("two files share a file name")
    spec = hf.Spec(entry["repo"], entry["revision"], kind, value)
    return hf.Resolved(spec, entry["commit"], tuple(out), bool(entry.get("needs_token", False)))


@dataclasses.dataclass
class Lock:
    path: Path
    models: dict[str, hf.Resolved] = dataclasses.field(default_factory=dict)
    # model name -> its GGUF header summary (gguf_header.summarize); absent for a model
    # locked by an older llm-garage, or whose header could not be read
    layouts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike, inventory: str | os.PathLike | None = None) -> Lock:
        path = Path(path)
        fix = _lock_cmd(inventory) + " to rewrite it"
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise LockError(f"cannot read the lock {path}: {e.strerror}") from None
        except ValueError as e:
            raise LockError(f"the lock {path} is not valid JSON ({e}); {fix}") from None
        if not isinstance(data, dict) or data.get("version") not in READABLE_VERSIONS:
            raise LockError(f"the lock {path} is not a version "
                            f"{' or '.join(map(str, READABLE_VERSIONS))} llm-garage lock; "
                            f"{fix}")
        models = data.get("models")
        if not isinstance(models, dict):
            raise LockError(f"the lock {path} has no models object; {fix}")
        lock = cls(path)
        for name, entry in models.items():
            try:
                lock.models[name] = _resolved_of(name, entry)
                layout = entry.get("layout")
                if layout is not None:
                    if not isinstance(layout, dict) or not isinstance(layout.get("blocks"),
                                                                      list):
                        raise ValueError("layout is not a GGUF header summary")
                    lock.layouts[name] = layout
            except ValueError as e:
                raise LockError(f"the lock {path}: model {name!r}: {e}; {fix}") from None
        return lock

    def dumps(self) -> str:
        data = {
            "_comment": COMMENT,
            "version": LOCK_VERSION,
            "models": {name: entry_of(r, self.layouts.get(name))
                       for name, r in sorted(self.models.items())},
        }
        return json.dumps(data, indent=2) + "\n"

    def save(self) -> None:
        """Write atomically (a reader never sees half a lock)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(self.dumps())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _lock_cmd(inventory) -> str:
    return f"run `llm-garage lock {inventory or '<inventory>'}`"


# --- models of a fleet --------------------------------------------------------------------------

def wanted(rigs: Mapping[str, Rig] | Iterable[Rig]) -> dict[str, dict[hf.Spec, list[str]]]:
    """name -> spec -> hosts asking for it (more than one spec per name is a conflict)."""
    out: dict[str, dict[hf.Spec, list[str]]] = {}
    for rig in (rigs.values() if isinstance(rigs, Mapping) else rigs):
        for name, model in rig.models.items():
            out.setdefault(name, {}).setdefault(hf.Spec.of(model), []).append(rig.name)
    return out


def _users(name: str, hosts: list[str]) -> str:
    return f"model {name!r} on {', '.join(repr(h) for h in hosts)}"


ResolverFor = Callable[[str], hf.Resolver]


def resolvers() -> ResolverFor:
    """One cached `Resolver` per endpoint (hosts may set their own hf_endpoint)."""
    cache: dict[str, hf.Resolver] = {}

    def resolver_for(endpoint: str) -> hf.Resolver:
        if endpoint not in cache:
            cache[endpoint] = hf.Resolver(endpoint)
        return cache[endpoint]

    return resolver_for


def _endpoints(rigs) -> dict[str, str]:
    return {rig.name: rig.hf_endpoint for rig in
            (rigs.values() if isinstance(rigs, Mapping) else rigs)}


def _resolve_grouped(todo: dict[tuple[str, hf.Spec], list[str]],
                     resolver_for: ResolverFor) -> dict[tuple[str, hf.Spec], hf.Resolved]:
    """Resolve (endpoint, spec) pairs, one error listing every problem of every endpoint."""
    out, problems = {}, []
    by_endpoint: dict[str, dict[hf.Spec, list[str]]] = {}
    for (endpoint, spec), users in todo.items():
        by_endpoint.setdefault(endpoint, {})[spec] = users
    for endpoint, specs in sorted(by_endpoint.items()):
        try:
            resolved = hf.resolve_all(resolver_for(endpoint), specs)
        except hf.HfError as e:
            problems.append(str(e))
            continue
        out.update({(endpoint, spec): r for spec, r in resolved.items()})
    if problems:
        raise hf.HfError("\n".join(problems))
    return out


def pins(rigs: Mapping[str, Rig] | Iterable[Rig], lock: Lock | None,
         resolver_for: ResolverFor | None, inventory: str | os.PathLike | None = None,
         have_token: bool | None = None) -> dict[tuple[str, str], hf.Resolved]:
    """(host, model name) -> pinned files, from the lock when there is one, else through the
    API (`resolver_for(endpoint)`; None = offline). Raises one LockError listing every
    problem; nothing has run on any host."""
    asked = wanted(rigs)
    if have_token is None:
        have_token = hf.token() is not None
    out: dict[tuple[str, str], hf.Resolved] = {}
    problems: list[str] = []
    if lock is not None:
        for name, specs in sorted(asked.items()):
            pinned = lock.models.get(name)
            for spec, hosts in specs.items():
                who = _users(name, hosts)
                if pinned is None:
                    problems.append(f"{who} ({spec.describe()}) is not in the lock "
                                    f"{lock.path}; {_lock_cmd(inventory)} to add it")
                elif pinned.spec != spec:
                    problems.append(f"{who}: the lock {lock.path} pins "
                                    f"{pinned.spec.describe()} but the inventory asks for "
                                    f"{spec.describe()}; {_lock_cmd(inventory)} to update it")
                else:
                    out.update({(h, name): pinned for h in hosts})
    else:
        if resolver_for is None:
            raise LockError("no lock and Hugging Face may not be asked (HF_HUB_OFFLINE is set); "
                            f"{_lock_cmd(inventory)} while online first")
        endpoints = _endpoints(rigs)
        todo: dict[tuple[str, hf.Spec], list[str]] = {}
        for name, specs in sorted(asked.items()):
            for spec, hosts in specs.items():
                for endpoint in sorted({endpoints[h] for h in hosts}):
                    users = [h for h in hosts if endpoints[h] == endpoint]
                    todo.setdefault((endpoint, spec), []).append(_users(name, users))
        resolved = _resolve_grouped(todo, resolver_for)
        for name, specs in asked.items():
            for spec, hosts in specs.items():
                out.update({(h, name): resolved[(endpoints[h], spec)] for h in hosts})
    if not have_token:
        gated: dict[tuple[str, str], list[str]] = {}
        for (h, name), r in sorted(out.items()):
            if r.needs_token:
                gated.setdefault((name, r.spec.repo), []).append(h)
        for (name, repo), hosts in gated.items():
            problems.append(f"{_users(name, hosts)}: {repo} is gated or private and no "
                            "Hugging Face token is set where pyinfra runs; export "
                            "HF_TOKEN=<token> (or run `hf auth login`)")
    if problems:
        raise LockError(f"{len(problems)} model pin problem(s); nothing was changed on any "
                        "host:\n" + "\n".join(f"  - {p}" for p in problems))
    return out


@dataclasses.dataclass
class LockChange:
    name: str
    status: str  # "kept" | "added" | "updated" | "changed" (settings changed)
    resolved: hf.Resolved
    before: hf.Resolved | None = None
    layout_note: str = ""  # what became of the GGUF header summary

    def line(self) -> str:
        r = self.resolved
        head = (f"{self.name}: {r.spec.describe()} -> {r.commit[:12]}, {len(r.files)} file(s), "
                f"{hf.human_size(r.size)}")
        if self.before is not None and self.before.commit != r.commit:
            head += f" (was {self.before.commit[:12]})"
        note = f"; {self.layout_note}" if self.layout_note else ""
        return f"{head} [{self.status}]{note}"


LayoutReader = Callable[[str, hf.Resolved], dict]  # (endpoint, pinned model) -> summary


def header_reader(resolver_for: ResolverFor) -> LayoutReader:
    """Reads a pinned model's GGUF headers from the endpoint its downloads use, with the
    token Hugging Face's rules give (only to that endpoint)."""

    def read(endpoint: str, resolved: hf.Resolved) -> dict:
        resolver = resolver_for(endpoint)
        summary, _ = gguf_header.read_model(resolved, resolver.base, resolver.token,
                                            session=resolver.session)
        return summary

    return read


def _layout(read: LayoutReader, endpoint: str, resolved: hf.Resolved
            ) -> tuple[dict | None, str]:
    try:
        summary = read(endpoint, resolved)
    except (gguf_header.HeaderError, OSError, ValueError) as e:
        return None, f"no memory plan: cannot read the GGUF header ({e})"
    shards = summary.get("header_bytes") or []
    return summary, (f"GGUF header read ({summary['architecture']}, {summary['n_layer']} "
                     f"layers; {hf.human_size(sum(shards))} of headers from "
                     f"{len(shards)} file(s))")


def relock(rigs: Mapping[str, Rig] | Iterable[Rig], path: str | os.PathLike,
           resolver_for: ResolverFor, update: Iterable[str] | None = (),
           inventory: str | os.PathLike | None = None,
           read_layout: LayoutReader | None = None) -> tuple[Lock, list[LockChange],
                                                             list[str]]:
    """The new lock for these rigs (not yet saved), what changed per model, dropped names.
    `update`: names to re-resolve even if unchanged; None = all. Every model's GGUF headers
    are read (`read_layout`, default over HTTP Range) unless the lock already holds them for
    the same pin."""
    path = Path(path)
    old = Lock.load(path, inventory) if path.exists() else Lock(path)
    asked = wanted(rigs)
    conflicts = [f"model {name!r} means different things: "
                 + "; ".join(f"{s.describe()} on {', '.join(map(repr, hosts))}"
                             for s, hosts in specs.items())
                 for name, specs in sorted(asked.items()) if len(specs) > 1]
    if conflicts:
        raise LockError("a model name must mean one model across the inventory (rename one):\n"
                        + "\n".join(f"  - {c}" for c in conflicts))
    unknown = set(update or ()) - set(asked)
    if unknown:
        raise LockError(f"--update names unknown model(s): {', '.join(sorted(unknown))} "
                        f"(models: {', '.join(sorted(asked)) or 'none'})")
    endpoints = _endpoints(rigs)
    todo: dict[tuple[str, hf.Spec], list[str]] = {}
    plan: dict[str, tuple[tuple[str, hf.Spec], str]] = {}
    for name, specs in sorted(asked.items()):
        (spec, hosts), = specs.items()
        key = (endpoints[sorted(hosts)[0]], spec)
        before = old.models.get(name)
        if before is not None and before.spec == spec and not (
                update is None or name in update):
            plan[name] = (key, "kept")
            continue
        status = "added" if before is None else ("changed" if before.spec != spec
                                                 else "updated")
        plan[name] = (key, status)
        todo.setdefault(key, []).append(_users(name, hosts))
    resolved = _resolve_grouped(todo, resolver_for)
    new = Lock(path)
    changes = []
    read_layout = read_layout or header_reader(resolver_for)
    for name, (key, status) in plan.items():
        r = old.models[name] if status == "kept" else resolved[key]
        new.models[name] = r
        before = old.models.get(name)
        if before is not None and before.commit == r.commit and before.files == r.files \
                and name in old.layouts:
            new.layouts[name], note = old.layouts[name], ""
        else:
            layout, note = _layout(read_layout, key[0], r)
            if layout is not None:
                new.layouts[name] = layout
        changes.append(LockChange(name, status, r, before, note))
    dropped = sorted(set(old.models) - set(asked))
    return new, changes, dropped

