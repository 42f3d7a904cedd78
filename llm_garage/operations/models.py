"""The model files operation: a folder holding exactly the pinned bytes, downloaded on the rig by
`garage-fetch` (resumable, hashed while downloading, renamed into place only once verified,
stamped last).

Facts decide, from sizes, mtimes and stamps (never by hashing): a file whose stamp matches is
trusted; the operation yields nothing when every file is. One model takes two calls:

- `check_only=True` hashes the files that are in place but lack a matching stamp (all of them
  with `verify=True`), stamps the good ones and removes the bad ones: bytes do not change;
- the plain call downloads what is missing, partial or was removed, so its change means the
  model's files changed (services restart on it), and nothing else does.

The token (from the controller's HF_TOKEN or token file) goes to `garage-fetch` on its stdin,
never on a command line or into a file, and only to the Hugging Face endpoint's origin."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.exceptions import OperationError

from llm_garage import hf
from llm_garage.facts.models import (
    MANAGED_MARKER,
    STAMP_DIR,
    FolderState,
    ManagedModelFolders,
    ModelFiles,
)


def _fetch_command(python: str, fetcher: str, path: str, files: list[dict], *, token: bool,
                   auth_origin: str | None, retries: int, check_only: bool) -> StringCommand:
    bits: list = [python, QuoteString(fetcher), "--dir", QuoteString(path),
                  "--retries", str(retries)]
    if check_only:
        bits.append("--verify-only")
    if token and auth_origin:
        bits += ["--auth-origin", QuoteString(auth_origin), "--token-stdin"]
    for f in files:
        bits += ["--file", QuoteString(f["name"]), str(int(f["size"])), QuoteString(f["sha256"]),
                 QuoteString(f["url"])]
    return StringCommand(*bits)


def _run_fetcher(state, host, command: StringCommand, send_token: bool, announce: str) -> bool:
    """Run garage-fetch with its output shown live (per-file progress), the token on stdin."""
    logger.info(f"{host.print_prefix}{announce}")
    arguments = host.current_op_global_arguments or {}
    kwargs = {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}
    token = hf.token() if send_token else None
    kwargs["_stdin"] = f"{token}\n" if token else None
    status, _output = host.run_shell_command(command, print_output=True, **kwargs)
    return bool(status)


def _plan(state: FolderState, files: list[dict], verify: bool):
    """(in place and trusted, in place but to be hashed, to download) by file index."""
    trusted, unverified, download = [], [], []
    for i, f in enumerate(files):
        have = state.file(i)
        if have.size == f["size"] and not verify and have.trusted(f["size"], f["sha256"]):
            trusted.append(i)
        elif have.size == f["size"]:
            unverified.append(i)
        else:
            download.append(i)
    return trusted, unverified, download


def _still_to_fetch(state: FolderState, files: list[dict], indexes: list[int]) -> int:
    need = 0
    for i in indexes:
        have = state.file(i)
        size = files[i]["size"]
        partial = have.partial if have.partial is not None and have.partial <= size else 0
        need += size - partial
    return need


@operation()
def model_files(path: str, files: list[dict], fetcher: str, auth_origin: str | None = None,
                verify: bool = False, check_only: bool = False, retries: int = 5,
                python: str = "python3"):
    """
    Make a folder hold exactly the given files, verified by sha256, stamped.

    + path: the model's folder on the rig (created, with llm-garage's marker, if missing)
    + files: dicts with ``name`` (file name in the folder), ``size``, ``sha256``, ``url``
    + fetcher: path of the garage-fetch script on the rig
    + auth_origin: the Hugging Face endpoint; the controller's token is sent only there
    + verify: with ``check_only``, re-hash every file in place, stamps notwithstanding
    + check_only: hash files in place without a matching stamp, stamp the good ones, remove
      the bad ones; download nothing
    + retries: times in a row a dropped download is resumed within one run
    + python: the rig's Python 3

    **Example:**

    .. code:: python

        models.model_files(
            name="Check qwen files", path="/srv/models/qwen", files=files,
            fetcher="/opt/llm-garage/bin/garage-fetch", check_only=True,
        )
        models.model_files(
            name="Fetch qwen", path="/srv/models/qwen", files=files,
            fetcher="/opt/llm-garage/bin/garage-fetch", auth_origin="https://huggingface.co",
        )
    """
    names = [f["name"] for f in files]
    state: FolderState = host.get_fact(ModelFiles, path=path, names=names)
    trusted, unverified, download = _plan(state, files, verify and check_only)
    total = hf.human_size(sum(f["size"] for f in files))

    if check_only:
        if not unverified:
            if trusted:
                host.noop(f"{len(trusted)} file(s) in {path} match their stamps")
            else:
                host.noop(f"no file of {path} is in place yet")
            return
        todo = [files[i] for i in unverified]
        size = hf.human_size(sum(f["size"] for f in todo))
        command = _fetch_command(python, fetcher, path, todo, token=False, auth_origin=None,
                                 retries=retries, check_only=True)
        yield FunctionCommand(_run_fetcher, (command, False,
                                             f"verifying {len(todo)} file(s), {size}, in {path}"),
                              {})
        return

    if not unverified and not download:
        host.noop(f"{len(files)} file(s), {total}, in {path}: stamps match")
        return
    # Files in place without a matching stamp are hashed first; they cost nothing to fetch
    # if they turn out right (and the check step normally has stamped them by now).
    todo = [files[i] for i in sorted(unverified + download)]
    need = _still_to_fetch(state, files, download)
    # wrong files in place are removed before downloading: their space counts as free
    free = None if state.free is None else state.free + sum(
        state.file(i).size or 0 for i in download)
    if not host.state.is_executing and free is not None and need > free:
        raise OperationError(
            f"host {host.name!r}: not enough disk space for {path}: {hf.human_size(need)} still "
            f"to download, {hf.human_size(free)} free ({hf.human_size(need - free)} short); "
            "free space or put the model on a bigger disk (models_dir, or the model's dir)")
    if not state.exists:
        yield StringCommand("install", "-d", "-m", "755", "-o", "root", "-g", "root",
                            QuoteString(path), QuoteString(f"{path}/{STAMP_DIR}"), "&&",
                            "touch", QuoteString(f"{path}/{MANAGED_MARKER}"))
    send_token = hf.token() is not None and auth_origin is not None
    command = _fetch_command(python, fetcher, path, todo, token=send_token,
                             auth_origin=auth_origin, retries=retries, check_only=False)
    listing = ", ".join(f"{f['name']} ({hf.human_size(f['size'])})" for f in todo)
    announce = (f"fetching {len(todo)} of {len(files)} file(s) into {path}, "
                f"{hf.human_size(need)} to download: {listing}")
    yield FunctionCommand(_run_fetcher, (command, send_token, announce), {})


@operation()
def pruned(models_dir: str, keep: list[str]):
    """
    Delete the model folders under `models_dir` that llm-garage created (they carry its marker)
    and that no model names any more. Folders without the marker are never touched.

    + models_dir: the parent folder of model folders
    + keep: folders of the models this rig has

    **Example:**

    .. code:: python

        models.pruned(name="Prune models", models_dir="/srv/models",
                      keep=["/srv/models/qwen"])
    """
    keep_set = {k.rstrip("/") for k in keep}
    stale = [d for d in host.get_fact(ManagedModelFolders, models_dir=models_dir)
             if d.rstrip("/") not in keep_set]
    if not stale:
        host.noop(f"no model folder to prune in {models_dir}")
        return
    for folder in stale:
        yield StringCommand("test", "-f", QuoteString(f"{folder}/{MANAGED_MARKER}"), "&&",
                            "rm", "-rf", "--", QuoteString(folder))
