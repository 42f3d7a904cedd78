"""The settings model: every cross-check with its exact message, defaults, derived values."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from llm_garage.settings import Profile, flags_hash, load_rig

REPO = Path(__file__).resolve().parents[2]
SHA = "8337e4cd3861406fc04e0854b1409cd1b027fbc9"

BASE = {
    "ssh_hostname": "10.0.0.5",
    "gpu_count": 2,
    "engines": {"llama": {"kind": "llama.cpp", "ref": "b8137"}},
    "models": {"m": {"repo": "unsloth/X-GGUF", "revision": "main", "quant": "Q4_K_M"}},
    "profiles": {"p": {"model": "m", "engine": "llama", "port": 8000}},
}


def rig_with(**changes):
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = value
    return load_rig("rig1", raw)


DELETE = object()


def messages(**changes):
    _, errors = rig_with(**changes)
    return [str(e) for e in errors]


def test_valid_settings_have_no_errors_and_defaults():
    rig, errors = rig_with()
    assert errors == []
    assert rig.data.garage_root == "/opt/llm-garage"
    assert rig.engines["llama"].cuda is True and rig.engines["llama"].keep_builds == 3
    assert rig.address == "10.0.0.5"
    assert rig.alias("p") == "p"
    assert rig.layout.model_dir("m") == "/srv/models/m"


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {"profiles__p__tensor_split": [0.9, 1, 1]},
            "host 'rig1': profiles.p.tensor_split: 3 values but gpu_count gives 2 GPUs "
            "(accepted: exactly one value per GPU)",
        ),
        (
            {"profiles__q": {"model": "m", "engine": "llama", "port": 8000}},
            "host 'rig1': profiles.q.port: port 8000 is already used by enabled profile 'p' "
            "(accepted: a free port, or enabled: false)",
        ),
        (
            {"profiles__p__model": "nope"},
            "host 'rig1': profiles.p.model: unknown model 'nope' (accepted: m)",
        ),
        (
            {"profiles__p__engine": "ik"},
            "host 'rig1': profiles.p.engine: unknown engine 'ik' (accepted: llama)",
        ),
        (
            {"gpu_power_limit_w": -5},
            "host 'rig1': gpu_power_limit_w: -5 is not valid "
            "(accepted: a positive number of watts, or a list of them)",
        ),
        (
            {"gpu_power_limit_w": [300, 300, 300]},
            "host 'rig1': gpu_power_limit_w: 3 values for gpu_count 2 "
            "(accepted: one value for all GPUs, or exactly one per GPU)",
        ),
        (
            {"engines__ik": {"kind": "ik_llama.cpp", "ref": "b8137"}},
            "host 'rig1': engines.ik.ref: 'b8137' is not a commit: ik_llama.cpp has no release "
            "tags, so pin it by full commit SHA (accepted: a 40-character commit SHA, or "
            "follow: true with a branch name)",
        ),
        (
            {"engines__llama__ref": DELETE},
            "host 'rig1': engines.llama.ref: is required: the pin: a tag such as b8137 or a full "
            "40-character commit SHA (ik_llama.cpp has no release tags: commit only)",
        ),
        (
            {"models__m__revision": DELETE},
            "host 'rig1': models.m.revision: is required: the pin: commit SHA, tag or branch; "
            "the lock file records the commit it resolved to",
        ),
        (
            {"gpu_cont": 3},
            "host 'rig1': gpu_cont: unknown setting (did you mean 'gpu_count'?)",
        ),
        (
            {"profiles__p__ctx": 4096},
            "host 'rig1': profiles.p.ctx: unknown setting (did you mean 'ctx_size'?)",
        ),
        (
            {"engines__llama__ref": "abc1234"},
            "host 'rig1': engines.llama.ref: 'abc1234' looks like a short commit SHA "
            "(accepted: the full 40-character SHA)",
        ),
        (
            {"engines__llama__follow": True, "engines__llama__ref": SHA},
            "host 'rig1': engines.llama.follow: follow: true needs a branch name in ref, not a "
            "commit (accepted: a branch such as master or main)",
        ),
        (
            {"engines__llama__cmake_extra": {"GGML_CUDA": "OFF"}},
            "host 'rig1': engines.llama.cmake_extra.GGML_CUDA: is set by its own setting "
            "(accepted: engines.llama.cuda)",
        ),
        (
            {"gpu_count": 0},
            "host 'rig1': engines.llama.cuda_architectures: 'auto' needs the rig's GPUs but "
            "gpu_count is 0 (accepted: set gpu_count, list architectures such as [86], or "
            "cuda: false)",
        ),
        (
            {"models__m__files": ["a.gguf"]},
            "host 'rig1': models.m: name the files with exactly one of quant, include or files "
            "(got quant, files) (accepted: quant: UD-Q6_K_XL | include: 'dir/*.gguf' | "
            "files: [path, ...])",
        ),
        (
            {"profiles__p__port": 70000},
            "host 'rig1': profiles.p.port: 70000 is out of range "
            "(accepted: a whole number from 1 to 65535)",
        ),
        (
            {"profiles__p__cpu_moe": True, "profiles__p__n_cpu_moe": 10},
            "host 'rig1': profiles.p.n_cpu_moe: cannot be combined with cpu_moe "
            "(accepted: cpu_moe: true (all layers) or n_cpu_moe: N)",
        ),
        (
            {"profiles__p__cache_type_k": "q9"},
            "host 'rig1': profiles.p.cache_type_k: 'q9' is not one of the choices (accepted: "
            "'f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_1', 'iq4_nl', 'q5_0', 'q5_1', 'q6_0')",
        ),
        (
            {"profiles__p__split_mode": "graph"},
            "host 'rig1': profiles.p.split_mode: 'graph' is not a split mode of llama.cpp "
            "(accepted: none, layer, row)",
        ),
        (
            {"profiles__p__api_key_env": "GARAGE_TEST_UNSET_KEY"},
            "host 'rig1': profiles.p.api_key_env: environment variable GARAGE_TEST_UNSET_KEY is "
            "not set where pyinfra runs (accepted: export GARAGE_TEST_UNSET_KEY=<key> before "
            "the run)",
        ),
        (
            {"engines__llama__cuda_architectures": ["sm_86"]},
            "host 'rig1': engines.llama.cuda_architectures: item 0: 'sm_86' is not a CUDA "
            "architecture (accepted: e.g. 86, 89, 120, '120a-real')",
        ),
        (
            {"models__m__repo": "justaname"},
            "host 'rig1': models.m.repo: 'justaname' is not valid (accepted: owner/name)",
        ),
        (
            {"gpu_persistence_mode": "yes"},
            "host 'rig1': gpu_persistence_mode: expected true or false, got 'yes' "
            "(accepted: true, false)",
        ),
    ],
)
def test_each_problem_gets_one_clear_message(changes, expected, monkeypatch):
    monkeypatch.delenv("GARAGE_TEST_UNSET_KEY", raising=False)
    assert messages(**changes) == [expected]


def test_tensor_split_counts_visible_devices_when_set():
    assert messages(profiles__p__tensor_split=[1, 1, 1],
                    profiles__p__cuda_visible_devices=[0, 1, 2]) == []
    assert messages(profiles__p__tensor_split="0.9,1") == []


def test_disabled_profiles_may_share_a_port():
    assert messages(profiles__q={"model": "m", "engine": "llama", "port": 8000,
                                 "enabled": False}) == []


def test_pyinfra_keys_pass_and_all_problems_are_reported_together():
    errors = messages(ssh_user="root", _sudo=True, gpu_cont=1, profiles__p__prot=1)
    assert len(errors) == 2


def test_ik_pinned_by_commit_is_valid():
    assert messages(engines__ik={"kind": "ik_llama.cpp", "ref": SHA}) == []


def test_same_alias_on_two_rigs_is_allowed(tmp_path):
    # opencode gets one provider per endpoint, so model ids never collide across rigs.
    host = ("{'gpu_count': 0, 'engines': {'e': {'kind': 'llama.cpp', 'ref': 'b1', 'cuda': False}},"
            " 'models': {'m': {'repo': 'a/b', 'revision': 'main', 'quant': 'Q4'}},"
            " 'profiles': {'p': {'model': 'm', 'engine': 'e', 'port': 8000, 'alias': 'same'}}}")
    inventory = tmp_path / "two.py"
    inventory.write_text(f"rigs = [('r1', {host}), ('r2', {host})]\n")
    result = subprocess.run(
        [sys.executable, "-m", "llm_garage.cli", "check", str(inventory)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "2 rig(s) valid" in result.stdout


def test_server_args_follow_the_profile_in_a_stable_order():
    rig, errors = rig_with(profiles__p={
        "model": "m", "engine": "llama", "port": 8000, "alias": "qwen", "ctx_size": 262144,
        "n_gpu_layers": 999, "cache_type_k": "q8_0", "cache_type_v": "q8_0",
        "split_mode": "layer", "tensor_split": [0.9, 1], "parallel": 1, "no_warmup": True,
        "jinja": True, "temp": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
        "override_tensor": ["blk\\.(2[0-9])\\.ffn_.*_exps=CPU"], "extra_args": ["--metrics"],
    })
    assert errors == []
    assert rig.server_args("p", "/srv/models/m/a b.gguf") == [
        "-m", "/srv/models/m/a b.gguf", "--host", "0.0.0.0", "--port", "8000",
        "--alias", "qwen", "-c", "262144", "-ngl", "999", "-ctk", "q8_0", "-ctv", "q8_0",
        "--split-mode", "layer", "-ts", "0.9,1", "--parallel", "1",
        "-ot", "blk\\.(2[0-9])\\.ffn_.*_exps=CPU", "--jinja", "--no-warmup",
        "--temp", "0.6", "--top-p", "0.95", "--top-k", "20", "--min-p", "0.0", "--metrics",
    ]


def test_every_profile_flag_field_is_emitted():
    flagged = [f for f in Profile.__dataclass_fields__.values() if f.metadata.get("flag")]
    assert len(flagged) >= 20


def test_cmake_flags_and_their_hash():
    rig, _ = rig_with()
    flags = rig.engines["llama"].cmake_flags(["86"])
    assert flags["GGML_CUDA"] == "ON"
    assert flags["GGML_CUDA_FA_ALL_QUANTS"] == "ON"
    assert flags["BUILD_SHARED_LIBS"] == "OFF"
    assert flags["CMAKE_BUILD_TYPE"] == "Release"
    assert flags["CMAKE_CUDA_ARCHITECTURES"] == "86"
    assert flags_hash(flags) != flags_hash(rig.engines["llama"].cmake_flags(["120"]))


def test_example_inventory_passes_validation():
    result = subprocess.run(
        [sys.executable, "-m", "llm_garage.cli", "check", "inventory/garage.py"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "2 rig(s) valid" in result.stdout
    assert "-ts 0.9,1,1,1,1,1" in result.stdout
    assert "--cpu-moe" in result.stdout


def test_check_names_host_setting_and_fix(tmp_path):
    inventory = tmp_path / "bad.py"
    inventory.write_text(
        "rigs = [('r1', {'gpu_count': 2, 'engines': {'e': {'kind': 'llama.cpp', 'ref': 'b1'}},"
        " 'models': {'m': {'repo': 'a/b', 'revision': 'main', 'quant': 'Q4'}},"
        " 'profiles': {'p': {'model': 'm', 'engine': 'e', 'port': 1, 'tensor_split': [1]}}})]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "llm_garage.cli", "check", str(inventory)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "host 'r1': profiles.p.tensor_split: 1 values but gpu_count gives 2 GPUs" in (
        result.stderr)
    assert "nothing was changed on any host" in result.stderr
