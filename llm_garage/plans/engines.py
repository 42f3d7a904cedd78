"""The engine plan: per engine, the commit its pin resolves to on the rig, the architectures
to build for and the exact cmake flags, checked against the rig's CUDA toolkit and GPUs.

A tag that does not exist or moved, a branch given as a pin, a missing CUDA toolkit, one
that cannot compile an architecture (its own `nvcc --list-gpu-arch`), a driver older than the
toolkit needs, a toolkit without cuBLAS: each is a problem naming the host, the engine and the
fix, raised before any operation runs."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
from collections.abc import Callable
from typing import Any

from pyinfra import logger
from pyinfra.facts.hardware import Cpus
from pyinfra.facts.server import Arch

from llm_garage.facts.engine import (
    CudaToolkit,
    CudaToolkitAt,
    CudaToolkitStamp,
    GitRemoteRefs,
    PinRecords,
    parse_ls_remote,
)
from llm_garage.facts.gpu import GpuComputeCaps, NvidiaDriver
from llm_garage.refusal import Refusal
from llm_garage.settings import Engine, Rig, flags_hash

# Oldest CUDA toolkit that compiles for an architecture (its number without a/f/-real suffix).
# Only a fallback: the toolkit's own `nvcc --list-gpu-arch` decides when it can be read (CUDA
# 11.0 and newer); this table is used, and the run says so, for a compiler that cannot list.
MIN_CUDA = {
    "87": (11, 4), "89": (11, 8), "90": (12, 0),
    "100": (12, 8), "101": (12, 8), "120": (12, 8),
    "103": (12, 9), "121": (12, 9),
}
# Oldest Linux x86_64 driver each CUDA release needs: the "Toolkit Driver Version" of the
# release's GA, from NVIDIA's CUDA Toolkit Release Notes, Table 3 "CUDA Toolkit and
# Corresponding Driver Versions" (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/,
# read in the CUDA 13.2 Update 2 notes; each release's own notes are archived under
# https://docs.nvidia.com/cuda/archive/). An update release may list a newer driver (13.0
# Update 1: 580.82.07); the GA's is the floor a release's minor-version compatibility keeps.
# A release newer than the table is held to the newest entry of its major (a floor, not a
# guess above it); releases older than the table are not checked.
MIN_DRIVER = {
    (11, 0): "450.51.05", (11, 1): "455.23", (11, 2): "460.27.03", (11, 3): "465.19.01",
    (11, 4): "470.42.01", (11, 5): "495.29.05", (11, 6): "510.39.01", (11, 7): "515.43.04",
    (11, 8): "520.61.05",
    (12, 0): "525.60.13", (12, 1): "530.30.02", (12, 2): "535.54.03", (12, 3): "545.23.06",
    (12, 4): "550.54.14", (12, 5): "555.42.02", (12, 6): "560.28.03", (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06", (13, 1): "590.44.01", (13, 2): "595.45.04",
}


@dataclasses.dataclass(frozen=True)
class Wheel:
    """One of NVIDIA's PyPI wheels, pinned by file name and sha256 (Linux x86_64)."""

    project: str  # the index's project name, e.g. nvidia-cuda-nvcc
    file: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class CudaWheels:
    """A CUDA release as NVIDIA's PyPI wheels make it: what its nvcc reports and lists, and
    the folder the wheels unpack into (bin/, include/, lib/, nvvm/)."""

    release: str  # the full version `nvcc --version` reports
    folder: str  # inside the unpacked wheels
    wheels: tuple[Wheel, ...]
    arches: tuple[str, ...]  # what its `nvcc --list-gpu-arch` lists

    @property
    def digest(self) -> str:
        """Names the exact set of wheels: the stamp's first line carries it."""
        text = "\n".join(f"{w.file} {w.sha256}" for w in self.wheels)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def version(self) -> tuple[int, int]:
        major, minor = self.release.split(".")[:2]
        return int(major), int(minor)


def _wheel(project: str, version: str, platform: str, sha256: str) -> Wheel:
    return Wheel(project, f"{project.replace('-', '_')}-{version}-py3-none-{platform}.whl",
                 sha256)


