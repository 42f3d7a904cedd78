"""The service plan: per enabled profile of a rig, its systemd unit, API key, the inputs its
restart digest covers and the command that proves it serves."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyinfra.api.exceptions import DeployError

from llm_garage import units
from llm_garage.layout import service_name, unit_path
from llm_garage.settings import Rig

if TYPE_CHECKING:  # plans.models loads requests, which must come after gevent's patching
    from llm_garage.plans.models import ModelPlan


@dataclasses.dataclass(frozen=True)
class ServicePlan:
    """One enabled profile's service, everything resolved."""

    profile: str
    engine: str
    model: str
    service: str  # llama-server-<profile>.service
    unit_file: str
    unit: Mapping  # what the unit template places (llm_garage.units.llama_unit_context)
    key_file: str  # root-only; absent when the profile has no API key
    api_key: str | None = dataclasses.field(repr=False)  # never printed
    inputs: str  # digest of what the running service was proven with
    engine_link: str
    binary: str
    model_path: str
    check: tuple[str, ...]  # garage-server-check's command line (without --restart)


def local_url(listen: str, port: int) -> str:
    """Where a check on the rig itself reaches a server bound to `listen`."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen, listen)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def check_command(rig: Rig, profile: str) -> tuple[str, ...]:
    p = rig.profiles[profile]
    command = [rig.layout.script("garage-server-check"), "--unit", service_name(profile),
               "--url", local_url(p.listen, p.port), "--alias", rig.alias(profile),
               "--timeout", str(p.health_timeout_s), "--warmup", str(p.warmup_requests)]
    if p.api_key_env:
        command += ["--key-file", rig.layout.key_file(profile)]
    return tuple(command)


def plan(rig: Rig, models: Mapping[str, ModelPlan]) -> list[ServicePlan]:
    """One ServicePlan per enabled profile, in name order."""
    enabled = sorted(rig.enabled_profiles)
    missing = [f"{p} (model {rig.profiles[p].model})" for p in enabled
               if rig.profiles[p].model not in models]
    if missing:
        raise DeployError(f"host {rig.name!r}: no model files for profile(s) "
                          + ", ".join(missing))
    plans = []
    for profile in enabled:
        p = rig.profiles[profile]
        model_path = models[p.model].path
        plans.append(ServicePlan(
            profile=profile, engine=p.engine, model=p.model, service=service_name(profile),
            unit_file=unit_path(service_name(profile)),
            unit=units.llama_unit_context(rig, profile, model_path),
            key_file=rig.layout.key_file(profile),
            api_key=os.environ[p.api_key_env] if p.api_key_env else None,
            inputs=rig.layout.service_inputs(profile),
            engine_link=rig.layout.engine_current(p.engine),
            binary=rig.layout.server_binary(p.engine),
            model_path=model_path,
            check=check_command(rig, profile),
        ))
    return plans


def removed_services(rig: Rig) -> list[str]:
    """Services of disabled profiles: removed even if a hand-written unit lacks our marker."""
    return [service_name(p) for p in sorted(set(rig.profiles) - set(rig.enabled_profiles))]

