"""The fixture engine repository: history and tags like upstream's, a CMake build with
upstream's interface, and a llama-server with upstream's command line and HTTP surface."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from lab.standins.engine_repo import build_engine_repo, cmake_build, serve_git
from lab.standins.gguf_gen import write_split_model, write_tiny_model
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


def test_fixture_engine_cuda_build_records_architectures(cpu_build, rig_root, tmp_path):
    root = rig_root(cuda="12.8")
    env = cuda_env(root, False)
    configure_run, build = cmake_build(
        cpu_build["src"], tmp_path / "b",
        ["-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=ON", NO_HOST_CUDA,
         f"-DCMAKE_CUDA_COMPILER={root}/usr/local/cuda/bin/nvcc",
         "-DCMAKE_CUDA_ARCHITECTURES=86;120", "-DGGML_CUDA_FA_ALL_QUANTS=ON", "-DGGML_RPC=ON"],
        env=env)
    assert configure_run.returncode == 0, configure_run.stderr
    assert build is not None and build.returncode == 0, build.stderr
    binary = tmp_path / "b/bin/llama-server"
    info = json.loads(subprocess.run([str(binary), "--fixture-build-info"], capture_output=True,
                                     text=True).stdout)
    assert info["options"]["CMAKE_CUDA_ARCHITECTURES"] == "86;120"
    assert info["options"]["GGML_CUDA_FA_ALL_QUANTS"] == "ON"
    assert info["cuda"]["architectures"] == ["86", "120a"]
    assert info["cuda"]["toolkit_version"] == "12.8.93"
    assert (tmp_path / "b/bin/libggml-cuda.so").exists()
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
    # As in ik_llama.cpp, the server is one of the examples.
    configure_run, build = cmake_build(src, tmp_path / "b2", ["-DLLAMA_BUILD_EXAMPLES=OFF"])
    assert build is not None and build.returncode != 0
    assert "No rule to make target 'llama-server'" in build.stderr


def test_fixture_engine_template_has_no_build_outputs():
    engine = Path(__file__).resolve().parents[2] / "lab/standins/engine"
    assert not any(p.name == "build" for p in engine.rglob("*"))
    assert shutil.which("git") and shutil.which("cmake")