# `cuda_toolkit: "13.0"` installs this set: CUDA 13.0 Update 1 (nvcc 13.0.88) with cuBLAS
# 13.0 Update 2, the compiler, its headers and runtime (the wheels PyPI serves for them).
CUDA_WHEELS = {
    "13.0": CudaWheels(
        release="13.0.88", folder="nvidia/cu13",
        arches=("75", "80", "86", "87", "88", "89", "90", "100", "110", "103", "120", "121"),
        wheels=(
            _wheel("nvidia-cuda-nvcc", "13.0.88", "manylinux2014_x86_64.manylinux_2_17_x86_64",
                   "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"),
            _wheel("nvidia-cuda-crt", "13.0.88", "manylinux2014_x86_64.manylinux_2_17_x86_64",
                   "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"),
            _wheel("nvidia-nvvm", "13.0.88", "manylinux2010_x86_64.manylinux_2_12_x86_64",
                   "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"),
            _wheel("nvidia-cuda-runtime", "13.0.96",
                   "manylinux2014_x86_64.manylinux_2_17_x86_64",
                   "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"),
            _wheel("nvidia-cublas", "13.0.2.14", "manylinux_2_27_x86_64",
                   "0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c"),
            _wheel("nvidia-cuda-cccl", "13.0.85", "manylinux2014_x86_64.manylinux_2_17_x86_64",
                   "e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"),
        )),
}


@dataclasses.dataclass(frozen=True)
class CudaInstall:
    """A pinned toolkit to install on the rig before its builds (garage-cuda)."""

    pin: str  # the setting: "13.0"
    toolkit_dir: str
    index: str  # the cuda_wheel_index setting
    wheels: CudaWheels

    @property
    def nvcc(self) -> str:
        return f"{self.toolkit_dir}/bin/nvcc"

    @property
    def stamp_path(self) -> str:
        return f"{self.toolkit_dir}/stamp"

    @property
    def stamp(self) -> str:
        """First line of the stamp: the full version and the exact wheels."""
        return f"cuda {self.wheels.release} {self.wheels.digest}"

    def expected_toolkit(self) -> dict:
        """What CudaToolkitAt will answer once installed, for planning before the install."""
        root = self.toolkit_dir  # nvcc's dry run names the bin/ link it was called through
        return {"nvcc": self.nvcc, "root": root, "version": self.wheels.version,
                "release": self.wheels.release, "arches": list(self.wheels.arches),
                "cublas": [f"{root}/lib64/libcublas.so"]}


CUDA_INSTALL_HINT = (
    "install the CUDA toolkit (NVIDIA's cuda-toolkit-12-8 or newer package, which puts nvcc in "
    "/usr/local/cuda/bin; or Debian's nvidia-cuda-toolkit)"
)

GetFact = Callable[..., Any]


class EngineError(Refusal):
    """An engine pin or toolchain problem found before any operation runs."""


def resolve_ref(refs: dict[str, str], ref: str) -> tuple[str, str | None]:
    """("tag" | "branch" | "missing", commit) for `ref` in ls-remote output; tags win."""
    peeled = refs.get(f"refs/tags/{ref}^{{}}")
    tag = peeled or refs.get(f"refs/tags/{ref}")
    if tag:
        return "tag", tag
    if f"refs/heads/{ref}" in refs:
        return "branch", refs[f"refs/heads/{ref}"]
    return "missing", None


def cuda_too_old(architectures: list[str], version: tuple[int, int]) -> list[tuple[str, str]]:
    """(architecture, minimum CUDA) for every architecture this toolkit cannot compile."""
    out = []
    for arch in architectures:
        base = re.match(r"\d+", arch)
        need = MIN_CUDA.get(base.group(0)) if base else None
        if need and version < need:
            out.append((arch, f"{need[0]}.{need[1]}"))
    return out


def arch_number(arch: str) -> str:
    """"120a-real" -> "120": the architecture as `nvcc --list-gpu-arch` names it."""
    m = re.match(r"\d+", arch)
    return m.group(0) if m else arch


def not_in_arch_list(architectures: list[str], listed: list[str]) -> list[str]:
    """The architectures this compiler's `--list-gpu-arch` does not name."""
    return [a for a in architectures if arch_number(a) not in listed]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def min_driver(version: tuple[int, int]) -> str | None:
    """Oldest driver for this CUDA release (MIN_DRIVER), or None when the table cannot say."""
    if version in MIN_DRIVER:
        return MIN_DRIVER[version]
    same_major = [v for v in MIN_DRIVER if v[0] == version[0] and v < version]
    return MIN_DRIVER[max(same_major)] if same_major else None


