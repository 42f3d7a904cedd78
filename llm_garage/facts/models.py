"""Facts about the model store: each blob's size and mtime, its stamp, a partial download, the
snapshot's links, files of the layout before snapshots, the free disk space; which folders
under models_dir llm-garage created; what a prune may delete and what units name.

They read a few inodes and small stamp files, never the files' contents: the cost does not grow
with the size of the models. Hashing happens only in `garage-fetch`, when a blob has no stamp
matching its size and mtime, or when a verification is asked for."""

from __future__ import annotations

import dataclasses
import shlex

from pyinfra.api import FactBase

from llm_garage.layout import blob_partial, blob_path, blob_stamp

STAMP_DIR = ".garage"  # in a model's folder: its fetch log, and stamps of the older layout
MANAGED_MARKER = f"{STAMP_DIR}/managed"  # in folders llm-garage created (prune only those)
VERIFIED = "verified"  # last word of a stamp whose bytes were hashed from disk


def stamp_path(folder: str, name: str) -> str:
    """The stamp of a file of the layout before snapshots (`<model dir>/<name>`)."""
    return f"{folder}/{STAMP_DIR}/{name}.stamp"


def stamp_line(size: int, mtime: str, sha256: str, verified: bool = False) -> str:
    """The stamp `garage-fetch` writes after hashing a blob: `size mtime sha256`, the mtime
    with nanoseconds as `stat -c %.9Y` prints it, then `verified` when the bytes were hashed
    from disk (or downloaded while a verification was asked for)."""
    return f"{size} {mtime} {sha256}" + (f" {VERIFIED}" if verified else "")


@dataclasses.dataclass(frozen=True)
class FileState:
    """One file of a model as the rig has it: its blob, the link in the snapshot, and the file
    of the layout before snapshots."""

    size: int | None = None  # the blob (None: absent)
    mtime: str | None = None  # seconds.nanoseconds
    stamp: str | None = None  # the blob's stamp line
    partial: int | None = None  # size of the blob's partial download (None: absent)
    link: str | None = None  # where <snapshot>/<name> points (None: no link)
    flat_size: int | None = None  # <model dir>/<name> of the older layout
    flat_mtime: str | None = None
    flat_stamp: str | None = None

    def trusted(self, size: int, sha256: str, verify: bool = False) -> bool:
        """In place and verified: the stamp matches the blob's size, mtime and the wanted
        sha256; with `verify`, it must also record a verification."""
        if self.size != size or self.mtime is None:
            return False
        good = {stamp_line(size, self.mtime, sha256, verified=True)}
        if not verify:
            good.add(stamp_line(size, self.mtime, sha256))
        return self.stamp in good

    def known_bad(self, sha256: str) -> bool:
        """The stamp matches the blob but records other bytes: hashed and found wrong."""
        words = (self.stamp or "").split()
        return (self.size is not None and len(words) >= 3
                and words[:2] == [str(self.size), self.mtime] and words[2] != sha256)

    def adoptable(self, size: int, sha256: str) -> bool:
        """The older layout's file is in place with its stamp: it becomes the blob, no
        download."""
        return (self.flat_size == size and self.flat_mtime is not None
                and self.flat_stamp == stamp_line(size, self.flat_mtime, sha256))


@dataclasses.dataclass(frozen=True)
class FolderState:
    exists: bool = False
    managed: bool = False  # has the marker: llm-garage created it
    free: int | None = None  # bytes available on the blob store's filesystem (df's Available)
    files: dict[int, FileState] = dataclasses.field(default_factory=dict)

    def file(self, index: int) -> FileState:
        return self.files.get(index, FileState())


def _folder_script(folder: str, snapshot: str, blobs: str,
                   files: list[tuple[str, str]]) -> str:
    q = shlex.quote
    lines = [
        f"d={q(folder)}",
        '[ -d "$d" ] && echo dir',
        f'[ -f "$d/{MANAGED_MARKER}" ] && echo managed',
        # free space of the filesystem the blobs are (or will be) on
        f"p={q(blobs)}",
        'while [ ! -d "$p" ]; do p=$(dirname "$p"); done',
        'df -P -B1 "$p" 2>/dev/null | awk \'NR==2 {print "free", $4}\'',
    ]
    for i, (name, sha256) in enumerate(files):
        lines += [
            f"b={q(blob_path(blobs, sha256))}; s={q(blob_stamp(blobs, sha256))}; "
            f"t={q(blob_partial(blobs, sha256))}; l={q(f'{snapshot}/{name}')}; "
            f"f=\"$d\"/{q(name)}; g={q(stamp_path(folder, name))}",
            f'[ -f "$b" ] && echo "file {i} $(stat -c \'%s %.9Y\' "$b")"',
            f'[ -f "$s" ] && echo "stamp {i} $(head -c 300 "$s" | head -n 1)"',
            f'[ -f "$t" ] && echo "partial {i} $(stat -c %s "$t")"',
            f'[ -L "$l" ] && echo "link {i} $(readlink "$l")"',
            f'[ -f "$f" ] && [ ! -L "$f" ] && echo "flat {i} $(stat -c \'%s %.9Y\' "$f")"',
            f'[ -f "$g" ] && echo "flatstamp {i} $(head -c 300 "$g" | head -n 1)"',
        ]
    lines.append("true")
    return "\n".join(lines)


