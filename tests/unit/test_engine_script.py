"""The rig-side build script (llm_garage/files/garage-build), run here on a tiny CMake project
in a local git repository: fetch into a stable source folder with full history, build,
verify `llama-server --version`, stamp last, ccache across build folders, failures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "llm_garage" / "files" / "garage-build"
TOOLS = ("git", "cmake", "ccache", "cc", "flock")

CMAKE = """cmake_minimum_required(VERSION 3.16)
project(fake_llama C)
find_package(Git REQUIRED)
execute_process(COMMAND ${GIT_EXECUTABLE} rev-list --count HEAD
                WORKING_DIRECTORY ${CMAKE_SOURCE_DIR} OUTPUT_VARIABLE N
                OUTPUT_STRIP_TRAILING_WHITESPACE)
execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --short HEAD
                WORKING_DIRECTORY ${CMAKE_SOURCE_DIR} OUTPUT_VARIABLE C
                OUTPUT_STRIP_TRAILING_WHITESPACE)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_library(ggml STATIC ggml.c)
add_executable(llama-server main.c)
target_link_libraries(llama-server ggml)
target_compile_definitions(llama-server PRIVATE BUILD_NUMBER=${N} BUILD_COMMIT="${C}")
"""
MAIN = """#include <stdio.h>
int ggml(void);
int main(void) {
#ifdef SEMVER_STYLE  /* what later llama.cpp prints */
    fprintf(stderr, "version: 0.5.0-dev (build %d, commit %s)\\n", BUILD_NUMBER, BUILD_COMMIT);
#else
    fprintf(stderr, "version: %d (%s)\\nbuilt with cc\\n", BUILD_NUMBER, BUILD_COMMIT);
#endif
#ifdef LOAD_MODE  /* what later llama.cpp offers instead of --no-mmap and --mlock */
    printf("-lm,   --load-mode MODE                 model loading mode (default: auto)\\n");
#endif
    return ggml() ? 0 : 1;
}
"""
GGML = "int ggml(void) { return %d; }\n"

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="needs " + ", ".join(t for t in TOOLS if shutil.which(t) is None))


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def upstream(tmp_path):
    """A repository with tags b1..b3 (b3 breaks the build) and a branch `dev`."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "master")
    (repo / "CMakeLists.txt").write_text(CMAKE)
    (repo / "main.c").write_text(MAIN)
    for i in (1, 2):
        (repo / "ggml.c").write_text(GGML % i)
        (repo / f"notes{i}.txt").write_text(f"{i}\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"commit {i}")
        git(repo, "tag", f"b{i}")
    (repo / "ggml.c").write_text("this is not C\n")
    git(repo, "commit", "-qam", "broken")
    git(repo, "tag", "b3")
    git(repo, "checkout", "-q", "-b", "dev", "b2")
    return repo


class Garage:
    def __init__(self, root: Path, remote: Path):
        self.root = root
        self.remote = remote

    def build(self, tag: str, *, key: str | None = None, cmake_args=(), fetch=None,
              options=(), env=None):
        commit = git(self.remote, "rev-parse", f"{tag}^{{commit}}")
        key = key or f"{commit[:12]}-0000000000"
        build_dir = self.root / "builds" / "llama" / key
        fetch = fetch if fetch is not None else [f"+refs/tags/{tag}:refs/tags/{tag}", commit]
        argv = [str(SCRIPT), "--name", "llama", "--source", str(self.root / "src" / "llama"),
                "--remote", str(self.remote), "--commit", commit,
                "--build-dir", str(build_dir), "--stamp", f"{commit} 0000000000",
                "--jobs", "2", "--ccache-dir", str(self.root / "ccache"),
                "--ccache-base", str(self.root)]
        for spec in fetch:
            argv += ["--fetch", spec]
        argv += [*options, "--", "-DCMAKE_BUILD_TYPE=Release", *cmake_args]
        proc = subprocess.run(argv, capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        return proc, build_dir, commit


@pytest.fixture
def garage(tmp_path, upstream):
    return Garage(tmp_path / "garage", upstream)


def version(build_dir: Path) -> str:
    return subprocess.run([build_dir / "bin" / "llama-server", "--version"],
                          capture_output=True, text=True).stderr


def stamp(build_dir: Path) -> dict[str, str]:
    lines = (build_dir / "stamp").read_text().splitlines()
    return {"built": lines[0], **dict(line.split("=", 1) for line in lines[1:])}


def test_builds_a_tag_with_the_right_build_number(garage):
    proc, build_dir, commit = garage.build("b2")
    assert proc.returncode == 0, proc.stderr
    assert f"version: 2 ({commit[:7]}" in version(build_dir)
    s = stamp(build_dir)
    assert s["built"] == f"{commit} 0000000000"
    assert int(s["seconds"]) >= 0 and s["ccache_misses"] == "2"
    assert "garage-build: done in" in proc.stdout
    assert (build_dir / "build.log").is_file()
    assert not list(build_dir.rglob("*.o"))
    source = garage.root / "src" / "llama"
    assert not (source / ".git" / "shallow").exists()
    assert git(source, "rev-parse", "HEAD") == commit


def test_the_stamp_names_the_cuda_toolkit(garage):
    proc, build_dir, _ = garage.build("b2", options=["--cuda-toolkit", "13.0.88"])
    assert proc.returncode == 0, proc.stderr
    assert stamp(build_dir)["cuda_toolkit"] == "13.0.88"
    proc, build_dir, _ = garage.build("b1")
    assert stamp(build_dir)["cuda_toolkit"] == "none"


def test_load_flags_follow_the_built_servers_help(garage):
    options = ["--load-flags-file", "", "--load-flags-new", "X=--load-mode none\n",
               "--load-flags-old", "X=--no-mmap\n"]
    for key, flags, expected in (("a" * 12 + "-1111111111", [], "X=--no-mmap\n"),
                                 ("b" * 12 + "-2222222222", ["-DCMAKE_C_FLAGS=-DLOAD_MODE"],
                                  "X=--load-mode none\n")):
        env_file = garage.root / "builds" / "llama" / key / "load-flags.env"
        options[1] = str(env_file)
        proc, build_dir, _ = garage.build("b2", key=key, cmake_args=flags, options=options)
        assert proc.returncode == 0, proc.stderr
        assert env_file.read_text() == expected
        assert (build_dir / "stamp").stat().st_mtime >= env_file.stat().st_mtime
    # without the option no file is written
    proc, build_dir, _ = garage.build("b1")
    assert proc.returncode == 0 and not (build_dir / "load-flags.env").exists()


def test_configure_only_configures_and_stops(garage):
    proc, build_dir, commit = garage.build("b2", options=["--configure-only"])
    assert proc.returncode == 0, proc.stderr
    assert "--configure-only: no build, no stamp" in proc.stdout
    assert (build_dir / "CMakeCache.txt").is_file()
    assert not (build_dir / "bin" / "llama-server").exists()
    assert not (build_dir / "stamp").exists()
    # A later full build of the same folder builds and stamps it.
    proc, build_dir, _ = garage.build("b2")
    assert proc.returncode == 0 and stamp(build_dir)["built"] == f"{commit} 0000000000"


def test_second_build_folder_hits_the_cache(garage):
    proc, first, _ = garage.build("b1")
    assert proc.returncode == 0, proc.stderr
    proc, second, commit = garage.build("b2")
    assert proc.returncode == 0, proc.stderr
    # ggml.c changed between b1 and b2, main.c did not but its build number did: both miss.
    assert stamp(second)["ccache_misses"] == "2"
    proc, third, _ = garage.build("b2", key=f"{commit[:12]}-1111111111")
    assert proc.returncode == 0, proc.stderr
    s = stamp(third)
    assert (s["ccache_hits"], s["ccache_misses"]) == ("2", "0")


def test_failed_build_shows_log_tail_and_path_and_leaves_no_stamp(garage):
    proc, build_dir, _ = garage.build("b3")
    assert proc.returncode == 1
    log = build_dir / "build.log"
    assert "failed (exit" in proc.stderr and "during: build" in proc.stderr
    assert f"--- last 40 lines of {log} ---" in proc.stderr
    assert f"full log on {os.uname().nodename}: {log}" in proc.stderr
    assert "ggml.c" in proc.stderr  # the compiler's complaint is in the tail
    assert not (build_dir / "stamp").exists()
    proc, build_dir, _ = garage.build("b2")  # the source folder still works
    assert proc.returncode == 0, proc.stderr


def test_refuses_to_rebuild_the_current_build(garage):
    proc, build_dir, _ = garage.build("b2")
    assert proc.returncode == 0
    (build_dir.parent / "current").symlink_to(build_dir.name)
    proc, _, _ = garage.build("b2")
    assert proc.returncode == 1 and "is the build in use" in proc.stderr
    assert (build_dir / "stamp").exists()


def test_version_check_catches_a_wrong_commit(garage):
    proc, build_dir, commit = garage.build(
        "b2", cmake_args=["-DCMAKE_C_FLAGS=-UBUILD_COMMIT -DBUILD_COMMIT=\\\"deadbee\\\""])
    assert proc.returncode == 1
    assert "during: verify llama-server --version" in proc.stderr
    assert f"does not report commit {commit}" in proc.stderr
    assert not (build_dir / "stamp").exists()


def test_version_check_reads_the_later_version_format(garage):
    proc, build_dir, commit = garage.build("b2", cmake_args=["-DCMAKE_C_FLAGS=-DSEMVER_STYLE"])
    assert proc.returncode == 0, proc.stderr
    assert f"version: 0.5.0-dev (build 2, commit {commit[:7]}" in version(build_dir)
    assert stamp(build_dir)["version"].startswith("version: 0.5.0-dev (build 2, commit ")


def test_commit_pin_fetched_by_sha_and_unknown_commit(garage):
    commit = git(garage.remote, "rev-parse", "b1")
    proc, build_dir, _ = garage.build("b1", fetch=[commit])
    assert proc.returncode == 0, proc.stderr
    assert git(garage.root / "src" / "llama", "tag") == ""  # fetched by SHA, no tag
    proc, build_dir, _ = garage.build("b2", fetch=["+refs/tags/nope:refs/tags/nope"])
    assert proc.returncode == 1 and "was not found on" in proc.stderr


def test_shallow_source_is_deepened(garage):
    source = garage.root / "src" / "llama"
    source.parent.mkdir(parents=True)
    git(source.parent, "clone", "-q", "--depth", "1", "--branch", "b2",
        f"file://{garage.remote}", str(source))
    assert (source / ".git" / "shallow").exists()
    proc, build_dir, commit = garage.build("b2")
    assert proc.returncode == 0, proc.stderr
    assert f"version: 2 ({commit[:7]}" in version(build_dir)


def test_git_locks_left_by_a_killed_build_are_removed(garage):
    proc, _, _ = garage.build("b1")
    assert proc.returncode == 0, proc.stderr
    git_dir = garage.root / "src" / "llama" / ".git"
    (git_dir / "index.lock").write_text("")  # what a kill mid-checkout leaves
    (git_dir / "shallow.lock").write_text("")
    proc, build_dir, commit = garage.build("b2")
    assert proc.returncode == 0, proc.stderr
    assert not (git_dir / "index.lock").exists() and not (git_dir / "shallow.lock").exists()
    assert f"version: 2 ({commit[:7]}" in version(build_dir)
    assert "removed stale .git/index.lock" in (build_dir / "build.log").read_text()


def test_a_build_running_holds_off_a_second_one(garage):
    builds = garage.root / "builds" / "llama"
    builds.mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(builds / ".lock"), "sleep", "30"])
    try:
        for _ in range(50):  # wait until the holder has the lock
            if subprocess.run(["flock", "-n", str(builds / ".lock"), "true"]).returncode:
                break
            time.sleep(0.1)
        proc, build_dir, _ = garage.build("b1")
        assert proc.returncode == 1
        assert "another build of llama is running on this host" in proc.stderr
        assert not (build_dir / "stamp").exists()
    finally:
        holder.kill()
        holder.wait()


