"""Models: GGUF files from Hugging Face at a pinned commit, on every rig that serves them.

While the run is prepared, before any host changes, every model of the run's hosts is pinned:
from the lock next to the inventory when there is one (Hugging Face is not asked), else through
the API once per model for the whole fleet (llm_garage.lock, llm_garage.hf). On the rig, one
folder per model holds the files under their original names (llama-server finds the shards of
a split model next to the first one), downloaded by `garage-fetch`: resumable, sha256-verified
before an atomic rename, stamped so that later runs cost a few `stat`s, not a re-hash.

Files are root's, readable by everyone (the service user reads them, cannot change them).
Removing a model from the inventory leaves its files alone; `models_prune: true` deletes the
folders llm-garage created that no model names any more."""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import gevent.lock
from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

import llm_garage
from llm_garage import hf, lock
from llm_garage.fleet import fleet_for
from llm_garage.operations import models as ops
from llm_garage.settings import Rig

FETCH_SCRIPT = Path(llm_garage.__file__).parent / "files" / "garage-fetch"


@dataclasses.dataclass(frozen=True)
class ModelOutcome:
    """What the services of a model need to know about it after this task."""

    path: str  # absolute path on the rig of the file to pass to -m (the first shard)
    ops: list[OperationMeta]  # operations whose change means the model's files changed


def fetcher_path(rig: Rig) -> str:
    return f"{rig.data.garage_root}/bin/garage-fetch"


_PINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# pyinfra prepares hosts in parallel greenlets: the first one resolves, the others wait for it
_PINS_LOCK = gevent.lock.RLock()


def pins_for(state) -> dict[tuple[str, str], hf.Resolved]:
    """(host, model name) -> pinned files for every host of this run, computed once per run:
    from the lock when the inventory has one, else through the Hugging Face API."""
    with _PINS_LOCK:
        if state not in _PINS:
            _PINS[state] = _pins(state)
    if isinstance(_PINS[state], Exception):
        raise _PINS[state]
    return _PINS[state]


def _pins(state) -> dict[tuple[str, str], hf.Resolved] | Exception:
    rigs = fleet_for(state)
    limit = getattr(state, "limit_hosts", None)
    if isinstance(limit, list):
        names = {h.name for h in limit}
        rigs = {name: rig for name, rig in rigs.items() if name in names}
    inventory = lock.inventory_of_run()
    path = lock.lock_path_for(inventory) if inventory else None
    try:
        the_lock = lock.Lock.load(path, inventory) if path and path.exists() else None
        resolver_for = None if hf.offline() else lock.resolvers()
        pinned = lock.pins(rigs, the_lock, resolver_for, inventory)
    except DeployError as e:
        return e  # every host's prepare raises the same error, asked once
    if the_lock is None and pinned:
        where = f" at {path}" if path else ""
        how = (f"`llm-garage lock {inventory}`" if inventory
               else "`llm-garage lock <inventory file>`")
        logger.warning(f"--> Models resolved through the Hugging Face API (no lock{where}); "
                       f"run {how} to pin them")
    return pinned


def file_specs(rig: Rig, resolved: hf.Resolved) -> list[dict]:
    base = rig.hf_endpoint
    return [{"name": f.name, "size": f.size, "sha256": f.sha256, "url": resolved.url(base, f)}
            for f in resolved.files]


@deploy("Models")
def converge(rig: Rig) -> dict[str, ModelOutcome]:
    """Every model of the rig in its folder, verified; name -> `ModelOutcome`."""
    d = rig.data
    pinned = pins_for(host.state) if rig.models else {}
    outcomes: dict[str, ModelOutcome] = {}
    if rig.models:
        files.directory(name=f"Ensure {d.garage_root}/bin", path=f"{d.garage_root}/bin",
                        user="root", group="root", mode="755")
        files.put(name="Install the model download script", src=str(FETCH_SCRIPT),
                  dest=fetcher_path(rig), add_deploy_dir=False, user="root", group="root",
                  mode="755")
    for name in sorted(rig.models):
        resolved = pinned[(rig.name, name)]
        folder = rig.model_dir(name)
        specs = file_specs(rig, resolved)
        ops.model_files(
            name=f"Check {name} files in place (hash only what has no matching stamp)",
            path=folder, files=specs, fetcher=fetcher_path(rig), verify=d.models_verify,
            check_only=True,
        )
        fetched = ops.model_files(
            name=f"Fetch {name}: {resolved.spec.repo}@{resolved.commit[:12]}, "
                 f"{len(specs)} file(s), {hf.human_size(resolved.size)}",
            path=folder, files=specs, fetcher=fetcher_path(rig), auth_origin=rig.hf_endpoint,
            retries=d.models_retries,
        )
        outcomes[name] = ModelOutcome(path=f"{folder}/{resolved.main.name}", ops=[fetched])
    if d.models_prune:
        ops.pruned(name=f"Prune model folders in {d.models_dir} no model names",
                   models_dir=d.models_dir, keep=[rig.model_dir(n) for n in rig.models])
    return outcomes
