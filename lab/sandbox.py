"""The sandbox: one local rig that llm-garage deploys to, for trying it out.

    python -m lab.sandbox up [--real [--llama-source PATH_OR_URL] [--ref TAG]
                               [--model OWNER/NAME/FILE]] [--vagrant] [-v]
    python -m lab.sandbox down
    python -m lab.sandbox status

`up` boots a test rig named `sandbox` (a systemd-nspawn container, or a Vagrant VM with
--vagrant), starts stand-ins on this machine for what the rig would fetch from the internet (a
git daemon serving a small llama.cpp-like source repository, a Hugging Face-like server
serving a tiny GGUF model), gives the rig a stand-in RTX 3090, writes the sandbox's state file,
then runs the real deploy twice, ``pyinfra -y inventory/sandbox.py deploy.py``: the first run
converges the rig and the model answers a chat request on port 8080; the second run must
change nothing. `up` again reuses what is up and deploys again. `down` stops what `up`
started (by PID) and removes the rig and its files.

--real builds real llama.cpp (from --llama-source: a local git repository, served to the rig
by the same git daemon, or a git URL; upstream by default) at --ref, and serves a real small
GGUF from $HF_ENDPOINT or https://huggingface.co (--model). The rig must reach those.

Environment: GARAGE_SANDBOX_NAME (fleet name, default `sandbox`), GARAGE_SANDBOX_STATE (state
file, default <fleet dir>/sandbox.json), and the rig harness's GARAGE_RIG_STATE and
GARAGE_RIG_CACHE.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lab.rigs
from lab.rigs.host import _is_zombie, _kill_pid, _proc_cmdline, _proc_start_time
from lab.rigs.pyinfra_results import (
    ANSI_RE,
    HOST_STATUS_RE,
    OP_START_RE,
    PYINFRA_ERROR_RE,
    REPO_ROOT,
    PyinfraResult,
    ResultParseError,
    parse_pyinfra_output,
    pyinfra_bin,
)

STATE_VERSION = 1
NAME_ENV = "GARAGE_SANDBOX_NAME"
STATE_ENV = "GARAGE_SANDBOX_STATE"
DEFAULT_NAME = "sandbox"
RIG = "sandbox"  # the rig's name in the fleet and the host's name in the inventory
INVENTORY = "inventory/sandbox.py"
DEPLOY = "deploy.py"

GIT_PORT = 9418
HF_PORT = 8090
HF_CDN_PORT = 8091
SERVE_PORT = 8080  # the profile's port, in inventory/sandbox.py
OPENCODE_JSON = "/root/.config/opencode/opencode.json"

FIXTURE_ENGINE_REPO = "llama.cpp.git"
FIXTURE_ENGINE_COMMITS = 36  # tags b6, b12, ..., b36 (the last commit is always tagged)
FIXTURE_ENGINE_TAG = f"b{FIXTURE_ENGINE_COMMITS}"
FIXTURE_ENGINE_UNITS = 16  # generated C++ files: a short but visible first build
FIXTURE_MODEL_REPO = "llm-garage/tiny-chat-GGUF"
FIXTURE_MODEL_FILE = "tiny-chat-F32.gguf"
FIXTURE_ALIAS = "tiny-chat"
FIXTURE_CTX = 2048

UPSTREAM_LLAMA = "https://github.com/ggml-org/llama.cpp.git"
REAL_REF = "b10864"
REAL_MODEL = "Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q8_0.gguf"
REAL_CTX = 4096
# Offline-safe build of real llama.cpp: the web UI is not downloaded at build time.
REAL_CMAKE_EXTRA = {"LLAMA_USE_PREBUILT_UI": "OFF"}
DEFAULT_HF_ENDPOINT = "https://huggingface.co"

VAGRANT_MACHINE = "sandbox"
VAGRANT_IP = "192.168.56.10"  # keep in step with the Vagrantfile
VAGRANT_HOST_IP = "192.168.56.1"  # this machine on the VM's host-only network
VAGRANT_MARKER = ".garage-sandbox-vagrant"

GPU_MODEL = "rtx3090"

# What the deploy says about long work while it runs, shown in the one-line-per-operation view:
# garage-build's and garage-fetch's progress lines and the lines that start and end a build
# or a download, each with the rig's prefix as pyinfra prints it.
PROGRESS_RE = re.compile(r"^\[[^\]]+\]\s+(?:garage-(?:build|fetch): |Building |Built |fetching )")
# The sandbox's builds and downloads take seconds: a progress line every 2 s (instead of 20)
# shows what a long build or download prints. A value set in the environment wins.
PROGRESS_DEFAULTS = {"GARAGE_PROGRESS_INTERVAL": "2"}

log = logging.getLogger("garage.sandbox")


class SandboxError(RuntimeError):
    """Something the user has to fix; printed without a traceback."""


# --------------------------------------------------------------------------------------------
# output


class Out:
    """Short headed steps for people who have never seen the project."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def step(self, title: str) -> None:
        self.n += 1
        print(f"\n==> [{self.n}/{self.total}] {title}", flush=True)

    @staticmethod
    def line(text: str = "") -> None:
        print(f"    {text}" if text else "", flush=True)


