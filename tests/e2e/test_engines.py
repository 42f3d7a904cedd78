"""Engine builds on test rigs, from fixture repositories served by git daemon on the fleet's
host address, with the fake nvidia-smi / nvcc pushed into the rigs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.serving import (
    controller_env,
    engine,
    make_engine_repo,
    make_hub,
    profile,
    rig_data,
    service,
    starts,
)
from lab.standins.engine_repo import GitDaemon, build_engine_repo
from lab.standins.gpu import fake_gpu_files
from llm_garage.settings import flags_hash, load_rig

pytestmark = pytest.mark.e2e

BUILDS = "/opt/llm-garage/builds"
# Small generated sources: a build takes seconds, and a tag bump still leaves cache hits.
REPO_SIZE = {"n_units": 6, "unit_weight": 8}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """llama.cpp with tags b6 b10 (does not compile) b11 b12 b14; ik_llama.cpp, no tags."""
    base = tmp_path_factory.mktemp("engines")
    llama = build_engine_repo(base, "llama.cpp", n_commits=14, **REPO_SIZE)
    ik = build_engine_repo(base, "ik_llama.cpp", n_commits=9, **REPO_SIZE)
    assert llama.broken_tag == "b10" and llama.fixed_tag == "b11"
    return base, llama, ik


@pytest.fixture
def git_url(fleet, repos):
    """Base git:// URL of the fixture repositories, reachable from the fleet's rigs."""
    base, _, _ = repos
    with GitDaemon(base, bind_ip=fleet.host_ip) as daemon:
        yield daemon.url


def install_fakes(rig, model, count, cuda):
    for path, (content, mode) in fake_gpu_files(model, count, cuda).items():
        rig.put_text(content.decode(), path, mode)


def llama(url, ref, **settings):
    return {"kind": "llama.cpp", "ref": ref, "remote": f"{url}/llama.cpp.git", **settings}


def data(gpu_count=0, **engines):
    return {"gpu_count": gpu_count, "engines": engines}


def expected_key(host_data, name, commit, arches, toolkit="12.8.93"):
    """The build folder: a CUDA build's key holds the full version the fake nvcc reports."""
    rig, errors = load_rig("x", host_data)
    assert errors == []
    engine = rig.engines[name]
    return (f"{commit[:12]}-"
            f"{flags_hash(engine.cmake_flags(arches), toolkit if engine.cuda else None)}")


def sh(rig, cmd):
    return rig.ssh(cmd).stdout.strip()


def current(rig, name="llama"):
    return rig.ssh(f"readlink {BUILDS}/{name}/current", check=False).stdout.strip() or None


def build_info(rig, name="llama"):
    return json.loads(sh(rig, f"{BUILDS}/{name}/current/bin/llama-server --fixture-build-info"))


def mtime(rig, path):
    return sh(rig, f"stat -c %Y.%y {path}")


def stamp(rig, name, key):
    lines = sh(rig, f"cat {BUILDS}/{name}/{key}/stamp").splitlines()
    return {"built": lines[0], **dict(line.split("=", 1) for line in lines[1:])}


def untouched(rig):
    """Nothing of the deploy ran: no garage folder, no service user."""
    out = rig.ssh("test -e /opt/llm-garage && echo garage; id llama >/dev/null 2>&1 && "
                  "echo user; true").stdout.split()
    return out == []


def failed_before_running(result):
    assert result.returncode != 0 and not result.ok
    assert "nothing was changed on any host" in result.stderr
    assert "Beginning operation run" not in result.stderr


# ---------------------------------------------------------------------------------------------

def test_first_converge_builds_for_the_3090s_and_a_rerun_does_nothing(
        start_rigs, write_inventory, converge, pyinfra_run, repos, git_url):
    _, repo, _ = repos
    (rig,) = start_rigs("garage")
    install_fakes(rig, "rtx3090", 6, "12.8")
    host = data(6, llama=llama(git_url, "b6"))
    inventory = write_inventory({"garage": host})

    first, second = converge(inventory)

    commit = repo.tags["b6"]
    key = expected_key(host, "llama", commit, ["86"])
    assert f"Engines | Build llama b6 ({key})" in first.changes()["garage"]
    assert current(rig) == key
    info = build_info(rig)
    assert (info["build_number"], info["commit"]) == (6, repo.short(commit))
    assert info["cuda"]["architectures_requested"] == "86"
    assert info["options"]["GGML_CUDA_FA_ALL_QUANTS"] == "ON"
    assert info["shared_libs"] is False
    assert f"llama.cpp b6 = {commit[:12]}), CUDA architectures 86 with CUDA 12.8" in first.stderr
    assert f"log: {BUILDS}/llama/{key}/build.log" in first.stderr
    assert "ccache hits 0/" in first.stderr  # cold cache, said after the build
    version = sh(rig, f"{BUILDS}/llama/current/bin/llama-server --version 2>&1")
    assert f"version: 6 ({repo.short(commit)})" in version

    # No cmake on a no-op run: the build log stays as the first run left it.
    log = f"{BUILDS}/llama/{key}/build.log"
    before = mtime(rig, log)
    third = pyinfra_run(inventory)
    assert third.changes() == {}
    assert mtime(rig, log) == before
    assert sh(rig, "cat /opt/llm-garage/state/engine-pins") == \
        f"b6\t{commit}\t{git_url}/llama.cpp.git"


