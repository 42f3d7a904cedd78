"""Models: GGUF files from Hugging Face at a pinned commit, on every rig that serves them.

The plan (llm_garage/plans/models.py) pins every model before any host changes. On the rig,
one folder per model holds the files under their original names (llama-server finds the
shards of a split model next to the first one), downloaded by `garage-fetch`: resumable,
sha256-verified before an atomic rename, stamped so that later runs cost a few `stat`s, not a
re-hash. Files are root's, readable by everyone (the service user reads them, cannot change
them). Removing a model from the inventory leaves its files alone; `models_prune: true`
deletes the folders llm-garage created that no model names any more."""

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
    """Every model of the rig in its folder, verified. Returns the plans (name -> ModelPlan)
    and, per model, the operations whose change means its files changed this run."""
    plans = model_plan.plan(rig, host.state)
    fetcher = rig.layout.script("garage-fetch")
    changed: dict[str, list[OperationMeta]] = {}
    for name, plan in plans.items():
        ops.model_files(
            name=f"Check {name} files in place (hash only what has no matching stamp)",
            path=plan.folder, files=list(plan.files), fetcher=fetcher,
            verify=rig.data.models_verify, check_only=True,
        )
        changed[name] = [ops.model_files(
            name=f"Fetch {name}: {plan.describe()}", path=plan.folder, files=list(plan.files),
            fetcher=fetcher, auth_origin=rig.hf_endpoint, retries=rig.data.models_retries,
        )]
    if rig.data.models_prune:
        ops.pruned(name=f"Prune model folders in {rig.data.models_dir} no model names",
                   models_dir=rig.data.models_dir,
                   keep=[rig.layout.model_dir(n) for n in rig.models])
    return plans, changed
