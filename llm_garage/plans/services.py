"""The service plan: per enabled profile of a rig, its systemd unit, API key, the inputs its
restart digest covers and the command that proves it serves."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from llm_garage import units
from llm_garage.layout import service_name, unit_path
from llm_garage.plans.engines import BuildPlan
from llm_garage.refusal import Refusal
from llm_garage.settings import IK_LLAMA_CPP, Rig

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
    wanted_unit: str  # where the deploy renders the unit; installed only by the proof step
    proven_unit: str  # copy of the last unit that passed its proof
    key_file: str  # root-only; absent when the profile has no API key
    api_key: str | None = dataclasses.field(repr=False)  # never printed
    inputs: str  # digest of what the running service was proven with
    failed: str  # digest of inputs that failed their proof, and why
    report: str  # what the last proof found (JSON)
    build_key: str  # the engine build the unit runs (`<commit12>-<flagshash>`)
    binary: str
    model_path: str
    check: tuple[str, ...]  # garage-server-check's command line (without --restart)
    retry_failed: bool = False  # try inputs that failed their proof again


def local_url(listen: str, port: int) -> str:
    """Where a check on the rig itself reaches a server bound to `listen`."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen, listen)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def uses_jinja(rig: Rig, profile: str) -> bool:
    """Chat templates through Jinja: mainline's default, ik_llama.cpp only with --jinja."""
    p, engine = rig.profiles[profile], rig.engines[rig.profiles[profile].engine]
    if engine.kind == IK_LLAMA_CPP:
        return p.jinja is True
    return p.jinja is not False


def expects_gpu(rig: Rig, profile: str) -> bool:
    """The server must put layers on a GPU: a CUDA build, GPUs on the rig and visible to the
    profile, and layers asked for (mainline offloads all by default, ik_llama.cpp none)."""
    p, engine = rig.profiles[profile], rig.engines[rig.profiles[profile].engine]
    if not engine.cuda or rig.data.gpu_count == 0 or p.cuda_visible_devices == []:
        return False
    if p.n_gpu_layers is None:
        return engine.kind != IK_LLAMA_CPP
    return p.n_gpu_layers not in (0, "0")


def check_command(rig: Rig, profile: str, commit: str = "") -> tuple[str, ...]:
    """garage-server-check's command line proving the profile's server (see that script)."""
    p = rig.profiles[profile]
    layout = rig.layout
    command = [layout.script("garage-server-check"), "--unit", service_name(profile),
               "--url", local_url(p.listen, p.port), "--alias", rig.alias(profile),
               "--timeout", str(p.health_timeout_s), "--warmup", str(p.warmup_requests),
               "--report", layout.proof_report(profile)]
    if p.api_key_env:
        command += ["--key-file", layout.key_file(profile)]
    if rig.engines[p.engine].kind == IK_LLAMA_CPP:
        command.append("--ik")
    if p.ctx_size:
        command += ["--ctx-size", str(p.ctx_size)]
    if commit:
        command += ["--commit", commit]
    if p.prove_tool_call and uses_jinja(rig, profile):
        command.append("--tool-call")
    if expects_gpu(rig, profile):
        command.append("--expect-gpu")
    return tuple(command)


def plan(rig: Rig, engines: Mapping[str, BuildPlan],
         models: Mapping[str, ModelPlan]) -> list[ServicePlan]:
    """One ServicePlan per enabled profile, in name order: the unit runs the build its engine
    plan resolved, serving the model plan's file."""
    enabled = sorted(rig.enabled_profiles)
    missing = [f"{p} (model {rig.profiles[p].model})" for p in enabled
               if rig.profiles[p].model not in models or rig.profiles[p].engine not in engines]
    if missing:
        raise Refusal(f"host {rig.name!r}: no engine build or model files for profile(s) "
                          + ", ".join(missing))
    plans = []
    for profile in enabled:
        p, layout = rig.profiles[profile], rig.layout
        build = engines[p.engine]
        model_path = models[p.model].path
        binary = layout.server_binary(p.engine, build.key)
        plans.append(ServicePlan(
            profile=profile, engine=p.engine, model=p.model, service=service_name(profile),
            unit_file=unit_path(service_name(profile)),
            unit=units.llama_unit_context(rig, profile, model_path, build.key),
            wanted_unit=layout.wanted_unit(profile), proven_unit=layout.proven_unit(profile),
            key_file=layout.key_file(profile),
            api_key=os.environ[p.api_key_env] if p.api_key_env else None,
            inputs=layout.service_inputs(profile), failed=layout.failed_inputs(profile),
            report=layout.proof_report(profile), build_key=build.key, binary=binary,
            model_path=model_path, check=check_command(rig, profile, build.commit),
            retry_failed=rig.data.services_retry_failed,
        ))
    return plans


def removed_services(rig: Rig) -> list[str]:
    """Services of disabled profiles: removed even if a hand-written unit lacks our marker."""
    return [service_name(p) for p in sorted(set(rig.profiles) - set(rig.enabled_profiles))]