def test_tag_bump_failed_build_and_rollback(start_rigs, write_inventory, converge, pyinfra_run,
                                            repos, git_url):
    _, repo, _ = repos
    (rig,) = start_rigs("garage")
    install_fakes(rig, "rtx3090", 6, "12.8")

    def inventory(tag):
        host = data(6, llama=llama(git_url, tag))
        return (write_inventory({"garage": host}, name=f"inventory-{tag}.py"),
                expected_key(host, "llama", repo.tags[tag], ["86"]))

    inv6, key6 = inventory("b6")
    converge(inv6)
    assert current(rig) == key6
    log6 = mtime(rig, f"{BUILDS}/llama/{key6}/build.log")

    # Bump: rebuilt at the new commit with a warm cache, switched; the old build is kept.
    inv11, key11 = inventory("b11")
    first, _ = converge(inv11)
    assert current(rig) == key11
    assert set(first.changes()["garage"]) >= {
        "Engines | Record llama tag b11", f"Engines | Build llama b11 ({key11})",
        f"Engines proven | Switch llama to {key11}"}
    assert int(stamp(rig, "llama", key11)["ccache_hits"]) > 0
    assert build_info(rig)["build_number"] == 11
    assert sh(rig, f"ls {BUILDS}/llama") == "\n".join(sorted([key6, key11, "current"]))

    # A tag that does not compile: the host fails with the log's tail, `current` stays.
    inv10, key10 = inventory("b10")
    failed = pyinfra_run(inv10, expect_ok=False)
    assert not failed.ok and failed.hosts["garage"].failed
    log10 = f"{BUILDS}/llama/{key10}/build.log"
    assert f"--- last 40 lines of {log10} ---" in failed.stderr
    assert f"--- full log on garage: {log10} ---" in failed.stderr
    assert "ggml_fixture_op_scratch_reduce" in failed.stderr  # the compiler's complaint
    assert current(rig) == key11
    assert rig.ssh(f"test -e {BUILDS}/llama/{key10}/stamp", check=False).returncode == 1
    assert build_info(rig)["build_number"] == 11

    # Rollback: back to the kept build without compiling anything.
    first, _ = converge(inv6)
    assert current(rig) == key6
    changed = first.changes()["garage"]
    assert f"Engines proven | Switch llama to {key6}" in changed
    assert f"Engines | Build llama b6 ({key6})" in first.hosts["garage"].no_change_ops
    assert mtime(rig, f"{BUILDS}/llama/{key6}/build.log") == log6
    # The unfinished b10 folder is gone; both good builds stay.
    assert sh(rig, f"ls {BUILDS}/llama") == "\n".join(sorted([key6, key11, "current"]))


def test_blackwell_needs_cuda_12_8(start_rigs, write_inventory, converge, pyinfra_run, repos,
                                   git_url):
    _, repo, _ = repos
    (rig,) = start_rigs("epyc")
    install_fakes(rig, "rtxpro6000", 1, "12.4")
    host = data(1, llama=llama(git_url, "b6"))
    inventory = write_inventory({"epyc": host})

    refused = pyinfra_run(inventory, expect_ok=False)
    failed_before_running(refused)
    assert ("engines.llama (ref 'b6'): architecture 120 needs CUDA >= 12.8, but "
            "/usr/local/cuda/bin/nvcc is CUDA 12.4") in refused.stderr
    assert untouched(rig)

    install_fakes(rig, "rtxpro6000", 1, "12.8")
    converge(inventory)
    assert current(rig) == expected_key(host, "llama", repo.tags["b6"], ["120"])
    cuda = build_info(rig)["cuda"]
    assert cuda["architectures_requested"] == "120"
    assert cuda["toolkit_version"].startswith("12.8")


def test_ik_llama_pinned_by_commit(start_rigs, write_inventory, converge, repos, git_url):
    _, _, ik = repos
    (rig,) = start_rigs("garage")
    install_fakes(rig, "rtx3090", 2, "12.8")
    commit = ik.commits[ik.commits.index(ik.broken_commit) - 1]  # not the head: by SHA
    host = data(2, ik={"kind": "ik_llama.cpp", "ref": commit,
                       "remote": f"{git_url}/ik_llama.cpp.git"})
    inventory = write_inventory({"garage": host})

    converge(inventory)

    assert current(rig, "ik") == expected_key(host, "ik", commit, ["86"])
    info = build_info(rig, "ik")
    assert info["flavour"] == "ik_llama.cpp"
    # Full history in the stable source folder: the build number is upstream's.
    assert (info["build_number"], info["commit"]) == (ik.build_number(commit), ik.short(commit))
    assert info["cuda"]["architectures_requested"] == "86"  # ik's default list has no 86
    assert rig.ssh("test -f /opt/llm-garage/src/ik/.git/shallow", check=False).returncode == 1


