"""Facts about model folders: each file's size and mtime, its stamp, a partial download, the
free disk space; and which folders under models_dir llm-garage created.

They read a few inodes and small stamp files, never the files' contents: the cost does not grow
with the size of the models. Hashing happens only in `garage-fetch`, when a file has no stamp
matching its size and mtime, or when a verification is asked for."""

from __future__ import annotations

import dataclasses
import shlex

from pyinfra.api import FactBase

STAMP_DIR = ".garage"
MANAGED_MARKER = f"{STAMP_DIR}/managed"  # in folders llm-garage created (prune only those)


def stamp_path(folder: str, name: str) -> str:
    return f"{folder}/{STAMP_DIR}/{name}.stamp"


def stamp_line(size: int, mtime: str, sha256: str) -> str:
    """The stamp `garage-fetch` writes after verifying a file: `size mtime sha256`, the mtime
    with nanoseconds as `stat -c %.9Y` prints it."""
    return f"{size} {mtime} {sha256}"


@dataclasses.dataclass(frozen=True)
class FileState:
    """One file of a model folder as the rig has it."""

    size: int | None = None  # the final file (None: absent)
    mtime: str | None = None  # seconds.nanoseconds
    stamp: str | None = None  # the stamp's line
    partial: int | None = None  # size of <file>.partial (None: absent)

    def trusted(self, size: int, sha256: str) -> bool:
        """In place and verified: the stamp matches its size, mtime and the wanted sha256."""
        return (self.size == size and self.mtime is not None
                and self.stamp == stamp_line(size, self.mtime, sha256))


@dataclasses.dataclass(frozen=True)
class FolderState:
    exists: bool = False
    managed: bool = False  # has the marker: llm-garage created it
    free: int | None = None  # bytes available on its filesystem (df's Available)
    files: dict[int, FileState] = dataclasses.field(default_factory=dict)

    def file(self, index: int) -> FileState:
        return self.files.get(index, FileState())


def _folder_script(folder: str, names: list[str]) -> str:
    d = shlex.quote(folder)
    lines = [
        f"d={d}",
        '[ -d "$d" ] && echo dir',
        f'[ -f "$d/{MANAGED_MARKER}" ] && echo managed',
        # free space of the filesystem the folder is (or will be) on
        'p="$d"; while [ ! -d "$p" ]; do p=$(dirname "$p"); done',
        'df -P -B1 "$p" 2>/dev/null | awk \'NR==2 {print "free", $4}\'',
    ]
    for i, name in enumerate(names):
        f = shlex.quote(name)
        lines += [
            f"f=\"$d\"/{f}; s=\"$d\"/{shlex.quote(STAMP_DIR)}/{shlex.quote(name + '.stamp')}",
            f'[ -f "$f" ] && echo "file {i} $(stat -c \'%s %.9Y\' "$f")"',
            f'[ -f "$s" ] && echo "stamp {i} $(head -c 300 "$s" | head -n 1)"',
            f'[ -f "$f.partial" ] && echo "partial {i} $(stat -c %s "$f.partial")"',
        ]
    lines.append("true")
    return "\n".join(lines)


class ModelFiles(FactBase):
    """State of a model folder and of the files `names` in it, as a `FolderState`: for each
    file (by its index in `names`) the final file's size and mtime, its stamp line, the size of
    a partial download; whether the folder exists, whether llm-garage created it (marker), and
    the free bytes of its filesystem."""

    def command(self, path: str, names: list[str]) -> str:
        return _folder_script(path, names)

    def process(self, output) -> FolderState:
        exists = managed = False
        free = None
        files: dict[int, dict] = {}
        for raw in output:
            parts = raw.strip().split(" ", 2)
            kind = parts[0]
            try:
                if kind == "dir":
                    exists = True
                elif kind == "managed":
                    managed = True
                elif kind == "free":
                    free = int(parts[1])
                elif kind == "file":
                    size, mtime = parts[2].split()
                    files.setdefault(int(parts[1]), {}).update(size=int(size), mtime=mtime)
                elif kind == "stamp":
                    stamp = parts[2].strip() if len(parts) > 2 else ""
                    files.setdefault(int(parts[1]), {})["stamp"] = stamp or None
                elif kind == "partial":
                    files.setdefault(int(parts[1]), {})["partial"] = int(parts[2])
            except (IndexError, ValueError):
                continue
        return FolderState(exists, managed, free,
                           {i: FileState(**state) for i, state in files.items()})

    def default(self) -> FolderState:
        return FolderState()


class ManagedModelFolders(FactBase):
    """Folders directly under `models_dir` that llm-garage created (they carry its marker)."""

    def command(self, models_dir: str) -> str:
        d = shlex.quote(models_dir.rstrip("/") or "/")
        return (f'[ -d {d} ] || exit 0; for m in {d}/*/{MANAGED_MARKER}; do '
                f'[ -f "$m" ] && echo "${{m%/{MANAGED_MARKER}}}"; done; true')

    def process(self, output) -> list[str]:
        return sorted(line.strip() for line in output if line.strip())

    def default(self) -> list[str]:
        return []
