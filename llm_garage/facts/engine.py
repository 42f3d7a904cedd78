"""Facts about engine builds: remote refs, recorded pins, the CUDA toolkit and the builds on
disk. What the engine plan derives from them is in llm_garage/plans/engines.py.

Every fact command exits 0 and reports failures in its output (a trailing `exit=N` line), so a
missing tool or an unreachable remote becomes a clear error of ours instead of a failed fact."""

from __future__ import annotations

import re
import shlex

from pyinfra.api import FactBase, QuoteString, StringCommand

from . import split_exit

SHA_RE = re.compile(r"[0-9a-f]{40}")
BUILD_KEY_RE = re.compile(r"[0-9a-f]{12}-[0-9a-f]{10}")

# --- git ls-remote ---------------------------------------------------------------------------

def parse_ls_remote(lines: list[str]) -> dict[str, str]:
    """`<sha>\\t<refname>` lines -> {refname: sha}; anything else is ignored."""
    refs = {}
    for line in lines:
        parts = line.strip().split("\t")
        if len(parts) == 2 and SHA_RE.fullmatch(parts[0]):
            refs[parts[1]] = parts[0]
    return refs


class GitRemoteRefs(FactBase):
    """The refs named `ref` on a git remote, as the rig sees them.

    Returns `{"refs": {refname: sha}, "error": None}`, with the peeled `refs/tags/<ref>^{}`
    entry for annotated tags, or `{"refs": {}, "error": "<git's message>"}` when the remote
    cannot be read (or does not answer within two minutes); `None` when git is not installed.
    """

    def requires_command(self, *args, **kwargs) -> str:
        return "git"

    def command(self, remote: str, ref: str):
        return StringCommand(
            "GIT_TERMINAL_PROMPT=0", "timeout", "120", "git", "ls-remote", QuoteString(remote),
            QuoteString(f"refs/tags/{ref}"), QuoteString(f"refs/tags/{ref}^{{}}"),
            QuoteString(f"refs/heads/{ref}"), "2>&1;", "echo", "exit=$?",
        )

    def process(self, output):
        lines, status = split_exit(output)
        if status:
            text = " ".join(line.strip() for line in lines if line.strip())
            if status == 124:
                text = (text + " " if text else "") + "(no answer within 120 s)"
            return {"refs": {}, "error": text or f"git ls-remote exited {status}"}
        return {"refs": parse_ls_remote(lines), "error": None}


# --- recorded pins ---------------------------------------------------------------------------

def parse_pin_records(lines: list[str]) -> dict[tuple[str, str], str]:
    """`<tag>\\t<sha>\\t<remote>` lines -> {(remote, tag): sha}; the first record of a tag wins."""
    out: dict[tuple[str, str], str] = {}
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 3 and SHA_RE.fullmatch(parts[1]):
            out.setdefault((parts[2], parts[0]), parts[1])
    return out


def pin_record_line(remote: str, tag: str, commit: str) -> str:
    return f"{tag}\t{commit}\t{remote}"


class PinRecords(FactBase):
    """Tags this rig has resolved before: {(remote, tag): commit}; empty when none."""

    default = dict

    def command(self, path: str):
        return StringCommand("!", "test", "-f", QuoteString(path), "||", "cat", QuoteString(path))

    def process(self, output):
        return parse_pin_records(output)


# --- CUDA toolkit ----------------------------------------------------------------------------

