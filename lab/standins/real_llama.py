"""Real llama.cpp, offline: upstream's source tree as a git repository with a good and a bad tag,
and a tiny model with Qwen3.5's real chat template.

The tree comes from the llama-cpp-python source distribution on PyPI, which ships upstream's
whole tree under ``vendor/llama.cpp`` (without git history). ``ensure_sdist`` downloads it
once into ``$GARAGE_SDIST_CACHE`` (default /var/cache/llm-garage/sdist) with pip.

``ensure_real_llama`` commits that tree into a bare repository, cached under
``$GARAGE_REAL_LLAMA_CACHE`` (default /var/cache/llm-garage/real-llama) by the sdist's sha256
and the patch below, so later runs reuse it. llama.cpp's build number is the commit count, so
the tree's commit comes after ``GOOD_BUILD - 1`` empty commits and is tagged like an upstream
release:

- ``GOOD_TAG`` (b7001): the tree as shipped;
- ``BAD_TAG`` (b7002): one more commit that still builds, but hands tool call arguments to the
  chat template as the JSON string they arrive as. Qwen3.5's template iterates them with
  ``|items``, so any request whose history holds an assistant message with ``tool_calls``
  fails with HTTP 500, ``Unknown (built-in) filter 'items' for type String``, as llama.cpp
  b7991 did. Only ``common/chat.cpp`` changes: with a warm ccache a switch recompiles one
  file and links.

``write_qwen_tool_model`` writes the tiny GGUF (see ``gguf_gen.write_tool_model``) carrying
the tree's own ``models/templates/Qwen3.5-4B.jinja``.

``python -m lab.standins.real_llama fetch`` downloads the sdist if it is missing;
``python -m lab.standins.real_llama repo`` also builds the repository and prints its path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.standins.engine_repo import _git, _git_env
from lab.standins.gguf_gen import write_tool_model

SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_CACHE_ENV = "GARAGE_SDIST_CACHE"
REPO_CACHE_ENV = "GARAGE_REAL_LLAMA_CACHE"
DEFAULT_SDIST_CACHE = Path("/var/cache/llm-garage/sdist")
DEFAULT_REPO_CACHE = Path("/var/cache/llm-garage/real-llama")

GOOD_BUILD = 7001
GOOD_TAG, BAD_TAG = f"b{GOOD_BUILD}", f"b{GOOD_BUILD + 1}"
BRANCH = "master"
QWEN_TEMPLATE = "models/templates/Qwen3.5-4B.jinja"
ITEMS_ERROR = "Unknown (built-in) filter 'items' for type String"

# The bad commit: the Jinja path no longer parses tool call arguments into objects for
# templates that expect objects.
PATCH_FILE = "common/chat.cpp"
PATCH_OLD = """    if (tmpl.original_caps().supports_object_arguments) {
        workaround::func_args_not_string(params.messages);
    }
