"""The model operations: a revision's files in the blob store (one file per sha256, shared by
every model and revision) with the revision's snapshot folder linking to them, downloaded on
the rig by `garage-fetch` (resumable, hashed while downloading, renamed into place only once
verified, stamped, linked last); and the prune of old revisions and unused blobs.

Facts decide, from sizes, mtimes, stamps and links (never by hashing): a blob whose stamp
matches is trusted; the operation yields nothing when every blob is and every link is in
place. One model takes two calls:

- `check_only=True` hashes the blobs that are in place but lack a matching stamp (with
  `verify=True`, also those whose stamp records no verification yet) and stamps them, good or
  bad: bytes do not change;
- the plain call downloads what is missing, partial or known bad (or takes it from the older
  layout, `<model dir>/<name>`), then makes the snapshot's links, so its change means the
  model's files changed (services restart on it), and nothing else does.

Nothing a server may be reading is written to: blobs are replaced by a rename, links already
right are left alone, and the prune never deletes a snapshot that a llama-server unit on the
rig names (installed, rendered or proven).

The token (from the controller's HF_TOKEN or token file) goes to `garage-fetch` on its stdin,
never on a command line or into a file, and only to the Hugging Face endpoint's origin."""

from __future__ import annotations

import posixpath

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.api.exceptions import OperationError

from llm_garage import hf, readahead
from llm_garage.facts.models import (
    MANAGED_MARKER,
    STAMP_DIR,
    FolderState,
    ManagedModelFolders,
    ModelFiles,
    ModelStore,
    NamedByUnits,
    stamp_path,
)
from llm_garage.layout import blob_path
from llm_garage.progress import streamed
from llm_garage.readahead import reads_ahead


def _fetch_command(python: str, fetcher: str, path: str, snapshot: str, blobs: str,
                   files: list[dict], *, token: bool, auth_origin: str | None, retries: int,
                   check_only: bool, verify: bool) -> StringCommand:
    bits: list = [python, QuoteString(fetcher), "--dir", QuoteString(path), "--blobs",
                  QuoteString(blobs), "--retries", str(retries)]
    if check_only:
        bits.append("--verify-only")
    else:
        bits += ["--snapshot", QuoteString(snapshot)]
    if verify:
        bits.append("--verify")
    if token and auth_origin:
        bits += ["--auth-origin", QuoteString(auth_origin), "--token-stdin"]
    for f in files:
        bits += ["--file", QuoteString(f["name"]), str(int(f["size"])), QuoteString(f["sha256"]),
                 QuoteString(f["url"])]
    return StringCommand(*bits)


def _run_fetcher(state, host, command: StringCommand, send_token: bool, announce: str) -> bool:
    """Run garage-fetch with its output shown live (per-file progress), the token on stdin.
    Never with a pseudo-terminal: it would echo the token into the output."""
    logger.info(f"{host.print_prefix}{announce}")
    token = hf.token() if send_token else None
    status, _output = streamed(host, command, _stdin=f"{token}\n" if token else None,
                               _get_pty=False)
    return bool(status)


def _plan(state: FolderState, blobs: str, files: list[dict], verify: bool):
    """By file index: (trusted, to hash, to download, to link). `to hash`: in place with the
    right size but no matching stamp (with `verify`, no stamp recording a verification)."""
    trusted, unverified, download, unlinked = [], [], [], []
    for i, f in enumerate(files):
        have = state.file(i)
        if have.trusted(f["size"], f["sha256"], verify):
            trusted.append(i)
        elif have.size == f["size"] and not have.known_bad(f["sha256"]):
            unverified.append(i)
        else:
            download.append(i)
        if have.link != blob_path(blobs, f["sha256"]):
            unlinked.append(i)
    return trusted, unverified, download, unlinked


def _still_to_fetch(state: FolderState, files: list[dict], indexes: list[int]) -> int:
    need = 0
    for i in indexes:
        have = state.file(i)
        size = files[i]["size"]
        partial = have.partial if have.partial is not None and have.partial <= size else 0
        need += size - partial
    return need


def _files_read(path: str, snapshot: str, blobs: str, files: list[dict]) -> dict:
    return {"path": path, "snapshot": snapshot, "blobs": blobs,
            "files": [(f["name"], f["sha256"]) for f in files]}


@reads_ahead(lambda path, snapshot, blobs, files, **_: [
    (ModelFiles, _files_read(path, snapshot, blobs, files))])
