"""The fixture engine repository: history and tags like upstream's, a CMake build with
upstream's interface, and a llama-server with upstream's command line and HTTP surface."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from lab.serving import make_engine_repo
from lab.standins.engine_repo import (
    FAULTS,
    GitDaemon,
    add_fault_tag,
    build_engine_repo,
    cmake_build,
    serve_git,
)
from lab.standins.gguf_gen import CHATML_TEMPLATE, write_split_model, write_tiny_model
from lab.standins.gpu import fake_gpu_files

# Small sources keep these builds to seconds; the default size is for ccache measurements.
LIGHT = {"n_units": 4, "unit_weight": 4}
# This machine may have a CUDA toolkit in /usr/local; the tests decide which nvcc is visible.
NO_HOST_CUDA = "-DCMAKE_IGNORE_PATH=/usr/local/bin;/usr/local/cuda/bin;/usr/local/cuda-13.0/bin"
BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def git(cwd, *args, check=True):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def repos(tmp_path_factory):
    base = tmp_path_factory.mktemp("engine-repos")
    return {
        "llama.cpp": build_engine_repo(base, "llama.cpp", **LIGHT),
        "ik_llama.cpp": build_engine_repo(base, "ik_llama.cpp", **LIGHT),
        "base": base,
    }


@pytest.fixture(scope="session")
def daemon(repos):
    with serve_git(repos["base"], "127.0.0.1") as d:
        yield d


def clone(repo, dest, *extra):
    subprocess.run(["git", "clone", "-q", *extra, str(repo.path), str(dest)], check=True)
    return dest


@pytest.fixture(scope="session", autouse=True)
def private_ccache(tmp_path_factory):
    """Builds here share one ccache of their own; with base_dir set, clones at different paths
    reuse each other's objects."""
    base = tmp_path_factory.getbasetemp()
    saved = {k: os.environ.get(k) for k in ("CCACHE_DIR", "CCACHE_BASEDIR")}
    os.environ["CCACHE_DIR"] = str(base / "ccache")
    os.environ["CCACHE_BASEDIR"] = str(base)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def cpu_build(repos, tmp_path_factory):
    """llama.cpp flavour, CPU only, built once."""
    root = tmp_path_factory.mktemp("cpu-build")
    src = clone(repos["llama.cpp"], root / "src")
    configure, build = cmake_build(src, root / "build", ["-DLLAMA_OPENSSL=OFF",
                                                         "-DSTALE_FLAG=ON"])
    assert configure.returncode == 0, configure.stderr
    assert build is not None and build.returncode == 0, build.stdout + build.stderr
    return {"src": src, "bin": root / "build/bin/llama-server", "configure": configure}


@pytest.fixture
def rig_root(tmp_path):
    """Fake GPU files under a temporary root, as fake_gpu_files would place them on a rig."""

    def make(model="rtx3090", count=2, cuda="12.8"):
        for path, (content, mode) in fake_gpu_files(model, count, cuda).items():
            target = tmp_path / "rig" / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
        return tmp_path / "rig"

    return make


def cuda_env(root, with_smi):
    path = f"{root}/usr/bin:{BASE_PATH}" if with_smi else BASE_PATH
    return dict(os.environ, FAKE_NVIDIA_ROOT=str(root), PATH=path)


def configure(src, build_dir, *args, env=None):
    return subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DLLAMA_OPENSSL=OFF",
                           *args], capture_output=True, text=True, env=env or os.environ,
                          timeout=300)


# --------------------------------------------------------------------------- repository


