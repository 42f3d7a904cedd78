"""llama-server services: root-only secret files, restart-then-prove, clean removal."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import (
    FileUploadCommand,
    FunctionCommand,
    QuoteString,
    StringCommand,
    operation,
)
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import Sha256File

from llm_garage import readahead
from llm_garage.facts.paths import PathStates
from llm_garage.facts.services import (
    GarageUnits,
    InstalledUnit,
    ServiceState,
    UnitPresence,
    inputs_digest_command,
)
from llm_garage.operations import connector_arguments
from llm_garage.plans.services import ServicePlan
from llm_garage.readahead import reads_ahead

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


@reads_ahead(lambda path, **_: [(Sha256File, {"path": path})])
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
    have = readahead.read(Sha256File, path=path)
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
    # Written beside, then renamed: a reader (or a kill) never sees half a key.
    temp = f"{path}.tmp"
    yield StringCommand("sh", "-c", QuoteString(
        'umask 077 && : > "$1" && chown root:root "$1" && chmod 600 "$1"'), "-", QuoteString(temp))
    yield from private_upload(content, temp)
    yield StringCommand("sh", "-c", QuoteString('sync -- "$1" && mv -f -- "$1" "$2"'), "-",
                        QuoteString(temp), QuoteString(path))


def _shell(host, script: str, *args: str, print_output: bool = False):
    """Run `sh -c SCRIPT - ARGS…` on the host with this operation's connector arguments."""
    kwargs = connector_arguments(host)
    command = StringCommand("sh", "-c", QuoteString(script), "-", *[QuoteString(a) for a in args])
    return host.run_shell_command(command, print_output=print_output, **kwargs)


def _install(host, source: str, unit_file: str) -> bool:
    """Copy a unit into place atomically (never half a unit file), then reload systemd."""
    ok, _ = _shell(host, 'cp -f -- "$1" "$2.tmp" && chmod 644 "$2.tmp" && sync -- "$2.tmp" && '
                         'mv -f -- "$2.tmp" "$2" && systemctl daemon-reload', source, unit_file)
    return ok


def _prove(host, plan: ServicePlan, rollback: bool = False) -> bool:
    """Restart the unit and prove it, with the check's output shown live: a big model loads
    for minutes, and the journal tail it prints on failure is what the user needs to see.

    The proof of a rolled-back unit leaves out what only the new unit promised (its pinned
    commit and its context size); the rest is asked of it again."""
    check = list(plan.check)
    if rollback:
        for option in ("--commit", "--ctx-size"):
            if option in check:
                at = check.index(option)
                del check[at:at + 2]
    ok, _ = _shell(host, '"$@"', *check, "--restart", print_output=True)
    return bool(ok)


def _report(host, plan: ServicePlan) -> dict:
    ok, output = _shell(host, 'cat -- "$1"', plan.report)
    try:
        return json.loads("\n".join(output.stdout_lines)) if ok else {}
    except ValueError:
        return {}


def _prove_or_roll_back(state, host, plan: ServicePlan, digest: str, keep_running: bool) -> bool:
    """Install the wanted unit, restart and prove it. On success record it as proven; on
    failure record the failed inputs and put the last proven unit back (or, with none, leave
    the service stopped rather than restart-looping). False fails the operation."""
    prefix = host.print_prefix
    if keep_running:
        # The unit running now was proven before there was a copy of it: keep one first.
        _shell(host, 'cp -f -- "$1" "$2.tmp" && mv -f -- "$2.tmp" "$2"', plan.unit_file,
               plan.proven_unit)
    if not _install(host, plan.wanted_unit, plan.unit_file):
        logger.error(f"{prefix}{plan.service}: cannot install {plan.unit_file}")
        return False
    if _prove(host, plan):
        _shell(host, 'umask 077 && cp -f -- "$1" "$2.tmp" && mv -f -- "$2.tmp" "$2" && '
                     f'{{ {digest}; }} > "$3.tmp" && mv -f -- "$3.tmp" "$3" && rm -f -- "$4" && '
                     'systemctl enable --quiet -- "$5"',
               plan.unit_file, plan.proven_unit, plan.inputs, plan.failed, plan.service)
        return True
    report = _report(host, plan)
    why = (f"{report.get('step', 'check')} failed: {report.get('reason', 'see above')}"
           .replace("\n", " "))
    # First line: what was tried (the inputs and the proof asked of them), then why it failed.
    _shell(host, f'umask 077 && {{ printf "%s\\n%s\\n" "$({digest})" "$3" | sha256sum | '
                 'cut -c1-64; printf "%s\\n" "$2"; } > "$1.tmp" && mv -f -- "$1.tmp" "$1"',
           plan.failed, why, proof_text(plan))
    has_proven = _shell(host, 'test -f "$1"', plan.proven_unit)[0]
    if not has_proven:
        _shell(host, 'systemctl disable --now --quiet -- "$1"; true', plan.service)
        logger.error(f"{prefix}{plan.service}: {why}; no earlier proven unit to go back to: "
                     "left stopped")
        return False
    logger.warning(f"{prefix}{plan.service}: {why}; rolling back to the last proven unit")
    if _install(host, plan.proven_unit, plan.unit_file) and _prove(host, plan, rollback=True):
        proven = _report(host, plan)
        logger.error(f"{prefix}{plan.service}: NOT PROVEN ({why}); rolled back to "
                     f"{proven.get('build_info') or 'the last proven build'}: serving again")
    else:
        logger.error(f"{prefix}{plan.service}: NOT PROVEN ({why}); the rollback to the last "
                     "proven unit failed too")
    return False