# --------------------------------------------------------------------------------------------
# paths and state


def sandbox_name() -> str:
    return os.environ.get(NAME_ENV) or DEFAULT_NAME


def state_root() -> Path:
    return Path(os.environ.get("GARAGE_RIG_STATE") or lab.rigs.DEFAULT_STATE_ROOT)


def work_dir(name: str) -> Path:
    """The sandbox's folder: the fleet's state dir (or, with Vagrant, a folder of our own)."""
    return state_root() / name


def state_path(name: str) -> Path:
    return Path(os.environ.get(STATE_ENV) or work_dir(name) / "sandbox.json")


def read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SandboxError(f"cannot read {path} ({e}); remove it and run `up` again") from None
    return state if isinstance(state, dict) else None


def make_state(name: str, mode: str, *, rig_ip: str, host_ip: str, ssh: dict, engine: dict,
               model: dict, fixtures: dict) -> dict:
    """What inventory/sandbox.py reads (and `down` and `status`)."""
    return {
        "version": STATE_VERSION,
        "name": name,
        "mode": mode,
        "rig": {"name": RIG, "ip": rig_ip},
        "host_ip": host_ip,
        "ssh": ssh,
        "sudo": mode == "vagrant",
        "rig_address": rig_ip,
        "engine": engine,
        "model": model,
        "fixtures": fixtures,
    }


