"""Rig documents: what runs on a rig and how to rebuild it by hand, written on the controller
at the end of every deploy (tasks/docs.py) as `<docs_dir>/<rig>.md` and `<rig>.json`.

`collect` joins what the deploy planned (engine and model plans, the settings) with what the
rig reports at the end of the run (`facts.rigdoc.RigReport`) into plain data; the JSON file is
that data, and `render` turns it into Markdown with nothing else, so `llm-garage docs` renders
the documents again offline from the JSON files.

Deterministic: identical data gives identical bytes (sorted keys, stable order, no clock).
Values that move without any change on the rig (free disk space) are kept under `observed`,
which the Markdown never shows and which is left out when deciding whether a document
changed: a deploy that changes nothing rewrites nothing."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .layout import GPU_POWER_UNIT, service_name, unit_path
from .settings import Rig, load_flags_env

FORMAT = 1
BENCH = "bench"  # the latest `llm-garage bench` run, written by the bench command
OBSERVED = "observed"  # volatile values: in the JSON only, ignored when comparing
UNIT_HEREDOC = "LLM_GARAGE_UNIT"


# --- collect ---------------------------------------------------------------------------------

def _exec_lines(unit_text: str | None) -> tuple[str | None, list[str]]:
    """ExecStart= and the Environment= words of a unit."""
    exec_start, env = None, []
    for line in (unit_text or "").splitlines():
        if line.startswith("ExecStart="):
            exec_start = line[len("ExecStart="):]
        elif line.startswith("Environment="):
            env.append(line[len("Environment="):])
    return exec_start, env


def configure_argv(plan, launchers: bool = True) -> list[str]:
    """The cmake configure line garage-build runs for a build plan (with ccache launchers),
    or, `launchers=False`, the same without ccache (what a person needs)."""
    argv = ["cmake", "-S", plan.source_dir, "-B", plan.build_dir]
    if launchers:
        argv += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if plan.nvcc:
            argv.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")
    if plan.nvcc:
        argv.append(f"-DCMAKE_CUDA_COMPILER={plan.nvcc}")
    return argv + plan.cmake_args


def collect(rig: Rig, report: Mapping[str, Any], engines: Mapping[str, Any],
            models: Mapping[str, Any], opencode_providers: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
    """The document's data: `report` from `facts.rigdoc.RigReport`, `engines` and `models`
    the deploy's plans (name -> BuildPlan / ModelPlan), `opencode_providers` what this rig's
    opencode.json was given (None when it is no opencode client)."""
    d = rig.data
    machine = dict(report.get("machine") or {})
    disk = machine.pop("disk", None) or {}
    observed = {"models_dir_free_bytes": disk.get("free_bytes")}
    machine.update(models_dir=d.models_dir, filesystem=disk.get("filesystem"),
                   filesystem_bytes=disk.get("size_bytes"), mounted_on=disk.get("mounted_on"))
    gpus = report.get("gpus") or {"gpus": [], "error": None}
    data: dict[str, Any] = {
        "format": FORMAT,
        "rig": rig.name,
        "address": rig.address,
        "machine": machine,
        "cuda_toolkit": report.get("nvcc"),
        "gpus": gpus["gpus"],
        "gpus_error": gpus["error"],
        "gpu_settings": {
            "count": d.gpu_count, "power_limits_w": rig.power_limits(),
            "persistence_mode": d.gpu_persistence_mode if d.gpu_count else None,
            "boot_unit": GPU_POWER_UNIT if d.gpu_count else None},
        "service_user": {"name": d.service_user, "groups": list(d.service_groups),
                         "home": rig.layout.service_home},
        "engines": [], "models": [], "profiles": [],
        "opencode": None,
        OBSERVED: observed,
    }
    found_engines = report.get("engines") or {}
    for name, plan in sorted(engines.items()):
        found = found_engines.get(name) or {"current": None, "builds": {}}
        stamps = found["builds"]
        kept = sorted(stamps, key=lambda k: (stamps[k].get("finished", ""), k), reverse=True)
        data["engines"].append({
            "name": name, "kind": plan.kind, "ref": plan.ref, "commit": plan.commit,
            "remote": plan.remote, "fetch": list(plan.fetch), "source_dir": plan.source_dir,
            "build_dir": plan.build_dir, "key": plan.key, "current": found["current"],
            "load_flags_file": plan.load_flags_file,
            "configure": configure_argv(plan), "by_hand_configure": configure_argv(plan, False),
            "targets": list(plan.targets), "jobs": plan.jobs,
            "architectures": list(plan.architectures), "nvcc": plan.nvcc,
            "cuda_toolkit": plan.cuda_toolkit,
            "cuda_install": {
                "dir": plan.cuda_install.toolkit_dir, "index": plan.cuda_install.index,
                "wheels": [f"{w.file} sha256:{w.sha256}"
                           for w in plan.cuda_install.wheels.wheels],
            } if plan.cuda_install else None,
            "stamp": stamps.get(plan.key),
            "kept": [{"key": k, "version": stamps[k].get("version"),
                      "finished": stamps[k].get("finished")} for k in kept],
        })
    found_models = report.get("models") or {}
    for name, plan in sorted(models.items()):
        on_rig = {f["name"]: f for f in found_models.get(name) or []}
        r = plan.resolved
        data["models"].append({
            "name": name, "repo": r.spec.repo, "revision": r.spec.revision,
            "commit": r.commit, "folder": plan.folder, "snapshot": plan.snapshot,
            "loaded_file": plan.path, "needs_token": r.needs_token,
            "files": [{"path": rf.path, "name": f["name"], "size": f["size"],
                       "sha256": f["sha256"], "url": f["url"],
                       "on_rig": _on_rig(f, on_rig.get(f["name"]))}
                      for rf, f in zip(r.files, plan.files, strict=True)],
        })
    found_services = report.get("services") or {}
    for name in sorted(rig.profiles):
        p = rig.profiles[name]
        found = found_services.get(name) or {}
        exec_start, env = _exec_lines(found.get("unit_text"))
        proof = dict(found.get("proof") or {})
        proof.pop("unit", None)
        data["profiles"].append({
            "name": name, "enabled": p.enabled, "service": service_name(name),
            "unit_file": unit_path(service_name(name)),
            "alias": rig.alias(name), "model": p.model, "engine": p.engine, "port": p.port,
            "listen": p.listen, "url": f"http://{_host(rig.address)}:{p.port}/v1",
            "key_file": rig.layout.key_file(name) if p.api_key_env else None,
            "key_env": p.api_key_env,
            "health_timeout_s": p.health_timeout_s,
            "active": found.get("active") if p.enabled else None,
            "unit_text": found.get("unit_text") if p.enabled else None,
            "exec_start": exec_start if p.enabled else None,
            "environment": env if p.enabled else [],
            "proof": (proof or None) if p.enabled else None,
            "loaded": (found.get("loaded") or []) if p.enabled else [],
        })
    if opencode_providers is not None:
        data["opencode"] = {
            "path": d.opencode_config_path,
            "providers": [{"id": pid, "base_url": prov["options"]["baseURL"],
                           "models": sorted(prov["models"])}
                          for pid, prov in sorted(opencode_providers.items())]}
    return data


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _on_rig(want: Mapping[str, Any], have: Mapping[str, Any] | None) -> str:
    """`ok` when the rig's file is the blob of the wanted sha256 with the wanted size."""
    if have is None:
        return "missing"
    if have.get("sha256") != want["sha256"] or have.get("size") != want["size"]:
        return "differs"
    return "ok"