def driver_too_old(driver: str, version: tuple[int, int]) -> str | None:
    """The driver this CUDA release needs when `driver` is older, else None."""
    need = min_driver(version)
    if need and _version_tuple(driver) < _version_tuple(need):
        return need
    return None


def architectures_from_caps(caps: list[str]) -> list[str]:
    """["8.6", "8.6", "12.0"] -> ["86", "120"]: unique, in numeric order.

    Raises ValueError naming the first cell that is not a compute capability."""
    found = set()
    for cap in caps:
        m = re.fullmatch(r"(\d+)\.(\d+)", cap.strip())
        if not m:
            raise ValueError(f"nvidia-smi reported compute capability {cap.strip()!r}")
        found.add(int(m.group(1)) * 10 + int(m.group(2)))
    return [str(a) for a in sorted(found)]


def build_key(commit: str, flags_hash: str) -> str:
    """Folder name of one build: `<commit12>-<flagshash>`."""
    return f"{commit[:12]}-{flags_hash}"


def stamp_line(commit: str, flags_hash: str) -> str:
    """First line of a build's stamp: what was built. Written last, after the build verified."""
    return f"{commit} {flags_hash}"


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything one engine build needs, resolved before any operation runs."""

    engine: str  # the engine's name in the settings
    kind: str  # llama.cpp | ik_llama.cpp
    ref: str  # the pin as written: tag, commit or branch
    commit: str  # what the pin resolved to
    remote: str
    fetch: tuple[str, ...]  # refspecs that bring `commit`, tried in order (then the SHA)
    source_dir: str
    builds_dir: str
    flags: tuple[tuple[str, str], ...]  # the effective -D flags, in order
    flags_hash: str
    architectures: tuple[str, ...]  # empty for a CPU-only build
    jobs: int
    ccache_dir: str
    ccache_base: str  # ccache base_dir: absolute paths under it are hashed relative
    nvcc: str | None = None
    cuda_toolkit: str | None = None  # the full version nvcc reports, part of flags_hash
    cuda_install: CudaInstall | None = None  # a pinned toolkit, installed before the build
    targets: tuple[str, ...] = ("llama-server",)
    keep_builds: int = 3  # builds kept on disk for rollback, this one included
    records_tag: bool = False  # a tag pin: record its commit so a moved tag is noticed
    load_flags_file: str | None = None  # the build's load-flags.env (settings.LOAD_FLAGS)

    @property
    def key(self) -> str:
        return build_key(self.commit, self.flags_hash)

    @property
    def build_dir(self) -> str:
        return f"{self.builds_dir}/{self.key}"

    @property
    def log_path(self) -> str:
        return f"{self.build_dir}/build.log"

    @property
    def stamp(self) -> str:
        return stamp_line(self.commit, self.flags_hash)

    @property
    def cmake_args(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in self.flags]

    def describe(self) -> str:
        pin = self.ref if self.ref == self.commit else f"{self.ref} = {self.commit[:12]}"
        arches = ("CUDA architectures " + ";".join(self.architectures)
                  if self.architectures else "CPU only")
        if self.cuda_toolkit:
            arches += f" with CUDA {self.cuda_toolkit}"
        return f"{self.engine} ({self.kind} {pin}), {arches}, -j {self.jobs}"


def controller_refs(remote: str, ref: str) -> dict | None:
    """GitRemoteRefs' answer, asked from the controller: for a rig without git yet. None when
    the remote is not a URL (a path names a folder on the rig) or git is missing here too."""
    if not re.match(r"(https?|git|ssh)://|[^/\s]+@[^/\s]+:", remote):
        return None
    command = ["git", "ls-remote", remote, f"refs/tags/{ref}", f"refs/tags/{ref}^{{}}",
               f"refs/heads/{ref}"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return {"refs": {}, "error": "(no answer within 120 s, asked from the controller)"}
    if out.returncode:
        text = " ".join(out.stderr.split()) or f"git ls-remote exited {out.returncode}"
        return {"refs": {}, "error": text + " (asked from the controller)"}
    logger.info(f"--> {remote} {ref}: resolved from the controller (no git on the rig yet)")
    return {"refs": parse_ls_remote(out.stdout.splitlines()), "error": None}


def fetch_specs(engine: Engine, commit: str) -> tuple[str, ...]:
    """What to fetch, in order, to bring `commit` into the source folder."""
    if engine.pinned_commit:
        return (commit, "+refs/heads/*:refs/remotes/origin/*")
    if engine.follow:
        return (f"+refs/heads/{engine.ref}:refs/remotes/origin/{engine.ref}", commit)
    return (f"+refs/tags/{engine.ref}:refs/tags/{engine.ref}", commit)


def _resolve_commit(rig: Rig, engine: Engine, get_fact: GetFact, problem) -> str | None:
    if engine.pinned_commit:
        return engine.pinned_commit
    remote = engine.git_remote
    info = get_fact(GitRemoteRefs, remote=remote, ref=engine.ref)
    if info is None:
        # A fresh rig gets git from this run's base packages, after planning: ask from here.
        info = controller_refs(remote, engine.ref)
    if info is None:
        problem(f"git is not installed on the rig, and {remote} cannot be read from where "
                "pyinfra runs either", "install git on the rig (apt-get install git) and run "
                "again")
        return None
    if info["error"]:
        problem(f"cannot read {remote}: {info['error']}",
                "check the remote setting and that the rig reaches it")
        return None
    kind, commit = resolve_ref(info["refs"], engine.ref)
    if engine.follow:
        if kind != "branch":
            what = "a tag" if kind == "tag" else "not a branch"
            problem(f"follow: true but {engine.ref!r} is {what} on {remote}",
                    "a branch name with follow: true, or a tag / commit SHA with follow: false")
            return None
        return commit
    if kind == "missing":
        problem(f"no tag {engine.ref!r} on {remote}",
                f"pin an existing tag (git ls-remote --tags {remote}) or a full commit SHA")
        return None
    if kind == "branch":
        problem(f"{engine.ref!r} is a branch on {remote}, not a pin",
                "pin a tag or a full commit SHA, or set follow: true to track the branch")
        return None
    recorded = get_fact(PinRecords, path=rig.layout.engine_pins).get((remote, engine.ref))
    if recorded and recorded != commit:
        problem(f"tag {engine.ref!r} on {remote} now points at {commit}, but this rig recorded "
                f"{recorded} for it: the tag moved",
                f"pin the commit you want by its SHA; to accept the moved tag, delete its line "
                f"from {rig.layout.engine_pins} on the rig")
        return None
    return commit


def _architectures(engine: Engine, get_fact: GetFact, problem) -> list[str] | None:
    if engine.cuda_architectures != "auto":
        return list(engine.cuda_architectures)
    gpus = get_fact(GpuComputeCaps)
    if gpus is None:
        problem("cuda_architectures 'auto' needs nvidia-smi, which is not installed",
                "install the NVIDIA driver, or list the architectures (e.g. [86])")
        return None
    if gpus["error"]:
        problem(f"nvidia-smi failed: {gpus['error']}",
                "fix the NVIDIA driver, or list the architectures (e.g. [86])")
        return None
    if not gpus["caps"]:
        problem("nvidia-smi lists no GPUs for cuda_architectures 'auto'",
                "list the architectures (e.g. [86]), or cuda: false")
        return None
    try:
        return architectures_from_caps(gpus["caps"])
    except ValueError as e:
        problem(f"{e}, so 'auto' cannot derive the architectures",
                "list the architectures (e.g. [86])")
        return None


def _release(toolkit: dict) -> str:
    """The toolkit's full version ("13.0.88"), else its release ("13.0")."""
    return toolkit.get("release") or ".".join(str(v) for v in toolkit["version"])