def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(name: str, remove: bool = False) -> Iterator[None]:
    """One `up` or `down` of a sandbox at a time; `down` removes the lock file at the end."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"sandbox-{name}.lock"
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SandboxError(f"another `up` or `down` of sandbox {name!r} is running") from None
        yield
        if remove:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# what the sandbox serves: the engine source and the model


def engine_config(args: argparse.Namespace, host_ip: str, git_dir: Path) -> dict:
    """Engine source for the inventory: the fixture repository, or real llama.cpp."""
    if not args.real:
        return {
            "source": "fixture",
            "remote": f"git://{host_ip}/{FIXTURE_ENGINE_REPO}",
            "ref": FIXTURE_ENGINE_TAG,
            "cmake_extra": {},
        }
    source = args.llama_source or UPSTREAM_LLAMA
    ref = args.ref or REAL_REF
    local = Path(source).expanduser()
    if local.exists():
        local = local.resolve()
        sha = re.fullmatch(r"[0-9a-f]{40}", ref) is not None
        check = subprocess.run(
            ["git", "-c", "safe.directory=*", "-C", str(local), "rev-parse", "--verify",
             "--quiet", f"{ref if sha else 'refs/tags/' + ref}^{{commit}}"],
            capture_output=True, text=True,
        )
        if check.returncode != 0:
            raise SandboxError(
                f"{local}: no {'commit' if sha else 'tag'} {ref!r} there (or not a git "
                f"repository); pass --ref with one of its tags (git -C {local} tag) or a full "
                f"commit SHA"
            )
        return {
            "source": "local",
            "path": str(local),
            "remote": f"git://{host_ip}/{local_repo_name(local)}",
            "ref": ref,
            "cmake_extra": dict(REAL_CMAKE_EXTRA),
        }
    return {"source": "url", "remote": source, "ref": ref, "cmake_extra": dict(REAL_CMAKE_EXTRA)}


def local_repo_name(path: Path) -> str:
    """The name a local llama.cpp checkout is served under by the git daemon."""
    return f"llama.cpp-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def split_model(spec: str) -> tuple[str, str]:
    """OWNER/NAME/PATH/IN/REPO.gguf -> ("OWNER/NAME", "PATH/IN/REPO.gguf")."""
    parts = spec.strip("/").split("/")
    if len(parts) < 3 or not parts[-1].endswith(".gguf") or not all(parts):
        raise SandboxError(f"--model {spec!r}: expected OWNER/NAME/FILE.gguf, e.g. {REAL_MODEL}")
    return "/".join(parts[:2]), "/".join(parts[2:])


def model_config(args: argparse.Namespace, host_ip: str) -> dict:
    if not args.real:
        return {
            "source": "fixture",
            "hf_endpoint": f"http://{host_ip}:{HF_PORT}",
            "repo": FIXTURE_MODEL_REPO,
            "revision": "main",
            "file": FIXTURE_MODEL_FILE,
            "alias": FIXTURE_ALIAS,
            "ctx_size": FIXTURE_CTX,
        }
    repo, file = split_model(args.model or REAL_MODEL)
    alias = re.sub(r"[^\w.:/-]", "-", Path(file).stem.lower())
    return {
        "source": "hub",
        "hf_endpoint": (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/"),
        "repo": repo,
        "revision": "main",
        "file": file,
        "alias": alias,
        "ctx_size": REAL_CTX,
    }


def prepare_fixture_data(fixtures: Path) -> None:
    """The bare engine repository and the Hub's files, made once per sandbox."""
    git_dir = fixtures / "git"
    git_dir.mkdir(parents=True, exist_ok=True)
    repo = git_dir / FIXTURE_ENGINE_REPO
    if not (repo / "HEAD").exists():
        from lab.standins import engine_repo

        tmp = git_dir / ".new"
        shutil.rmtree(tmp, ignore_errors=True)
        made = engine_repo.build_engine_repo(tmp, "llama.cpp", n_commits=FIXTURE_ENGINE_COMMITS,
                                             n_units=FIXTURE_ENGINE_UNITS)
        assert FIXTURE_ENGINE_TAG in made.tags, made.tags
        os.rename(made.path, repo)
        shutil.rmtree(tmp)
    model = fixtures / "hf" / FIXTURE_MODEL_REPO / "main" / FIXTURE_MODEL_FILE
    if not model.exists():
        from lab.standins.gguf_gen import write_tiny_model

        model.parent.mkdir(parents=True, exist_ok=True)
        tmp = model.with_name(f".{model.name}.tmp")
        write_tiny_model(tmp, name="Garage Tiny Chat")
        (model.parent / "README.md").write_text(
            "# tiny-chat-GGUF\n\nA tiny llama-architecture model with random weights for the "
            "llm-garage sandbox. It answers, with gibberish.\n"
        )
        os.rename(tmp, model)


def link_local_source(git_dir: Path, engine: dict) -> None:
    if engine["source"] != "local":
        return
    link = git_dir / engine["remote"].rsplit("/", 1)[1]
    target = Path(engine["path"])
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target)


# --------------------------------------------------------------------------------------------
# host-side processes (git daemon, Hub stand-in): started detached, stopped by PID


def proc_alive(entry: dict | None) -> bool:
    if not entry:
        return False
    pid = entry["pid"]
    return (
        _proc_start_time(pid) == entry["start"]
        and not _is_zombie(pid)
        and entry["marker"] in _proc_cmdline(pid)
    )