# --- JSON ------------------------------------------------------------------------------------

def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stable(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data without its observed (volatile) values."""
    return {k: v for k, v in data.items() if k != OBSERVED}


# --- Markdown --------------------------------------------------------------------------------

def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _num(x: float | None, unit: str) -> str:
    return "?" if x is None else f"{x:g} {unit}"


def _code(text: str | None) -> str:
    return "?" if text in (None, "") else f"`{text}`"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def _machine(data) -> list[str]:
    m, cuda = data["machine"], data["cuda_toolkit"]
    cpu = m.get("cpu") or "unknown"
    if m.get("cpus"):
        cpu += f", {m['cpus']} logical CPUs"
    disk = f"`{m['models_dir']}`"
    if m.get("filesystem"):
        disk += (f" on {m['filesystem']} (mounted on `{m.get('mounted_on')}`, "
                 f"{_size(m.get('filesystem_bytes'))})")
    rows = [["address", data["address"]], ["OS", m.get("os") or "unknown"],
            ["kernel", m.get("kernel") or "unknown"], ["CPU", cpu],
            ["memory", _size(m.get("memory_bytes"))], ["models_dir", disk],
            ["CUDA toolkit", f"{cuda['version'] or '?'} (`{cuda['nvcc']}`)" if cuda else "none"]]
    return ["## Machine", ""] + _table(["", ""], rows) + [""]


def _gpus(data) -> list[str]:
    out = ["## GPUs", ""]
    s = data["gpu_settings"]
    if data["gpus"]:
        rows = [[str(g["index"]), g["name"], _code(g["uuid"]), _code(g["pci_bus_id"]),
                 f"{g['memory_mib']} MiB" if g["memory_mib"] is not None else "?",
                 g["compute_cap"] or "?", g["driver_version"] or "?",
                 f"{_num(g['power_limit_w'], 'W')} ({_num(g['power_min_w'], 'W')}–"
                 f"{_num(g['power_max_w'], 'W')})",
                 {True: "on", False: "off"}.get(g["persistence_mode"], "?")]
                for g in data["gpus"]]
        out += _table(["index", "name", "UUID", "PCI bus", "memory", "compute cap", "driver",
                       "power limit (range)", "persistence"], rows)
    elif data["gpus_error"]:
        out.append(f"nvidia-smi failed: {data['gpus_error']}")
    else:
        out.append("No NVIDIA GPU (nvidia-smi is not installed).")
    if s["count"]:
        limits = s["power_limits_w"]
        what = ("power limits " + ", ".join(f"GPU {i} {w:g} W" for i, w in enumerate(limits))
                if limits else "power limits left alone")
        persistence = "persistence mode on" if s["persistence_mode"] else \
            "persistence mode left alone"
        out += ["", f"Settings: {s['count']} GPU(s) expected, {what}, {persistence}; "
                    f"re-applied at boot by `{s['boot_unit']}`."]
    return out + [""]


def _engines(data) -> list[str]:
    out = ["## Engines", ""]
    if not data["engines"]:
        return out + ["None.", ""]
    for e in data["engines"]:
        stamp = e["stamp"] or {}
        pin = e["ref"] if e["ref"] == e["commit"] else f"{e['ref']} → {e['commit']}"
        arches = ("CUDA architectures " + ";".join(e["architectures"])
                  if e["architectures"] else "CPU only")
        out += [f"### {e['name']}: {e['kind']} {e['ref']}", "",
                f"- pin: `{pin}` from `{e['remote']}`",
                f"- `--version`: {_code(stamp.get('version'))}",
                f"- build: `{e['build_dir']}` ({arches}; "
                + ("current" if e["current"] == e["key"] else
                   f"not current: `current` is {_code(e['current'])}") + ")"]
        if stamp:
            out.append(f"- built in {stamp.get('seconds', '?')} s with -j "
                       f"{stamp.get('jobs', '?')}, ccache {stamp.get('ccache_hits', '?')} hits /"
                       f" {stamp.get('ccache_misses', '?')} misses, finished "
                       f"{stamp.get('finished', '?')}")
        else:
            out.append("- not built on the rig (no stamp)")
        if e["nvcc"]:
            toolkit = f" (CUDA {e['cuda_toolkit']})" if e.get("cuda_toolkit") else ""
            out.append(f"- CUDA compiler: `{e['nvcc']}`{toolkit}")
        if e.get("cuda_install"):
            i = e["cuda_install"]
            out.append(f"- CUDA toolkit installed by llm-garage into `{i['dir']}` from NVIDIA's "
                       f"wheels on `{i['index']}` (its `stamp` lists them):")
            out += [f"  - `{w}`" for w in i["wheels"]]
        out += ["- configure (as garage-build runs it):", "", "  ```sh",
                "  " + shlex.join(e["configure"]), "  ```",
                "- builds kept for rollback (newest first):"]
        out += [f"  - `{k['key']}`: {_code(k['version'])}, finished {k['finished'] or '?'}"
                + (" (current)" if k["key"] == e["current"] else "") for k in e["kept"]] or [
            "  - none"]
        out.append("")
    return out


def _models(data) -> list[str]:
    out = ["## Models", ""]
    if not data["models"]:
        return out + ["None.", ""]
    for m in data["models"]:
        out += [f"### {m['name']}: {m['repo']}", "",
                f"- revision `{m['revision']}` → commit `{m['commit']}`",
                f"- snapshot: `{m['snapshot']}/` (links to blobs named by their sha256)",
                f"- llama-server loads `{m['loaded_file']}`", ""]
        out += _table(["file", "size", "sha256", "on the rig"],
                      [[f"`{f['path']}`", f"{_size(f['size'])} ({f['size']} B)",
                        f"`{f['sha256']}`", f["on_rig"]] for f in m["files"]])
        out.append("")
    return out


def _proof(proof: Mapping[str, Any] | None) -> str:
    if not proof:
        return "no proof recorded"
    if not proof.get("ok"):
        return f"FAILED at {proof.get('step', '?')}: {proof.get('reason', '?')}"
    said = ["ok"]
    if proof.get("n_ctx") is not None:
        said.append(f"n_ctx {proof['n_ctx']}")
    if proof.get("slots") is not None:
        said.append(f"{proof['slots']} slot(s)")
    if proof.get("build_info"):
        said.append(f"build {proof['build_info']}")
    if proof.get("tool_call"):
        said.append(f"tool call `{proof['tool_call']}` and tool result")
    if proof.get("gpu_layers"):
        said.append(f"{proof['gpu_layers']} layers on {proof.get('cuda_devices')} GPU(s)")
    elif proof.get("cuda_devices") is not None:
        said.append(f"{proof['cuda_devices']} CUDA device(s)")
    return ", ".join(said)


def _profiles(data) -> list[str]:
    out = ["## Profiles", ""]
    if not data["profiles"]:
        return out + ["None.", ""]
    for p in data["profiles"]:
        if not p["enabled"]:
            out += [f"### {p['name']}: disabled", "",
                    f"- `{p['service']}` is stopped and removed (model {p['model']}, engine "
                    f"{p['engine']}, port {p['port']})", ""]
            continue
        out += [f"### {p['name']}: {p['service']} ({p['active'] or 'unknown'})", "",
                f"- serves `{p['alias']}` at {p['url']} (listens on {p['listen']}:{p['port']};"
                f" model {p['model']}, engine {p['engine']})",
                f"- unit: `{p['unit_file']}`"]
        if p["key_file"]:
            out.append(f"- API key: in `{p['key_file']}` (root only, a credential of the unit)")
        out += ["- ExecStart:", "", "  ```", f"  {p['exec_start'] or '(no unit installed)'}",
                "  ```"]
        if p["environment"]:
            out.append("- environment: " + ", ".join(f"`{w}`" for w in p["environment"]))
        out.append(f"- last proof: {_proof(p['proof'])}")
        if p["loaded"]:
            out += ["- memory at load (from the server's start log):", ""]
            out += ["  " + line for line in _table(
                ["device", "buffer", "MiB"],
                [[x["device"], x["buffer"] + (f" ({x['detail']})" if x.get("detail") else ""),
                  f"{x['mib']:.2f}"] for x in p["loaded"]])]
        out.append("")
    return out


def _opencode(data) -> list[str]:
    o = data["opencode"]
    if o is None:
        return []
    out = ["## opencode", "", f"Providers written to `{o['path']}` on this rig:", ""]
    out += [f"- `{x['id']}`: {x['base_url']}, models " + ", ".join(f"`{m}`" for m in x["models"])
            for x in o["providers"]] or ["- none"]
    return out + [""]


def load_flags_by_hand(build_dir: str, path: str | None) -> list[str]:
    """What garage-build writes to a build's load-flags.env (settings.LOAD_FLAGS), as a shell
    line: the spelling of no_mmap/mlock the built llama-server's --help offers (grep reads
    all of it: with -q it could stop early and, under pipefail, fail the pipe)."""
    if not path:
        return []
    q = shlex.quote
    binary, env = q(f"{build_dir}/bin/llama-server"), q(path)
    return ["# how this llama-server spells no_mmap/mlock (the units read this file)",
            f"if {binary} --help 2>&1 | grep -e --load-mode >/dev/null; then printf %s "
            f"{q(load_flags_env(True))} > {env}; else printf %s {q(load_flags_env(False))} "
            f"> {env}; fi"]


def _by_hand(data) -> list[str]:
    """Commands that rebuild this rig without llm-garage: same binary, bytes and units."""
    q = shlex.quote
    u = data["service_user"]
    sh = ["# service user (the units run as it)",
          *[f"groupadd -f --system {q(g)}" for g in u["groups"]],
          f"useradd --system --no-create-home --home-dir {q(u['home'])} "
          f"--shell /usr/sbin/nologin" + (f" --groups {q(','.join(u['groups']))}"
                                          if u["groups"] else "") + f" {q(u['name'])}"]
    if data["engines"]:
        sh += ["", "# build and download tools",
               "apt-get install -y build-essential cmake git libssl-dev curl ca-certificates"]
    for e in data["engines"]:
        stamp = e["stamp"] or {}
        sh += ["", f"# engine {e['name']}: {e['kind']} {e['ref']} (full history: the build "
                   "number is the commit count)",
               f"git clone {q(e['remote'])} {q(e['source_dir'])}"]
        sh += [f"git -C {q(e['source_dir'])} fetch origin {q(spec)}" for spec in e["fetch"]
               if spec != e["commit"]]
        sh += [f"git -C {q(e['source_dir'])} checkout --detach {e['commit']}",
               shlex.join(e["by_hand_configure"]),
               f"cmake --build {q(e['build_dir'])} -j {e['jobs']} --target "
               + " ".join(q(t) for t in e["targets"]),
               f"{q(e['build_dir'] + '/bin/llama-server')} --version"
               + (f"   # {stamp['version']}" if stamp.get("version") else ""),
               *load_flags_by_hand(e["build_dir"], e.get("load_flags_file"))]
    for m in data["models"]:
        sh += ["", f"# model {m['name']}: {m['repo']} at {m['commit']}"
               + (" (gated: add -H \"Authorization: Bearer $HF_TOKEN\" to curl)"
                  if m["needs_token"] else ""),
               f"mkdir -p {q(m['snapshot'])}"]
        for f in m["files"]:
            dest = f"{m['snapshot']}/{f['name']}"
            sh += [f"curl -fL -o {q(dest)} {q(f['url'])}",
                   f"echo {q(f['sha256'] + '  ' + dest)} | sha256sum -c -"]
    s = data["gpu_settings"]
    if s["count"] and (s["persistence_mode"] or s["power_limits_w"]):
        sh += ["", "# GPUs (not kept across a reboot: run these at boot, e.g. from a oneshot "
                   "unit)"]
        if s["persistence_mode"]:
            sh.append("nvidia-smi -pm 1")
        for i, w in enumerate(s["power_limits_w"] or []):
            sh.append(f"nvidia-smi -i {i} -pl {w:g}")
    for p in data["profiles"]:
        if not p["enabled"] or not p["unit_text"]:
            continue
        sh += ["", f"# service {p['service']}"]
        if p["key_file"]:
            env = p.get("key_env") or "LLAMA_API_KEY"
            sh += [f"install -d -m 700 {q(p['key_file'].rsplit('/', 1)[0])}",
                   f"install -m 600 /dev/null {q(p['key_file'])}",
                   f"printf '%s\\n' \"${env}\" > {q(p['key_file'])}   # the API key: set "
                   f"{env} first (as for the deploy)"]
        sh += [f"cat > {q(p['unit_file'])} <<'{UNIT_HEREDOC}'",
               *p["unit_text"].rstrip("\n").split("\n"), UNIT_HEREDOC,
               "systemctl daemon-reload",
               f"systemctl enable --now {q(p['service'])}",
               _wait_health(p)]
    return ["## Rebuild by hand", "",
            "Run as root on a fresh machine, in order; the result runs the same "
            "`llama-server` version from the same commit, on the same model bytes, with the "
            "same units.", "", "```sh", *sh, "```", ""]


def _wait_health(p: Mapping[str, Any]) -> str:
    """A curl that waits, as the deploy does, until the server has loaded and /health answers
    200 (it answers 503 while loading)."""
    listen = p["listen"]
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "localhost": "127.0.0.1"}.get(
        listen, _host(listen))
    wait = p.get("health_timeout_s") or 900
    return (f"curl -fsS --retry {wait} --retry-delay 1 --retry-all-errors --retry-max-time "
            f"{wait} http://{host}:{p['port']}/health")


def render(data: Mapping[str, Any]) -> str:
    """The rig document, Markdown, from `collect`'s data (and nothing else)."""
    lines = [f"# Rig {data['rig']}", "",
             "Written by llm-garage at the end of each deploy from what the rig reports; "
             f"`{data['rig']}.json` holds the same data. Change the inventory, not this file.",
             ""]
    for part in (_machine, _gpus, _engines, _models, _profiles, _bench, _opencode, _by_hand):
        lines += part(data)
    return "\n".join(lines).rstrip("\n") + "\n"