def proof_text(plan: ServicePlan) -> str:
    return " ".join(plan.check)


def attempt_key(inputs: str, plan: ServicePlan) -> str:
    """What a proof attempt tried: the service's inputs and the proof asked of them (a new
    proof, e.g. without the tool turn, is a new attempt)."""
    return hashlib.sha256(f"{inputs}\n{proof_text(plan)}\n".encode()).hexdigest()


def _state_read(plan: ServicePlan) -> dict:
    digest = inputs_digest_command(plan.wanted_unit, plan.key_file if plan.api_key else None,
                                   plan.binary, plan.model_path)
    return {"service": plan.service, "wanted": plan.wanted_unit, "installed": plan.unit_file,
            "proven_unit": plan.proven_unit, "proven_path": plan.inputs,
            "failed_path": plan.failed, "digest": digest}


@reads_ahead(lambda plan, **_: [(ServiceState, _state_read(plan))])
@operation()
def served(plan: ServicePlan, changed: Sequence[OperationMeta] = ()):
    """
    Serve a profile with its wanted unit once that unit is proven; else roll back.

    + plan: the profile's service (``plans.services.ServicePlan``): its wanted, installed
      and proven unit, the inputs its digest covers (``facts.services.inputs_digest_command``)
      and the command restarting and proving it (``garage-server-check``)
    + changed: operations of this run whose change also means a restart

    The wanted unit is installed and the service restarted (a first start counts) when the
    inputs differ from those last proven, when the installed unit is not the wanted one, when
    the unit is not active, or when an operation in ``changed`` changed; then proven. A
    proven unit is kept as the one to roll back to. A change that fails its proof is recorded
    and rolled back (the old unit, the old build it names, restarted and proven again) and
    the operation fails; a rerun with the same inputs reports that failure without restarting
    anything (``retry_failed`` tries again). Nothing else ever restarts the service.

    **Example:**

    .. code:: python

        services.served(name="Serve qwen", plan=plan, changed=[build_op])
    """
    service = plan.service
    read = _state_read(plan)
    digest = read["digest"]
    state = readahead.read(ServiceState, **read)
    if host.state.is_executing:
        upstream = any(op.is_complete() and op.did_change() for op in changed)
    else:
        upstream = any(op.will_change for op in changed)
    if (state["inputs"] and state["failed"] == attempt_key(state["inputs"], plan)
            and not plan.retry_failed):
        # Proven broken already: say so again, and leave the service serving what it serves.
        text = (f"{service}: these inputs already failed their proof ("
                f"{state['failure'] or 'see the last run'}); it keeps serving the last proven "
                "unit. Change the inventory, or set services_retry_failed to try again")
        yield StringCommand("echo", QuoteString(text), ">&2;", "exit", "1")
        return
    reasons = []
    if state["proven"] is None:
        reasons.append("never proven")
    elif state["proven"] != state["inputs"]:
        reasons.append("its unit, API key, engine build or model files changed")
    if not state["installed"]:
        reasons.append("its installed unit is not the wanted one")
    if state["active"] != "active":
        reasons.append(f"it is {state['active']}")
    if upstream:
        reasons.append("its engine or model changed in this run")
    if not reasons:
        if not state["enabled"]:
            yield StringCommand("systemctl", "enable", "--", QuoteString(service))
            return
        host.noop(f"{service} is running with the inputs it was proven with")
        return
    host.log(f"{service}: (re)start because " + "; ".join(reasons))
    keep_running = (not state["proven_unit"] and state["proven"] is not None
                    and state["active"] == "active")
    yield FunctionCommand(_prove_or_roll_back, (plan, digest, keep_running), {})


