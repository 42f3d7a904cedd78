"""opencode.json on every opencode client: one provider per served endpoint of the fleet
(see llm_garage/opencode.py), merged into the user's own file."""

from collections.abc import Mapping

from pyinfra import host
from pyinfra.api import deploy

from llm_garage import opencode
from llm_garage.operations import opencode as opencode_ops
from llm_garage.settings import Rig


@deploy("opencode")
def converge(rig: Rig, fleet: Mapping[str, Rig]) -> None:
    d = rig.data
    if not d.opencode_client:
        return
    providers = opencode.providers_for(rig, fleet)
    if not providers:
        host.log("opencode: no enabled profile in the inventory is reachable from here")
    opencode_ops.config_merged(
        name=f"Providers of the fleet in {d.opencode_config_path}",
        path=d.opencode_config_path,
        providers=providers,
        prefix=d.opencode_provider,
        owner=d.opencode_owner,
    )