def parse_nvcc_version(lines: list[str]) -> tuple[int, int] | None:
    """`Cuda compilation tools, release 12.4, V12.4.131` -> (12, 4)."""
    for line in lines:
        m = re.search(r"release (\d+)\.(\d+)", line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def parse_nvcc_release(lines: list[str]) -> str | None:
    """`Cuda compilation tools, release 12.4, V12.4.131` -> "12.4.131": the full version, which
    changes with every toolkit update (the release alone does not)."""
    for line in lines:
        m = re.search(r"release \d+\.\d+, V(\d+\.\d+(?:\.\d+)*)", line)
        if m:
            return m.group(1)
    return None


def parse_gpu_arch_list(lines: list[str]) -> list[str]:
    """`nvcc --list-gpu-arch` lines (`compute_86`, `compute_120`, ...) -> ["86", "120", ...]."""
    return [m.group(1) for line in lines if (m := re.fullmatch(r"compute_(\d+)[af]?",
                                                                   line.strip()))]


def _toolkit_script(candidates: str) -> str:
    """CudaToolkit's command: the first executable nvcc of `candidates` (shell words)."""
    return (
        f'n=""; for c in {candidates}; do '
        'if [ -n "$c" ] && [ -x "$c" ]; then n=$c; break; fi; done; '
        '[ -n "$n" ] || exit 0; '
        # nvcc may be a wrapper script: its own dry run names the folder it lives in, as
        # CMake's FindCUDAToolkit reads it too.
        'here=$("$n" --dryrun -E -x cu /dev/null -o /dev/null 2>&1 | '
        "sed -n 's/^#\\$ _HERE_=//p' | head -n1); "
        'if [ -n "$here" ]; then root=$(dirname "$here"); '
        'else root=$(dirname "$(dirname "$(readlink -f "$n")")"); fi; '
        'echo "nvcc=$n"; echo "root=$root"; "$n" --version 2>&1; '
        'echo "--- list-gpu-arch"; "$n" --list-gpu-arch 2>&1; echo "exit=$?"; '
        'echo "--- cublas"; for d in "$root/lib64" "$root/lib" "$root"/targets/*/lib '
        '/usr/lib/*-linux-gnu; do for f in "$d"/libcublas.so "$d"/libcublas.so.*; do '
        '[ -e "$f" ] && echo "$f"; done; done; true'
    )


class CudaToolkit(FactBase):
    """The CUDA compiler and what it can do, for the first of `nvcc` in PATH and
    /usr/local/cuda/bin/nvcc; `None` when there is none. Otherwise:

    - `nvcc`: its path; `root`: the toolkit folder (the parent of the bin/ folder that
      `nvcc --dryrun` names, else of the resolved nvcc's);
    - `version`: (major, minor) | None and `release`: the full version ("13.0.88") | None,
      from `nvcc --version`;
    - `arches`: the architectures `nvcc --list-gpu-arch` lists (["75", "80", "86", ...]), or
      None when it cannot say (an nvcc older than 11.0, or one that fails);
    - `cublas`: the cuBLAS files found where toolkits keep their libraries: NVIDIA's packages
      (lib64, targets/<triple>/lib), the PyPI wheels (lib), Debian's nvidia-cuda-toolkit (the
      multiarch folder)."""

    command = _toolkit_script('"$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc')

    def process(self, output):
        lines = [line.rstrip("\n") for line in output]
        if not lines or not lines[0].startswith("nvcc="):
            return None
        head, arch, cublas = _sections(lines, ("--- list-gpu-arch", "--- cublas"))
        root = next((ln[len("root="):] for ln in head if ln.startswith("root=")), None)
        arch_lines, status = split_exit(arch)
        arches = parse_gpu_arch_list(arch_lines) if status == 0 else []
        return {"nvcc": lines[0][len("nvcc="):], "root": root,
                "version": parse_nvcc_version(head), "release": parse_nvcc_release(head),
                "arches": arches or None,
                "cublas": sorted({ln.strip() for ln in cublas if ln.strip()})}


def _sections(lines: list[str], markers: tuple[str, ...]) -> list[list[str]]:
    """Split `lines` at each marker line, in order: len(markers) + 1 lists."""
    out: list[list[str]] = [[]]
    pending = list(markers)
    for line in lines:
        if pending and line.strip() == pending[0]:
            pending.pop(0)
            out.append([])
        else:
            out[-1].append(line)
    return out + [[] for _ in pending]


class CudaToolkitAt(CudaToolkit):
    """CudaToolkit's answer for one nvcc (a toolkit llm-garage installed), None without it."""

    def command(self, nvcc: str):
        return _toolkit_script(shlex.quote(nvcc))


class CudaToolkitStamp(FactBase):
    """The first line of an installed toolkit's stamp (`<toolkit_dir>/stamp`, written last
    by garage-cuda), or None while it is not installed."""

    def command(self, path: str):
        return StringCommand("head", "-n1", QuoteString(path), "2>/dev/null", "||", "true")

    def process(self, output):
        line = output[0].strip() if output else ""
        return line or None


# --- builds on disk --------------------------------------------------------------------------

class EngineBuilds(FactBase):
    """The builds of one engine: `{"current": key | None, "builds": {key: {"stamp": first
    stamp line | None, "mtime": seconds | None}}}` for every `<commit12>-<flagshash>` folder.
    A build without a stamp never completed."""

    @staticmethod
    def default():
        return {"current": None, "builds": {}}

    def command(self, builds_dir: str):
        return StringCommand(
            "cd", QuoteString(builds_dir), "2>/dev/null", "||", "exit", "0;",
            "printf", "'current\\t%s\\n'", '"$(readlink current 2>/dev/null)";',
            "for", "d", "in", "*/;", "do", 'd="${d%/}";',
            '[ -d "$d" ] && [ ! -L "$d" ] || continue;',
            'if [ -f "$d/stamp" ]; then',
            "printf", "'build\\t%s\\t%s\\t%s\\n'", '"$d"', '"$(stat -c %Y "$d/stamp")"',
            '"$(head -n1 "$d/stamp")";',
            "else", "printf", "'build\\t%s\\t-\\t\\n'", '"$d";', "fi;", "done",
        )

    def process(self, output):
        result = self.default()
        for line in output:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == "current" and len(parts) == 2:
                target = parts[1].rstrip("/").rsplit("/", 1)[-1]
                result["current"] = target or None
            elif parts[0] == "build" and len(parts) == 4 and BUILD_KEY_RE.fullmatch(parts[1]):
                mtime = int(parts[2]) if parts[2].isdigit() else None
                stamp = (parts[3] or None) if mtime is not None else None
                result["builds"][parts[1]] = {"stamp": stamp, "mtime": mtime}
        return result