@operation()
def model_files(path: str, snapshot: str, blobs: str, files: list[dict], fetcher: str,
                auth_origin: str | None = None, verify: bool = False, check_only: bool = False,
                retries: int = 5, python: str = "python3"):
    """
    Make a revision's files present in the blob store, verified by sha256 and stamped, and its
    snapshot folder link to them under their names.

    + path: the model's folder on the rig (created, with llm-garage's marker, if missing)
    + snapshot: the revision's folder inside it (made last, once every blob is in)
    + blobs: the blob store (files by sha256, shared by every model)
    + files: dicts with ``name`` (file name in the snapshot), ``size``, ``sha256``, ``url``
    + fetcher: path of the garage-fetch script on the rig
    + auth_origin: the Hugging Face endpoint; the controller's token is sent only there
    + verify: re-hash every blob once (the stamp records it; later runs are satisfied)
    + check_only: hash blobs in place without a matching stamp and stamp them, good or bad;
      download nothing
    + retries: times in a row a dropped download is resumed within one run
    + python: the rig's Python 3

    **Example:**

    .. code:: python

        models.model_files(
            name="Check qwen files", path="/srv/models/qwen",
            snapshot="/srv/models/qwen/0123456789ab", blobs="/srv/models/.blobs", files=files,
            fetcher="/opt/llm-garage/bin/garage-fetch", check_only=True,
        )
        models.model_files(
            name="Fetch qwen", path="/srv/models/qwen",
            snapshot="/srv/models/qwen/0123456789ab", blobs="/srv/models/.blobs", files=files,
            fetcher="/opt/llm-garage/bin/garage-fetch", auth_origin="https://huggingface.co",
        )
    """
    state: FolderState = readahead.read(ModelFiles, **_files_read(path, snapshot, blobs, files))
    # The download step trusts any matching stamp: the check step before it verifies.
    trusted, unverified, download, unlinked = _plan(state, blobs, files, verify and check_only)
    total = hf.human_size(sum(f["size"] for f in files))

    if check_only:
        if not unverified:
            if trusted:
                host.noop(f"{len(trusted)} file(s) of {snapshot} match their stamps")
            else:
                host.noop(f"no file of {snapshot} is in the blob store yet")
            return
        todo = [files[i] for i in unverified]
        size = hf.human_size(sum(f["size"] for f in todo))
        command = _fetch_command(python, fetcher, path, snapshot, blobs, todo, token=False,
                                 auth_origin=None, retries=retries, check_only=True,
                                 verify=verify)
        yield FunctionCommand(_run_fetcher, (command, False,
                                             f"verifying {len(todo)} file(s), {size}, in {blobs}"),
                              {})
        return

    if not unverified and not download and not unlinked:
        host.noop(f"{len(files)} file(s), {total}, in {snapshot}: stamps and links match")
        return
    # Blobs in place without a matching stamp are hashed first; they cost nothing to fetch
    # if they turn out right (and the check step normally has stamped them by now). Files of
    # the older layout with a matching stamp are linked into the store, not downloaded.
    adopted = [i for i in download if state.file(i).adoptable(files[i]["size"],
                                                               files[i]["sha256"])]
    fetched = [i for i in download if i not in adopted]
    need = _still_to_fetch(state, files, fetched)
    # a wrong blob stays until its replacement is renamed over it: its space is not free
    if not host.state.is_executing and state.free is not None and need > state.free:
        raise OperationError(
            f"host {host.name!r}: not enough disk space for {snapshot}: {hf.human_size(need)} "
            f"still to download, {hf.human_size(state.free)} free "
            f"({hf.human_size(need - state.free)} short); free space or put models_dir on a "
            "bigger disk")
    if not state.exists:
        yield StringCommand("install", "-d", "-m", "755", "-o", "root", "-g", "root",
                            QuoteString(path), QuoteString(f"{path}/{STAMP_DIR}"), "&&",
                            "touch", QuoteString(f"{path}/{MANAGED_MARKER}"))
    # a blob to hash may turn out wrong, a file to take over may sit on another filesystem:
    # anything not merely to link may be downloaded
    send_token = bool(download or unverified) and hf.token() is not None \
        and auth_origin is not None
    command = _fetch_command(python, fetcher, path, snapshot, blobs, files, token=send_token,
                             auth_origin=auth_origin, retries=retries, check_only=False,
                             verify=verify)
    steps = []
    if fetched:
        listing = ", ".join(f"{files[i]['name']} ({hf.human_size(files[i]['size'])})"
                            for i in fetched)
        steps.append(f"fetching {len(fetched)} of {len(files)} file(s), "
                     f"{hf.human_size(need)} to download: {listing}")
    if adopted:
        steps.append(f"taking {len(adopted)} file(s) from {path} into the blob store")
    if unverified:
        steps.append(f"verifying {len(unverified)} file(s)")
    steps.append(f"linking {snapshot}")
    yield FunctionCommand(_run_fetcher, (command, send_token, "; ".join(steps)), {})


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


