"""Kill a deploy anywhere: at each point below, the controller's pyinfra process group and
every rig-side process of its SSH sessions (garage-build, git, the compiler, garage-fetch, the
shell writing a file ...) are SIGKILLed together, as a lost controller or a power cut would.

After each kill: the old server still answers (it was never restarted, or comes back with a
restart), nothing half-written or corrupt is at a final path or stamped (blobs, stamps,
snapshot links, builds and `current`, the unit, opencode.json), the unit names files that
exist, and the next run converges and passes the idempotence gate.

One rig serves the whole walk; each point changes one thing in the inventory (an engine tag,
a model revision, the unit, opencode.json) and kills the deploy that applies it. Points are
reached by watching from outside (lab/rigs/interrupt.py): a process or a file appearing on
the rig, or a line of the deploy's log. A write point missed by a hair is tried again with
the next change."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.rigs.interrupt import Interrupter, RigSessions, Watch
from lab.serving import chat, controller_env, http, service, sh
from lab.standins.engine_repo import GitDaemon, build_engine_repo
from lab.standins.gguf_gen import write_padded_model
from lab.standins.hf_server import HFServer

pytestmark = pytest.mark.e2e

REPO = "garage/Kill-GGUF"
FILE = "Kill-Q4_K_M.gguf"
SIZE = 4_000_000
PORT = 8081
UNIT = "/etc/systemd/system/llama-server-a.service"
OPENCODE = "/root/.config/opencode/opencode.json"
BUILDS = "/opt/llm-garage/builds/llama"
BLOBS = "/srv/models/.blobs"
TRIES = 3


def model_file(tmp: Path, revision: int) -> Path:
    """The model's file at one revision: the tiny model padded to SIZE, its weights seeded."""
    (tmp / f"rev{revision}").mkdir()
    return write_padded_model(tmp / f"rev{revision}" / FILE, SIZE, seed=revision)


@dataclass
class Walk:
    """The inventory as it stands, and what each change needs."""

    tmp: Path
    hub: HFServer
    git_url: str
    write_inventory: Callable
    ref: int = 4
    step: int = 0
    output_limit: int = 1000
    revisions: int = 0

    def data(self) -> dict:
        return {
            "hf_endpoint": self.hub.url,
            "engines": {"llama": {"kind": "llama.cpp", "ref": f"b{self.ref}", "cuda": False,
                                  "remote": f"{self.git_url}/llama.cpp.git"}},
            "models": {"m": {"repo": REPO, "revision": "main", "files": [FILE]}},
            "profiles": {"a": {"model": "m", "engine": "llama", "port": PORT,
                               "ctx_size": 4096, "health_timeout_s": 60,
                               "environment": {"FIXTURE_LOAD_SECONDS": "0.3",
                                               "GARAGE_KILL_STEP": str(self.step)}}},
            "opencode_client": True,
            "opencode_output_limit": self.output_limit,
        }

    def inventory(self) -> Path:
        return self.write_inventory({"rig1": self.data()})

    def new_revision(self) -> str:
        """A new commit of the model on `main`: other bytes under the same name."""
        self.revisions += 1
        self.hub.add_commit(REPO, {FILE: model_file(self.tmp, self.revisions)}, refs=["main"])
        return self.hub.file(REPO, FILE).sha256


@dataclass
class Point:
    name: str
    change: Callable[[Walk], dict]  # changes the walk; returns facts the checks use
    trigger: Callable[[Watch, dict], bool]
    hit: Callable  # (interruption, facts) -> "" when the kill landed at the point, else why not
    at_kill: Callable[[Watch, dict], dict] = lambda watch, facts: {}


@dataclass
class Row:
    point: str
    tries: int = 0
    killed: list[str] = field(default_factory=list)
    server: str = ""
    losses: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    reached: bool = False


def text(rig, path: str) -> str | None:
    local = rig.merged / path.lstrip("/")
    return local.read_text() if local.is_file() else None


def on_rig(rig, path: str) -> Path:
    """A rig path seen from here, following the rig's absolute links inside the rig."""
    local = rig.merged / path.lstrip("/")
    for _ in range(10):
        if not local.is_symlink():
            return local
        target = os.readlink(local)
        local = (rig.merged / target.lstrip("/")) if target.startswith("/") \
            else local.parent / target
    return local


def stamped_builds(rig) -> set[str]:
    return {p.parent.name for p in (rig.merged / BUILDS.lstrip("/")).glob("*/stamp")}


