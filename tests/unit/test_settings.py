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
        (
            {"engines__llama__remote": "--upload-pack=touch /tmp/x"},
            "host 'rig1': engines.llama.remote: '--upload-pack=touch /tmp/x' starts with '-' "
            "and would reach git as an option (accepted: a URL (https://, http://, git://, "
            "ssh://, file://), user@host:path or an absolute path)",
        ),
        (
            {"engines__llama__remote": "github.com/ggml-org/llama.cpp"},
            "host 'rig1': engines.llama.remote: 'github.com/ggml-org/llama.cpp' is not a git "
            "URL or absolute path (accepted: a URL (https://, http://, git://, ssh://, "
            "file://), user@host:path or an absolute path)",
        ),
        (
            {"engines__llama__remote": "ftp://mirror/llama.cpp.git"},
            "host 'rig1': engines.llama.remote: 'ftp://mirror/llama.cpp.git' is not a git "
            "URL or absolute path (accepted: a URL (https://, http://, git://, ssh://, "
            "file://), user@host:path or an absolute path)",
        ),
        (
            {"profiles__p__ctx_size": 4096, "profiles__p__extra_args": ["-c", "8192"]},
            "host 'rig1': profiles.p.extra_args: '-c' is set by its own setting "
            "(accepted: profiles.p.ctx_size)",
        ),
        (
            {"profiles__p__extra_args": ["--metrics", "--ctx-size=8192"]},
            "host 'rig1': profiles.p.extra_args: '--ctx-size=8192' is set by its own setting "
            "(accepted: profiles.p.ctx_size)",
        ),
        (
            {"profiles__p__extra_args": ["--port=9000"]},
            "host 'rig1': profiles.p.extra_args: '--port=9000' is set by its own setting "
            "(accepted: profiles.p.port)",
        ),
        (
            {"profiles__p__extra_args": ["--gpu-layers", "99"]},
            "host 'rig1': profiles.p.extra_args: '--gpu-layers' is set by its own setting "
            "(accepted: profiles.p.n_gpu_layers)",
        ),
        (
            {"profiles__p__extra_args": ["--api-key-file", "/k"]},
            "host 'rig1': profiles.p.extra_args: '--api-key-file' is set by its own setting "
            "(accepted: profiles.p.api_key_env)",
        ),
        (
            {"profiles__p__extra_args": ["--no-jinja"]},
            "host 'rig1': profiles.p.extra_args: '--no-jinja' is set by its own setting "
            "(accepted: profiles.p.jinja)",
        ),
        (
            {"profiles__p__extra_args": ["-a", "other"]},
            "host 'rig1': profiles.p.extra_args: '-a' is set by its own setting "
            "(accepted: profiles.p.alias)",
        ),
        (
            {"profiles__p__cuda_visible_devices": [0, 2]},
            "host 'rig1': profiles.p.cuda_visible_devices: GPU index 2 is out of range for "
            "gpu_count 2 (accepted: indices 0 to 1)",
        ),
        (
            {"profiles__p__cuda_visible_devices": "1,1"},
            "host 'rig1': profiles.p.cuda_visible_devices: GPU 1 is listed twice "
            "(accepted: each GPU once)",
        ),
        (
            {"gpu_count": 0, "engines__llama__cuda": False,
             "profiles__p__cuda_visible_devices": [0]},
            "host 'rig1': profiles.p.cuda_visible_devices: GPU index 0 is out of range for "
            "gpu_count 0 (accepted: set gpu_count to the rig's GPUs)",
        ),
        (
            {"profiles__p__listen": "0.0.0.0.0"},
            "host 'rig1': profiles.p.listen: '0.0.0.0.0' is not an IP address (accepted: an "
            "IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::, or localhost)",
        ),
        (
            {"profiles__p__listen": "rig1.lan"},
            "host 'rig1': profiles.p.listen: 'rig1.lan' is not an IP address (accepted: an "
            "IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::, or localhost)",
        ),
        (
            {"profiles__p__temp": float("nan")},
            "host 'rig1': profiles.p.temp: nan is not a finite number (accepted: a number "
            "from 0)",
        ),
        (
            {"profiles__p__tensor_split": [1, float("inf")]},
            "host 'rig1': profiles.p.tensor_split: item 1: inf is not a finite number "
            "(accepted: a number from 0)",
        ),
        (
            {"profiles__p__top_p": float("-inf")},
            "host 'rig1': profiles.p.top_p: -inf is not a finite number (accepted: a number "
            "from 0 to 1)",
        ),
        (
            {"gpu_power_limit_w": float("inf")},
            "host 'rig1': gpu_power_limit_w: inf is not valid "
            "(accepted: a positive number of watts, or a list of them)",
        ),
        (
            {"profiles__p__environment": {"GGML_X": float("nan")}},
            "host 'rig1': profiles.p.environment: GGML_X: nan is not a finite number "
            "(accepted: ON/OFF, true/false, a number or text)",
        ),
        (
            {"engines__ik": {"kind": "ik_llama.cpp", "ref": SHA}, "profiles__p__engine": "ik",
             "profiles__p__n_gpu_layers": "all"},
            "host 'rig1': profiles.p.n_gpu_layers: 'all' is not a number, and ik_llama.cpp's "
            "-ngl takes only a number (accepted: a whole number of layers, e.g. 999 for all)",
        ),
        (
            {"profiles__p__cache_type_v": "q6_0", "profiles__p__flash_attn": "on"},
            "host 'rig1': profiles.p.cache_type_v: 'q6_0' is a KV cache type of ik_llama.cpp "
            "only (accepted: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1)",
        ),
        (
            {"profiles__p__cache_type_v": "q8_0", "profiles__p__flash_attn": "off"},
            "host 'rig1': profiles.p.cache_type_v: a quantized V cache ('q8_0') needs flash "
            "attention, but flash_attn is 'off' (accepted: flash_attn: 'on' or 'auto', or "
            "cache_type_v: f16, bf16 or f32)",
        ),
    ],
)
def test_each_problem_gets_one_clear_message(changes, expected, monkeypatch):
    monkeypatch.delenv("GARAGE_TEST_UNSET_KEY", raising=False)
    assert messages(**changes) == [expected]