# --- progress while compiling -------------------------------------------------------------------

PROGRESS = re.compile(r"^garage-build: llama (compiling|compiled): (.*)$")


def progress_lines(stdout: str) -> list[tuple[str, str]]:
    return [m.groups() for m in map(PROGRESS.match, stdout.splitlines()) if m]


def test_progress_lines_grow_to_the_total_and_the_log_keeps_every_line(garage):
    proc, build_dir, _ = garage.build("b2", env={"GARAGE_PROGRESS_INTERVAL": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = progress_lines(proc.stdout)
    # Makefiles: four steps, 25 % each; every 10 % step gets its line at interval 0
    assert [kind for kind, _ in lines] == ["compiling"] * 3 + ["compiled"]
    percents = [int(text.split(" %")[0]) for _, text in lines]
    assert percents == [25, 50, 75, 100]
    assert "elapsed, about " in lines[0][1] and " left, ccache hits " in lines[0][1]
    assert re.fullmatch(r"100 % \(4 steps done\) in \d+ s, ccache hits 0/2", lines[-1][1])
    log = (build_dir / "build.log").read_text()
    assert "[ 25%] Building C object" in log and "[100%] Built target llama-server" in log
    assert "compiling:" not in log  # progress goes to the output only
    # the same build from the cache says so; quiet mode prints no progress at all
    proc, _, commit = garage.build("b2", key="second-0000000000",
                                   env={"GARAGE_PROGRESS_INTERVAL": "0"})
    assert progress_lines(proc.stdout)[-1][1].endswith("ccache hits 2/2")
    proc, _, _ = garage.build("b2", key="third-0000000000",
                              env={"GARAGE_PROGRESS_INTERVAL": "0", "GARAGE_PROGRESS": "off"})
    assert proc.returncode == 0 and progress_lines(proc.stdout) == []
    assert "garage-build: done in" in proc.stdout


FAKE_CMAKE = """#!/bin/bash
# cmake, except that --build prints the lines of $FAKE_BUILD_OUTPUT ("sleep S" waits)
if [ "$1" != --build ]; then exec "$REAL_CMAKE" "$@"; fi
"$REAL_CMAKE" "$@" >/dev/null 2>&1 || exit 1
while IFS= read -r line; do
    case "$line" in "sleep "*) sleep "${line#sleep }" ;; *) printf '%s\\n' "$line" ;; esac
done < "$FAKE_BUILD_OUTPUT"
"""


def scripted_build(garage, tmp_path, output: list[str], **env):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "cmake").write_text(FAKE_CMAKE)
    (bin_dir / "cmake").chmod(0o755)
    (tmp_path / "build-output").write_text("\n".join(output) + "\n")
    started = time.monotonic()
    proc, build_dir, _ = garage.build("b2", env={
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_CMAKE": shutil.which("cmake"),
        "FAKE_BUILD_OUTPUT": str(tmp_path / "build-output"), **env})
    return proc, build_dir, time.monotonic() - started


def test_progress_is_paced_by_interval_and_step_with_a_line_during_a_long_stall(garage, tmp_path):
    # Ninja: 40 edges, one every 0.05 s, then a stall of 3.5 s on the last one
    output = []
    for n in range(1, 40):
        output += [f"[{n}/40] Building CXX object src/unit{n}.cpp.o", "sleep 0.05"]
    output += ["sleep 3.5", "[40/40] Linking CXX executable bin/llama-server"]
    proc, build_dir, took = scripted_build(garage, tmp_path, output,
                                           GARAGE_PROGRESS_INTERVAL="0.4",
                                           GARAGE_PROGRESS_STEP="20")
    assert proc.returncode == 0, proc.stderr
    lines = progress_lines(proc.stdout)
    steps = [int(re.match(r"(\d+)/40 steps", text).group(1)) for _, text in lines]
    assert lines[-1] == ("compiled", lines[-1][1]) and steps[-1] == 40
    assert re.match(r"40/40 steps \(100 %\) in \d+ s, ccache hits \d+/\d+$", lines[-1][1])
    compiling = steps[:-1]
    assert compiling == sorted(compiling) and len(compiling) >= 2
    # never more often than the step allows (8 edges of 40), except the stall's line(s)
    moving = [s for s in compiling if s != 39]
    assert all(b - a >= 8 for a, b in zip(moving, moving[1:], strict=False))
    assert len(moving) <= 5
    # the stall (more than 6 intervals without a step) got a line all the same
    assert 39 in compiling
    assert all("left" in text for _, text in lines[:-1] if not text.startswith("39/40"))
    assert "[40/40] Linking CXX executable" in (build_dir / "build.log").read_text()
