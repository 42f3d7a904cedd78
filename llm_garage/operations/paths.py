"""Folders and files of our own, several per operation: one fact reads them all, so a rig
where they are all in place costs one command."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping, Sequence
from io import BytesIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation
from pyinfra.api.exceptions import OperationError

from llm_garage import readahead
from llm_garage.facts.paths import PathStates, ServiceAccount
from llm_garage.readahead import reads_ahead


def _owner_and_mode(path: str, have: dict, user: str, group: str, mode: str):
    """Commands setting what differs of the owner and mode of `path`."""
    if have["user"] != user or have["group"] != group:
        yield StringCommand("chown", f"{user}:{group}", "--", QuoteString(path))
    if have["mode"] != mode:
        yield StringCommand("chmod", mode, "--", QuoteString(path))


@reads_ahead(lambda paths, **_: [(PathStates, {"paths": list(paths), "hash_files": False})])
@operation()
def folders(paths: Sequence[str], user: str, group: str, mode: str):
    """
    Make sure each of `paths` is a folder with this owner and mode (created with its parents).

    + paths: the folders
    + user, group: their owner
    + mode: their mode, as ``stat -c %a`` prints it (``755``)

    A path that exists and is not a folder (a file, a link) stops the operation.

    **Example:**

    .. code:: python

        paths.folders(name="Folders", paths=["/opt/llm-garage"], user="root", group="root",
                      mode="755")
    """
    states = readahead.read(PathStates, paths=list(paths), hash_files=False)
    changed = []
    for path in paths:
        have = states.get(path)
        if have is not None and have["type"] != "dir":
            raise OperationError(f"{path} exists and is not a directory ({have['type']})")
        if have is None:
            changed.append(f"{path} created")
            yield StringCommand("mkdir", "-p", "--", QuoteString(path))
            have = {"user": "", "group": "", "mode": ""}
        elif (have["user"], have["group"], have["mode"]) != (user, group, mode):
            changed.append(f"{path} set to {user}:{group} {mode}")
        yield from _owner_and_mode(path, have, user, group, mode)
    if changed:
        host.log("; ".join(changed))
    else:
        host.noop(f"{len(paths)} folder(s) in place ({user}:{group} {mode}): "
                  + ", ".join(paths))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@reads_ahead(lambda files, **_: [(PathStates, {"paths": sorted(files)})])
@operation()
def files_installed(files: Mapping[str, str], user: str, group: str, mode: str):
    """
    Install files from this machine onto the rig, each only when its content differs.

    + files: path on the rig -> the local file it must hold
    + user, group: their owner
    + mode: their mode, as ``stat -c %a`` prints it (``755``)

    Contents are compared by sha256 on the rig. A file is uploaded beside its place and
    renamed over it, so nothing ever runs half a script.

    **Example:**

    .. code:: python

        paths.files_installed(name="Scripts", files={"/opt/llm-garage/bin/x": "files/x"},
                              user="root", group="root", mode="755")
    """
    states = readahead.read(PathStates, paths=sorted(files))
    changed = []
    for dest, src in sorted(files.items()):
        have = states.get(dest)
        if have is not None and have["type"] != "file":
            raise OperationError(f"{dest} exists and is not a regular file ({have['type']})")
        if have is None or have["sha256"] != _sha256(src):
            changed.append(f"{posixpath.basename(dest)} {'updated' if have else 'installed'}")
            temp = f"{dest}.tmp"
            yield FileUploadCommand(src, temp)
            yield from _owner_and_mode(temp, {"user": "", "group": "", "mode": ""}, user,
                                       group, mode)
            yield StringCommand("mv", "-f", "--", QuoteString(temp), QuoteString(dest))
            continue
        if (have["user"], have["group"], have["mode"]) != (user, group, mode):
            changed.append(f"{posixpath.basename(dest)} set to {user}:{group} {mode}")
        yield from _owner_and_mode(dest, have, user, group, mode)
    if changed:
        host.log("; ".join(changed))
    else:
        folders_of = sorted({posixpath.dirname(d) for d in files})
        host.noop(f"{len(files)} file(s) in {', '.join(folders_of)} up to date")


@reads_ahead(lambda path, **_: [(PathStates, {"paths": [path]})])
@operation()
def text_installed(path: str, text: str, user: str, group: str, mode: str):
    """
    Make `path` on the rig hold `text` (made on this machine: a rendered template), with this
    owner and mode.

    + path: the file on the rig (its folder exists)
    + text: what it must hold
    + user, group: its owner
    + mode: its mode, as ``stat -c %a`` prints it (``644``)

    Compared by sha256 on the rig; a new content is uploaded beside the file and renamed
    over it.

    **Example:**

    .. code:: python

        paths.text_installed(name="Unit", path="/opt/llm-garage/state/x.service", text=text,
                             user="root", group="root", mode="644")
    """
    have = readahead.read(PathStates, paths=[path]).get(path)
    if have is not None and have["type"] != "file":
        raise OperationError(f"{path} exists and is not a regular file ({have['type']})")
    data = text.encode()
    if have is None or have["sha256"] != hashlib.sha256(data).hexdigest():
        temp = f"{path}.tmp"
        yield FileUploadCommand(BytesIO(data), temp)
        yield from _owner_and_mode(temp, {"user": "", "group": "", "mode": ""}, user, group,
                                   mode)
        yield StringCommand("mv", "-f", "--", QuoteString(temp), QuoteString(path))
        return
    if (have["user"], have["group"], have["mode"]) == (user, group, mode):
        host.noop(f"{path} holds the rendered text")
    yield from _owner_and_mode(path, have, user, group, mode)


@reads_ahead(lambda user, groups, home, **_: [
    (ServiceAccount, {"user": user, "groups": list(groups), "home": home})])
@operation()
def service_account(user: str, groups: Sequence[str], home: str, shell: str):
    """
    A system user with this home and login shell, in exactly `groups` besides its own, each
    group created (as a system group) where missing; its home folder exists and is the
    user's (a link there is left as it is).

    + user: the user
    + groups: its supplementary groups
    + home, shell: its home folder and login shell

    **Example:**

    .. code:: python

        paths.service_account(name="Service user", user="llama", groups=["video"],
                              home="/opt/llm-garage/home", shell="/usr/sbin/nologin")
    """
    have = readahead.read(ServiceAccount, user=user, groups=list(groups), home=home)
    changed = []
    for group in groups:
        if group not in have["groups"]:
            changed.append(f"group {group} created")
            yield StringCommand("groupadd", "-r", QuoteString(group))
    listed = StringCommand(*[QuoteString(g) for g in groups], _separator=",")
    passwd = have["passwd"]
    if passwd is None:
        changed.append(f"user {user} created")
        yield StringCommand("useradd", "-d", QuoteString(home), "-s", QuoteString(shell),
                            *(["-G", listed] if groups else []), "-r", "-M", QuoteString(user))
    else:
        mod = []
        if passwd["home"] != home:
            mod += ["-d", QuoteString(home)]
        if passwd["shell"] != shell:
            mod += ["-s", QuoteString(shell)]
        if set(have["member_of"]) != set(groups):
            mod += ["-G", listed]
        if mod:
            changed.append(f"user {user} changed")
            yield StringCommand("usermod", *mod, QuoteString(user))
    where = have["home"]
    if where == "other":
        raise OperationError(f"{home} exists and is not a directory")
    if where is None:
        changed.append(f"{home} created")
        yield StringCommand("mkdir", "-p", "--", QuoteString(home))
    if where is None or (where != "link" and (where["user"], where["group"]) != (user, user)):
        if where is not None:
            changed.append(f"{home} given to {user}")
        yield StringCommand("chown", f"{user}:{user}", "--", QuoteString(home))
    if changed:
        host.log("; ".join(changed))
    else:
        host.noop(f"user {user} exists (home {home}, shell {shell}, groups "
                  f"{', '.join(groups) or 'none'})")
