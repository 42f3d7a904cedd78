"""Engine builds without rigs: fact parsers, pin resolution and its errors, architecture
derivation, build folder naming, and the operations' commands for given facts."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess

import pytest
from pyinfra.api import FunctionCommand
from pyinfra.facts.hardware import Cpus

from lab.standins.engine_repo import serve_git
from llm_garage.facts.engine import (
    CudaToolkit,
    EngineBuilds,
    GitRemoteRefs,
    PinRecords,
    parse_ls_remote,
    parse_nvcc_release,
    parse_nvcc_version,
)
from llm_garage.operations import engine as ops
from llm_garage.operations.engine import build_command, builds_to_prune, parse_stamp
from llm_garage.plans.engines import (
    BuildPlan,
    EngineError,
    architectures_from_caps,
    build_key,
    cuda_too_old,
    fetch_specs,
    resolve_ref,
)
from llm_garage.plans.engines import plan as plan_builds
from llm_garage.settings import flags_hash, load_rig
from tests.unit.ophelper import ShellHost, run_op

SHA_A = "a" * 40
SHA_B = "0123456789abcdef0123456789abcdef01234567"
SHA_T = "f" * 40  # an annotated tag object
REMOTE = "git://10.0.0.1/llama.cpp.git"

NVCC_12_4 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Built on Thu_Mar_28_02:18:24_PDT_2024
Cuda compilation tools, release 12.4, V12.4.131
Build cuda_12.4.r12.4/compiler.34097967_0""".splitlines()


# --- fact parsers ----------------------------------------------------------------------------

def test_ls_remote_lightweight_annotated_and_branch():
    out = [f"{SHA_A}\trefs/tags/b8137", f"{SHA_T}\trefs/tags/b9000",
           f"{SHA_B}\trefs/tags/b9000^{{}}", f"{SHA_B}\trefs/heads/master", "exit=0"]
    info = GitRemoteRefs().process(out)
    assert info["error"] is None
    refs = info["refs"]
    assert resolve_ref(refs, "b8137") == ("tag", SHA_A)
    assert resolve_ref(refs, "b9000") == ("tag", SHA_B)  # the peeled commit, not the tag object
    assert resolve_ref(refs, "master") == ("branch", SHA_B)
    assert resolve_ref(refs, "b1") == ("missing", None)


def test_ls_remote_tag_wins_over_branch_of_same_name():
    refs = parse_ls_remote([f"{SHA_A}\trefs/heads/b8137", f"{SHA_B}\trefs/tags/b8137"])
    assert resolve_ref(refs, "b8137") == ("tag", SHA_B)


def test_ls_remote_failure_keeps_gits_message():
    out = ["fatal: unable to connect to 10.0.0.1:", "10.0.0.1[0: 10.0.0.1]: errno=Connection "
           "refused", "exit=128"]
    info = GitRemoteRefs().process(out)
    assert info["refs"] == {}
    assert "Connection refused" in info["error"] and info["error"].startswith("fatal:")
    assert GitRemoteRefs().process(["exit=124"])["error"] == "(no answer within 120 s)"
    assert GitRemoteRefs().process(["fatal: x", "exit=2"])["error"] == "fatal: x"


def test_ls_remote_command_quotes_the_ref():
    cmd = GitRemoteRefs().command(remote="git://h/x y.git", ref="b1")
    text = cmd.get_raw_value()
    assert "timeout 120 git ls-remote 'git://h/x y.git'" in text
    assert "'refs/tags/b1^{}'" in text and "refs/heads/b1" in text


def test_pin_records():
    out = [f"b8137\t{SHA_A}\t{REMOTE}", f"b8137\t{SHA_B}\t{REMOTE}", "junk",
           f"b8137\t{SHA_B}\tgit://other/x.git"]
    assert PinRecords().process(out) == {(REMOTE, "b8137"): SHA_A,
                                         ("git://other/x.git", "b8137"): SHA_B}


def test_nvcc_version_parsed():
    assert parse_nvcc_version(NVCC_12_4) == (12, 4)
    assert parse_nvcc_version(["nvcc fatal: whatever"]) is None
    assert parse_nvcc_release(NVCC_12_4) == "12.4.131"
    assert CudaToolkit().process([]) is None