def test_tensor_split_counts_visible_devices_when_set():
    assert messages(gpu_count=4, profiles__p__tensor_split=[1, 1, 1],
                    profiles__p__cuda_visible_devices=[0, 1, 3]) == []
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


EVERY_FLAG = {
    "model": "m", "engine": "llama", "port": 8000, "alias": "qwen", "ctx_size": 8192,
    "n_gpu_layers": 99, "cache_type_k": "q8_0", "cache_type_v": "q8_0", "split_mode": "layer",
    "tensor_split": [1, 1], "parallel": 2, "flash_attn": "on", "n_cpu_moe": 3,
    "override_tensor": ["exps=CPU"], "threads": 4, "threads_batch": 8, "batch_size": 512,
    "ubatch_size": 256, "no_mmap": True, "mlock": True, "jinja": True, "no_warmup": True,
    "temp": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "repeat_penalty": 1.1,
}


def test_extra_args_may_repeat_no_flag_the_settings_write():
    # Every flag server_args writes, for a profile setting all of them, is refused in
    # extra_args, alone and in its --flag=value form.
    rig, errors = rig_with(profiles__p=EVERY_FLAG)
    assert errors == []
    written = [a for a in rig.server_args("p", "/srv/models/m/x.gguf")
               if a.startswith("-") and not a[1:2].isdigit()]
    written.append("--cpu-moe")  # set alone: cpu_moe excludes n_cpu_moe
    assert len(written) >= 28
    for flag in written:
        for item in (flag, f"{flag}=1"):
            errors = messages(profiles__p__extra_args=[item])
            assert len(errors) == 1 and f"extra_args: {item!r} is set by its own setting" in (
                errors[0]), item
    assert messages(profiles__p__extra_args=["--metrics", "--chat-template", "chatml",
                                             "--rope-scaling", "yarn", "-lv", "3"]) == []


def test_jinja_follows_each_engine_default():
    ik = {"kind": "ik_llama.cpp", "ref": SHA}

    def jinja_args(engine, jinja):
        changes = {"engines__ik": ik, "profiles__p__engine": engine}
        if jinja is not None:
            changes["profiles__p__jinja"] = jinja
        rig, errors = rig_with(**changes)
        assert errors == []
        return [a for a in rig.server_args("p", "/m.gguf") if "jinja" in a]

    assert jinja_args("llama", True) == ["--jinja"]
    assert jinja_args("llama", False) == ["--no-jinja"]
    assert jinja_args("llama", None) == []
    assert jinja_args("ik", True) == ["--jinja"]
    assert jinja_args("ik", False) == []
    assert jinja_args("ik", None) == []


def test_engine_aware_values_that_are_valid():
    ik = {"kind": "ik_llama.cpp", "ref": SHA}
    assert messages(engines__ik=ik, profiles__p__engine="ik", profiles__p__n_gpu_layers=999,
                    profiles__p__cache_type_k="q6_0", profiles__p__cache_type_v="q6_0") == []
    assert messages(profiles__p__n_gpu_layers="auto") == []
    for fa in (None, "on", "auto"):
        changes = {"profiles__p__cache_type_v": "q4_0"}
        if fa:
            changes["profiles__p__flash_attn"] = fa
        assert messages(**changes) == [], fa
    assert messages(profiles__p__cache_type_v="bf16", profiles__p__flash_attn="off") == []


@pytest.mark.parametrize("remote", [
    "https://github.com/ggml-org/llama.cpp.git", "http://10.0.0.2/llama.cpp.git",
    "git://10.0.0.2:9418/llama.cpp", "ssh://git@host:2222/llama.cpp.git",
    "file:///srv/git/llama.cpp", "git@github.com:ggml-org/llama.cpp.git",
    "/srv/git/llama.cpp.git",
])
def test_git_remotes_that_are_accepted(remote):
    rig, errors = rig_with(engines__llama__remote=remote)
    assert errors == [] and rig.engines["llama"].git_remote == remote


@pytest.mark.parametrize("listen, stored", [
    ("0.0.0.0", "0.0.0.0"), ("127.0.0.1", "127.0.0.1"), ("::", "::"),
    ("0:0::1", "::1"), ("fd00::7", "fd00::7"), ("localhost", "localhost"),
])
def test_listen_addresses_that_are_accepted(listen, stored):
    rig, errors = rig_with(profiles__p__listen=listen)
    assert errors == [] and rig.profiles["p"].listen == stored


def test_visible_devices_by_index_and_uuid():
    uuid = "GPU-8a1c5b3e-0000-4f00-9000-123456789abc"
    rig, errors = rig_with(profiles__p__cuda_visible_devices=["1", 0])
    assert errors == [] and rig.profiles["p"].cuda_visible_devices == ["1", "0"]
    assert messages(profiles__p__cuda_visible_devices=[uuid, 1]) == []
    assert messages(profiles__p__cuda_visible_devices=["01", 1]) == [
        "host 'rig1': profiles.p.cuda_visible_devices: GPU 1 is listed twice "
        "(accepted: each GPU once)"]
    assert messages(profiles__p__cuda_visible_devices=[uuid, uuid]) == [
        f"host 'rig1': profiles.p.cuda_visible_devices: GPU {uuid} is listed twice "
        "(accepted: each GPU once)"]


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
