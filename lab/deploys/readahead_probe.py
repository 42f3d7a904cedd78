"""A deploy that exercises llm_garage.readahead on one host (tests/unit/test_readahead.py runs
it with the real pyinfra CLI on @local).

Host data (pyinfra's --data): ``probe_dir``, a folder holding ``a`` and ``b``; ``probe_out``,
a JSON-lines file each probe appends what it read to. The operations, in order: probe a and
b, write a new text into a (a change), probe a again, then probe three facts whose answers are
unusual in a batch (no final newline, no output, a failing command) and two facts that run
the same command (a counter of its runs), each read twice."""

import json

from pyinfra import host
from pyinfra.api import FactBase, operation

from llm_garage import readahead
from llm_garage.facts.paths import PathStates
from llm_garage.operations import paths
from llm_garage.readahead import reads_ahead

folder = host.data.get("probe_dir")
out = host.data.get("probe_out")


class NoFinalNewline(FactBase):
    def command(self):
        return "printf 'one\\ntwo'"

    def process(self, output):
        return list(output)


class Silent(FactBase):
    default = list

    def command(self):
        return "true"

    def process(self, output):
        return list(output)


class Failing(FactBase):
    """Exits 3 its first two times (a counter file beside the marker), then answers."""

    def command(self, marker: str):
        return (f"n=$(cat {marker} 2>/dev/null || echo 0); echo $((n + 1)) > {marker}; "
                f'[ "$n" -ge 2 ] || exit 3; echo "answered at try $((n + 1))"')

    def process(self, output):
        return list(output)


class RunCount(FactBase):
    """How many times this command has run (a counter file)."""

    def command(self, marker: str):
        return f"n=$(cat {marker} 2>/dev/null || echo 0); echo $((n + 1)) | tee {marker}"

    def process(self, output):
        return int(list(output)[0])


class RunCountText(RunCount):
    """The same command as RunCount, read another way."""

    def process(self, output):
        return f"run {list(output)[0]}"


def _record(label: str, value) -> None:
    with open(out, "a") as f:
        f.write(json.dumps({"label": label, "value": value}, default=str) + "\n")


@reads_ahead(lambda path, label, **_: [(PathStates, {"paths": [path]})])
@operation()
def probe(path: str, label: str):
    state = readahead.read(PathStates, paths=[path]).get(path) or {}
    _record(label, state.get("sha256"))
    host.noop(f"probed {path}")
    return
    yield


@reads_ahead(lambda marker, runs, **_: [(NoFinalNewline, {}), (Silent, {}),
                                        (Failing, {"marker": marker}),
                                        (RunCount, {"marker": runs}),
                                        (RunCountText, {"marker": runs})])
@operation()
def odd(marker: str, runs: str, label: str):
    _record(label, [readahead.read(NoFinalNewline), readahead.read(Silent),
                    readahead.read(Failing, marker=marker), readahead.read(RunCount, marker=runs),
                    readahead.read(RunCountText, marker=runs)])
    host.noop("probed odd facts")
    return
    yield


probe(name="probe a", path=f"{folder}/a", label="a before")
probe(name="probe b", path=f"{folder}/b", label="b")
odd(name="odd 1", marker=f"{folder}/tries", runs=f"{folder}/runs", label="odd 1")
paths.text_installed(name="write a", path=f"{folder}/a", text="new text\n", user="root",
                     group="root", mode="644")
probe(name="probe a again", path=f"{folder}/a", label="a after")
odd(name="odd 2", marker=f"{folder}/tries", runs=f"{folder}/runs", label="odd 2")