def find_procs(marker: str) -> list[int]:
    """PIDs whose command line has `marker` as one whole argument (our fixture folders)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            if marker in _proc_cmdline(int(entry.name)):
                found.append(int(entry.name))
    return found


def stop_proc(entry: dict | None) -> None:
    if proc_alive(entry):
        _kill_pid(entry["pid"], grace=5.0)
    if entry:
        for pid in find_procs(entry["marker"]):
            _kill_pid(pid, grace=5.0)


def git_daemon_path() -> str:
    """git-daemon itself: `git daemon` would run it as a child, and we want its PID."""
    exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True,
                               check=True).stdout.strip()
    return str(Path(exec_path) / "git-daemon")


# For the git daemon's upload-packs: a local llama.cpp checkout may belong to another user than
# the daemon's (root), and deploys fetch commits by SHA, as GitHub allows.
SPAWN_ENV = {"GIT_CONFIG_COUNT": "2",
             "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*",
             "GIT_CONFIG_KEY_1": "uploadpack.allowReachableSHA1InWant",
             "GIT_CONFIG_VALUE_1": "true"}


def spawn(name: str, argv: list[str], marker: str, logfile: Path) -> dict:
    """Starts `argv` in its own session, outliving this process; returns its record."""
    for pid in find_procs(marker):  # left behind by a sandbox whose state was lost
        log.info("stopping leftover %s (pid %d)", name, pid)
        _kill_pid(pid, grace=5.0)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env={**os.environ, **SPAWN_ENV},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while proc.poll() is None and marker not in _proc_cmdline(proc.pid):
        if time.monotonic() > deadline:  # not exec'd yet after 10 s: something is wrong
            break
        time.sleep(0.01)
    return {"pid": proc.pid, "start": _proc_start_time(proc.pid), "marker": marker,
            "argv": argv, "log": str(logfile)}


def wait_port(entry: dict, host: str, port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive(entry):
            tail = Path(entry["log"]).read_text(errors="replace")[-2000:]
            raise SandboxError(f"{what} exited at start; its log ({entry['log']}):\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise SandboxError(f"{what} does not listen on {host}:{port} after {timeout:.0f}s")


def ensure_fixtures(state: dict, fixtures: Path, host_ip: str, out: Out) -> dict:
    """Starts the git daemon and the Hub stand-in unless they already run; returns records."""
    procs = dict(state.get("fixtures") or {})
    git_dir, hf_dir = fixtures / "git", fixtures / "hf"
    specs = {
        "git-daemon": (
            [git_daemon_path(), "--reuseaddr", "--export-all",
             "--informative-errors", f"--listen={host_ip}", f"--port={GIT_PORT}",
             f"--base-path={git_dir}"],
            f"--base-path={git_dir}", GIT_PORT,
            f"git daemon on git://{host_ip}:{GIT_PORT}/ (engine sources)",
        ),
        "hf-server": (
            [sys.executable, "-m", "lab.standins.hf_server", "--root", str(hf_dir),
             "--bind", host_ip, "--port", str(HF_PORT), "--cdn-port", str(HF_CDN_PORT)],
            str(hf_dir), HF_PORT,
            f"Hugging Face stand-in on http://{host_ip}:{HF_PORT} (models)",
        ),
    }
    for key, (argv, marker, port, what) in specs.items():
        entry = procs.get(key)
        if proc_alive(entry) and entry["argv"] == argv:
            out.line(f"{what}: running (pid {entry['pid']})")
            continue
        stop_proc(entry)
        entry = spawn(key, argv, marker, fixtures / f"{key}.log")
        wait_port(entry, host_ip, port, what)
        procs[key] = entry
        out.line(f"{what}: started (pid {entry['pid']})")
    return procs


# --------------------------------------------------------------------------------------------
# the rig: an nspawn test rig, or a Vagrant VM


def nspawn_rig(name: str, out: Out) -> tuple[lab.rigs.Fleet, lab.rigs.Rig]:
    lab.rigs.cleanup_stale()
    if any(entry["name"] == name for entry in lab.rigs.list_fleets()):
        fleet = lab.rigs.Fleet.attach(name)
        rig = fleet.rigs.get(RIG)
        if rig is None:
            out.line(f"fleet {name} has no rig {RIG}: starting it")
            rig = fleet.start([RIG])[0]
        elif not rig.running:
            out.line(f"rig {RIG} is stopped: booting it again (its disk is kept)")
            rig.reboot()
        else:
            out.line(f"reusing rig {RIG} ({rig.ip}), up since an earlier run")
        return fleet, rig
    if not (lab.rigs.base_path() / ".garage-base").is_file():
        out.line("building the rigs' Debian 12 base image first (once; about 3-4 minutes)")
    fleet = lab.rigs.Fleet(name, detached=True)
    try:
        rig = fleet.start([RIG])[0]
    except BaseException:
        fleet.teardown()
        raise
    out.line(f"booted rig {RIG} at {rig.ip} (systemd-nspawn container, bridge {fleet.bridge})")
    return fleet, rig


def push_fake_gpu_nspawn(rig: lab.rigs.Rig) -> None:
    from lab.standins.gpu import fake_gpu_files

    for path, (content, mode) in fake_gpu_files(GPU_MODEL, 1).items():
        rig.put_text(content.decode(), path, mode)


def parse_ssh_config(text: str) -> dict[str, str]:
    """`vagrant ssh-config` output -> {option (lower case): value} of its first host."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        key = key.lower()
        if key == "host" and options:
            break
        options.setdefault(key, value.strip().strip('"'))
    return options


