"""Operations on engine builds: install a pinned CUDA toolkit, build one commit into its own
folder, switch the `current` link, prune old builds, record the commit a tag resolved to.

Facts decide: the build runs only when its folder has no stamp for this commit and these
flags (the stamp is written last, so a failed build is retried on the next run); a toolkit's
install only when its folder's stamp does not name its release and wheels; the switch only
when `current` points elsewhere; pruning only when more builds are kept than asked."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.api.exceptions import OperationError

from llm_garage import readahead
from llm_garage.facts.engine import CudaToolkitStamp, EngineBuilds, PinRecords, pin_record_line
from llm_garage.plans.engines import BuildPlan, CudaInstall
from llm_garage.progress import streamed
from llm_garage.readahead import reads_ahead
from llm_garage.settings import load_flags_env


def build_command(plan: BuildPlan, script: str) -> StringCommand:
    """The rig-side build script's command line for this plan."""
    bits: list = [QuoteString(script)]

    def opt(flag, value):
        bits.extend([flag, QuoteString(value)])

    opt("--name", plan.engine)
    opt("--source", plan.source_dir)
    opt("--remote", plan.remote)
    opt("--commit", plan.commit)
    for spec in plan.fetch:
        opt("--fetch", spec)
    opt("--build-dir", plan.build_dir)
    opt("--stamp", plan.stamp)
    opt("--jobs", str(plan.jobs))
    opt("--ccache-dir", plan.ccache_dir)
    opt("--ccache-base", plan.ccache_base)
    if plan.nvcc:
        opt("--nvcc", plan.nvcc)
    if plan.cuda_toolkit:
        opt("--cuda-toolkit", plan.cuda_toolkit)
    for target in plan.targets:
        opt("--target", target)
    if plan.load_flags_file:
        opt("--load-flags-file", plan.load_flags_file)
        opt("--load-flags-new", load_flags_env(True))
        opt("--load-flags-old", load_flags_env(False))
    bits.append("--")
    bits.extend(QuoteString(arg) for arg in plan.cmake_args)
    return StringCommand(*bits)


def cuda_command(install: CudaInstall, script: str) -> StringCommand:
    """The rig-side toolkit installer's command line for this toolkit."""
    bits: list = [QuoteString(script)]
    for flag, value in (("--dir", install.toolkit_dir), ("--index", install.index),
                        ("--folder", install.wheels.folder),
                        ("--release", install.wheels.release), ("--stamp", install.stamp)):
        bits.extend([flag, QuoteString(value)])
    for wheel in install.wheels.wheels:
        bits.extend(["--wheel", QuoteString(wheel.project), QuoteString(wheel.file),
                     QuoteString(wheel.sha256)])
    return StringCommand(*bits)


@reads_ahead(lambda install, **_: [(CudaToolkitStamp, {"path": install.stamp_path})])
@operation()
def cuda_toolkit(install: CudaInstall, script: str):
    """
    Install a pinned CUDA toolkit from NVIDIA's wheels into its own folder.

    + install: the toolkit (``CudaInstall``: folder, wheels with their sha256, index)
    + script: path of the rig-side installer (``garage-cuda``)

    Runs only when the folder's stamp does not name this release and these wheels. The
    script downloads each wheel from the index, checks its sha256, unpacks and links the
    toolkit in a temporary folder, checks ``nvcc --version``, writes the stamp last and
    renames the folder into place.

    **Example:**

    .. code:: python

        engine.cuda_toolkit(name="Install CUDA 13.0", install=plan.cuda_install,
                            script="/opt/llm-garage/bin/garage-cuda")
    """
    if readahead.read(CudaToolkitStamp, path=install.stamp_path) == install.stamp:
        host.noop(f"CUDA {install.wheels.release} is already installed in {install.toolkit_dir}")
        return
    yield cuda_command(install, script)


def parse_stamp(lines: list[str]) -> dict[str, str]:
    """A stamp's `key=value` lines (the first line, what was built, is `built`)."""
    out = {"built": lines[0].strip()} if lines else {}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def hit_rate(hits: int, misses: int) -> str:
    total = hits + misses
    if not total:
        return "no compilations cached"
    return f"ccache hits {hits}/{total} ({100 * hits / total:.0f} %)"


def _announce(state, host, plan: BuildPlan) -> bool:
    logger.info(f"{host.print_prefix}Building {plan.describe()}; log: {plan.log_path}")
    return True


def _build(state, host, command: StringCommand) -> bool:
    """Run garage-build with its progress lines shown as they come."""
    status, _output = streamed(host, command)
    return bool(status)


def _report(state, host, plan: BuildPlan) -> bool:
    stamp_path = f"{plan.build_dir}/stamp"
    ok, output = host.run_shell_command(StringCommand("cat", QuoteString(stamp_path)))
    stamp = parse_stamp(output.stdout_lines) if ok else {}
    try:
        seconds = int(stamp["seconds"])
        rate = hit_rate(int(stamp["ccache_hits"]), int(stamp["ccache_misses"]))
    except (KeyError, ValueError):
        logger.info(f"{host.print_prefix}Built {plan.engine} in {plan.build_dir}")
        return True
    logger.info(f"{host.print_prefix}Built {plan.engine} {plan.commit[:12]} in "
                f"{seconds // 60} min {seconds % 60} s, {rate}")
    return True


