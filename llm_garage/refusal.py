"""Refusals: problems found while a run is prepared, before any operation runs on any rig.

Every such problem is raised as a `Refusal` (settings, engine pins and toolchains, the models'
lock and Hugging Face resolution, GPU limits, plans that cannot be made). Its message is
complete on its own: one line per problem naming the host, the setting, the value and what is
accepted or how to fix it.

Under pyinfra's CLI, `deploy.py` runs inside `refusals_end_the_run()`: a refusal then ends the
run with its message alone on stderr and exit status 1, with no traceback and without the
"pyinfra error in <file> line <n>:" prefix pyinfra puts before errors it did not expect. The
route is pyinfra's own for a user-facing error: an exception that is both a `PyinfraError`
(so that loading the deploy file passes it on unwrapped, pyinfra_cli/util.py `exec_file`) and
a `pyinfra_cli.exceptions.CliError` (which `pyinfra_cli/cli.py` re-raises as it is, for click to
show and exit with its `exit_code`), whose `show()` prints our message. Outside the CLI (the
API, `llm-garage check`, tests) the refusal propagates unchanged."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from pyinfra.api.exceptions import DeployError

NOTHING_CHANGED = "nothing was changed on any host"


class Refusal(DeployError):
    """A problem found while the run is prepared: nothing has changed on any host yet."""


def refusal_text(error: BaseException) -> str:
    """What the run prints for a refusal: its message, saying that nothing changed."""
    text = str(error).strip()
    if NOTHING_CHANGED not in text.lower():
        text += f"\n{NOTHING_CHANGED.capitalize()}."
    return text


@contextlib.contextmanager
def refusals_end_the_run() -> Iterator[None]:
    """Around the code of a deploy file: a `Refusal` raised inside ends a pyinfra CLI run with
    its message alone (see the module's docstring)."""
    try:
        yield
    except Refusal as e:
        cli = sys.modules.get("pyinfra_cli.exceptions")
        if cli is None:  # not under pyinfra's CLI: the caller handles it
            raise
        raise _cli_refusal(cli.CliError, refusal_text(e)) from None


def _cli_refusal(cli_error: type, text: str) -> Exception:
    import click  # pyinfra's CLI is built on click: it is loaded already

    class RunRefused(cli_error, Refusal):
        exit_code = 1

        def show(self, file=None) -> None:
            click.echo(self.message, err=True)

    return RunRefused(text)