def _check_toolkit(where: str, engine: Engine, toolkit: dict, arches: list[str], driver: dict,
                   problem) -> None:
    """The toolkit's own answers against what this engine builds: the pinned release, every
    architecture, the driver it needs, cuBLAS."""
    nvcc, version = toolkit["nvcc"], toolkit["version"]
    if version is None:
        problem(f"cannot read the CUDA version from {nvcc} --version", CUDA_INSTALL_HINT)
        return
    release = ".".join(str(v) for v in version)
    if engine.cuda_toolkit != "system" and engine.cuda_toolkit != release:
        problem(f"cuda_toolkit is {engine.cuda_toolkit} but {nvcc} is CUDA "
                f"{_release(toolkit)}", f"delete {os.path.dirname(os.path.dirname(nvcc))} on "
                "the rig so that the next run installs it again")
    listed = toolkit.get("arches")
    if listed:
        for arch in not_in_arch_list(arches, listed):
            older = int(arch_number(arch)) < min(int(a) for a in listed)
            need = MIN_CUDA.get(arch_number(arch))
            fix = (f"build with an older CUDA toolkit (CUDA {version[0]} starts at "
                   f"compute_{min(listed, key=int)}), or drop {arch}" if older else
                   f"install CUDA {need[0]}.{need[1]} or newer, or drop {arch}" if need else
                   f"install a CUDA toolkit whose nvcc --list-gpu-arch lists compute_"
                   f"{arch_number(arch)}, or drop {arch}")
            problem(f"architecture {arch} is not in `{nvcc} --list-gpu-arch` (CUDA {release}: "
                    f"{', '.join(listed)})", fix)
    else:
        logger.warning(f"--> {where}: {nvcc} "
                       "--list-gpu-arch gave no list; architectures checked against "
                       "llm-garage's table of the oldest CUDA per architecture instead")
        for arch, need in cuda_too_old(arches, version):
            problem(f"architecture {arch} needs CUDA >= {need}, but {nvcc} is CUDA "
                    f"{version[0]}.{version[1]}", f"install CUDA {need} or newer, or drop {arch}")
    if driver["version"]:
        need = driver_too_old(driver["version"], version)
        if need:
            problem(f"CUDA {release} needs NVIDIA driver >= {need}, but the rig's driver is "
                    f"{driver['version']}", f"upgrade the NVIDIA driver to {need} or newer, or "
                    "build with an older CUDA toolkit")
    else:
        logger.warning(f"--> {where}: NVIDIA driver not checked against CUDA {release}: "
                       f"{driver['error']}")
    cublas = toolkit.get("cublas") or []
    names = {c.rsplit("/", 1)[-1] for c in cublas}
    if "libcublas.so" not in names and "CUDA_cublas_LIBRARY" not in engine.cmake_extra:
        root = toolkit.get("root") or "the toolkit"
        if cublas:
            problem(f"cuBLAS has no unversioned libcublas.so link, which CMake looks for "
                    f"(found {', '.join(cublas)})",
                    f"link libcublas.so and libcublasLt.so to their .so.{version[0]} files, or "
                    "name them in cmake_extra (CUDA_cublas_LIBRARY, CUDA_cublasLt_LIBRARY)")
        else:
            problem(f"no cuBLAS (libcublas.so) in {root}'s lib64, lib or targets/*/lib, which "
                    "GGML_CUDA needs", f"install cuBLAS for CUDA {version[0]} (NVIDIA's "
                    f"libcublas-dev-{version[0]}-{version[1]} package, or the nvidia-cublas "
                    "wheel), or name it in cmake_extra (CUDA_cublas_LIBRARY, "
                    "CUDA_cublasLt_LIBRARY)")