def current_build(rig) -> str | None:
    link = rig.merged / BUILDS.lstrip("/") / "current"
    return os.readlink(link) if link.is_symlink() else None


def store_losses(rig) -> list[str]:
    """Every blob at its final path holds the bytes its name says, every stamp vouching for a
    blob matches it, every snapshot link leads to a blob."""
    losses = []
    blobs = rig.merged / BLOBS.lstrip("/")
    for blob in blobs.glob("*"):
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):
            digest = hashlib.sha256(blob.read_bytes()).hexdigest()
            if digest != blob.name:
                losses.append(f"blob {blob.name[:12]} holds other bytes ({digest[:12]})")
        elif blob.name.endswith(".stamp"):
            size, _mtime, sha, *_ = blob.read_text().split()
            data = blobs / blob.name.removesuffix(".stamp")
            if sha == data.name and (not data.exists() or data.stat().st_size != int(size)):
                losses.append(f"stamp {blob.name} vouches for a blob that is not there whole")
    for link in (rig.merged / "srv/models").glob("*/*/*"):
        if link.is_symlink() and not on_rig(rig, str(link.relative_to(rig.merged))).is_file():
            losses.append(f"snapshot link {link.relative_to(rig.merged)} leads nowhere")
    return losses


def build_losses(rig) -> list[str]:
    """Every stamped build runs and reports what its stamp says; `current` is one of them."""
    losses = []
    for key in sorted(stamped_builds(rig)):
        stamp = text(rig, f"{BUILDS}/{key}/stamp")
        if not stamp.rstrip().splitlines()[-1].startswith("cmake_args="):
            losses.append(f"build {key}: stamp cut short")
        version = rig.ssh(f"{BUILDS}/{key}/bin/llama-server --version 2>&1", check=False)
        line = next((x for x in version.stdout.splitlines() if "version:" in x), "?")
        if version.returncode != 0 or f"version={line}\n" not in stamp:
            losses.append(f"build {key}: its llama-server does not answer as stamped "
                          f"({version.stdout.strip()!r})")
    current = current_build(rig)
    if current is not None and current not in stamped_builds(rig):
        losses.append(f"current -> {current}, a build without a stamp")
    return losses


def unit_losses(rig) -> list[str]:
    """The installed unit names a binary and model files that exist."""
    unit = text(rig, UNIT) or ""
    exec_start = next((line for line in unit.splitlines() if line.startswith("ExecStart=")), "")
    words = shlex.split(exec_start.removeprefix("ExecStart="))
    if not words:
        return ["no ExecStart in the installed unit"]
    paths = [w for w in words if w.startswith(("/opt/llm-garage/builds", "/srv/models"))]
    return [f"the unit names {p}, which is missing" for p in paths
            if not on_rig(rig, p).exists()]


def serving(rig, before_pid: str) -> tuple[str, list[str]]:
    """Whether the old server still answers (not restarted), or comes back with a restart."""
    for _ in range(20):  # a server the deploy restarted may still be loading
        if chat(rig, PORT) == 200:
            pid = service(rig, "llama-server-a.service")["MainPID"]
            return ("answers, not restarted" if pid == before_pid
                    else "answers (restarted by the killed deploy)"), []
        rig.ssh("sleep 0.5")
    rig.ssh("systemctl restart llama-server-a.service", check=False)
    for _ in range(30):
        if chat(rig, PORT) == 200:
            return "back after a restart", []
        rig.ssh("sleep 1")
    return "down", ["the server does not answer, even after a restart"]


def converged_losses(rig, walk: Walk) -> list[str]:
    """After the rerun, the rig serves what the inventory says: the new build, the new
    model bytes, the new unit (loaded by systemd), the new opencode.json."""
    losses = []
    status, body = http(rig, PORT, "/props")
    build = json.loads(body).get("build_info", "") if status == 200 else ""
    if not build.startswith(f"b{walk.ref}-"):
        losses.append(f"serves build {build!r}, not b{walk.ref}")
    show = sh(rig, "systemctl show -p Environment -p NeedDaemonReload -p MainPID "
                   "llama-server-a.service")
    if f"GARAGE_KILL_STEP={walk.step}" not in show or "NeedDaemonReload=no" not in show:
        losses.append(f"the running service is not the new unit: {show!r}")
    pid = re.search(r"MainPID=(\d+)", show).group(1)
    model = next((w for w in sh(rig, f"tr '\\0' ' ' </proc/{pid}/cmdline").split()
                  if w.endswith(".gguf")), "")
    if on_rig(rig, model).name != walk.hub.file(REPO, FILE).sha256:
        losses.append(f"the server loaded {model}, not the revision on main")
    config = json.loads(text(rig, OPENCODE) or "{}")
    outputs = {m.get("limit", {}).get("output") for p in config.get("provider", {}).values()
               for m in p.get("models", {}).values()}
    if outputs != {walk.output_limit}:
        losses.append(f"opencode.json has limit.output {outputs}, not {walk.output_limit}")
    return losses


