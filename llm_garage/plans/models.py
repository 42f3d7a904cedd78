"""The model plan: every model of a rig pinned to a commit and exact files (name, size,
sha256, URL), the blob store they land in and the revision's snapshot folder that names them.

Pins come from the lock when the inventory names one (Hugging Face is not asked), else from
the API, once per model for the whole run (llm_garage.lock, llm_garage.hf)."""

from __future__ import annotations

import dataclasses
import weakref

import gevent.lock
from pyinfra import logger
from pyinfra.api.exceptions import DeployError

from llm_garage import hf, lock
from llm_garage.fleet import fleet_for
from llm_garage.settings import Rig


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One model on one rig."""

    name: str
    folder: str  # the model's folder: one snapshot folder per revision
    snapshot: str  # this revision's: its files under their names, links to their blobs
    blobs: str  # the blob store (shared by every model of the rig)
    files: tuple[dict, ...]  # {"name", "size", "sha256", "url"} per file, the loaded one first
    resolved: hf.Resolved

    @property
    def path(self) -> str:
        """The file llama-server loads (-m): the first shard finds the others beside it. A new
        revision is a new path, so a new unit (proven, or rolled back to the old snapshot)."""
        return f"{self.snapshot}/{self.resolved.main.name}"

    def describe(self) -> str:
        r = self.resolved
        return (f"{r.spec.repo}@{r.commit[:12]}, {len(self.files)} file(s), "
                f"{hf.human_size(r.size)}")


def plan(rig: Rig, state) -> dict[str, ModelPlan]:
    """Model name -> its plan, for every model of the rig."""
    if not rig.models:
        return {}
    pinned = pins_for(state)
    plans = {}
    for name in sorted(rig.models):
        resolved = pinned[(rig.name, name)]
        files = tuple({"name": f.name, "size": f.size, "sha256": f.sha256,
                       "url": resolved.url(rig.hf_endpoint, f)} for f in resolved.files)
        plans[name] = ModelPlan(name=name, folder=rig.layout.model_dir(name),
                                snapshot=rig.layout.model_snapshot(name, resolved.commit),
                                blobs=rig.layout.blobs_dir, files=files, resolved=resolved)
    return plans


_PINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# pyinfra prepares hosts in parallel greenlets: the first one resolves, the others wait for it
_PINS_LOCK = gevent.lock.RLock()


def check_token(rigs, pinned: dict[tuple[str, str], hf.Resolved]) -> None:
    """A token the endpoint refuses stops the run now, not when a rig's download gets 403."""
    token_value = hf.token()
    if not token_value or hf.offline():
        return
    gated = {}
    for (host_name, _model), resolved in pinned.items():
        if resolved.needs_token:
            base = rigs[host_name].hf_endpoint
            gated.setdefault((base, resolved.spec.repo), resolved.url(base, resolved.main))
    refused = hf.token_refusals(gated, token_value)
    if refused:
        raise hf.HfError("\n".join(refused) + "; nothing was changed on any host")


def pins_for(state) -> dict[tuple[str, str], hf.Resolved]:
    """(host, model name) -> pinned files for every host of this run, computed once per run:
    from the lock when the inventory names one, else through the Hugging Face API."""
    with _PINS_LOCK:
        if state not in _PINS:
            _PINS[state] = _pins(state)
    if isinstance(_PINS[state], Exception):
        raise _PINS[state]
    return _PINS[state]


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layouts_for(state) -> dict[str, dict] | None:
    """Model name -> the GGUF header summary the lock records for its pin (what a memory plan
    needs), read once per run; None when there is no lock. The models' pins (`pins_for`)
    decide first whether the lock pins what the inventory asks."""
    pins_for(state)
    with _PINS_LOCK:
        if state not in _LAYOUTS:
            path = lock.lock_path_of(fleet_for(state))
            _LAYOUTS[state] = (lock.Lock.load(path).layouts if path and path.exists()
                               else None)
    return _LAYOUTS[state]


def _pins(state) -> dict[tuple[str, str], hf.Resolved] | Exception:
    rigs = fleet_for(state)
    limit = getattr(state, "limit_hosts", None)
    if isinstance(limit, list):
        names = {h.name for h in limit}
        rigs = {name: rig for name, rig in rigs.items() if name in names}
    try:
        path = lock.lock_path_of(rigs)
        the_lock = lock.Lock.load(path) if path and path.exists() else None
        resolver_for = None if hf.offline() else lock.resolvers()
        # the inventory's own path is not known here: the hint says <inventory>
        pinned = lock.pins(rigs, the_lock, resolver_for, None)
        check_token(rigs, pinned)
    except DeployError as e:
        return e  # every host's prepare raises the same error, asked once
    if the_lock is None and pinned:
        how = (f"`llm-garage lock <inventory>` to write {path}" if path
               else "set models_lock and run `llm-garage lock <inventory>`")
        logger.warning(f"--> Models resolved through the Hugging Face API (no lock); "
                       f"{how} to pin them and to check their memory plan before any "
                       "download")
    return pinned
