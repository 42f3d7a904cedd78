"""Cheaper operation ordering for a deploy file.

pyinfra orders each operation it adds by the call stack (`inspect.stack()`), and `inspect`
finds each frame's module by the frame's file name. A file that no loaded module names, such
as the deploy file pyinfra runs with `exec`, sends every one of those lookups through a scan
of all loaded modules (CPython issue 92041), once per frame per operation on every host.
Naming the deploy file as a module lets `inspect` find it in its own cache instead; the
operations, their order and their hashes stay as they were."""

from __future__ import annotations

import os
import sys
import types


def register_deploy_file(path: str) -> None:
    """Make `path` (the running deploy file, as pyinfra named it) a module `inspect` can
    find."""
    name = "llm_garage.deploy_file:" + os.path.abspath(path)
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__file__ = path
        sys.modules[name] = module
