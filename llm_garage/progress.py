"""Progress of long work on the rig (builds, downloads), shown while it runs.

The rig-side scripts (`garage-build`, `garage-fetch`) print their own paced progress lines;
this module runs them so that those lines reach the deploy's output as they come, with the
host's prefix, and forwards the controller's progress settings to them:

- ``GARAGE_PROGRESS``: ``on`` (default) or ``off`` (only the lines that start and end the work);
- ``GARAGE_PROGRESS_INTERVAL``: seconds between two progress lines at least (default 20);
- ``GARAGE_PROGRESS_STEP``: percent of the work between two progress lines at least (default 10).

Progress goes to the output only, never into a file on the rig."""

from __future__ import annotations

import os

from pyinfra.api import StringCommand

from llm_garage.operations import connector_arguments

PROGRESS_ENV = ("GARAGE_PROGRESS", "GARAGE_PROGRESS_INTERVAL", "GARAGE_PROGRESS_STEP")


def progress_env(environ=None) -> dict[str, str]:
    """The progress settings set in the controller's environment."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in PROGRESS_ENV if environ.get(key)}


def streamed(host, command: StringCommand, **extra):
    """Run `command` on `host` from an operation's function with the operation's connector
    arguments and the progress settings in its environment, its output shown line by line
    as it comes (pyinfra shows a plain command's output only once it ended). `extra`
    overrides connector arguments (``_stdin``, ``_get_pty``)."""
    kwargs = connector_arguments(host)
    env = {**(kwargs.get("_env") or {}), **progress_env()}
    if env:
        kwargs["_env"] = env
    kwargs.update(extra)
    return host.run_shell_command(command, print_output=True, **kwargs)