def test_toolkit_fact_reads_version_arch_list_and_cublas():
    out = ["nvcc=/usr/local/cuda/bin/nvcc", "root=/usr/local/cuda-12.4", *NVCC_12_4,
           "--- list-gpu-arch", "compute_50", "compute_86", "compute_90", "exit=0",
           "--- cublas", "/usr/local/cuda-12.4/lib64/libcublas.so",
           "/usr/local/cuda-12.4/lib64/libcublas.so.12"]
    assert CudaToolkit().process(out) == {
        "nvcc": "/usr/local/cuda/bin/nvcc", "root": "/usr/local/cuda-12.4", "version": (12, 4),
        "release": "12.4.131", "arches": ["50", "86", "90"],
        "cublas": ["/usr/local/cuda-12.4/lib64/libcublas.so",
                   "/usr/local/cuda-12.4/lib64/libcublas.so.12"]}
    # A compiler that cannot list (the option is CUDA 11.0+, or it fails): no list, no guess.
    out = ["nvcc=/x/nvcc", "root=/x", *NVCC_12_4, "--- list-gpu-arch",
           "nvcc fatal   : Unknown option '--list-gpu-arch'", "exit=1", "--- cublas"]
    tk = CudaToolkit().process(out)
    assert tk["arches"] is None and tk["cublas"] == [] and tk["version"] == (12, 4)


@pytest.mark.parametrize("caps, arches", [
    (["8.6"] * 6, ["86"]),
    (["12.0"], ["120"]),
    (["12.0", "8.6", "8.9", "8.6"], ["86", "89", "120"]),
    ([" 9.0 "], ["90"]),
])
def test_architectures_from_caps(caps, arches):
    assert architectures_from_caps(caps) == arches


@pytest.mark.parametrize("cap", ["[N/A]", "[Unknown Error]", "", "8"])
def test_architectures_refuse_unreadable_caps(cap):
    with pytest.raises(ValueError, match="compute capability"):
        architectures_from_caps(["8.6", cap])


def test_cuda_too_old():
    assert cuda_too_old(["86", "120"], (12, 4)) == [("120", "12.8")]
    assert cuda_too_old(["86", "120a-real"], (12, 4)) == [("120a-real", "12.8")]
    assert cuda_too_old(["86", "120"], (12, 8)) == []
    assert cuda_too_old(["121"], (12, 8)) == [("121", "12.9")]
    assert cuda_too_old(["86"], (11, 1)) == []


def test_engine_builds_fact():
    key1, key2 = "0123456789ab-0123456789", "aaaaaaaaaaaa-bbbbbbbbbb"
    out = ["current\t" + key1,
           f"build\t{key1}\t1700000000\t{SHA_B} 0123456789",
           f"build\t{key2}\t-\t",
           "build\tnot-a-build\t1700000000\tx"]
    assert EngineBuilds().process(out) == {
        "current": key1,
        "builds": {key1: {"stamp": f"{SHA_B} 0123456789", "mtime": 1700000000},
                   key2: {"stamp": None, "mtime": None}},
    }
    assert EngineBuilds().process(["current\t"])["current"] is None
    assert EngineBuilds().process(["current\t/abs/path/" + key2 + "/"])["current"] == key2
    assert EngineBuilds.default() == {"current": None, "builds": {}}


def test_build_key_is_commit12_and_flags_hash():
    flags = {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "86"}
    h = flags_hash(flags)
    assert len(h) == 10
    assert build_key(SHA_B, h) == f"0123456789ab-{h}"


# --- planning from facts ---------------------------------------------------------------------

def rig_for(engine: dict, **data):
    raw = {"gpu_count": 6, "engines": {"llama": {"kind": "llama.cpp", "remote": REMOTE,
                                                 **engine}}, **data}
    rig, errors = load_rig("garage", raw)
    assert errors == []
    return rig


# What CUDA 12.8's nvcc --list-gpu-arch prints (compute_50 ... compute_120).
ARCHES_12_8 = ["50", "52", "53", "60", "61", "62", "70", "72", "75", "80", "86", "87", "89",
               "90", "100", "101", "120"]


def toolkit_12_8(**changes):
    return {"nvcc": "/usr/local/cuda/bin/nvcc", "root": "/usr/local/cuda-12.8",
            "version": (12, 8), "release": "12.8.93", "arches": ARCHES_12_8,
            "cublas": ["/usr/local/cuda-12.8/lib64/libcublas.so",
                       "/usr/local/cuda-12.8/lib64/libcublas.so.12"], **changes}