@reads_ahead(lambda source, unit_file, service=None, **_: [
    (InstalledUnit, {"source": source, "unit_file": unit_file, "service": service}) if service
    else (PathStates, {"paths": [source, unit_file]})])
@operation()
def unit_installed(source: str, unit_file: str, service: str | None = None):
    """
    Install a unit rendered on the rig as the systemd unit, atomically, and reload systemd;
    with `service`, also enable it at boot.

    + source: the rendered unit (written by the deploy beside our state)
    + unit_file: where systemd reads it
    + service: the unit to enable (``systemctl enable``) when it is not enabled

    A unit file is never half-written: the copy goes beside it, reaches the disk, then is
    renamed over it. Both files (and whether the unit is enabled) are read in one command.

    **Example:**

    .. code:: python

        services.unit_installed(name="GPU unit", source="/opt/llm-garage/state/x.service",
                                unit_file="/etc/systemd/system/x.service",
                                service="x.service")
    """
    if service:
        found = readahead.read(InstalledUnit, source=source, unit_file=unit_file,
                               service=service)
        states, enabled = found["files"], found["enabled"] == "enabled"
    else:
        states, enabled = readahead.read(PathStates, paths=[source, unit_file]), True
    want, have = ((states.get(p) or {}).get("sha256") for p in (source, unit_file))
    same = want is not None and want == have
    if not same:
        yield StringCommand("sh", "-c", QuoteString(
            'cp -f -- "$1" "$2.tmp" && chmod 644 "$2.tmp" && sync -- "$2.tmp" && '
            'mv -f -- "$2.tmp" "$2" && systemctl daemon-reload'), "-", QuoteString(source),
            QuoteString(unit_file))
    if not enabled:
        yield StringCommand("systemctl", "enable", "--", QuoteString(service))
    if same and enabled:
        host.noop(f"{unit_file} is the rendered unit"
                  + (f", {service} is enabled at boot" if service else ""))


@reads_ahead(lambda service, paths, **_: [
    (UnitPresence, {"service": service, "paths": list(paths)})])
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
    presence = readahead.read(UnitPresence, service=service, paths=list(paths))
    if not (presence["active"] or presence["enabled"] or presence["present"]):
        host.noop(f"{service} is absent")
        return
    if presence["active"] or presence["enabled"]:
        yield StringCommand("systemctl", "disable", "--now", "--", QuoteString(service))
    if presence["present"]:
        yield StringCommand("rm", "-f", "--", *[QuoteString(p) for p in presence["present"]])


@reads_ahead(lambda unit_dir, pattern, marker, **_: [
    (GarageUnits, {"directory": unit_dir, "pattern": pattern, "marker": marker})])
@operation()
def stale_units_removed(keep: Sequence[str], also: Sequence[str], unit_dir: str, pattern: str,
                        marker: str, companions: dict[str, Sequence[str] | str]):
    """
    Stop, disable and delete the units llm-garage wrote that no enabled profile wants.

    + keep: unit names to leave alone (the enabled profiles)
    + also: unit names to remove even without llm-garage's marker (disabled profiles)
    + unit_dir, pattern: where our units live and the glob naming them
    + marker: first-line marker of the unit files llm-garage wrote
    + companions: folder -> suffix(es) of files that belong to a unit of the same stem (its
      API key, its wanted and proven unit, its recorded inputs), deleted with it

    **Example:**

    .. code:: python

        services.stale_units_removed(name="Old units", keep=["llama-server-a.service"],
                                     also=[], unit_dir="/etc/systemd/system",
                                     pattern="llama-server-*.service",
                                     marker="# Generated by llm-garage", companions={})
    """
    owned = readahead.read(GarageUnits, directory=unit_dir, pattern=pattern, marker=marker)
    stale = sorted((set(owned) | set(also)) - set(keep))
    for service in stale:
        stem = service.removesuffix(".service")
        paths = [f"{unit_dir}/{service}"] + [
            f"{d}/{stem}{suffix}" for d, suffixes in companions.items()
            for suffix in ((suffixes,) if isinstance(suffixes, str) else suffixes)]
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