# --- the points -------------------------------------------------------------------------------

def next_ref(walk: Walk) -> dict:
    walk.ref += 1
    return {}


def next_revision(walk: Walk) -> dict:
    walk.hub.faults.clear()
    return {"sha": walk.new_revision()}


def throttled_revision(walk: Walk) -> dict:
    facts = next_revision(walk)
    walk.hub.faults.throttle(FILE, 1_000_000)  # 4 s for the whole file
    return facts


def next_step(walk: Walk) -> dict:
    walk.step += 1
    return {}


def next_limit(walk: Walk) -> dict:
    walk.output_limit += 1
    return {}


def killed(pattern: str, what: str):
    return lambda run, facts: "" if run.killed(pattern) else f"no {what} was running"


def build_done_not_switched(run, facts) -> str:
    new = run.at_kill["stamped"] - facts["stamped"]
    if not new:
        return "no new stamped build at the kill"
    if run.at_kill["current"] != facts["current"] or run.at_kill["unit"] != facts["unit"]:
        return "current or the unit had moved already"
    return ""


def download_cut(run, facts) -> str:
    return "" if run.killed("garage-fetch") and run.at_kill["arriving"] else \
        "the download was not under way"


def fetched_not_served(run, facts) -> str:
    if not run.at_kill["blob"] or not run.at_kill["snapshot"]:
        return "the new revision was not in place"
    return "" if run.at_kill["unit"] == facts["unit"] else "the unit had moved already"


def tmp_present(name: str):
    return lambda run, facts: "" if run.at_kill["tmp"] else f"{name} was already renamed"


def restarted_not_proven(run, facts) -> str:
    return "" if run.killed("garage-server-check") else "the proof was not running"


def unit_new_not_restarted(run, facts) -> str:
    return "" if run.at_kill["unit"] != facts["unit"] else "the unit was not written yet"


def look(rig, sha: str | None = None, tmp: str | None = None) -> Callable[[Watch, dict], dict]:
    def at_kill(watch: Watch, facts: dict) -> dict:
        seen = {"stamped": stamped_builds(rig), "current": current_build(rig),
                "unit": text(rig, UNIT), "opencode": text(rig, OPENCODE)}
        if tmp:
            seen["tmp"] = watch.path(tmp).exists()
        if facts.get("sha"):
            sha = facts["sha"]
            seen["arriving"] = bytes_arriving(watch, facts)
            seen["blob"] = watch.path(f"{BLOBS}/{sha}").exists()
            seen["snapshot"] = any(
                on_rig(rig, str(p.relative_to(rig.merged))).name == sha
                for p in (rig.merged / "srv/models/m").glob("*/*") if p.is_symlink())
        return seen
    return at_kill


def bytes_arriving(watch: Watch, facts: dict) -> bool:
    """Some of the new file's bytes are on the rig (wherever the fetcher puts them), not
    all: the download is under way."""
    for path in watch.path(BLOBS).glob(facts["sha"] + "*"):
        size = path.stat().st_size if path.is_file() else 0
        if 256 << 10 < size < SIZE:
            return True
    return False


