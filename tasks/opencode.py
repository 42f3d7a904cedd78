"""opencode.json on every opencode client: one provider per served endpoint of the fleet
(see llm_garage/opencode.py), merged into the user's own file. A context limit the settings
cannot give is read back from the servers when the operation runs, after every server of the
run was proven (llm_garage/plans/opencode.py)."""

from collections.abc import Mapping

from pyinfra import host
from pyinfra.api import deploy

from llm_garage import opencode
from llm_garage.operations import opencode as opencode_ops
from llm_garage.plans import opencode as opencode_plan
from llm_garage.settings import Rig


@deploy("opencode")
def converge(rig: Rig, fleet: Mapping[str, Rig]) -> None:
    d = rig.data
    if not d.opencode_client:
        return
    if not opencode.providers_for(rig, fleet):
        host.log("opencode: no enabled profile in the inventory is reachable from here")
    opencode_ops.config_merged(
        name=f"Providers of the fleet in {d.opencode_config_path}",
        path=d.opencode_config_path,
        providers=opencode_plan.when_asked(host.state, rig, fleet),
        prefix=d.opencode_provider,
        owner=d.opencode_owner,
    )