class Facts:
    """Answers get_fact(cls, **kwargs) from a table keyed by fact class name."""

    def __init__(self, **table):
        self.table = {"Cpus": 16, "PinRecords": {}, "CudaToolkit": toolkit_12_8(),
                      "Arch": "x86_64", "CudaToolkitStamp": None, "CudaToolkitAt": None,
                      "GpuComputeCaps": {"caps": ["8.6"] * 6, "error": None},
                      "NvidiaDriver": {"version": "570.172.08", "error": None}, **table}
        self.asked: list[tuple[str, dict]] = []

    def __call__(self, cls, **kwargs):
        self.asked.append((cls.__name__, kwargs))
        value = self.table[cls.__name__]
        return copy.deepcopy(value(**kwargs) if callable(value) else value)


def refs(*lines):
    return {"refs": parse_ls_remote(lines), "error": None}


def test_plan_tag_with_auto_architectures():
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"))
    (plan,) = plan_builds(rig_for({"ref": "b8137"}), facts)
    assert plan.commit == SHA_B and plan.architectures == ("86",)
    flags = dict(plan.flags)
    assert flags["CMAKE_CUDA_ARCHITECTURES"] == "86" and flags["GGML_CUDA"] == "ON"
    assert plan.key == f"0123456789ab-{flags_hash(flags, '12.8.93')}"
    assert plan.cuda_toolkit == "12.8.93"
    assert plan.build_dir == f"/opt/llm-garage/builds/llama/{plan.key}"
    assert plan.source_dir == "/opt/llm-garage/src/llama"
    assert plan.jobs == 16 and plan.nvcc == "/usr/local/cuda/bin/nvcc"
    assert plan.fetch == ("+refs/tags/b8137:refs/tags/b8137", SHA_B)
    assert ("GitRemoteRefs", {"remote": REMOTE, "ref": "b8137"}) in facts.asked


def test_plan_blackwell_on_cuda_12_8_and_jobs_override():
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"),
                  GpuComputeCaps={"caps": ["12.0"], "error": None})
    (plan,) = plan_builds(rig_for({"ref": "b8137", "build_jobs": 3}, gpu_count=1), facts)
    assert plan.architectures == ("120",) and plan.jobs == 3
    assert "Cpus" not in [name for name, _ in facts.asked]


def test_plan_commit_pin_needs_no_remote_lookup():
    rig = rig_for({"kind": "ik_llama.cpp", "ref": SHA_B, "cuda_architectures": [86, 120]})
    facts = Facts()
    (plan,) = plan_builds(rig, facts)
    assert plan.commit == SHA_B and plan.kind == "ik_llama.cpp"
    assert plan.architectures == ("86", "120")
    assert [n for n, _ in facts.asked if n in ("GitRemoteRefs", "GpuComputeCaps")] == []
    assert plan.fetch == (SHA_B, "+refs/heads/*:refs/remotes/origin/*")


def test_plan_cpu_only_needs_no_cuda():
    rig = rig_for({"ref": "b8137", "cuda": False}, gpu_count=0)
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"), CudaToolkit=None,
                  GpuComputeCaps=None)
    (plan,) = plan_builds(rig, facts)
    assert plan.architectures == () and plan.nvcc is None
    assert dict(plan.flags)["GGML_CUDA"] == "OFF"
    assert "CMAKE_CUDA_ARCHITECTURES" not in dict(plan.flags)


def test_plan_follow_records_the_branch_head():
    rig = rig_for({"ref": "master", "follow": True})
    (plan,) = plan_builds(rig, Facts(GitRemoteRefs=refs(f"{SHA_A}\trefs/heads/master")))
    assert plan.commit == SHA_A
    assert fetch_specs(rig.engines["llama"], SHA_A)[0] == \
        "+refs/heads/master:refs/remotes/origin/master"