def _cuda_install(rig: Rig, engine: Engine, get_fact: GetFact, problem) -> CudaInstall | None:
    """The toolkit a pinned `cuda_toolkit` installs, or None (a problem) when llm-garage has
    no wheel set for it or the rig is not x86_64."""
    wheels = CUDA_WHEELS.get(engine.cuda_toolkit)
    if wheels is None:
        problem(f"cuda_toolkit {engine.cuda_toolkit!r}: llm-garage installs only "
                f"{', '.join(sorted(CUDA_WHEELS))} from NVIDIA's wheels",
                f"pin one of {', '.join(sorted(CUDA_WHEELS))}, or install the toolkit yourself "
                "and set cuda_toolkit: system")
        return None
    machine = get_fact(Arch)
    if machine and machine != "x86_64":
        problem(f"cuda_toolkit {engine.cuda_toolkit!r} installs Linux x86_64 wheels, but the rig "
                f"is {machine}", "install the toolkit yourself and set cuda_toolkit: system")
        return None
    return CudaInstall(pin=engine.cuda_toolkit,
                       toolkit_dir=rig.layout.cuda_toolkit_dir(engine.cuda_toolkit),
                       index=rig.data.cuda_wheel_index, wheels=wheels)


def _pinned_toolkit(install: CudaInstall, get_fact: GetFact) -> dict | None:
    """The installed toolkit's own answers once its stamp says it is complete; before that
    (this run installs it), what the wheel set is known to answer."""
    if get_fact(CudaToolkitStamp, path=install.stamp_path) == install.stamp:
        return get_fact(CudaToolkitAt, nvcc=install.nvcc)  # None: stamped, yet no nvcc
    return install.expected_toolkit()