@reads_ahead(lambda models_dir, blobs, models, prune_folders=False, **_: [
    (ModelStore, {"models_dir": models_dir, "blobs": blobs, "folders": sorted(models)}),
    *([(ManagedModelFolders, {"models_dir": models_dir})] if prune_folders else [])])
@operation()
def store_pruned(models_dir: str, blobs: str, models: dict[str, str], wanted: list[str],
                 keep_revisions: int, unit_files: list[str], fetcher: str,
                 prune_folders: bool = False, python: str = "python3"):
    """
    Delete, under `models_dir`: per model, the snapshot folders beyond the `keep_revisions`
    newest (the deployed one counts and always stays; the files of the layout before
    snapshots count as the oldest revision); with `prune_folders`, the model folders
    llm-garage created (they carry its marker) that no model names any more; then the blobs
    and partial downloads that no remaining link points at and no model wants. Never a
    snapshot, file or folder that a llama-server unit on the rig names.

    + models_dir: the parent folder of model folders
    + blobs: the blob store
    + models: model folder -> the snapshot this run deploys, for every model of the rig
    + wanted: sha256 of every file of those snapshots (kept even before they are linked)
    + keep_revisions: snapshots kept per model, the deployed one included
    + unit_files: globs of the unit files that may name model files
    + fetcher: garage-fetch on the rig, which deletes blobs under their locks
    + prune_folders: also delete model folders no model names (``models_prune``)
    + python: the rig's Python 3
    """
    store = readahead.read(ModelStore, models_dir=models_dir, blobs=blobs, folders=sorted(models))
    # candidates: (what, the paths a unit would name, the paths to delete)
    candidates: list[tuple[str, list[str], list[str]]] = []
    for folder, current in sorted(models.items()):
        others = sorted((s for s in store.snapshots.get(folder, []) if s[0] != current),
                        key=lambda s: s[1], reverse=True)
        revisions = [(snap, [f"{snap}/"], [snap]) for snap, _ in others]
        flat = sorted(store.flat.get(folder, []))
        if flat:
            stamps = [stamp_path(folder, posixpath.basename(f)) for f in flat]
            revisions.append((f"{len(flat)} file(s) of {folder} from before snapshots", flat,
                              flat + stamps))
        candidates += revisions[max(keep_revisions - 1, 0):]
    folders: set[str] = set()
    if prune_folders:
        keep = {m.rstrip("/") for m in models}
        folders = {folder for folder in readahead.read(ManagedModelFolders, models_dir=models_dir)
                   if folder.rstrip("/") not in keep}
        candidates += [(folder, [f"{folder}/"], [folder]) for folder in sorted(folders)]
    needles = sorted({n for _, names, _ in candidates for n in names})
    named = host.get_fact(NamedByUnits, needles=needles, unit_files=unit_files) if needles \
        else set()
    stale, kept = [], []
    for candidate in candidates:
        (kept if any(n in named for n in candidate[1]) else stale).append(candidate)
    for what, _, _ in kept:
        logger.info(f"{host.print_prefix}kept {what}: a llama-server unit names it")
    gone = [path for _, _, paths in stale for path in paths]
    referenced = {posixpath.basename(target) for link, target in store.links.items()
                  if not _under(link, gone) and posixpath.dirname(target) == blobs}
    drop = sorted((set(store.blobs) | set(store.partials)) - referenced - set(wanted))
    if not stale and not drop:
        host.noop(f"nothing to prune in {models_dir}"
                  + (f" ({len(kept)} revision(s) kept: named by units)" if kept else ""))
        return
    for what, _, paths in stale:
        if what in folders:  # only a folder llm-garage created
            yield StringCommand("test", "-f", QuoteString(f"{what}/{MANAGED_MARKER}"), "&&",
                                "rm", "-rf", "--", QuoteString(what))
        else:
            yield StringCommand("rm", "-rf", "--", *[QuoteString(p) for p in paths])
    if drop:
        bits: list = [python, QuoteString(fetcher), "--prune", "--blobs", QuoteString(blobs),
                      "--models-dir", QuoteString(models_dir)]
        for sha in drop:
            bits += ["--drop-blob", sha]
        yield StringCommand(*bits)
