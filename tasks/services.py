"""One llama-server systemd service per enabled profile: written from its plan
(llm_garage/plans/services.py), restarted once per run and only when what it runs with
changed, then proven to answer.

A disabled profile's service is stopped, disabled and its unit deleted (as is the unit of a
profile removed from the inventory), so nothing can start it by accident and its port is free
for the profile that replaces it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import systemd

from llm_garage import units
from llm_garage.layout import (
    SECRETS_DIR,
    SERVER_UNIT_GLOB,
    SERVICE_STATE_SUFFIXES,
    UNIT_DIR,
)
from llm_garage.operations import paths, services
from llm_garage.plans import services as service_plan
from llm_garage.settings import Rig

if TYPE_CHECKING:  # plans.models loads requests, which must come after gevent's patching
    from llm_garage.plans.engines import BuildPlan
    from llm_garage.plans.models import ModelPlan

UNIT_TEMPLATE = str(Path(__file__).resolve().parent.parent / "templates"
                    / "llama-server.service.j2")


@deploy("Services")
def converge(rig: Rig, engines: Mapping[str, BuildPlan], models: Mapping[str, ModelPlan],
             engine_changes: Mapping[str, Sequence[OperationMeta]],
             model_changes: Mapping[str, Sequence[OperationMeta]]
             ) -> dict[str, list[OperationMeta]]:
    """`engines`, `models`: the plans; `engine_changes` and `model_changes`: engine or model
    name -> operations whose change this run means a restart of the services using it.
    Returns, per engine, the proof operations of the services running it."""
    plans = service_plan.plan(rig, engines, models)
    pruned = services.stale_units_removed(
        name="Stop and remove services of disabled or removed profiles",
        keep=[plan.service for plan in plans], also=service_plan.removed_services(rig),
        unit_dir=UNIT_DIR, pattern=SERVER_UNIT_GLOB, marker=units.GENERATED_MARKER,
        companions={SECRETS_DIR: ".key", rig.layout.service_inputs_dir: SERVICE_STATE_SUFFIXES},
    )
    for plan in plans:
        # One operation per profile either way: pyinfra orders operations across hosts by
        # where they are called, so every host must call the same ones in the same order.
        services.secret_file(name=f"API key of {plan.service}", path=plan.key_file,
                             content=plan.api_key + "\n" if plan.api_key else None)
        # Rendered beside the unit; the proof step installs it (and rolls it back).
        paths.text_installed(name=f"Wanted unit {plan.service}", path=plan.wanted_unit,
                             text=units.render(UNIT_TEMPLATE, plan.unit), user="root",
                             group="root", mode="644")
    systemd.daemon_reload(name="Reload systemd (llama-server units removed)",
                          _if=pruned.did_change)
    checks: dict[str, OperationMeta] = {}
    proofs: dict[str, list[OperationMeta]] = {}
    for plan in plans:
        checks[plan.service] = services.served(
            name=f"Serve {plan.service}: (re)start when changed, prove, else roll back",
            plan=plan, changed=[*engine_changes.get(plan.engine, ()),
                                *model_changes.get(plan.model, ())],
            _ignore_errors=True,
        )
        proofs.setdefault(plan.engine, []).append(checks[plan.service])
    if checks:
        services.all_proven(name="Every llama-server proven", checks=checks)
    return proofs
