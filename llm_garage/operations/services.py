"""llama-server services: root-only secret files, restart-then-prove, clean removal."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from io import StringIO

from pyinfra import host
from pyinfra.api import (
    FileUploadCommand,
    FunctionCommand,
    QuoteString,
    StringCommand,
    operation,
)
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import Sha256File

from llm_garage.facts.services import (
    GarageUnits,
    ServiceState,
    UnitPresence,
    inputs_digest_command,
)
from llm_garage.plans.services import ServicePlan

# Global arguments that make pyinfra upload to a temporary file first (see the SSH connector).
_ESCALATION = ("_sudo", "_doas", "_dzdo", "_su_user")


def private_upload(content: str, dest: str):
    """Commands uploading `content` to `dest` (which should already exist with the wanted
    mode). An escalated upload (_sudo and the like) first lands in a temporary file as the
    SSH user: that file is created 0600 before the upload, so nobody else can read it."""
    args = host.current_op_global_arguments or {}
    temp = None
    if any(args.get(a) for a in _ESCALATION):
        temp = host.get_temp_filename(f"private:{dest}")
        yield StringCommand("sh", "-c", QuoteString('umask 077 && : > "$1" && chmod 600 "$1"'),
                            "-", QuoteString(temp), **{a: False for a in _ESCALATION})
    yield FileUploadCommand(StringIO(content), dest, remote_temp_filename=temp)


@operation()
def secret_file(path: str, content: str | None, directory_mode: str = "700"):
    """
    Write a file only root can read (0600, in a 0700 folder), without ever showing it.

    + path: the file on the rig
    + content: what it must hold (compared by sha256 on the rig; never printed or diffed);
      None: the file must not exist
    + directory_mode: mode of the folder holding it

    Unlike ``files.put``, ``--diff`` prints nothing of the content, and the file exists with
    mode 0600 before a byte is written into it (also the temporary copy an escalated upload
    goes through).

    **Example:**

    .. code:: python

        services.secret_file(name="API key", path="/etc/llm-garage/x.key", content=key)
    """
    have = host.get_fact(Sha256File, path=path)
    if content is None:
        if have is None:
            host.noop(f"no {path}")
            return
        yield StringCommand("rm", "-f", "--", QuoteString(path))
        return
    want = hashlib.sha256(content.encode()).hexdigest()
    if have == want:
        host.noop(f"{path} is up to date")
        return
    directory = posixpath.dirname(path)
    yield StringCommand("install", "-d", "-m", directory_mode, "-o", "root", "-g", "root",
                        QuoteString(directory))
    yield StringCommand("sh", "-c", QuoteString(
        'umask 077 && : >> "$1" && chown root:root "$1" && chmod 600 "$1"'), "-", QuoteString(path))
    yield from private_upload(content, path)


def _run_check(state, host, command: StringCommand) -> bool:
    """Run the check with its output shown live: a big model loads for minutes, and the
    journal tail it prints on failure is what the user needs to see."""
    arguments = host.current_op_global_arguments or {}
    kwargs = {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}
    status, _output = host.run_shell_command(command, print_output=True, **kwargs)
    return bool(status)


@operation()
def restarted_on_change(plan: ServicePlan, changed: Sequence[OperationMeta] = ()):
    """
    Restart a llama-server unit when what it runs with changed, then prove it works.

    + plan: the profile's service (``plans.services.ServicePlan``): its unit, the inputs its
      digest covers (``facts.services.inputs_digest_command``), where that digest is kept, and
      the command restarting (given ``--restart``) and proving it (``garage-server-check``)
    + changed: operations of this run whose change also means a restart

    Restarts (a first start counts) when the inputs differ from the recorded digest, when the
    unit is not active, or when an operation in ``changed`` changed; the check runs after
    every (re)start, and the digest is written last, so a service that failed its check is
    restarted and checked again by the next run. Nothing else ever restarts it.

    **Example:**

    .. code:: python

        services.restarted_on_change(name="Serve qwen", plan=plan, changed=[switch_op])
    """
    service = plan.service
    digest = inputs_digest_command(plan.unit_file, plan.key_file if plan.api_key else None,
                                   plan.engine_link, plan.binary, plan.model_path)
    state = host.get_fact(ServiceState, service=service, proven_path=plan.inputs,
                          digest=digest)
    reasons = []
    if state["proven"] is None:
        reasons.append("never proven healthy")
    elif state["proven"] != state["inputs"]:
        reasons.append("its unit, API key, engine build or model files changed")
    if state["active"] != "active":
        reasons.append(f"it is {state['active']}")
    if host.state.is_executing:
        upstream = any(op.is_complete() and op.did_change() for op in changed)
    else:
        upstream = any(op.will_change for op in changed)
    if upstream:
        reasons.append("its engine or model changed in this run")
    if not reasons:
        host.noop(f"{service} is running with the inputs it was proven with")
        return
    host.log(f"{service}: (re)start because " + "; ".join(reasons))
    # The check restarts the unit itself, so that a unit that does not even start also gets
    # its journal printed.
    yield FunctionCommand(_run_check,
                          (StringCommand(*[QuoteString(a) for a in [*plan.check, "--restart"]]),),
                          {})
    directory = posixpath.dirname(plan.inputs)
    yield StringCommand("sh", "-c", QuoteString(
        f'umask 077 && mkdir -p "$1" && {{ {digest}; }} > "$2.tmp" && mv -f "$2.tmp" "$2"'),
        "-", QuoteString(directory), QuoteString(plan.inputs))


@operation()
def unit_absent(service: str, paths: Sequence[str]):
    """
    Stop and disable a unit and delete its files (unit file, key, recorded inputs).

    + service: the unit
    + paths: files that belong to it

    **Example:**

    .. code:: python

        services.unit_absent(name="Remove old", service="llama-server-old.service",
                             paths=["/etc/systemd/system/llama-server-old.service"])
    """
    presence = host.get_fact(UnitPresence, service=service, paths=list(paths))
    if not (presence["active"] or presence["enabled"] or presence["present"]):
        host.noop(f"{service} is absent")
        return
    if presence["active"] or presence["enabled"]:
        yield StringCommand("systemctl", "disable", "--now", "--", QuoteString(service))
    if presence["present"]:
        yield StringCommand("rm", "-f", "--", *[QuoteString(p) for p in presence["present"]])


@operation()
def stale_units_removed(keep: Sequence[str], also: Sequence[str], unit_dir: str, pattern: str,
                        marker: str, companions: dict[str, str]):
    """
    Stop, disable and delete the units llm-garage wrote that no enabled profile wants.

    + keep: unit names to leave alone (the enabled profiles)
    + also: unit names to remove even without llm-garage's marker (disabled profiles)
    + unit_dir, pattern: where our units live and the glob naming them
    + marker: first-line marker of the unit files llm-garage wrote
    + companions: folder -> suffix of files that belong to a unit of the same stem (its API
      key, its recorded inputs), deleted with it

    **Example:**

    .. code:: python

        services.stale_units_removed(name="Old units", keep=["llama-server-a.service"],
                                     also=[], unit_dir="/etc/systemd/system",
                                     pattern="llama-server-*.service",
                                     marker="# Generated by llm-garage", companions={})
    """
    owned = host.get_fact(GarageUnits, directory=unit_dir, pattern=pattern, marker=marker)
    stale = sorted((set(owned) | set(also)) - set(keep))
    for service in stale:
        stem = service.removesuffix(".service")
        paths = [f"{unit_dir}/{service}"] + [f"{d}/{stem}{suffix}"
                                             for d, suffix in companions.items()]
        yield from unit_absent._inner(service=service, paths=paths)
    if not stale:
        host.noop("no llama-server unit of a disabled or removed profile")


@operation()
def all_proven(checks: dict[str, OperationMeta]):
    """
    Fail the host, naming them, when any service failed its check in this run.

    + checks: service name -> its ``restarted_on_change`` operation (run with
      ``_ignore_errors`` so that one failing service does not keep the others from
      converging)

    **Example:**

    .. code:: python

        services.all_proven(name="Every service proven", checks={"a.service": op})
    """
    if not host.state.is_executing:
        host.noop("checked once the services have been (re)started")
        return
    failed = [name for name, op in checks.items() if op.is_complete() and op.did_error()]
    if not failed:
        return
    text = ("llama-server service(s) failed to start or to answer: " + ", ".join(failed)
            + " (their journal is printed above)")
    yield StringCommand("echo", QuoteString(text), ">&2;", "exit", "1")
