"""The real llama.cpp repository is made from an sdist's vendored tree: filler history up to
the good tag, the bad tag one small commit later, the submodule pointer gone, cached by key."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lab.standins import real_llama
from lab.standins.gguf_gen import read_metadata
from lab.standins.real_llama import (
    BAD_TAG,
    GOOD_BUILD,
    GOOD_TAG,
    PATCH_FILE,
    PATCH_OLD,
    QWEN_TEMPLATE,
    SDIST_FILE,
    SDIST_VERSION,
    ensure_real_llama,
    ensure_sdist,
    write_qwen_tool_model,
)

TEMPLATE = "{{ messages }}<tool_call><function=x><parameter=y>"


def fake_sdist(path, chat_cpp: str = "// before\n" + PATCH_OLD + "// after\n"):
    """A tarball laid out like llama-cpp-python's sdist, with a tiny vendored tree."""
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    files = {"CMakeLists.txt": "project(llama)\n", PATCH_FILE: chat_cpp,
             QWEN_TEMPLATE: TEMPLATE, ".git": "gitdir: ../../.git/modules/llama.cpp\n",
             ".gitignore": "*.gguf\n/models/*\n!/models/templates\n",
             "models/ggml-vocab-test.gguf": "GGUF"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        members = {prefix + name: text for name, text in files.items()}
        members[f"llama_cpp_python-{SDIST_VERSION}/pyproject.toml"] = "[project]\n"
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_repository_has_a_good_and_a_bad_tag_with_upstream_build_numbers(tmp_path):
    sdist = fake_sdist(tmp_path / SDIST_FILE)
    real = ensure_real_llama(tmp_path / "cache", sdist)

    assert git(real.path, "rev-parse", "--is-bare-repository") == "true"
    assert real.build_number(GOOD_TAG) == GOOD_BUILD and GOOD_TAG == f"b{GOOD_BUILD}"
    assert real.build_number(BAD_TAG) == GOOD_BUILD + 1
    assert git(real.path, "rev-parse", f"{BAD_TAG}^") == real.good_commit
    files = git(real.path, "ls-tree", "-r", "--name-only", GOOD_TAG).splitlines()
    # The tree as shipped, ignored files included, without the submodule pointer.
    assert sorted(files) == sorted(["CMakeLists.txt", PATCH_FILE, QWEN_TEMPLATE, ".gitignore",
                                    "models/ggml-vocab-test.gguf"])
    assert git(real.path, "diff", "--name-only", GOOD_TAG, BAD_TAG) == PATCH_FILE
    bad = real.show(BAD_TAG, PATCH_FILE)
    assert "func_args_not_string" not in bad and bad.startswith("// before\n")
    assert "func_args_not_string" in real.show(GOOD_TAG, PATCH_FILE)
    assert git(real.path, "config", "daemon.uploadpack") == "true"


def test_repository_is_reused_and_keyed_by_the_sdist(tmp_path):
    cache = tmp_path / "cache"
    sdist = fake_sdist(tmp_path / "a" / SDIST_FILE)
    first = ensure_real_llama(cache, sdist)
    stamp = (first.base / ".complete").stat().st_mtime_ns
    (tmp_path / "b").mkdir()
    copy = shutil.copy(sdist, tmp_path / "b" / SDIST_FILE)
    again = ensure_real_llama(cache, Path(copy))
    assert again == first and (first.base / ".complete").stat().st_mtime_ns == stamp
    other = ensure_real_llama(cache, fake_sdist(tmp_path / "c" / SDIST_FILE,
                                                "// other\n" + PATCH_OLD))
    assert other.base != first.base and other.good_commit != first.good_commit
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.base.name, other.base.name])


def test_a_tree_without_the_patched_lines_is_refused(tmp_path):
    sdist = fake_sdist(tmp_path / SDIST_FILE, "// nothing to patch\n")
    with pytest.raises(RuntimeError, match="does not hold the lines to patch"):
        ensure_real_llama(tmp_path / "cache", sdist)
    assert list((tmp_path / "cache").iterdir()) == []


def test_sdist_in_the_cache_is_used_without_pip(tmp_path, monkeypatch):
    (tmp_path / SDIST_FILE).write_bytes(b"cached")
    monkeypatch.setenv(real_llama.SDIST_CACHE_ENV, str(tmp_path))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(real_llama.subprocess, "run", no_pip)
    assert ensure_sdist() == tmp_path / SDIST_FILE


def test_a_failed_download_says_why(tmp_path, monkeypatch):
    def pip(argv, **kwargs):
        assert argv[1:4] == ["-m", "pip", "download"] and argv[-2:] == ["-d", str(tmp_path)]
        assert f"llama-cpp-python=={SDIST_VERSION}" in argv and ":all:" in argv
        return subprocess.CompletedProcess(argv, 1, "", "No matching distribution")

    monkeypatch.setattr(real_llama.subprocess, "run", pip)
    with pytest.raises(RuntimeError, match="No matching distribution"):
        ensure_sdist(tmp_path)


def test_qwen_tool_model_carries_the_trees_template(tmp_path):
    real = ensure_real_llama(tmp_path / "cache", fake_sdist(tmp_path / SDIST_FILE))
    meta = read_metadata(write_qwen_tool_model(tmp_path / "q.gguf", real))
    assert meta["tokenizer.chat_template"] == TEMPLATE