def test_fixture_engine_history_and_tags(repos):
    repo = repos["llama.cpp"]
    assert repo.default_branch == "master" and len(repo.commits) == 36
    assert git(repo.path, "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/master"
    for tag, sha in repo.tags.items():
        count = git(repo.path, "rev-list", "--count", sha).stdout.strip()
        assert tag == f"b{count}"
        assert git(repo.path, "rev-parse", f"{tag}^{{commit}}").stdout.strip() == sha
        assert git(repo.path, "cat-file", "-t", tag).stdout.strip() == "commit"  # lightweight
    assert repo.broken_tag == f"b{repo.build_number(repo.broken_commit)}"
    assert repo.fixed_tag == f"b{repo.build_number(repo.broken_commit) + 1}"
    assert repo.tags[repo.broken_tag] == repo.broken_commit
    assert repo.tag_for(repo.head) == "b36"
    ik = repos["ik_llama.cpp"]
    assert ik.default_branch == "main" and ik.tags == {} and ik.broken_tag is None
    assert git(ik.path, "tag").stdout == ""


def test_fixture_engine_history_is_deterministic(repos, tmp_path):
    again = build_engine_repo(tmp_path, "llama.cpp", **LIGHT)
    assert again.commits == repos["llama.cpp"].commits
    assert again.tags == repos["llama.cpp"].tags


def test_fixture_engine_git_daemon_fetch_by_tag_and_sha(repos, daemon, tmp_path):
    repo = repos["llama.cpp"]
    url = daemon.url_for(repo.name)
    assert url.startswith("git://127.0.0.1:")
    work = tmp_path / "w"
    work.mkdir()
    git(work, "init", "-q")
    git(work, "remote", "add", "origin", url)
    git(work, "fetch", "-q", "--depth=1", "origin", "b12")
    assert git(work, "rev-parse", "FETCH_HEAD").stdout.strip() == repo.tags["b12"]
    git(work, "fetch", "-q", "origin", repo.commits[3])
    assert git(work, "rev-parse", "FETCH_HEAD").stdout.strip() == repo.commits[3]
    git(work, "checkout", "-q", "FETCH_HEAD")
    ls = git(work, "ls-remote", "origin").stdout
    assert f"{repo.tags['b36']}\trefs/tags/b36" in ls
    ik = repos["ik_llama.cpp"]
    full = tmp_path / "ik"
    subprocess.run(["git", "clone", "-q", daemon.url_for(ik.name), str(full)], check=True)
    assert git(full, "rev-list", "--count", "HEAD").stdout.strip() == "36"


def test_fixture_engine_git_daemon_takes_another_port_when_its_own_is_taken(repos, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers on it
        taken = holder.getsockname()[1]
        d = GitDaemon(repos["base"], "127.0.0.1")
        d.port = taken  # as if another process had bound it after the daemon picked it
        d.start()
        try:
            assert d.port != taken
            assert git(tmp_path, "ls-remote", d.url_for("llama.cpp.git")).returncode == 0
        finally:
            d.stop()
        fixed = GitDaemon(repos["base"], "127.0.0.1", port=taken)  # a port asked for: no retry
        with pytest.raises(RuntimeError, match="Address already in use"):
            fixed.start()


def test_fixture_engine_git_daemon_stops(repos, tmp_path):
    d = serve_git(repos["base"], "127.0.0.1")
    url = d.url_for("llama.cpp.git")
    assert git(tmp_path, "ls-remote", url).returncode == 0
    d.stop()
    assert git(tmp_path, "ls-remote", url, check=False).returncode != 0


# --------------------------------------------------------------------------- CPU build


def test_fixture_engine_version_output(cpu_build, repos):
    repo = repos["llama.cpp"]
    r = subprocess.run([str(cpu_build["bin"]), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0] == f"version: 36 ({repo.short(repo.head)})"
    assert re.fullmatch(r"built with .+ for x86_64-linux-gnu", lines[1])


def test_fixture_engine_warns_on_unknown_cmake_flag(cpu_build):
    err = cpu_build["configure"].stderr
    assert "Manually-specified variables were not used by the project" in err
    assert "STALE_FLAG" in err


def test_fixture_engine_build_info_json(cpu_build):
    r = subprocess.run([str(cpu_build["bin"]), "--fixture-build-info"], capture_output=True,
                       text=True)
    info = json.loads(r.stdout)
    assert info["flavour"] == "llama.cpp" and info["build_number"] == 36
    assert info["options"]["GGML_CUDA"] == "OFF"
    assert info["options"]["BUILD_SHARED_LIBS"] == "ON"
    assert info["options"]["CMAKE_BUILD_TYPE"] == "Release"
    assert info["cuda"] is None
    assert "STALE_FLAG" not in info["options"]


def test_fixture_engine_shallow_clone_reports_build_number_one(repos, tmp_path):
    repo = repos["llama.cpp"]
    src = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth=1", "--branch", "b30",
                    f"file://{repo.path}", str(src)], check=True)
    r = configure(src, tmp_path / "build")
    assert r.returncode == 0, r.stderr
    info = (tmp_path / "build/common/build-info.cpp").read_text()
    assert "int LLAMA_BUILD_NUMBER = 1;" in info
    assert f'LLAMA_COMMIT = "{repo.short(repo.tags["b30"])}"' in info


def test_fixture_engine_broken_tag_fails_to_compile(repos, tmp_path):
    repo = repos["llama.cpp"]
    src = clone(repo, tmp_path / "src")
    git(src, "checkout", "-q", repo.broken_tag)
    _, build = cmake_build(src, tmp_path / "build", ["-DLLAMA_OPENSSL=OFF"])
    assert build is not None and build.returncode != 0
    assert "was not declared in this scope" in build.stdout + build.stderr


def test_fixture_engine_ccache_launcher(cpu_build, repos, tmp_path):
    # The session cache already holds these objects (cpu_build, same layout under base_dir):
    # a fresh clone built through explicit launchers must hit it.
    src = clone(repos["llama.cpp"], tmp_path / "src")
    subprocess.run(["ccache", "--zero-stats"], check=True, capture_output=True)
    _, build = cmake_build(src, tmp_path / "build", [
        "-DLLAMA_OPENSSL=OFF", "-DCMAKE_C_COMPILER_LAUNCHER=ccache",
        "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"])
    assert build is not None and build.returncode == 0, build.stderr
    stats = subprocess.run(["ccache", "--print-stats"], capture_output=True, text=True).stdout
    counters = dict(line.split("\t", 1) for line in stats.splitlines() if "\t" in line)
    assert int(counters.get("direct_cache_hit", 0)) >= 10
    # Only the generated build-info source differs (it records the source path and launcher).
    assert int(counters.get("cache_miss", 0)) <= 1
    info = json.loads(subprocess.run([str(tmp_path / "build/bin/llama-server"),
                                      "--fixture-build-info"], capture_output=True,
                                     text=True).stdout)
    assert info["options"]["CMAKE_CXX_COMPILER_LAUNCHER"] == "ccache"
    assert info["rule_launch_compile"] == ""


# --------------------------------------------------------------------------- llama-server


def start_server(binary, *args, env=None, port=None):
    port = port or _free_port()
    env = {**os.environ, "FIXTURE_LOAD_SECONDS": "1", **(env or {})}
    proc = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    return proc, base


def stop(proc):
    proc.terminate()
    out, _ = proc.communicate(timeout=5)
    return out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if requests.get(base + "/health", timeout=1).status_code == 200:
            return True
        time.sleep(0.05)
    return False


def test_fixture_engine_server_health_models_chat(cpu_build, tmp_path):
    model = write_tiny_model(tmp_path / "tiny.gguf")
    proc, base = start_server(cpu_build["bin"], "-m", str(model), "-a", "garage-tiny", "-c",
                              "4096", "-ngl", "99", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on",
                              "--jinja", "--temp", "0.6", "--top-p", "0.95", "--top-k", "20",
                              "--min-p", "0", "-np", "2", "--no-warmup", "-t", "2")
    try:
        loading = requests.get(base + "/health", timeout=2)
        assert loading.status_code == 503
        assert loading.json() == {"error": {"code": 503, "message": "Loading model",
                                            "type": "unavailable_error"}}
        assert wait_ready(base)
        assert requests.get(base + "/health", timeout=2).json() == {"status": "ok"}
        models = requests.get(base + "/v1/models", timeout=2).json()
        assert [m["id"] for m in models["data"]] == ["garage-tiny"]
        chat = requests.post(base + "/v1/chat/completions", timeout=2, json={
            "messages": [{"role": "user", "content": "hello"}]}).json()
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["model"] == "garage-tiny"
        completion = requests.post(base + "/completion", json={"prompt": "hi"}, timeout=2).json()
        assert completion["content"] and completion["stop"] is True
    finally:
        log = stop(proc)
    assert "main: server is listening on http://127.0.0.1:" in log


def test_fixture_engine_server_api_key(cpu_build, tmp_path):
    model = write_tiny_model(tmp_path / "tiny.gguf")
    key_file = tmp_path / "keys"
    key_file.write_text("k-from-file\n")
    proc, base = start_server(cpu_build["bin"], "-m", str(model), "--api-key-file",
                              str(key_file), env={"FIXTURE_LOAD_SECONDS": "0"})
    try:
        assert wait_ready(base)
        body = {"messages": [{"role": "user", "content": "x"}]}
        anonymous = requests.post(base + "/v1/chat/completions", json=body, timeout=2)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == {"code": 401, "message": "Invalid API Key",
                                             "type": "authentication_error"}
        wrong = requests.post(base + "/v1/chat/completions", json=body, timeout=2,
                              headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = requests.post(base + "/v1/chat/completions", json=body, timeout=2,
                              headers={"Authorization": "Bearer k-from-file"})
        assert right.status_code == 200
        # As upstream: health and the model list stay public.
        assert requests.get(base + "/health", timeout=2).status_code == 200
        models = requests.get(base + "/v1/models", timeout=2).json()
        assert models["data"][0]["id"] == str(model)
    finally:
        stop(proc)


def test_fixture_engine_server_rejects_unknown_arguments(cpu_build, tmp_path):
    model = write_tiny_model(tmp_path / "tiny.gguf")
    for args, message in [
        (["--bogus"], "error: invalid argument: --bogus"),
        (["-fmoe"], "error: invalid argument: -fmoe"),
        (["--rpc", "10.0.0.2:50052"], "error: invalid argument: --rpc"),
        (["-fa", "-c", "4096"], "unknown value for --flash-attn: '-c'"),
        (["-ctk", "q7_0"], "Unsupported cache type: q7_0"),
        (["-ot", "blk\\.1\\.ffn_.*=CUDA0"], "unknown buffer type"),
        (["--api-key-file", str(tmp_path / "missing")], "failed to open file"),
    ]:
        r = subprocess.run([str(cpu_build["bin"]), "-m", str(model), *args],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 1, args
        assert message in r.stderr, (args, r.stderr)


def test_fixture_engine_server_model_checks(cpu_build, tmp_path):
    shards = write_split_model(tmp_path / "split", "m", 3)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOT A MODEL")
    env = {"FIXTURE_LOAD_SECONDS": "0"}
    proc, base = start_server(cpu_build["bin"], "-m", str(shards[0]), env=env)
    try:
        assert wait_ready(base)
    finally:
        log = stop(proc)
    assert "additional 2 GGUFs metadata loaded" in log
    for model, message in [
        (shards[1], "model must be loaded with the first split"),
        (bad, "invalid magic characters"),
        (tmp_path / "absent.gguf", "failed to open GGUF file"),
    ]:
        r = subprocess.run([str(cpu_build["bin"]), "-m", str(model), "--port",
                            str(_free_port())], capture_output=True, text=True, timeout=10,
                           env=dict(os.environ, **env))
        assert r.returncode == 1 and message in r.stderr
        assert "main: exiting due to model loading error" in r.stderr
    shards[2].unlink()
    r = subprocess.run([str(cpu_build["bin"]), "-m", str(shards[0]), "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=10, env=dict(os.environ, **env))
    assert r.returncode == 1 and "failed to load GGUF split" in r.stderr


def test_fixture_engine_server_never_ready_and_env_args(cpu_build, tmp_path):
    model = write_tiny_model(tmp_path / "tiny.gguf")
    proc, base = start_server(cpu_build["bin"], env={
        "FIXTURE_LOAD_SECONDS": "0", "FIXTURE_NEVER_READY": "1", "LLAMA_ARG_MODEL": str(model)})
    try:
        assert not wait_ready(base, timeout=1.5)
        assert requests.get(base + "/health", timeout=2).status_code == 503
    finally:
        stop(proc)


# --------------------------------------------------------------------------- CUDA configure


def test_fixture_engine_cuda_toolkit_missing(cpu_build, tmp_path):
    r = configure(cpu_build["src"], tmp_path / "b", "-DGGML_CUDA=ON", NO_HOST_CUDA,
                  env=dict(os.environ, PATH=BASE_PATH))
    assert r.returncode != 0
    assert "CUDA Toolkit not found" in r.stderr


def test_fixture_engine_cuda_compiler_not_on_path(cpu_build, rig_root, tmp_path):
    root = rig_root()
    r = configure(cpu_build["src"], tmp_path / "b", "-DGGML_CUDA=ON", NO_HOST_CUDA,
                  f"-DCUDAToolkit_ROOT={root}/usr/local/cuda", env=cuda_env(root, False))
    assert r.returncode != 0
    assert "CUDA Toolkit found" in r.stdout
    assert "No CMAKE_CUDA_COMPILER could be found" in r.stderr


@pytest.mark.parametrize("arch, cuda, expected", [
    ("86", "12.8", "Using CMAKE_CUDA_ARCHITECTURES=86 "),
    ("86-real;120a-virtual", "12.8", "Using CMAKE_CUDA_ARCHITECTURES=86-real;120a-virtual"),
    ("86;120", "12.9", "Using CMAKE_CUDA_ARCHITECTURES=86;120 "),
    ("all-major", "12.8", "Using CMAKE_CUDA_ARCHITECTURES=all-major"),
    ("sm_86", "12.8", "is not one of the following"),
    ("86,120", "12.8", "is not one of the following"),
    ("86;120", "12.4", "Unsupported gpu architecture 'compute_120a'"),
    ("61", "13.0", "Unsupported gpu architecture 'compute_61'"),
    ("", "12.8", "CMAKE_CUDA_ARCHITECTURES must be non-empty if set."),
])
def test_fixture_engine_cuda_architectures(cpu_build, rig_root, tmp_path, arch, cuda, expected):
    root = rig_root(cuda=cuda)
    r = configure(cpu_build["src"], tmp_path / "b", "-DGGML_CUDA=ON", NO_HOST_CUDA,
                  f"-DCMAKE_CUDA_COMPILER={root}/usr/local/cuda/bin/nvcc",
                  f"-DCMAKE_CUDA_ARCHITECTURES={arch}", env=cuda_env(root, False))
    assert expected in r.stdout + r.stderr
    assert (r.returncode == 0) == expected.startswith("Using")


def test_fixture_engine_cuda_native_needs_a_gpu(cpu_build, rig_root, tmp_path):
    root = rig_root(model=["rtx3090", "rtxpro6000"], count=2)
    nvcc = f"-DCMAKE_CUDA_COMPILER={root}/usr/local/cuda/bin/nvcc"
    blind = configure(cpu_build["src"], tmp_path / "b1", "-DGGML_CUDA=ON", NO_HOST_CUDA, nvcc,
                      env=cuda_env(root, False))
    assert blind.returncode != 0
    assert 'CUDA_ARCHITECTURES is set to "native", but no GPU was detected.' in blind.stderr
    seeing = configure(cpu_build["src"], tmp_path / "b2", "-DGGML_CUDA=ON", NO_HOST_CUDA, nvcc,
                       env=cuda_env(root, True))
    assert seeing.returncode == 0, seeing.stderr
    assert "CMAKE_CUDA_ARCHITECTURES_NATIVE=86-real;120-real" in seeing.stdout
    default = configure(cpu_build["src"], tmp_path / "b3", "-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF",
                        NO_HOST_CUDA, nvcc, env=cuda_env(root, False))
    assert "86-real;89-real;90-virtual;120a-real" in default.stdout


@pytest.fixture(scope="session")
def cuda_build(cpu_build, tmp_path_factory):
    """llama.cpp flavour with GGML_CUDA=ON, built once against a fake CUDA 12.8 toolkit."""
    base = tmp_path_factory.mktemp("cuda-build")
    root = base / "rig"
    for path, (content, mode) in fake_gpu_files("rtx3090", 1, "12.8").items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    configure_run, build = cmake_build(
        cpu_build["src"], base / "b",
        ["-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=ON", NO_HOST_CUDA,
         f"-DCMAKE_CUDA_COMPILER={root}/usr/local/cuda/bin/nvcc",
         "-DCMAKE_CUDA_ARCHITECTURES=86;120", "-DGGML_CUDA_FA_ALL_QUANTS=ON", "-DGGML_RPC=ON"],
        env=cuda_env(root, False))
    assert configure_run.returncode == 0, configure_run.stderr
    assert build is not None and build.returncode == 0, build.stderr
    return base / "b/bin/llama-server"


def test_fixture_engine_cuda_build_records_architectures(cuda_build):
    binary = cuda_build
    info = json.loads(subprocess.run([str(binary), "--fixture-build-info"], capture_output=True,
                                     text=True).stdout)
    assert info["options"]["CMAKE_CUDA_ARCHITECTURES"] == "86;120"
    assert info["options"]["GGML_CUDA_FA_ALL_QUANTS"] == "ON"
    assert info["cuda"]["architectures"] == ["86", "120a"]
    assert info["cuda"]["toolkit_version"] == "12.8.93"
    assert (binary.parent / "libggml-cuda.so").exists()
    r = subprocess.run([str(binary), "--rpc", "x:1", "-ot", "exps=CUDA0", "--version"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- ik_llama.cpp


def test_fixture_engine_ik_flavour(repos, tmp_path):
    repo = repos["ik_llama.cpp"]
    src = clone(repo, tmp_path / "src")
    configure_run, build = cmake_build(src, tmp_path / "b", ["-DGGML_CUDA_FA=ON",
                                                             "-DGGML_CUDA_USE_GRAPHS=ON"])
    assert build is not None and build.returncode == 0, build.stderr
    assert "GGML_CUDA_FA\n" in configure_run.stderr  # not an ik option: unused
    assert "GGML_CUDA_USE_GRAPHS" not in configure_run.stderr
    binary = tmp_path / "b/bin/llama-server"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    assert version.stderr.splitlines()[0] == f"version: 36 ({repo.short(repo.head)})"
    info = json.loads(subprocess.run([str(binary), "--fixture-build-info"],
                                     capture_output=True, text=True).stdout)
    assert info["flavour"] == "ik_llama.cpp"
    assert info["options"]["GGML_CUDA_USE_GRAPHS"] == "ON"
    assert "GGML_CUDA_FA" not in info["options"]
    for args, message in [(["-fmoe"], "error: unknown argument: -fmoe"),
                          (["-sm", "row"], "unknown value for --split-mode: 'row'"),
                          (["--no-jinja"], "error: unknown argument: --no-jinja")]:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 1 and message in r.stderr
    ok = subprocess.run([str(binary), "-mla", "3", "-amb", "512", "-fa", "on", "-no-fmoe",
                         "-sm", "graph", "-ts", "3/1", "--version"], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    # ik_llama.cpp's /props: the context at the top level, no build_info.
    model = write_tiny_model(tmp_path / "tiny.gguf")
    proc, base = start_server(binary, "-m", str(model), "-c", "6000", "-np", "3",
                              env={"FIXTURE_LOAD_SECONDS": "0"})
    try:
        assert wait_ready(base)
        props = requests.get(base + "/props", timeout=2).json()
    finally:
        stop(proc)
    assert props["n_ctx"] == 2000 and props["total_slots"] == 3
    assert "build_info" not in props and "n_ctx" not in props["default_generation_settings"]
    assert props["chat_template"] == CHATML_TEMPLATE
    # As in ik_llama.cpp, the server is one of the examples.
    configure_run, build = cmake_build(src, tmp_path / "b2", ["-DLLAMA_BUILD_EXAMPLES=OFF"])
    assert build is not None and build.returncode != 0
    assert "No rule to make target 'llama-server'" in build.stderr


def test_fixture_engine_template_has_no_build_outputs():
    engine = Path(__file__).resolve().parents[2] / "lab/standins/engine"
    assert not any(p.name == "build" for p in engine.rglob("*"))
    assert shutil.which("git") and shutil.which("cmake")


# --------------------------------------------------------------------------- what a deploy proves

ANSWER = "Hello from the fixture engine."
TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"},
            "mode": {"type": "string", "enum": ["text", "binary"]},
            "limit": {"type": "integer"},
            "follow": {"type": "boolean"},
            "comment": {"type": "string"}},
            "required": ["path", "mode", "limit", "follow"]}}},
    {"type": "function", "function": {"name": "list_dir", "parameters": {
        "type": "object", "properties": {"dir": {"type": "string"}}, "required": ["dir"]}}},
]
TURN_1 = [{"role": "user", "content": "Read notes.txt"}]


def turn_2(call):
    return [*TURN_1, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "hello"}]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@contextlib.contextmanager
def serving(binary, *args, env=None):
    """A ready server; yields (base URL, dict whose "log" is the server's output once stopped)."""
    proc, base = start_server(binary, *args, env={"FIXTURE_LOAD_SECONDS": "0", **(env or {})})
    out = {"proc": proc}
    try:
        assert wait_ready(base)
        yield base, out
    finally:
        out["log"] = stop(proc)


def chat(base, **body):
    return requests.post(base + "/v1/chat/completions", json=body, timeout=5)


def test_fixture_engine_props_llama_cpp(cpu_build, repos, tiny_model):
    repo = repos["llama.cpp"]
    with serving(cpu_build["bin"], "-m", str(tiny_model), "-c", "8192", "-np", "2") as (base, _):
        props = requests.get(base + "/props", timeout=2).json()
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert props["total_slots"] == 2
    assert props["build_info"] == f"b36-{repo.short(repo.head)}"
    assert props["chat_template"] == CHATML_TEMPLATE
    assert "n_ctx" not in props
    with serving(cpu_build["bin"], "-m", str(tiny_model)) as (base, _):
        props = requests.get(base + "/props", timeout=2).json()
    assert props["default_generation_settings"]["n_ctx"] == 4096 and props["total_slots"] == 1
    with serving(cpu_build["bin"], "-m", str(tiny_model), "-c", "3000",
                 "--chat-template", "{{ messages }}") as (base, out):
        props = requests.get(base + "/props", timeout=2).json()
    assert props["default_generation_settings"]["n_ctx"] == 3000 and props["total_slots"] == 1
    assert props["chat_template"] == "{{ messages }}"
    assert "n_ctx_per_seq = 3000" in out["log"]


def test_fixture_engine_default_template_and_cpu_layers(cpu_build, rig_root, tmp_path):
    from gguf import GGUFWriter

    model = tmp_path / "bare.gguf"
    writer = GGUFWriter(model, "llama")
    writer.add_block_count(5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    root = rig_root(count=2)
    # A CPU-only build ignores the GPUs the driver shows, and -ngl.
    with serving(cpu_build["bin"], "-m", str(model), "-ngl", "99",
                 env=cuda_env(root, True)) as (base, out):
        props = requests.get(base + "/props", timeout=2).json()
    assert props["chat_template"] and props["chat_template"] != CHATML_TEMPLATE
    assert "<|im_start|>" in props["chat_template"]
    assert "load_tensors: offloaded 0/6 layers to GPU" in out["log"]
    assert "ggml_cuda_init" not in out["log"]


def test_fixture_engine_tool_calls(cpu_build, tiny_model):
    with serving(cpu_build["bin"], "-m", str(tiny_model)) as (base, _):
        required = chat(base, messages=TURN_1, tools=TOOLS, tool_choice="required")
        auto = chat(base, messages=TURN_1, tools=TOOLS, tool_choice="auto").json()
        implicit = chat(base, messages=TURN_1, tools=TOOLS).json()
        named = chat(base, messages=TURN_1, tools=TOOLS, tool_choice={
            "type": "function", "function": {"name": "list_dir"}}).json()
        none = chat(base, messages=TURN_1, tools=TOOLS, tool_choice="none").json()
        plain = chat(base, messages=TURN_1).json()
        assert required.status_code == 200
        call = required.json()["choices"][0]["message"]["tool_calls"][0]
        second = chat(base, messages=turn_2(call), tools=TOOLS, tool_choice="auto")
        streamed = requests.post(base + "/v1/chat/completions", timeout=5, json={
            "messages": TURN_1, "tools": TOOLS, "tool_choice": "required", "stream": True})
        unknown = chat(base, messages=TURN_1, tools=TOOLS, tool_choice={
            "type": "function", "function": {"name": "rm_rf"}})
        broken = requests.post(base + "/v1/chat/completions", data='{"messages": [}', timeout=5)
    choice = required.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] is None
    assert call["id"] == "call_1" and call["type"] == "function"
    assert call["function"]["name"] == "read_file"
    assert isinstance(call["function"]["arguments"], str)
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"path", "mode", "limit", "follow"}
    assert isinstance(args["path"], str) and args["path"]
    assert args["mode"] == "text" and args["limit"] == 1 and args["follow"] is True
    for answer in (auto, implicit):
        assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "read_file"
    named_call = named["choices"][0]["message"]["tool_calls"][0]["function"]
    assert named_call["name"] == "list_dir" and list(json.loads(named_call["arguments"])) == ["dir"]
    for answer in (none, plain):
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == ANSWER
    assert second.json()["choices"][0]["finish_reason"] == "stop"
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    delta_call = events[1]["choices"][0]["delta"]["tool_calls"][0]
    assert delta_call["index"] == 0 and delta_call["function"]["name"] == "read_file"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert unknown.status_code == 400 and broken.status_code == 400


# The fake driver shows an RTX 3090 (GPU 0) and an RTX PRO 6000 (GPU 1); the tiny model has
# 2 layers, 3 with the output layer.
@pytest.mark.parametrize("visible, args, devices, offloaded", [
    (None, [], ["NVIDIA GeForce RTX 3090", "NVIDIA RTX PRO 6000"], "3/3"),
    (None, ["-ngl", "1"], ["NVIDIA GeForce RTX 3090", "NVIDIA RTX PRO 6000"], "1/3"),
    (None, ["-ngl", "all"], ["NVIDIA GeForce RTX 3090", "NVIDIA RTX PRO 6000"], "3/3"),
    ("1", [], ["NVIDIA RTX PRO 6000"], "3/3"),
    ("0,7,1", [], ["NVIDIA GeForce RTX 3090"], "3/3"),
    ("uuid:1", ["-ngl", "99"], ["NVIDIA RTX PRO 6000"], "3/3"),
    ("", ["-ngl", "99"], [], "0/3"),
    ("-1", [], [], "0/3"),
    ("no-driver", ["-ngl", "99"], [], "0/3"),
])
def test_fixture_engine_cuda_start_log(cuda_build, rig_root, tiny_model, visible, args, devices,
                                       offloaded):
    root = rig_root(model=["rtx3090", "rtxpro6000"], count=2)
    env = cuda_env(root, visible != "no-driver")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible and visible.startswith("uuid:"):
        listing = subprocess.run([str(root / "usr/bin/nvidia-smi"), "-L"], capture_output=True,
                                 text=True, env=env).stdout.splitlines()
        visible = listing[int(visible[5:])].split("UUID: ")[1][:12]  # a prefix, as CUDA allows
    if visible is not None and visible != "no-driver":
        env["CUDA_VISIBLE_DEVICES"] = visible
    with serving(cuda_build, "-m", str(tiny_model), *args, env=env) as (_, out):
        pass
    log = out["log"]
    if devices:
        assert f"ggml_cuda_init: found {len(devices)} CUDA devices:\n" in log
        for i, name in enumerate(devices):
            assert re.search(rf"^  Device {i}: {name}[^,]*, compute capability", log, re.M), log
        assert f"  Device {len(devices)}:" not in log
    else:
        assert ("ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected"
                in log)
        assert "found" not in log.split("ggml_cuda_init")[1].splitlines()[0]
    assert f"load_tensors: offloaded {offloaded} layers to GPU" in log


# --------------------------------------------------------------------------- deliberate faults


@pytest.fixture(scope="session")
def fault_repo(tmp_path_factory):
    """The repository the end-to-end tests serve: b8 builds, b9 to b12 build faulty servers."""
    return make_engine_repo(tmp_path_factory.mktemp("fault-repo"))


@pytest.fixture(scope="session")
def fault_build(fault_repo, tmp_path_factory):
    """Builds the tag of a fault (once) and returns its llama-server."""
    built = {}

    def build(fault):
        if fault not in built:
            root = tmp_path_factory.mktemp(f"fault-{fault}")
            src = clone(fault_repo, root / "src", "--branch", fault_repo.fault_tags[fault])
            _, result = cmake_build(src, root / "build", ["-DLLAMA_OPENSSL=OFF"])
            assert result is not None and result.returncode == 0, result.stderr
            built[fault] = root / "build/bin/llama-server"
        return built[fault]

    return build


def build_info(binary):
    return json.loads(subprocess.run([str(binary), "--fixture-build-info"], capture_output=True,
                                     text=True).stdout)


def test_fixture_engine_fault_tags(fault_repo, tmp_path):
    repo = fault_repo
    assert repo.fault_tags == {"tool_history_500": "b9", "arguments_object": "b10",
                               "ctx_clamp": "b11", "crash_after_health": "b12"}
    assert list(repo.fault_tags) == list(FAULTS)
    parent = repo.tags["b8"]
    for fault, tag in repo.fault_tags.items():
        sha = repo.tags[tag]
        assert git(repo.path, "rev-parse", f"{sha}^").stdout.strip() == parent
        assert git(repo.path, "rev-list", "--count", sha).stdout.strip() == tag[1:]
        assert repo.build_number(sha) == int(tag[1:])
        assert git(repo.path, "branch", "--contains", sha).stdout == ""  # on no branch
        assert git(repo.path, "diff", "--name-only", parent, sha).stdout == "CMakeLists.txt\n"
        cmakelists = git(repo.path, "show", f"{sha}:CMakeLists.txt").stdout
        assert f'set(FIXTURE_FAULT "{fault}" CACHE STRING' in cmakelists
        parent = sha
    assert 'set(FIXTURE_FAULT "none" CACHE STRING' in git(
        repo.path, "show", f"{repo.tags['b8']}:CMakeLists.txt").stdout
    assert git(repo.path, "rev-parse", "master").stdout.strip() == repo.tags["b8"]
    again = make_engine_repo(tmp_path)
    assert again.tags == repo.tags
    with pytest.raises(ValueError):
        add_fault_tag(again, "segfault")
    assert add_fault_tag(again, "none") == "b13"
    assert again.fault_tags == repo.fault_tags
    assert 'set(FIXTURE_FAULT "none" CACHE STRING' in git(
        again.path, "show", "b13:CMakeLists.txt").stdout


def test_fixture_engine_fault_option(fault_repo, tmp_path):
    src = clone(fault_repo, tmp_path / "src", "--branch", "b12")
    r = configure(src, tmp_path / "b1", "-DFIXTURE_FAULT=none")
    assert r.returncode == 0, r.stderr
    assert '"fault": "none"' in (tmp_path / "b1/common/fixture-build-info.cpp").read_text()
    r = configure(src, tmp_path / "b2")
    assert '"fault": "crash_after_health"' in (
        tmp_path / "b2/common/fixture-build-info.cpp").read_text()
    r = configure(src, tmp_path / "b3", "-DFIXTURE_FAULT=segfault")
    assert r.returncode != 0
    assert "FIXTURE_FAULT must be one of" in r.stderr


def test_fixture_engine_fault_tool_history_500(fault_build, tiny_model):
    binary = fault_build("tool_history_500")
    assert build_info(binary)["fault"] == "tool_history_500"
    with serving(binary, "-m", str(tiny_model)) as (base, _):
        first = chat(base, messages=TURN_1, tools=TOOLS, tool_choice="required")
        assert first.status_code == 200
        call = first.json()["choices"][0]["message"]["tool_calls"][0]
        assert isinstance(call["function"]["arguments"], str)
        second = chat(base, messages=turn_2(call), tools=TOOLS)
        plain = chat(base, messages=TURN_1)
    assert second.status_code == 500
    assert second.json() == {"error": {
        "code": 500, "message": "Unknown (built-in) filter 'items' for type String",
        "type": "server_error"}}
    assert plain.status_code == 200


def test_fixture_engine_fault_arguments_object(fault_build, tiny_model):
    binary = fault_build("arguments_object")
    with serving(binary, "-m", str(tiny_model)) as (base, _):
        first = chat(base, messages=TURN_1, tools=TOOLS, tool_choice="required").json()
        call = first["choices"][0]["message"]["tool_calls"][0]
        second = chat(base, messages=turn_2(call), tools=TOOLS)
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    assert isinstance(call["function"]["arguments"], dict)
    assert set(call["function"]["arguments"]) == {"path", "mode", "limit", "follow"}
    assert second.status_code == 200


def test_fixture_engine_fault_ctx_clamp(fault_build, tiny_model):
    binary = fault_build("ctx_clamp")
    with serving(binary, "-m", str(tiny_model), "-c", "8192", "-np", "2") as (base, _):
        slots = requests.get(base + "/props", timeout=2).json()
    with serving(binary, "-m", str(tiny_model), "-c", "8192") as (base, _):
        single = requests.get(base + "/props", timeout=2).json()
    assert slots["default_generation_settings"]["n_ctx"] == 2048 and slots["total_slots"] == 2
    assert single["default_generation_settings"]["n_ctx"] == 4096


def test_fixture_engine_fault_crash_after_health(fault_build, tiny_model):
    binary = fault_build("crash_after_health")
    proc, base = start_server(binary, "-m", str(tiny_model), env={"FIXTURE_LOAD_SECONDS": "1"})
    try:
        # Still loading: /health answers 503, and a POST is answered, not fatal.
        assert chat(base, messages=TURN_1).status_code == 503
        assert proc.poll() is None
        assert wait_ready(base)
        with pytest.raises(requests.ConnectionError):
            chat(base, messages=TURN_1)
        assert proc.wait(timeout=5) == 1
    finally:
        log = stop(proc)
    assert "fixture fault crash_after_health" in log