def test_plan_rpc_builds_rpc_server_too():
    rig = rig_for({"ref": "b8137", "rpc": True})
    (plan,) = plan_builds(rig, Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137")))
    assert plan.targets == ("llama-server", "rpc-server")
    assert dict(plan.flags)["GGML_RPC"] == "ON"


def problems_for(engine, facts, **data):
    with pytest.raises(EngineError) as err:
        plan_builds(rig_for(engine, **data), facts)
    text = str(err.value)
    assert text.startswith("host garage:") and "nothing was changed" in text
    return text


def test_unknown_tag_is_refused_with_the_fix():
    text = problems_for({"ref": "b9999"}, Facts(GitRemoteRefs=refs()))
    assert f"engines.llama (ref 'b9999'): no tag 'b9999' on {REMOTE}" in text
    assert "Fix: pin an existing tag" in text


def test_branch_as_pin_is_refused():
    text = problems_for({"ref": "master"},
                        Facts(GitRemoteRefs=refs(f"{SHA_A}\trefs/heads/master")))
    assert "'master' is a branch" in text and "follow: true" in text


def test_follow_on_a_tag_is_refused():
    text = problems_for({"ref": "b8137", "follow": True},
                        Facts(GitRemoteRefs=refs(f"{SHA_A}\trefs/tags/b8137")))
    assert "follow: true but 'b8137' is a tag" in text


def test_moved_tag_is_refused():
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"),
                  PinRecords={(REMOTE, "b8137"): SHA_A})
    text = problems_for({"ref": "b8137"}, facts)
    assert f"now points at {SHA_B}" in text and f"recorded {SHA_A}" in text
    assert "the tag moved" in text and "/opt/llm-garage/state/engine-pins" in text


def test_recorded_tag_that_did_not_move_is_fine():
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"),
                  PinRecords={(REMOTE, "b8137"): SHA_B, (REMOTE, "b1"): SHA_A})
    (plan,) = plan_builds(rig_for({"ref": "b8137"}), facts)
    assert plan.commit == SHA_B


def test_unreachable_remote_and_missing_git():
    text = problems_for({"ref": "b8137"}, Facts(GitRemoteRefs={
        "refs": {}, "error": "fatal: unable to connect"}))
    assert f"cannot read {REMOTE}: fatal: unable to connect" in text
    local = {"ref": "b8137", "remote": "/srv/git/llama.cpp"}  # a folder on the rig
    text = problems_for(local, Facts(GitRemoteRefs=None))
    assert "git is not installed on the rig, and /srv/git/llama.cpp cannot be read" in text


def test_a_rig_without_git_yet_has_its_pin_resolved_from_the_controller(tmp_path):
    """A fresh minimal rig gets git from the run's base packages, after planning."""
    repo = tmp_path / "repos" / "llama.cpp.git"
    work = tmp_path / "work"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for argv in (["git", "init", "-q", str(work)],
                 ["git", "-C", str(work), "commit", "-q", "--allow-empty", "-m", "one"],
                 ["git", "-C", str(work), "tag", "b8137"],
                 ["git", "clone", "-q", "--bare", str(work), str(repo)]):
        subprocess.run(argv, check=True, env=env, capture_output=True)
    commit = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    with serve_git(tmp_path / "repos", "127.0.0.1") as daemon:
        rig = rig_for({"ref": "b8137", "remote": daemon.url_for("llama.cpp.git"),
                       "cuda": False})
        (plan,) = plan_builds(rig, Facts(GitRemoteRefs=None))
        assert plan.commit == commit
        rig = rig_for({"ref": "b9999", "remote": daemon.url_for("llama.cpp.git"),
                       "cuda": False})
        with pytest.raises(EngineError, match="no tag 'b9999'"):
            plan_builds(rig, Facts(GitRemoteRefs=None))


def test_missing_nvcc_says_what_to_install():
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"), CudaToolkit=None)
    text = problems_for({"ref": "b8137"}, facts)
    assert "GGML_CUDA=ON needs nvcc" in text and "cuda-toolkit" in text
    assert "or set cuda: false" in text


def test_blackwell_needs_cuda_12_8_by_the_table_when_nvcc_cannot_list():
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"),
                  CudaToolkit=toolkit_12_8(version=(12, 4), release="12.4.131", arches=None),
                  GpuComputeCaps={"caps": ["12.0"], "error": None})
    text = problems_for({"ref": "b8137"}, facts, gpu_count=1)
    assert "architecture 120 needs CUDA >= 12.8, but /usr/local/cuda/bin/nvcc is CUDA 12.4" \
        in text
    assert "install CUDA 12.8 or newer" in text


@pytest.mark.parametrize("gpus, expected", [
    (None, "needs nvidia-smi, which is not installed"),
    ({"caps": [], "error": "NVIDIA-SMI has failed"}, "nvidia-smi failed: NVIDIA-SMI has failed"),
    ({"caps": [], "error": None}, "lists no GPUs"),
    ({"caps": ["8.6", "[N/A]"], "error": None}, "compute capability '[N/A]'"),
])
def test_auto_architectures_problems(gpus, expected):
    facts = Facts(GitRemoteRefs=refs(f"{SHA_B}\trefs/tags/b8137"), GpuComputeCaps=gpus)
    assert expected in problems_for({"ref": "b8137"}, facts)