def vagrant_ssh_data(ssh_config: dict[str, str]) -> dict:
    """pyinfra connection data for the VM, from its `vagrant ssh-config`."""
    missing = [k for k in ("hostname", "user", "identityfile") if k not in ssh_config]
    if missing:
        raise SandboxError(f"`vagrant ssh-config {VAGRANT_MACHINE}` lacks {', '.join(missing)}")
    return {
        "ssh_hostname": ssh_config["hostname"],
        "ssh_port": int(ssh_config.get("port", 22)),
        "ssh_user": ssh_config["user"],
        "ssh_key": ssh_config["identityfile"],
        "ssh_strict_host_key_checking": "no",
        "ssh_known_hosts_file": "/dev/null",
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
    }


def vagrant(*args: str, timeout: float = 1800) -> str:
    if shutil.which("vagrant") is None:
        raise SandboxError("--vagrant needs Vagrant (https://developer.hashicorp.com/vagrant) "
                           "and a provider such as VirtualBox or libvirt")
    proc = subprocess.run(["vagrant", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SandboxError(f"vagrant {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def ssh_argv(ssh: dict) -> list[str]:
    return ["ssh", "-i", ssh["ssh_key"], "-p", str(ssh.get("ssh_port", 22)), "-l",
            ssh["ssh_user"], "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", ssh["ssh_hostname"]]


def push_fake_gpu_ssh(ssh: dict, sudo: bool) -> None:
    from lab.standins.gpu import fake_gpu_files

    for path, (content, mode) in fake_gpu_files(GPU_MODEL, 1).items():
        q, tmp = shlex.quote(path), shlex.quote(path + ".garage-put")
        script = (f'mkdir -p -- "$(dirname -- {q})" && cat > {tmp} && chmod {mode:o} {tmp} '
                  f"&& mv -f -- {tmp} {q}")
        cmd = f"sudo sh -c {shlex.quote(script)}" if sudo else script
        proc = subprocess.run([*ssh_argv(ssh), "--", cmd], input=content, capture_output=True,
                              timeout=120)
        if proc.returncode != 0:
            raise SandboxError(f"writing {path} on the VM failed: "
                               f"{proc.stderr.decode(errors='replace')}")


# --------------------------------------------------------------------------------------------
# the deploy and the model


def run_deploy(state_file: Path, logfile: Path, show_all: bool, verbose: bool) -> PyinfraResult:
    """Runs the real deploy; prints one line per operation (all of them, or only the changed
    and failed ones) and the progress lines of builds and downloads; the whole log goes to
    `logfile`."""
    args = [str(pyinfra_bin()), "-y", INVENTORY, DEPLOY]
    env = {**PROGRESS_DEFAULTS, **os.environ, STATE_ENV: str(state_file),
           "PYINFRA_PROGRESS": "off", "NO_COLOR": "1"}
    Out.line("$ " + shlex.join([os.path.relpath(args[0], REPO_ROOT), *args[1:]]))
    start = time.monotonic()
    lines: list[str] = []
    with open(logfile, "w") as log_fh:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        current, open_line = None, False
        for raw in proc.stdout:
            log_fh.write(raw)
            lines.append(raw)
            line = ANSI_RE.sub("", raw).rstrip()
            if verbose:
                print("    | " + line, flush=True)
                continue
            match = OP_START_RE.match(line.strip())
            if match:
                current = match.group("name")
                if show_all:
                    print(f"    {current} ... ", end="", flush=True)
                    open_line = True
                continue
            if PROGRESS_RE.match(line.strip()):
                if open_line:  # the operation's line ends with its status after these
                    print(flush=True)
                    open_line = False
                print(f"    {line.strip()}", flush=True)
                continue
            status = HOST_STATUS_RE.match(line)
            if status and current is not None:
                word = {"Success": "changed", "No changes": "ok"}.get(status.group("status"),
                                                                       "FAILED")
                if open_line:
                    print(word, flush=True)
                elif show_all or word != "ok":
                    print(f"    {current} ... {word}", flush=True)
                current, open_line = None, False
                continue
            if PYINFRA_ERROR_RE.match(line.strip()):
                print(f"    {line.strip()}", flush=True)
        returncode = proc.wait()
    text = "".join(lines)
    try:
        return parse_pyinfra_output(text, "", returncode, args=args,
                                    duration=time.monotonic() - start)
    except ResultParseError as e:
        raise SandboxError(f"could not read the deploy's results ({e}); log: {logfile}") from None


def deploy_failed(result: PyinfraResult, logfile: Path) -> SandboxError:
    lines = ANSI_RE.sub("", result.stdout).rstrip().splitlines()
    tail = "\n".join(lines[-40:])
    return SandboxError(f"the deploy failed; the end of its log ({logfile}):\n{tail}")


def chat_request(alias: str, prompt: str) -> dict:
    return {"model": alias, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48}


def chat(url: str, alias: str, prompt: str, timeout: float = 300) -> str:
    """One chat completion; returns the answer's text."""
    body = json.dumps(chat_request(alias, prompt)).encode()
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read())
            break
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"the model does not answer at {url}/chat/completions: {e}") from None
            time.sleep(1)
    try:
        return payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise SandboxError(f"unexpected answer from {url}: {json.dumps(payload)[:500]}") from None


def api_health(url_root: str) -> str:
    try:
        with urllib.request.urlopen(f"{url_root}/health", timeout=3) as response:
            return f"{response.status} {response.read(200).decode(errors='replace').strip()}"
    except urllib.error.HTTPError as e:
        return f"{e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"unreachable ({getattr(e, 'reason', e)})"


# --------------------------------------------------------------------------------------------
# commands


def cmd_up(args: argparse.Namespace) -> int:
    name = sandbox_name()
    path = state_path(name)
    work = work_dir(name)
    started = time.monotonic()
    out = Out(total=7)
    with locked(name):
        old = read_state(path) or {}
        mode = "vagrant" if args.vagrant else "nspawn"
        if old and old.get("mode", mode) != mode:
            raise SandboxError(f"sandbox {name!r} is up as a {old.get('mode')} rig; run "
                               f"`./scripts/sandbox down` first")
        if mode == "nspawn":
            missing = lab.rigs.missing_requirements()
            if missing:
                raise SandboxError("cannot boot the sandbox rig here, missing: "
                                   + ", ".join(missing) + " (run ./scripts/setup as root)")
            out.step(f"Sandbox rig `{RIG}` (a Debian 12 container with systemd and SSH)")
            fleet, rig = nspawn_rig(name, out)
            host_ip, rig_ip = fleet.host_ip, rig.ip
            ssh = fleet.connection_data(RIG)
            reach = f"./scripts/rigs ssh --name {name} {RIG}"
        else:
            out.step(f"Sandbox VM `{VAGRANT_MACHINE}` (Vagrant, Debian 12, {VAGRANT_IP})")
            vagrant("--version")
            work.mkdir(parents=True, exist_ok=True)
            (work / VAGRANT_MARKER).write_text(name + "\n")
            out.line("$ vagrant up " + VAGRANT_MACHINE)
            vagrant("up", VAGRANT_MACHINE)
            ssh = vagrant_ssh_data(parse_ssh_config(vagrant("ssh-config", VAGRANT_MACHINE)))
            host_ip, rig_ip = VAGRANT_HOST_IP, VAGRANT_IP
            reach = f"vagrant ssh {VAGRANT_MACHINE}"

        out.step("Stand-ins on this machine for GitHub and Hugging Face")
        fixtures = work / "fixtures"
        prepare_fixture_data(fixtures)
        engine = engine_config(args, host_ip, fixtures / "git")
        link_local_source(fixtures / "git", engine)
        model = model_config(args, host_ip)
        procs = ensure_fixtures(old, fixtures, host_ip, out)
        state = make_state(name, mode, rig_ip=rig_ip, host_ip=host_ip, ssh=ssh, engine=engine,
                           model=model, fixtures=procs)
        write_state(path, state)
        out.line(f"engine source: {engine['remote']} at {engine['ref']}")
        out.line(f"model: {model['repo']} {model['file']} from {model['hf_endpoint']}")
        out.line(f"state file: {path}")

        out.step("A stand-in NVIDIA GPU on the rig (one RTX 3090; nvidia-smi answers)")
        if mode == "nspawn":
            push_fake_gpu_nspawn(rig)
        else:
            push_fake_gpu_ssh(ssh, sudo=True)
        out.line("gpu_count: 1, power limit 280 W (the card allows 100-350 W)")

        out.step("Deploy: build the engine, download the model, start llama-server")
        first_log = work / "deploy-1.log"
        first = run_deploy(path, first_log, show_all=True, verbose=args.verbose)
        if not first.ok:
            raise deploy_failed(first, first_log)
        out.line(f"done in {first.duration:.0f}s: {first.changed} operation(s) changed "
                 f"something (full log: {first_log})")

        out.step("The served model answers on its port")
        url = f"http://{rig_ip}:{SERVE_PORT}/v1"
        prompt = "Hello! Which model are you?"
        request = json.dumps(chat_request(model["alias"], prompt))
        out.line(f"$ curl -s {url}/chat/completions -H 'Content-Type: application/json' "
                 f"-d {shlex.quote(request)}")
        answer = chat(url, model["alias"], prompt)
        shown = " ".join(answer.split())
        out.line(f"{model['alias']} answered: {shown[:300]!r}")

        out.step("Deploy again: nothing may change")
        second_log = work / "deploy-2.log"
        second = run_deploy(path, second_log, show_all=False, verbose=args.verbose)
        if not second.ok:
            raise deploy_failed(second, second_log)
        if second.changed or second.totals.get("success", 0):
            raise SandboxError(
                f"the second deploy changed {second.changed} operation(s), it should change "
                f"nothing (log: {second_log}):\n"
                + "\n".join(f"  {op}" for ops in second.changes().values() for op in ops))
        ops = sum(h.no_change for h in second.hosts.values())
        out.line(f"no changes: all {ops} operations found the rig as described "
                 f"({second.duration:.1f}s)")
        state["last_up"] = {"first_changed": first.changed, "first_s": round(first.duration, 1),
                            "second_changed": second.changed,
                            "second_s": round(second.duration, 1), "answer": answer[:500]}
        write_state(path, state)

    out.step(f"The sandbox is up ({time.monotonic() - started:.0f}s)")
    pyinfra_cmd = f".venv/bin/pyinfra -y {INVENTORY} {DEPLOY}"
    if os.environ.get(STATE_ENV) or name != DEFAULT_NAME:
        pyinfra_cmd = f"{STATE_ENV}={shlex.quote(str(path))} {pyinfra_cmd}"
    down = "./scripts/sandbox down"
    if name != DEFAULT_NAME:
        down = f"{NAME_ENV}={name} {down}"
    for label, value in (
        ("log in", reach),
        ("model API", f"{url}  (OpenAI-compatible, model {model['alias']!r})"),
        ("opencode", f"{OPENCODE_JSON} on the rig"),
        ("deploy again", pyinfra_cmd),
        ("inventory", f"{INVENTORY} (reads {path})"),
        ("tear down", down),
    ):
        out.line(f"{label:<14}{value}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    name = sandbox_name()
    path = state_path(name)
    work = work_dir(name)
    with locked(name, remove=True):
        state = read_state(path) or {}
        did = []
        for key, entry in (state.get("fixtures") or {}).items():
            if proc_alive(entry):
                stop_proc(entry)
                did.append(f"stopped {key} (pid {entry['pid']})")
        for marker in (f"--base-path={work / 'fixtures' / 'git'}", str(work / "fixtures" / "hf")):
            for pid in find_procs(marker):
                _kill_pid(pid, grace=5.0)
                did.append(f"stopped leftover pid {pid}")
        if state.get("mode") == "vagrant" or (work / VAGRANT_MARKER).exists():
            if shutil.which("vagrant"):
                vagrant("destroy", "-f", VAGRANT_MACHINE)
                did.append(f"destroyed Vagrant VM {VAGRANT_MACHINE}")
            else:
                did.append("Vagrant is not installed: no VM to destroy")
            shutil.rmtree(work, ignore_errors=True)
        elif any(entry["name"] == name for entry in lab.rigs.list_fleets()):
            lab.rigs.Fleet.attach(name).teardown()
            did.append(f"removed rig {RIG} and fleet {name}")
        path.unlink(missing_ok=True)
    if did:
        for line in did:
            print(f"    {line}")
        print(f"sandbox {name} is down")
    else:
        print(f"no sandbox {name!r} is up")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    name = sandbox_name()
    path = state_path(name)
    state = read_state(path)
    fleets = {e["name"]: e for e in lab.rigs.list_fleets()} if os.geteuid() == 0 else {}
    if state is None and name not in fleets:
        print(f"sandbox {name}: down (start it with ./scripts/sandbox)")
        return 1
    print(f"sandbox {name}: state {path}" + ("" if state else " (missing)"))
    entry = fleets.get(name)
    if entry:
        rig = entry["rigs"].get(RIG)
        running = bool(rig and rig["pid"]
                       and _proc_start_time(rig["pid"]) == rig["pid_start"])
        print(f"  rig {RIG:<12}{rig['ip'] if rig else '-':<16}{'up' if running else 'down'}")
    if state:
        if state.get("mode") == "vagrant":
            print(f"  vm  {VAGRANT_MACHINE:<12}{state['rig']['ip']:<16}(Vagrant)")
        for key, proc in (state.get("fixtures") or {}).items():
            alive = "running" if proc_alive(proc) else "stopped"
            print(f"  {key:<16}pid {proc['pid']:<12}{alive}")
        root = f"http://{state['rig']['ip']}:{SERVE_PORT}"
        print(f"  llama-server    {root}/v1  /health: {api_health(root)}")
        print(f"  engine          {state['engine']['remote']} at {state['engine']['ref']}")
        print(f"  model           {state['model']['repo']} {state['model']['file']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sandbox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="boot the sandbox (or reuse it) and deploy to it twice")
    up.add_argument("--real", action="store_true",
                    help="real llama.cpp and a real GGUF from Hugging Face instead of stand-ins")
    up.add_argument("--llama-source", metavar="PATH_OR_URL",
                    help=f"with --real: a local llama.cpp git repository or a git URL "
                         f"(default {UPSTREAM_LLAMA})")
    up.add_argument("--ref", help=f"with --real: the tag or commit to build (default {REAL_REF})")
    up.add_argument("--model", metavar="OWNER/NAME/FILE",
                    help=f"with --real: the GGUF file to serve (default {REAL_MODEL})")
    up.add_argument("--vagrant", action="store_true",
                    help="a Vagrant VM (see Vagrantfile) instead of a systemd-nspawn container")
    up.add_argument("-v", "--verbose", action="store_true", help="show pyinfra's whole output")
    sub.add_parser("down", help="stop and remove the sandbox")
    sub.add_parser("status", help="show what is up")
    args = parser.parse_args(argv)
    if args.cmd == "up" and not args.real and (args.llama_source or args.ref or args.model):
        parser.error("--llama-source, --ref and --model go with --real")
    logging.basicConfig(level=logging.WARNING, format="    %(message)s")
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[args.cmd](args)
    except (SandboxError, lab.rigs.RigError) as e:
        print(f"\nsandbox: {e}", file=sys.stderr)
        if args.cmd == "up" and state_path(sandbox_name()).exists():
            print("\nThe sandbox stays up so that you can look (./scripts/sandbox status); "
                  "./scripts/sandbox down removes it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