"""
PATCH_NEW = """    // tool call arguments reach the template as received (a JSON string)
"""
BAD_MESSAGE = "chat : pass tool call arguments to the template as received"
# Bump when the way the repository is made changes: old caches are then not reused.
LAYOUT = "1"
EPOCH = 1_735_689_600  # 2025-01-01T00:00:00Z, the first commit's date


def sdist_cache() -> Path:
    return Path(os.environ.get(SDIST_CACHE_ENV) or DEFAULT_SDIST_CACHE)


def repo_cache() -> Path:
    return Path(os.environ.get(REPO_CACHE_ENV) or DEFAULT_REPO_CACHE)


def ensure_sdist(cache: Path | None = None) -> Path:
    """The llama-cpp-python sdist, downloaded with pip into ``cache`` unless already there."""
    cache = cache or sdist_cache()
    path = cache / SDIST_FILE
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
         "--no-binary", ":all:", f"llama-cpp-python=={SDIST_VERSION}", "-d", str(cache)],
        capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"pip download of llama-cpp-python {SDIST_VERSION} into {cache} "
                           f"failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RealLlama:
    """A bare llama.cpp repository made by ensure_real_llama, under ``base`` (serve ``base``
    with GitDaemon; the repository is ``<url>/llama.cpp.git``)."""

    base: Path
    good_commit: str
    bad_commit: str
    good_tag: str = GOOD_TAG
    bad_tag: str = BAD_TAG

    @property
    def path(self) -> Path:
        return self.base / "llama.cpp.git"

    @property
    def name(self) -> str:
        return self.path.name

    def show(self, rev: str, path: str) -> str:
        return _git(self.path, "show", f"{rev}:{path}")

    def build_number(self, tag: str) -> int:
        return int(_git(self.path, "rev-list", "--count", tag).strip())

    def short(self, rev: str) -> str:
        return _git(self.path, "rev-parse", "--short", rev).strip()


def _extract_tree(sdist: Path, dest: Path) -> None:
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix) or member.name == prefix.rstrip("/"):
                continue
            member.name = member.name[len(prefix):]
            members.append(member)
        if not members:
            raise RuntimeError(f"{sdist} has no {prefix}")
        tar.extractall(dest, members=members, filter="tar")
    # A submodule's gitdir pointer: git (and cmake's build-info) would follow it nowhere.
    pointer = dest / ".git"
    if pointer.is_file():
        pointer.unlink()


def _filler_history(work: Path, n: int, env: dict[str, str]) -> None:
    """``n`` empty commits on BRANCH, one per hour from EPOCH, in one git fast-import."""
    lines = []
    for k in range(1, n + 1):
        date = f"{EPOCH + k * 3600} +0000"
        message = b"llama : history before the vendored tree"
        lines.append(f"commit refs/heads/{BRANCH}\nmark :{k}\n"
                     f"author {env['GIT_AUTHOR_NAME']} <{env['GIT_AUTHOR_EMAIL']}> {date}\n"
                     f"committer {env['GIT_COMMITTER_NAME']} <{env['GIT_COMMITTER_EMAIL']}> "
                     f"{date}\ndata {len(message)}\n".encode() + message + b"\n")
        if k > 1:
            lines.append(f"from :{k - 1}\n".encode())
        lines.append(b"\n")
    proc = subprocess.run(["git", "fast-import", "--quiet"], cwd=work, env=env,
                          input=b"".join(lines), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git fast-import failed: {proc.stderr.decode(errors='replace')}")


def _commit(work: Path, message: str, k: int) -> str:
    env = _git_env()
    date = f"{EPOCH + k * 3600} +0000"
    env.update(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
    _git(work, "add", "-A", "-f", env=env)
    _git(work, "commit", "-q", "--no-verify", "-m", message, env=env)
    return _git(work, "rev-parse", "HEAD").strip()


def cache_key(sdist: Path) -> str:
    digest = hashlib.sha256()
    for part in (LAYOUT, _sha256(sdist), PATCH_FILE, PATCH_OLD, PATCH_NEW, BAD_MESSAGE,
                 str(GOOD_BUILD)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def ensure_real_llama(cache: Path | None = None, sdist: Path | None = None) -> RealLlama:
    """The cached bare repository (made first if missing); safe to call concurrently."""
    sdist = sdist or ensure_sdist()
    cache = cache or repo_cache()
    base = cache / cache_key(sdist)
    bare = base / "llama.cpp.git"
    if not (base / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-real-llama-", dir=cache) as tmp:
            tmp_base = Path(tmp) / "base"
            _make_repo(sdist, Path(tmp) / "src", tmp_base / "llama.cpp.git")
            (tmp_base / ".complete").write_text(f"{sdist.name}\n")
            try:
                tmp_base.rename(base)
            except OSError:
                if not (base / ".complete").exists():  # not made meanwhile by another run
                    shutil.rmtree(base, ignore_errors=True)
                    tmp_base.rename(base)
    return RealLlama(base=base, good_commit=_git(bare, "rev-parse", GOOD_TAG).strip(),
                     bad_commit=_git(bare, "rev-parse", BAD_TAG).strip())


def _make_repo(sdist: Path, work: Path, bare: Path) -> None:
    work.mkdir(parents=True)
    _extract_tree(sdist, work)
    env = _git_env()
    _git(work, "init", "-q", "-b", BRANCH)
    _filler_history(work, GOOD_BUILD - 1, env)
    _git(work, "reset", "-q", "--soft", BRANCH)
    _commit(work, f"llama.cpp as vendored by llama-cpp-python {SDIST_VERSION}", GOOD_BUILD)
    _git(work, "tag", GOOD_TAG)
    target = work / PATCH_FILE
    source = target.read_text()
    if source.count(PATCH_OLD) != 1:
        raise RuntimeError(f"{PATCH_FILE} of this tree does not hold the lines to patch once")
    target.write_text(source.replace(PATCH_OLD, PATCH_NEW))
    _commit(work, BAD_MESSAGE, GOOD_BUILD + 1)
    _git(work, "tag", BAD_TAG)
    subprocess.run(["git", "clone", "-q", "--bare", "--no-local", str(work), str(bare)],
                   env=_git_env(), check=True, capture_output=True)
    _git(bare, "remote", "remove", "origin")
    for key in ("uploadpack.allowReachableSHA1InWant", "uploadpack.allowAnySHA1InWant",
                "uploadpack.allowTipSHA1InWant", "daemon.uploadpack"):
        _git(bare, "config", key, "true")


def write_qwen_tool_model(path: os.PathLike | str, real: RealLlama) -> Path:
    """The tiny tool-calling model with the tree's Qwen3.5 chat template."""
    return write_tool_model(path, real.show(real.good_tag, QWEN_TEMPLATE),
                            name="Garage Tiny Qwen3.5 Tool Caller")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.standins.real_llama",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fetch", "repo"],
                        help="fetch: the sdist only; repo: the sdist and the repository")
    args = parser.parse_args(argv)
    sdist = ensure_sdist()
    print(sdist)
    if args.what == "repo":
        real = ensure_real_llama(sdist=sdist)
        print(f"{real.path} {real.good_tag}={real.good_commit} {real.bad_tag}={real.bad_commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
