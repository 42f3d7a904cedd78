"""opencode.json: our providers merged into the user's file, written atomically."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation

from llm_garage import opencode, readahead
from llm_garage.facts.opencode import ConfigFile
from llm_garage.operations.services import private_upload
from llm_garage.readahead import reads_ahead

_MAKE_DIRS = ('mk() { [ -d "$1" ] && return 0; mk "$(dirname "$1")" "$2" && '
              'install -d -m 755 -o "$2" -g "$(id -gn "$2")" "$1"; }; mk "$1" "$2"')


@reads_ahead(lambda path, **_: [(ConfigFile, {"path": path})])
@operation()
def config_merged(path: str,
                  providers: Mapping[str, dict] | Callable[[Mapping | None], Mapping[str, dict]],
                  prefix: str, owner: str):
    """
    Merge our providers into an opencode.json, keeping everything else the user wrote.

    + path: the opencode.json (a symlink is followed: its target is written)
    + providers: provider id -> provider, from ``llm_garage.opencode.providers_for``; or a
      function of the file's current content (None: no file) returning them, called each
      time the operation decides (while the run is prepared, and again when it runs, after
      the operations before it: for values read back from servers,
      ``llm_garage.plans.opencode``)
    + prefix: our provider namespace; providers ``prefix`` and ``prefix-*`` are replaced
    + owner: user owning the file (and any folder created for it)

    Written only when the merged config differs from the file's; first a copy of the
    original is kept as ``<file>.llm-garage.orig`` (once), then the new content goes to a
    temporary file beside it that is renamed over the original. Missing folders are created
    owned by ``owner``. A file opencode could not read either (not JSON with comments, or
    not an object) fails the host without being touched.

    **Example:**

    .. code:: python

        opencode.config_merged(name="opencode.json", path="/root/.config/opencode/opencode.json",
                               providers=providers, prefix="llm-garage", owner="root")
    """
    current = readahead.read(ConfigFile, path=path)
    real = current["real"] or path
    existing = None
    if current["text"] is not None:
        try:
            existing, had_comments = opencode.loads(current["text"])
        except opencode.OpencodeConfigError as e:
            message = f"{real}: {e}; fix it (opencode would refuse it too), then run again"
            yield StringCommand("echo", QuoteString(message), ">&2;", "exit", "1")
            return
        if had_comments:
            host.log(f"{real} has comments: they are not kept when it is rewritten "
                     f"(the original is kept as {real}{opencode.BACKUP_SUFFIX} the first time)")
    if callable(providers):
        providers = providers(existing)
    if existing is None and not providers:
        host.noop(f"no {real} and no provider to write into it")
        return
    merged = opencode.merge(existing, providers, prefix)
    if merged == existing:
        host.noop(f"{real} already lists our providers")
        return
    temp = real + ".llm-garage.tmp"
    mode = current["mode"] or "644"
    yield StringCommand("sh", "-c", QuoteString(_MAKE_DIRS), "-",
                        QuoteString(posixpath.dirname(real)), QuoteString(owner))
    if existing is not None:
        backup = real + opencode.BACKUP_SUFFIX
        keep_once = ('[ -e "$2" ] || { cp -p -- "$1" "$2.tmp" && sync -- "$2.tmp" && '
                     'mv -f -- "$2.tmp" "$2"; }')
        yield StringCommand("sh", "-c", QuoteString(keep_once), "-", QuoteString(real),
                            QuoteString(backup))
    yield StringCommand("sh", "-c", QuoteString('umask 077 && : > "$1" && chmod 600 "$1"'), "-",
                        QuoteString(temp))
    yield from private_upload(opencode.dumps(merged), temp)
    yield StringCommand("chmod", mode, QuoteString(temp))
    yield StringCommand("chown", f"{owner}:", QuoteString(temp))
    yield StringCommand("sync", "--", QuoteString(temp))
    yield StringCommand("mv", "-f", "--", QuoteString(temp), QuoteString(real))