def test_every_engine_problem_is_listed_at_once():
    raw = {"gpu_count": 1, "engines": {
        "a": {"kind": "llama.cpp", "ref": "b9999", "remote": REMOTE},
        "b": {"kind": "llama.cpp", "ref": "master", "remote": REMOTE, "cuda": False},
    }}
    rig, errors = load_rig("garage", raw)
    assert errors == []
    facts = Facts(GitRemoteRefs=lambda remote, ref: refs(f"{SHA_A}\trefs/heads/master"),
                  CudaToolkit=None)
    with pytest.raises(EngineError) as err:
        plan_builds(rig, facts)
    text = str(err.value)
    assert "3 engine problem(s)" in text
    assert "engines.a (ref 'b9999'): no tag" in text and "engines.a (ref 'b9999'): GGML_CUDA" \
        in text
    assert "engines.b (ref 'master'): 'master' is a branch" in text


# --- operations ------------------------------------------------------------------------------

def make_plan(**changes) -> BuildPlan:
    flags = {"CMAKE_BUILD_TYPE": "Release", "GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "86"}
    fields = dict(engine="llama", kind="llama.cpp", ref="b8137", commit=SHA_B, remote=REMOTE,
                  fetch=("+refs/tags/b8137:refs/tags/b8137", SHA_B),
                  source_dir="/opt/llm-garage/src/llama",
                  builds_dir="/opt/llm-garage/builds/llama", flags=tuple(flags.items()),
                  flags_hash=flags_hash(flags), architectures=("86",), jobs=16,
                  ccache_dir="/opt/llm-garage/ccache", ccache_base="/opt/llm-garage",
                  nvcc="/usr/local/cuda/bin/nvcc")
    fields.update(changes)
    return BuildPlan(**fields)


def builds(current=None, **stamps):
    return {"current": current,
            "builds": {k: {"stamp": s, "mtime": 1 if s else None} for k, s in stamps.items()}}


SCRIPT = "/opt/llm-garage/bin/garage-build"


def test_build_noop_when_stamped():
    plan = make_plan()
    facts = {"engine.EngineBuilds": builds(plan.key, **{plan.key: plan.stamp})}
    run = run_op(ops.build, facts, plan=plan, script=SCRIPT)
    assert run.commands == []
    assert run.noops == [f"llama 0123456789ab is already built in {plan.build_dir}"]


@pytest.mark.parametrize("existing", [{}, {"stamp": None}, {"stamp": f"{SHA_A} 0000000000"}])
def test_build_runs_when_not_stamped_for_this_commit_and_flags(existing):
    plan = make_plan()
    state = builds(None, **({plan.key: existing["stamp"]} if existing else {}))
    run = run_op(ops.build, {"engine.EngineBuilds": state}, plan=plan, script=SCRIPT)
    assert run.noops == []
    assert [type(c) for c in run.commands] == [FunctionCommand] * 3
    assert run.commands[1].function is ops._build
    argv = shlex.split(run.commands[1].args[0].get_raw_value())
    assert argv[0] == SCRIPT
    assert argv[argv.index("--build-dir") + 1] == plan.build_dir
    assert argv[argv.index("--stamp") + 1] == f"{SHA_B} {plan.flags_hash}"
    assert argv[argv.index("--jobs") + 1] == "16"
    assert argv[argv.index("--nvcc") + 1] == "/usr/local/cuda/bin/nvcc"
    assert argv[argv.index("--") + 1:] == ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON",
                                           "-DCMAKE_CUDA_ARCHITECTURES=86"]
    fetches = [argv[i + 1] for i, a in enumerate(argv) if a == "--fetch"]
    assert fetches == ["+refs/tags/b8137:refs/tags/b8137", SHA_B]


def test_build_command_quotes_odd_values():
    plan = make_plan(flags=(("CMAKE_C_FLAGS", "-O2 -g"),), nvcc=None)
    argv = shlex.split(build_command(plan, SCRIPT).get_raw_value())
    assert argv[-1] == "-DCMAKE_C_FLAGS=-O2 -g"
    assert "--nvcc" not in argv


