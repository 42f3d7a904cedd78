"""The deploy file named as a module: `inspect` finds its frames' module without scanning every
loaded module, and pyinfra's operation order reads the same line numbers as before."""

from __future__ import annotations

import inspect
import sys

from llm_garage.stack_order import register_deploy_file


def frame_of(filename: str):
    """A frame of code compiled under `filename`, as pyinfra runs a deploy file."""
    scope: dict = {}
    exec(compile("import sys\nframe = sys._getframe()\n", filename, "exec"), scope)
    return scope["frame"]


def test_a_registered_deploy_file_is_found_as_a_module(tmp_path):
    deploy = tmp_path / "deploy.py"
    deploy.write_text("# a deploy file\n")
    frame = frame_of(str(deploy))
    assert inspect.getmodule(frame) is None  # each lookup scans sys.modules, and fails
    register_deploy_file(str(deploy))
    module = inspect.getmodule(frame)
    assert module is not None and module.__file__ == str(deploy)
    assert sys.modules[module.__name__] is module
    # the frame's file and line, what pyinfra orders operations by, are unchanged
    info = inspect.getframeinfo(frame)
    assert (info.filename, info.lineno) == (str(deploy), 2)
    register_deploy_file(str(deploy))  # once per file: a second call changes nothing
    assert inspect.getmodule(frame) is module