def reads(rig: Rig) -> list[tuple[type, dict]]:
    """The facts `plan` reads on the rig in the common case (a pinned CUDA toolkit's are
    read when needed), for llm_garage.readahead."""
    out: list[tuple[type, dict]] = []
    for engine in rig.engines.values():
        if not engine.pinned_commit:
            out += [(GitRemoteRefs, {"remote": engine.git_remote, "ref": engine.ref}),
                    (PinRecords, {"path": rig.layout.engine_pins})]
        if not isinstance(engine.build_jobs, int):
            out.append((Cpus, {}))
        if engine.cuda:
            out.append((NvidiaDriver, {}))
            if engine.cuda_architectures == "auto":
                out.append((GpuComputeCaps, {}))
            if engine.cuda_toolkit == "system":
                out.append((CudaToolkit, {}))
    return out


def plan(rig: Rig, get_fact: GetFact) -> list[BuildPlan]:
    """One BuildPlan per engine, from facts read on the rig; raises EngineError listing every
    problem of this rig (nothing has run yet when it does)."""
    problems: list[str] = []
    plans = []
    toolkits: dict[str, dict | None] = {}
    driver: dict | None = None
    for name, engine in sorted(rig.engines.items()):
        found = len(problems)

        def problem(what, fix, name=name, engine=engine):
            problems.append(f"engines.{name} (ref {engine.ref!r}): {what}. Fix: {fix}.")

        commit = _resolve_commit(rig, engine, get_fact, problem)
        arches: list[str] | None = None
        toolkit: dict | None = None
        install: CudaInstall | None = None
        if engine.cuda:
            if engine.cuda_toolkit == "system":
                if "system" not in toolkits:
                    toolkits["system"] = get_fact(CudaToolkit)
                toolkit = toolkits["system"]
                if toolkit is None:
                    newest = max(CUDA_WHEELS, key=_version_tuple)
                    problem("GGML_CUDA=ON needs nvcc, found neither in PATH nor in "
                            "/usr/local/cuda/bin", f"{CUDA_INSTALL_HINT}, or pin cuda_toolkit: "
                            f"'{newest}' to have llm-garage install it, or set cuda: false")
            else:
                install = _cuda_install(rig, engine, get_fact, problem)
                if install and install.pin not in toolkits:
                    toolkits[install.pin] = _pinned_toolkit(install, get_fact)
                toolkit = toolkits.get(install.pin) if install else None
                if install and toolkit is None:
                    problem(f"{install.toolkit_dir} is stamped as installed, but has no "
                            f"working {install.nvcc}", f"delete {install.toolkit_dir} on the "
                            "rig so that the next run installs it again")
            arches = _architectures(engine, get_fact, problem)
            if toolkit:
                if driver is None:
                    driver = get_fact(NvidiaDriver) or {"version": None,
                                                        "error": "nvidia-smi is not installed"}
                _check_toolkit(f"{rig.name}: engines.{name}", engine, toolkit, arches or [],
                               driver, problem)
        if len(problems) > found or commit is None:
            continue
        jobs = engine.build_jobs if isinstance(engine.build_jobs, int) else get_fact(Cpus) or 1
        flags = engine.cmake_flags(arches)
        release = _release(toolkit) if engine.cuda and toolkit else None
        targets = ("llama-server", "rpc-server") if engine.rpc else ("llama-server",)
        plans.append(BuildPlan(
            engine=name, kind=engine.kind, ref=engine.ref, commit=commit,
            remote=engine.git_remote, fetch=fetch_specs(engine, commit),
            source_dir=rig.layout.engine_source_dir(name),
            builds_dir=rig.layout.engine_builds_dir(name),
            flags=tuple(flags.items()), flags_hash=flags_hash(flags, release),
            architectures=tuple(arches or ()), jobs=int(jobs), ccache_dir=rig.layout.ccache_dir,
            ccache_base=rig.data.garage_root,
            nvcc=toolkit["nvcc"] if engine.cuda and toolkit else None, cuda_toolkit=release,
            cuda_install=install,
            targets=targets, keep_builds=engine.keep_builds,
            records_tag=engine.ref != commit and not engine.follow,
            load_flags_file=rig.layout.load_flags_file(
                name, build_key(commit, flags_hash(flags, release))),
        ))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EngineError(f"host {rig.name}: {len(problems)} engine problem(s); nothing was "
                          f"changed on any host:\n{lines}")
    return plans