def test_switch_noop_and_atomic_switch():
    key = make_plan().key
    run = run_op(ops.switch, {"engine.EngineBuilds": builds(key, **{key: "x"})},
                 builds_dir="/b", key=key)
    assert run.commands == [] and run.noops == [f"/b/current is already {key}"]
    run = run_op(ops.switch, {"engine.EngineBuilds": builds("old", **{key: "x"})},
                 builds_dir="/b", key=key)
    text = run.commands[0].get_raw_value()
    assert f"test -f /b/{key}/stamp ||" in text
    assert f"ln -sfn {key} /b/.current.tmp && mv -fT /b/.current.tmp /b/current" in text


def test_builds_to_prune_keeps_current_wanted_and_most_recent():
    state = {"current": "c", "builds": {
        "a": {"stamp": "s", "mtime": 10}, "b": {"stamp": "s", "mtime": 30},
        "c": {"stamp": "s", "mtime": 5}, "d": {"stamp": "s", "mtime": 20},
        "broken": {"stamp": None, "mtime": None}, "w": {"stamp": None, "mtime": None}}}
    # current c and wanted w stay; one more slot for the most recent (b).
    assert builds_to_prune(state, 3, "w") == ["a", "broken", "d"]
    assert builds_to_prune(state, 1, "w") == ["a", "b", "broken", "d"]  # never current
    state["current"] = "w"
    assert builds_to_prune(state, 3, "w") == ["a", "broken", "c"]


def test_prune_commands_and_noop():
    run = run_op(ops.prune, {"engine.EngineBuilds": builds("k1", k1="s", k2="s")},
                 builds_dir="/b", keep=3, wanted="k1")
    assert run.commands == [] and run.noops == ["2 build(s) in /b, keeping up to 3"]
    state = builds("k1", k1="s", k2="s", k3=None)
    run = run_op(ops.prune, {"engine.EngineBuilds": state}, builds_dir="/b", keep=1,
                 wanted="k1")
    assert run.raw == ["rm -rf /b/k2", "rm -rf /b/k3"]


def test_record_pin():
    path = "/opt/llm-garage/state/engine-pins"
    run = run_op(ops.record_pin, {"engine.PinRecords": {(REMOTE, "b8137"): SHA_B}},
                 path=path, remote=REMOTE, tag="b8137", commit=SHA_B)
    assert run.commands == []
    assert run.noops == [f"tag b8137 of {REMOTE} is recorded as 0123456789ab"]
    run = run_op(ops.record_pin, {"engine.PinRecords": {}}, path=path, remote=REMOTE,
                 tag="b8137", commit=SHA_B)
    assert shlex.split(run.commands[0].get_raw_value()) == [
        "printf", "%s\\n", f"b8137\t{SHA_B}\t{REMOTE}", ">>", path]
    assert rig_for({"ref": "b8137"}).layout.engine_pins == path


def test_parse_stamp():
    stamp = parse_stamp([f"{SHA_B} 0123456789", "seconds=75", "ccache_hits=9",
                         "ccache_misses=1", "cmake_args=-DA=1 -DB=x=y"])
    assert stamp["built"] == f"{SHA_B} 0123456789"
    assert stamp["seconds"] == "75" and stamp["cmake_args"] == "-DA=1 -DB=x=y"
    assert ops.hit_rate(9, 1) == "ccache hits 9/10 (90 %)"


def test_cpus_fact_is_pyinfras():
    assert Cpus().process(["16"]) == 16


def test_build_streams_the_script_output_with_the_progress_settings(monkeypatch):
    monkeypatch.setenv("GARAGE_PROGRESS_INTERVAL", "5")
    monkeypatch.setenv("GARAGE_PROGRESS", "off")
    monkeypatch.delenv("GARAGE_PROGRESS_STEP", raising=False)
    fake = ShellHost(global_args={"_sudo": True, "_env": {"LANG": "C"}, "_ignore_errors": False})
    command = build_command(make_plan(), SCRIPT)
    assert ops._build(None, fake, command) is True
    [(raw, kwargs)] = fake.calls
    assert raw == command.get_raw_value()
    assert kwargs["print_output"] is True and kwargs["_sudo"] is True
    assert kwargs["_env"] == {"LANG": "C", "GARAGE_PROGRESS_INTERVAL": "5",
                              "GARAGE_PROGRESS": "off"}
    assert "_ignore_errors" not in kwargs  # not a connector argument
