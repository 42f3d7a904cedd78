"""Models: GGUF files from Hugging Face at a pinned commit, on every rig that serves them.

The plan (llm_garage/plans/models.py) pins every model before any host changes. On the rig,
every file is stored once in the blob store, `<models_dir>/.blobs/<sha256>`, and each revision
of a model is a snapshot folder, `<model dir>/<commit12>/`, holding links to its blobs under
the files' original names (llama-server finds the shards of a split model next to the first
one). `garage-fetch` downloads resumably, verifies the sha256 before an atomic rename, stamps
so that later runs cost a few `stat`s, not a re-hash, and links the snapshot last: nothing a
running server reads is changed, so a new revision is a new unit that is proven, or rolled
back to the old snapshot. Files are root's, readable by everyone (the service user reads
them, cannot change them). Old snapshots are pruned beyond `models_keep_revisions`, never one a
unit names; removing a model from the inventory leaves its files alone unless `models_prune`."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from llm_garage.operations import models as ops
from llm_garage.plans import models as model_plan
from llm_garage.plans.models import ModelPlan
from llm_garage.settings import Rig


@deploy("Models")
def converge(rig: Rig) -> tuple[dict[str, ModelPlan], dict[str, list[OperationMeta]]]:
    """Every model of the rig in its snapshot, verified. Returns the plans (name -> ModelPlan)
    and, per model, the operations whose change means its files changed this run."""
    plans = model_plan.plan(rig, host.state)
    fetcher = rig.layout.script("garage-fetch")
    changed: dict[str, list[OperationMeta]] = {}
    for name, plan in plans.items():
        where = dict(path=plan.folder, snapshot=plan.snapshot, blobs=plan.blobs,
                     files=list(plan.files), fetcher=fetcher, verify=rig.data.models_verify)
        ops.model_files(name=f"Check {name} files in place (hash only what has no matching "
                             "stamp)", check_only=True, **where)
        changed[name] = [ops.model_files(
            name=f"Fetch {name}: {plan.describe()}", auth_origin=rig.hf_endpoint,
            retries=rig.data.models_retries, **where)]
    what = "old revisions, unused files" + (
        ", folders no model names" if rig.data.models_prune else "")
    ops.store_pruned(
        name=f"Prune {rig.data.models_dir}: {what}", models_dir=rig.data.models_dir,
        blobs=rig.layout.blobs_dir, models={p.folder: p.snapshot for p in plans.values()},
        wanted=sorted({f["sha256"] for p in plans.values() for f in p.files}),
        keep_revisions=rig.data.models_keep_revisions,
        unit_files=list(rig.layout.server_unit_files), fetcher=fetcher,
        prune_folders=rig.data.models_prune)
    return plans, changed