class ModelFiles(FactBase):
    """State of one model revision, as a `FolderState`: for each file (by its index in
    `files`, `(name, sha256)` pairs) its blob's size and mtime, the blob's stamp line, the size
    of a partial download, where the snapshot's link points, and the file of the older layout
    (`<path>/<name>`, its size, mtime and stamp); whether the model folder exists, whether
    llm-garage created it (marker), and the free bytes of the blob store's filesystem."""

    def command(self, path: str, snapshot: str, blobs: str, files: list) -> str:
        return _folder_script(path, snapshot, blobs, [tuple(f) for f in files])

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
                elif kind in ("file", "flat"):
                    size, mtime = parts[2].split()
                    prefix = "" if kind == "file" else "flat_"
                    files.setdefault(int(parts[1]), {}).update(
                        {f"{prefix}size": int(size), f"{prefix}mtime": mtime})
                elif kind in ("stamp", "flatstamp", "link"):
                    value = parts[2].strip() if len(parts) > 2 else ""
                    key = {"stamp": "stamp", "flatstamp": "flat_stamp", "link": "link"}[kind]
                    files.setdefault(int(parts[1]), {})[key] = value or None
                elif kind == "partial":
                    files.setdefault(int(parts[1]), {})["partial"] = int(parts[2])
            except (IndexError, ValueError):
                continue
        return FolderState(exists, managed, free,
                           {i: FileState(**state) for i, state in files.items()})

    def default(self) -> FolderState:
        return FolderState()


@dataclasses.dataclass(frozen=True)
class StoreState:
    """What a prune looks at: every blob and partial download, the snapshot folders and the
    older layout's files of the given model folders, and every link to a blob."""

    blobs: dict[str, int] = dataclasses.field(default_factory=dict)  # sha256 -> size
    partials: dict[str, int] = dataclasses.field(default_factory=dict)
    # model folder -> [(snapshot folder, mtime)]
    snapshots: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    flat: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # folder -> files
    links: dict[str, str] = dataclasses.field(default_factory=dict)  # link -> target


_HEX64 = "[0-9a-f]" * 64
_HEX12 = "[0-9a-f]" * 12


class ModelStore(FactBase):
    """The blob store `blobs` and the model folders `folders` under `models_dir`, as a
    `StoreState` (names, sizes and times only: nothing is read or hashed)."""

    def command(self, models_dir: str, blobs: str, folders: list[str]) -> str:
        q = shlex.quote
        lines = [
            f"b={q(blobs)}",
            f'for f in "$b"/{_HEX64} "$b"/{_HEX64}.partial; do [ -f "$f" ] && '
            'echo "blob $(stat -c %s "$f") ${f##*/}"; done',
        ]
        for folder in folders:
            lines += [
                f"d={q(folder)}",
                f'for s in "$d"/{_HEX12}; do [ -d "$s" ] && [ ! -L "$s" ] && '
                'echo "snap $(stat -c %.9Y "$s") $s"; done',
                'for f in "$d"/*.gguf; do [ -f "$f" ] && [ ! -L "$f" ] && echo "flat $f"; done',
            ]
        lines += [
            f"[ -d {q(models_dir)} ] && find -P {q(models_dir)} -path \"$b\" -prune -o -type l "
            "-printf 'link %p\\t%l\\n' 2>/dev/null",
            "true",
        ]
        return "\n".join(lines)

    def process(self, output) -> StoreState:
        state = StoreState()
        for raw in output:
            kind, _, rest = raw.rstrip("\n").partition(" ")
            try:
                if kind == "blob":
                    size, name = rest.split(" ", 1)
                    if name.endswith(".partial"):
                        state.partials[name.removesuffix(".partial")] = int(size)
                    else:
                        state.blobs[name] = int(size)
                elif kind == "snap":
                    mtime, path = rest.split(" ", 1)
                    folder = path.rsplit("/", 1)[0]
                    state.snapshots.setdefault(folder, []).append((path, mtime))
                elif kind == "flat":
                    state.flat.setdefault(rest.rsplit("/", 1)[0], []).append(rest)
                elif kind == "link":
                    path, target = rest.split("\t", 1)
                    state.links[path] = target
            except ValueError:
                continue
        return state

    def default(self) -> StoreState:
        return StoreState()


class NamedByUnits(FactBase):
    """Which of `needles` (paths, or folders ending in /) a llama-server unit on the rig
    names: the files matching the globs `unit_files` (installed, wanted and proven units)."""

    def command(self, needles: list[str], unit_files: list[str]) -> str:
        q = shlex.quote
        units = " ".join(unit_files)  # globs, expanded by the shell
        lines = [f"set -- {units}"]
        for needle in needles:
            # as written, and as systemd's Exec lines spell % and $
            spelled = needle.replace("%", "%%").replace("$", "$$")
            lines.append(f'grep -qsF -e {q(needle)} -e {q(spelled)} -- "$@" && '
                         f"printf '%s\\n' {q(needle)}")
        lines.append("true")
        return "\n".join(lines)

    def process(self, output) -> set[str]:
        return {line.rstrip("\n") for line in output if line.strip()}

    def default(self) -> set[str]:
        return set()


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
