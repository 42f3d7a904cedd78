"""The rig document: what runs on the rig and how to rebuild it by hand, written on the
machine running pyinfra (`docs_dir`) from what the rig reports at the end of the run
(llm_garage/rigdoc.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyinfra.api import deploy

from llm_garage import opencode
from llm_garage.operations import rigdoc
from llm_garage.settings import Rig

if TYPE_CHECKING:  # plans.models loads requests, which must come after gevent's patching
    from llm_garage.plans.engines import BuildPlan
    from llm_garage.plans.models import ModelPlan


@deploy("Docs")
def write(rig: Rig, fleet: Mapping[str, Rig], engines: Mapping[str, BuildPlan],
          models: Mapping[str, ModelPlan]) -> None:
    providers = opencode.providers_for(rig, fleet) if rig.data.opencode_client else None
    rigdoc.documented(name=f"Rig document {rig.data.docs_dir}/{rig.name}.md", rig=rig,
                      docs_dir=rig.data.docs_dir, engines=engines, models=models,
                      opencode_providers=providers)
