"""One llama-server systemd service per enabled profile: written from the structured profile,
restarted once per run and only when what it runs with changed, then proven to answer.

A disabled profile's service is stopped, disabled and its unit deleted (as is the unit of a
profile removed from the inventory), so nothing can start it by accident and its port is free
for the profile that replaces it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from io import StringIO
from pathlib import Path

from pyinfra.api import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

import llm_garage
from llm_garage import units
from llm_garage.operations import services
from llm_garage.settings import Rig

CHECK_SCRIPT = Path(llm_garage.__file__).parent / "files" / "garage-server-check"


def check_script_path(rig: Rig) -> str:
    return f"{rig.data.garage_root}/bin/garage-server-check"


def local_url(listen: str, port: int) -> str:
    """Where a check on the rig itself reaches a server bound to `listen`."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen, listen)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def check_command(rig: Rig, profile: str) -> list[str]:
    p = rig.profiles[profile]
    command = [check_script_path(rig), "--unit", rig.service_name(profile),
               "--url", local_url(p.listen, p.port), "--alias", rig.alias(profile),
               "--timeout", str(p.health_timeout_s), "--warmup", str(p.warmup_requests)]
    if p.api_key_env:
        command += ["--key-file", units.key_file_path(rig, profile)]
    return command


@deploy("Services")
def converge(rig: Rig, engines: Mapping[str, Sequence[OperationMeta]],
             models: Mapping[str, object]) -> None:
    """`engines`: engine name -> operations whose change means its `current` build switched;
    `models`: model name -> outcome with `.path` (the file for -m) and `.ops` (operations
    whose change means the files changed)."""
    enabled = sorted(rig.enabled_profiles)
    disabled = sorted(set(rig.profiles) - set(enabled))
    missing = [f"{p} (model {rig.profiles[p].model})" for p in enabled
               if rig.profiles[p].model not in models]
    if missing:
        raise DeployError(f"host {rig.name!r}: no model files for profile(s) "
                          + ", ".join(missing))

    if enabled:
        files.put(name="Server check script", src=str(CHECK_SCRIPT),
                  dest=check_script_path(rig), add_deploy_dir=False, user="root",
                  group="root", mode="755")

    pruned = services.stale_units_removed(
        name="Stop and remove services of disabled or removed profiles",
        keep=[rig.service_name(p) for p in enabled],
        also=[rig.service_name(p) for p in disabled],
        unit_dir=units.UNIT_DIR,
        pattern="llama-server-*.service",
        marker=units.GENERATED_MARKER,
        companions={units.SECRETS_DIR: ".key", f"{rig.state_dir}/services": ".inputs"},
    )

    unit_ops = []
    for profile in enabled:
        p = rig.profiles[profile]
        service = rig.service_name(profile)
        key_file = units.key_file_path(rig, profile)
        # One operation per profile either way: pyinfra orders operations across hosts by
        # where they are called, so every host must call the same ones in the same order.
        services.secret_file(
            name=f"API key of {service}", path=key_file,
            content=os.environ[p.api_key_env] + "\n" if p.api_key_env else None)
        unit_ops.append(files.put(
            name=f"Unit {service}",
            src=StringIO(units.llama_unit(rig, profile, models[p.model].path)),
            dest=units.unit_path(service),
            user="root",
            group="root",
            mode="644",
        ))

    systemd.daemon_reload(name="Reload systemd (llama-server units changed)",
                          _if=any_changed(pruned, *unit_ops))

    checks = {}
    for profile in enabled:
        p = rig.profiles[profile]
        service = rig.service_name(profile)
        model = models[p.model]
        systemd.service(name=f"Enable {service} at boot", service=service, running=None,
                        enabled=True)
        checks[service] = services.restarted_on_change(
            name=f"Start {service} when changed, then check /health, /v1/models, warm-up",
            service=service,
            stamp=units.stamp_path(rig, profile),
            unit_file=units.unit_path(service),
            key_file=units.key_file_path(rig, profile) if p.api_key_env else None,
            engine_link=rig.engine_current(p.engine),
            binary=rig.server_binary(p.engine),
            model=model.path,
            check=check_command(rig, profile),
            changed=[*engines.get(p.engine, ()), *model.ops],
            _ignore_errors=True,
        )
    if checks:
        services.all_proven(name="Every llama-server answered", checks=checks)