# --- files -----------------------------------------------------------------------------------

def doc_paths(docs_dir: str | os.PathLike, rig: str) -> tuple[Path, Path]:
    base = Path(docs_dir)
    return base / f"{rig}.md", base / f"{rig}.json"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def pending(docs_dir: str | os.PathLike, data: Mapping[str, Any]) -> list[Path]:
    """The files `write` would change: none when the stable data and the Markdown on disk
    already match."""
    md, js = doc_paths(docs_dir, data["rig"])
    out = []
    old = load(js)
    if old is None or stable(old) != stable(data):
        out.append(js)
    try:
        if md.read_text() != render(data):
            out.append(md)
    except OSError:
        out.append(md)
    return out


def write_markdown(path: Path, data: Mapping[str, Any]) -> bool:
    """Render `data` into `path` unless it already holds exactly that; True when written."""
    text = render(data)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    _atomic_write(path, text)
    return True


def write(docs_dir: str | os.PathLike, data: Mapping[str, Any]) -> list[Path]:
    """Write `<rig>.md` and `<rig>.json` atomically, each only when it changes; returns the
    files written."""
    md, js = doc_paths(docs_dir, data["rig"])
    todo = pending(docs_dir, data)
    if js in todo:
        _atomic_write(js, dumps(data))
    if md in todo:
        _atomic_write(md, render(data))
    return todo


# --- the latest bench run ---------------------------------------------------------------------

def _bench(data) -> list[str]:
    bench = data.get(BENCH)
    if not bench:
        return []
    return ["## Benchmark", "",
            f"The latest `llm-garage bench` run on this rig, `{bench['run']}` (all runs: "
            f"`{bench['results']}`):", "", *bench["lines"], ""]


def set_bench(docs_dir: str | os.PathLike, rig: str, run: str, results: str,
              lines: list[str]) -> list[Path]:
    """Put a bench run's table into the rig's document (when the rig has one); returns the
    files written."""
    _, js = doc_paths(docs_dir, rig)
    data = load(js)
    if data is None or data.get("format") != FORMAT:
        return []
    data[BENCH] = {"run": run, "results": results, "lines": list(lines)}
    return write(docs_dir, data)


def keep_bench(docs_dir: str | os.PathLike, data: dict[str, Any]) -> None:
    """A deploy keeps the bench table the document holds (the rig does not report it)."""
    old = load(doc_paths(docs_dir, data["rig"])[1])
    if old and old.get(BENCH):
        data[BENCH] = old[BENCH]