def test_unknown_tag_and_branch_refused_before_anything_changes(
        start_rigs, write_inventory, converge, pyinfra_run, repos, git_url):
    _, repo, _ = repos
    (rig,) = start_rigs("garage")
    url = f"{git_url}/llama.cpp.git"
    inventory = write_inventory({"garage": data(
        0, a=llama(git_url, "b999", cuda=False), b=llama(git_url, "master", cuda=False))})

    refused = pyinfra_run(inventory, expect_ok=False)

    failed_before_running(refused)
    assert f"engines.a (ref 'b999'): no tag 'b999' on {url}. Fix: pin an existing tag" \
        in refused.stderr
    assert (f"engines.b (ref 'master'): 'master' is a branch on {url}, not a pin. Fix: pin a "
            "tag or a full commit SHA, or set follow: true") in refused.stderr
    assert "host garage: 2 engine problem(s)" in refused.stderr
    assert untouched(rig)

    # follow: true takes the branch, and builds the commit it points at now.
    host = data(0, a=llama(git_url, "b14", cuda=False),
                b=llama(git_url, "master", cuda=False, follow=True))
    converge(write_inventory({"garage": host}))
    assert current(rig, "b") == expected_key(host, "b", repo.head, None)
    assert build_info(rig, "b")["build_number"] == 14


def test_moved_tag_refused(start_rigs, write_inventory, converge, pyinfra_run, repos, git_url):
    base, repo, _ = repos
    moved = base / "moved" / "llama.cpp.git"
    shutil.copytree(repo.path, moved)
    try:
        (rig,) = start_rigs("garage")
        host = data(0, llama={"kind": "llama.cpp", "ref": "b6", "cuda": False,
                              "remote": f"{git_url}/moved/llama.cpp.git"})
        inventory = write_inventory({"garage": host})
        converge(inventory)
        before = current(rig)

        subprocess.run(["git", "-C", str(moved), "tag", "-f", "b6", repo.commits[6]],
                       check=True, capture_output=True)
        refused = pyinfra_run(inventory, expect_ok=False)

        failed_before_running(refused)
        assert (f"tag 'b6' on {git_url}/moved/llama.cpp.git now points at {repo.commits[6]}, "
                f"but this rig recorded {repo.tags['b6']} for it: the tag moved") \
            in refused.stderr
        assert current(rig) == before
    finally:
        shutil.rmtree(Path(moved).parent)


def test_failed_build_keeps_the_service_and_rollback_restarts_it_once(
        fleet, start_rigs, write_inventory, converge, pyinfra_run, tmp_path):
    repo = make_engine_repo(tmp_path / "git")  # b3 does not compile; b6 and b8 build
    unit = "llama-server-a.service"
    (rig,) = start_rigs("garage")
    env = controller_env(tmp_path)
    with GitDaemon(tmp_path / "git", bind_ip=fleet.host_ip) as git, \
            make_hub(fleet.host_ip, tmp_path / "hub") as hub:

        def inventory(ref):
            host = rig_data(hub, git.url, {"a": profile(8081)},
                            engines={"llama": engine(git.url, ref)})
            return write_inventory({"garage": host}, name=f"inventory-{ref}.py")

        converge(inventory("b6"), env=env)
        key6 = current(rig)
        running = service(rig, unit)
        assert running["ActiveState"] == "active" and starts(rig, unit) == 1

        failed = pyinfra_run(inventory("b3"), env=env, expect_ok=False)
        assert not failed.ok and "garage-build: building llama at" in failed.stderr
        assert current(rig) == key6
        assert service(rig, unit) == running and starts(rig, unit) == 1

        converge(inventory("b8"), env=env)
        assert service(rig, unit)["MainPID"] != running["MainPID"]
        assert starts(rig, unit) == 2
        log6 = mtime(rig, f"{BUILDS}/llama/{key6}/build.log")

        first, _ = converge(inventory("b6"), env=env)  # rollback: no compile, one restart
        assert current(rig) == key6
        assert mtime(rig, f"{BUILDS}/llama/{key6}/build.log") == log6
        assert starts(rig, unit) == 3
        version = sh(rig, f"{BUILDS}/llama/current/bin/llama-server --version 2>&1")
        assert f"version: 6 ({repo.short(repo.tags['b6'])})" in version
        assert any(op.startswith("Engines | Build llama b6")
                   for op in first.hosts["garage"].no_change_ops)