@reads_ahead(lambda plan, **_: [(EngineBuilds, {"builds_dir": plan.builds_dir})])
@operation()
def build(plan: BuildPlan, script: str):
    """
    Build one engine commit with its flags into `<builds_dir>/<commit12>-<flagshash>`.

    + plan: the resolved build (``BuildPlan``)
    + script: path of the rig-side build script (``garage-build``)

    Runs only when that folder has no stamp saying this commit and these flags were built;
    the script fetches what is missing into the stable source folder, configures with
    ccache launchers, builds, checks ``llama-server --version`` reports the commit, and
    writes the stamp last. A failure shows the tail of the build log and its path. While it
    compiles, the script's progress lines are shown as they come (see ``garage-build``).

    **Example:**

    .. code:: python

        engine.build(name="Build llama", plan=plan, script="/opt/llm-garage/bin/garage-build")
    """
    builds = readahead.read(EngineBuilds, builds_dir=plan.builds_dir)
    have = builds["builds"].get(plan.key)
    if have and have["stamp"] == plan.stamp:
        host.noop(f"{plan.engine} {plan.commit[:12]} is already built in {plan.build_dir}")
        return
    yield FunctionCommand(_announce, (plan,), {})
    yield FunctionCommand(_build, (build_command(plan, script),), {})
    yield FunctionCommand(_report, (plan,), {})


@reads_ahead(lambda builds_dir, **_: [(EngineBuilds, {"builds_dir": builds_dir})])
@operation()
def switch(builds_dir: str, key: str):
    """
    Point `<builds_dir>/current` at a finished build, atomically (new link, then rename).

    + builds_dir: the engine's builds folder
    + key: the build folder's name, `<commit12>-<flagshash>`

    Refuses a folder without a stamp, so an unfinished build is never served.

    **Example:**

    .. code:: python

        engine.switch(builds_dir="/opt/llm-garage/builds/llama", key="0123456789ab-a1b2c3d4e5")
    """
    builds = readahead.read(EngineBuilds, builds_dir=builds_dir)
    if builds["current"] == key:
        host.noop(f"{builds_dir}/current is already {key}")
        return
    stamp = f"{builds_dir}/{key}/stamp"
    tmp = f"{builds_dir}/.current.tmp"
    yield StringCommand(
        "test", "-f", QuoteString(stamp), "||", "{", "echo",
        QuoteString(f"{builds_dir}/{key} has no stamp: not a finished build"), ">&2;",
        "exit", "1;", "};",
        "ln", "-sfn", QuoteString(key), QuoteString(tmp), "&&",
        "mv", "-fT", QuoteString(tmp), QuoteString(f"{builds_dir}/current"), "&&",
        "touch", "-c", QuoteString(stamp),
    )


def builds_to_prune(builds: dict, keep: int, wanted: str) -> list[str]:
    """Build folders to delete so that `keep` builds remain: the wanted and the current build
    always stay, then the most recently used (stamp mtime, touched on switch); unfinished
    builds other than the wanted one always go."""
    protected = {k for k in (wanted, builds.get("current")) if k}
    finished = sorted(
        (k for k, b in builds["builds"].items() if b["stamp"] and k not in protected),
        key=lambda k: (builds["builds"][k]["mtime"] or 0, k), reverse=True,
    )
    slots = max(0, keep - len(protected))
    unfinished = [k for k, b in builds["builds"].items() if not b["stamp"] and k not in protected]
    return sorted(finished[slots:] + unfinished)


@reads_ahead(lambda builds_dir, **_: [(EngineBuilds, {"builds_dir": builds_dir})])
@operation()
def prune(builds_dir: str, keep: int, wanted: str):
    """
    Delete old builds of an engine, keeping `keep` of them (never the current one).

    + builds_dir: the engine's builds folder
    + keep: how many builds stay on disk, the wanted one included
    + wanted: the build `current` should point at

    **Example:**

    .. code:: python

        engine.prune(builds_dir="/opt/llm-garage/builds/llama", keep=3, wanted=key)
    """
    builds = readahead.read(EngineBuilds, builds_dir=builds_dir)
    doomed = builds_to_prune(builds, keep, wanted)
    if not doomed:
        host.noop(f"{len(builds['builds'])} build(s) in {builds_dir}, keeping up to {keep}")
        return
    for key in doomed:
        yield StringCommand("rm", "-rf", QuoteString(f"{builds_dir}/{key}"))


@reads_ahead(lambda path, **_: [(PinRecords, {"path": path})])
@operation()
def record_pin(path: str, remote: str, tag: str, commit: str):
    """
    Record the commit a tag resolved to on this rig, so that a tag moved later is noticed.

    + path: the record file (one `<tag> <commit> <remote>` line per tag, tab-separated)
    + remote: the git remote the tag was read from
    + tag: the tag
    + commit: the commit it resolved to

    **Example:**

    .. code:: python

        engine.record_pin(path="/opt/llm-garage/state/engine-pins",
                          remote="https://github.com/ggml-org/llama.cpp.git",
                          tag="b8137", commit=sha)
    """
    recorded = readahead.read(PinRecords, path=path).get((remote, tag))
    if recorded == commit:
        host.noop(f"tag {tag} of {remote} is recorded as {commit[:12]}")
        return
    if recorded is not None:
        raise OperationError(f"tag {tag} of {remote} was recorded as {recorded}, not {commit}")
    yield StringCommand("printf", "'%s\\n'", QuoteString(pin_record_line(remote, tag, commit)),
                        ">>", QuoteString(path))