def points(rig) -> list[Point]:
    return [
        Point("mid source fetch (git fetch of the new tag)", next_ref,
              lambda w, f: w.process(r"^git .*\bfetch\b|index-pack|unpack-objects"),
              killed(r"^git .*\bfetch\b|index-pack|unpack-objects", "git fetch")),
        Point("mid compile", next_ref, lambda w, f: w.process(r"(^|/)cc1plus "),
              killed(r"(^|/)cc1plus ", "compiler")),
        Point("between build and switch (build stamped, unit and current not moved)",
              next_ref, lambda w, f: w.line(r"garage-build: done in "),
              build_done_not_switched, look(rig)),
        Point("mid model download (new revision, same file name)", throttled_revision,
              bytes_arriving, download_cut, look(rig)),
        Point("after download, before the switch (snapshot linked, unit not moved)",
              next_revision, lambda w, f: w.line(r"garage-fetch: .*: 1 of 1 link\(s\) made"),
              fetched_not_served, look(rig)),
        Point("mid unit write (temporary unit beside the installed one)", next_step,
              lambda w, f: w.path(UNIT + ".tmp").exists(), tmp_present("the unit"),
              look(rig, tmp=UNIT + ".tmp")),
        Point("between unit write and restart (new unit installed, server not restarted)",
              next_step, lambda w, f: text(rig, UNIT) != f["unit"],
              unit_new_not_restarted, look(rig)),
        Point("mid proof (new unit restarted, its proof running)", next_step,
              lambda w, f: w.process("garage-server-check") and w.service_process(
                  rf"llama-server .*--port {PORT}\b", f["servers"]),
              restarted_not_proven),
        Point("mid opencode.json write (temporary file beside it)", next_limit,
              lambda w, f: w.path(OPENCODE + ".llm-garage.tmp").exists(),
              tmp_present("opencode.json"), look(rig, tmp=OPENCODE + ".llm-garage.tmp")),
    ]


def test_a_deploy_killed_anywhere_loses_nothing_and_the_rerun_converges(
        fleet, start_rigs, write_inventory, converge, tmp_path):
    build_engine_repo(tmp_path / "engines", "llama.cpp", n_commits=20, n_units=4,
                      unit_weight=8, tag_every=1, broken_at=3)
    hub = HFServer(bind=fleet.host_ip)
    hub.add_repo(REPO, {FILE: model_file(tmp_path, 0)})
    (rig,) = start_rigs("rig1")
    env = controller_env(tmp_path)
    rows: list[Row] = []
    with GitDaemon(tmp_path / "engines", bind_ip=fleet.host_ip) as daemon, hub, \
            RigSessions(rig) as sessions:
        walk = Walk(tmp_path, hub, daemon.url, write_inventory)
        converge(walk.inventory(), env=env)
        assert chat(rig, PORT) == 200
        interrupter = Interrupter(sessions)
        for point in points(rig):
            row = Row(point.name)
            rows.append(row)
            for row.tries in range(1, TRIES + 1):
                facts = point.change(walk)
                facts.update(stamped=stamped_builds(rig), current=current_build(rig),
                             unit=text(rig, UNIT), opencode=text(rig, OPENCODE),
                             pid=service(rig, "llama-server-a.service")["MainPID"],
                             servers=set(sessions.services()))
                run = interrupter.run(
                    walk.inventory(), lambda w, p=point, f=facts: p.trigger(w, f), env=env,
                    at_kill=lambda w, p=point, f=facts: p.at_kill(w, f))
                assert run.fired or run.result.ok, run.result.output_tail()
                missed = point.hit(run, facts) if run.fired else "the deploy ended first"
                if run.fired:
                    row.killed = sorted({os.path.basename(argv[0]) for argv in run.rig_killed
                                         if argv})
                    row.server, losses = serving(rig, facts["pid"])
                    losses += store_losses(rig) + build_losses(rig) + unit_losses(rig)
                    at_kill = {"unit": text(rig, UNIT), "opencode": text(rig, OPENCODE)}
                    walk.hub.faults.clear()
                    rerun, _ = converge(walk.inventory(), env=env)
                    if not re.search(r"deploy lock \S+ \(.*\) taken over", rerun.stderr):
                        losses.append("the rerun did not take over the killed run's lock")
                    losses += converged_losses(rig, walk)
                    for name, path in (("unit", UNIT), ("opencode", OPENCODE)):
                        if at_kill[name] not in (facts[name], text(rig, path)):
                            losses.append(f"{path} was neither the old nor the new file")
                    if at_kill["opencode"] is not None:
                        json.loads(at_kill["opencode"])
                    row.losses += losses
                if not missed:
                    row.reached = True
                    break
                row.missed.append(f"try {row.tries}: {missed}")
    table = "\n".join(f"| {r.point} | {r.tries} | {', '.join(r.killed)} | {r.server} | "
                      f"{'; '.join(r.losses) or 'none'} |"
                      + (f" missed: {'; '.join(r.missed)}" if r.missed else "") for r in rows)
    print(f"\n| kill point | tries | rig-side processes killed | server | losses |\n"
          f"|---|---|---|---|---|\n{table}")
    (tmp_path / "kill-points.md").write_text(table + "\n")
    assert all(r.reached for r in rows) and not any(r.losses for r in rows), table
