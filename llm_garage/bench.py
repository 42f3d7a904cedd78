"""`llm-garage bench`: prefill and decode speed, time to first token and GPU power of a deployed
server, by context depth, kept as data and shown as the seeds' table, a chart and deltas.

The measurement runs on the rig (`garage-bench`, installed by the deploy) against the server
as it runs; this module builds its command line, runs it over SSH, turns what it reports into
one JSON Lines record per measurement (`<bench_dir>/<rig>.jsonl`) and renders runs."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .layout import service_name
from .plans.services import local_url
from .settings import Rig

FORMAT = 1
DEFAULT_DEPTHS = "4k,16k,32k,64k,128k,262k"
DEFAULT_GEN = 128
DEFAULT_REPEAT = 3
SAMPLE_MS = 100
JOULES_PER_KWH = 3.6e6
TABLE_HEAD = ["Context", "Prefill t/s", "Decode t/s", "TTFT ms", "Power W",
              "Decode tokens/kWh"]
ENERGY_HEAD = ["Context", "Prefill W", "Prefill J/token", "Prefill tokens/kWh",
               "Decode W", "Decode J/token"]


class BenchError(Exception):
    pass


# --- depths ---------------------------------------------------------------------------------

def parse_depths(text: str) -> list[tuple[int, str]]:
    """`4k,16k,262k,1000` -> [(4096, '4K'), (16384, '16K'), (262144, '262K'), (1000, '1000')].

    `Nk` is N x 1024, except that a value within 1% of a power of two is that power of two:
    people write 262,144 tokens (2^18) as 262k."""
    out = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        low = word.lower()
        try:
            if low.endswith("k"):
                n = float(low[:-1])
                value = round(n * 1024)
                power = 2 ** round(math.log2(n * 1000)) if n > 0 else 0
                if power and abs(power - n * 1000) <= 0.01 * n * 1000:
                    value = power
                label = f"{low[:-1]}K"
            else:
                value, label = int(low), str(int(low))
        except ValueError:
            raise BenchError(f"--depths: {word!r} is not a token count (e.g. 4k, 16k, 1000)")\
                from None
        if value < 1:
            raise BenchError(f"--depths: {word!r} is not a positive token count")
        out.append((value, label))
    if not out:
        raise BenchError("--depths names no depth")
    return out


# --- what a run is keyed by -------------------------------------------------------------------

def args_digest(rig: Rig, profile: str) -> str:
    """sha256 (16 hex digits) of how the profile runs the server, wherever its model lives:
    its llama-server arguments, environment and visible GPUs."""
    p = rig.profiles[profile]
    payload = {"args": rig.server_args(profile, "<model>"), "environment": p.environment,
               "cuda_visible_devices": p.cuda_visible_devices}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def gpus_arg(rig: Rig, profile: str) -> str:
    """The GPUs whose power counts: the profile's cuda_visible_devices, else all the rig's."""
    p = rig.profiles[profile]
    if rig.data.gpu_count == 0 or p.cuda_visible_devices == []:
        return "none"
    if p.cuda_visible_devices:
        return ",".join(str(d) for d in p.cuda_visible_devices)
    return "all"


def choose_profile(rig: Rig, wanted: str | None) -> str:
    enabled = sorted(rig.enabled_profiles)
    if wanted:
        if wanted not in rig.profiles:
            raise BenchError(f"{rig.name}: no profile {wanted!r} (profiles: "
                             f"{', '.join(sorted(rig.profiles)) or 'none'})")
        if wanted not in enabled:
            raise BenchError(f"{rig.name}: profile {wanted!r} is disabled: nothing serves it")
        return wanted
    if len(enabled) != 1:
        raise BenchError(f"{rig.name}: {len(enabled)} enabled profiles "
                         f"({', '.join(enabled) or 'none'}); choose one with --profile")
    return enabled[0]


def rig_command(rig: Rig, profile: str, depths: Sequence[tuple[int, str]], gen: int,
                repeat: int) -> list[str]:
    """garage-bench's command line on the rig (the API key stays in its root-only file)."""
    p = rig.profiles[profile]
    command = [rig.layout.script("garage-bench"), "--unit", service_name(profile),
               "--url", local_url(p.listen, p.port),
               "--depths", ",".join(str(d) for d, _ in depths),
               "--labels", ",".join(label for _, label in depths),
               "--gen", str(gen), "--repeat", str(repeat), "--gpus", gpus_arg(rig, profile),
               "--sample-ms", str(SAMPLE_MS), "--stop-on-eof"]
    if p.api_key_env:
        command += ["--key-file", rig.layout.key_file(profile)]
    return command


def ssh_argv(name: str, data: Mapping[str, Any], command: Sequence[str]) -> list[str]:
    """ssh's command line reaching the rig as pyinfra does (ssh_hostname, ssh_port, ssh_user,
    ssh_key, ssh_known_hosts_file, ssh_strict_host_key_checking; sudo with _sudo)."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    if data.get("ssh_port"):
        argv += ["-p", str(data["ssh_port"])]
    if data.get("ssh_user"):
        argv += ["-l", str(data["ssh_user"])]
    if data.get("ssh_key"):
        argv += ["-i", str(data["ssh_key"]), "-o", "IdentitiesOnly=yes"]
    if data.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={data['ssh_known_hosts_file']}"]
    if data.get("ssh_strict_host_key_checking"):
        argv += ["-o", f"StrictHostKeyChecking={data['ssh_strict_host_key_checking']}"]
    remote = shlex.join(command)
    if data.get("_sudo"):
        remote = "sudo -n " + remote
    return [*argv, "--", str(data.get("ssh_hostname") or name), remote]


# --- numbers ----------------------------------------------------------------------------------

def tokens_per_kwh(tps: float | None, watts: float | None) -> float | None:
    """Tokens per kWh at `tps` tokens/s drawing `watts`: 46.3 t/s at 818 W is 203,765."""
    if not tps or not watts:
        return None
    return tps * JOULES_PER_KWH / watts


def joules_per_token(tps: float | None, watts: float | None) -> float | None:
    if not tps or watts is None:
        return None
    return watts / tps


def speeds(result: Mapping[str, Any]) -> dict[str, Any]:
    """Prefill and decode t/s and TTFT from garage-bench's result (the engine's `timings`)."""
    prompt_n, prompt_ms = result["prompt_n"], result["prompt_ms"]
    predicted_n, predicted_ms = result["predicted_n"], result["predicted_ms"]
    prefill = result.get("prompt_per_second") or (
        prompt_n * 1000 / prompt_ms if prompt_ms else None)
    decode = result.get("predicted_per_second") or (
        predicted_n * 1000 / predicted_ms if predicted_ms else None)
    return {"prefill_tps": prefill, "decode_tps": decode, "ttft_ms": prompt_ms}


def notes_of(result: Mapping[str, Any]) -> list[str]:
    """What makes a measurement not quite what was asked for."""
    notes = []
    cache = result.get("cache_n")
    evaluated = result["prompt_n"] + (cache or 0)
    if cache:
        notes.append(f"the server reused {cache} cached prompt tokens")
    if evaluated != result["depth"]:
        notes.append(f"the prompt was {evaluated} tokens, not {result['depth']}")
    if result["predicted_n"] != result["gen"]:
        notes.append(f"generated {result['predicted_n']} tokens, not {result['gen']}")
    if result.get("decode_samples") == 0 or result.get("prefill_samples") == 0:
        notes.append("a phase shorter than the power sampling interval: its power is the "
                     "nearest sample")
    return notes


def record(head: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """One measurement as stored: the run's key, what was asked, what the engine reported,
    and the derived speeds and energy."""
    rec = {**head, "kind": "result"}
    for name in ("depth", "label", "repeat", "gen", "prompt_n", "cache_n", "prompt_ms",
                 "predicted_n", "predicted_ms", "request_s", "prefill_w", "decode_w",
                 "prefill_samples", "decode_samples"):
        rec[name] = result.get(name)
    rec.update(speeds(result))
    for phase in ("prefill", "decode"):
        tps, watts = rec[f"{phase}_tps"], rec[f"{phase}_w"]
        rec[f"{phase}_j_per_token"] = joules_per_token(tps, watts)
        rec[f"{phase}_tokens_per_kwh"] = tokens_per_kwh(tps, watts)
    rec["notes"] = notes_of(result)
    return rec


# --- running it -------------------------------------------------------------------------------

def run_head(rig: Rig, profile: str, start: Mapping[str, Any], run_id: str,
             when: datetime.datetime) -> dict[str, Any]:
    """The key every record of a run carries: rig, engine commit, model sha256s, the profile's
    argument digest, power limits and GPU list (as the rig reported them)."""
    p = rig.profiles[profile]
    engine = rig.engines[p.engine]
    gpus = start.get("gpus") or []
    return {
        "format": FORMAT, "run": run_id, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rig": rig.name, "profile": profile, "alias": rig.alias(profile),
        "engine": {"name": p.engine, "kind": engine.kind, "ref": engine.ref,
                   "commit": start.get("commit") or None, "build": start.get("build") or None},
        "model": {"name": p.model, "repo": rig.models[p.model].repo,
                  "files": start.get("models") or {}},
        "args_digest": args_digest(rig, profile),
        "power_limit_w": [g.get("power_limit_w") for g in gpus],
        "gpus": [f"{g['index']}: {g['name']}" for g in gpus],
        "n_ctx": start.get("n_ctx"),
    }


def events(argv: Sequence[str], on_stderr: Callable[[str], None] | None = None
           ) -> Iterator[dict[str, Any]]:
    """garage-bench's events as they come; its messages go to `on_stderr` (default: our
    stderr). Closing the generator (Ctrl-C included) ends the connection, which stops the
    run on the rig; the server is never touched."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=None if on_stderr is None else subprocess.PIPE, text=True,
                            bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
        proc.wait()
        if on_stderr is not None and proc.stderr is not None:
            for line in proc.stderr.read().splitlines():
                on_stderr(line)
        yield {"event": "exit", "rc": proc.returncode}
    finally:
        if proc.poll() is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


def progress_line(done: int, total: int, rec: Mapping[str, Any]) -> str:
    power = f", {rec['decode_w']:.0f} W" if rec.get("decode_w") else ""
    return (f"{bar(done, total)}  {rec['label']} #{rec['repeat']}: prefill "
            f"{_fmt(rec['prefill_tps'])} t/s, decode {_fmt(rec['decode_tps'])} t/s, TTFT "
            f"{_fmt(rec['ttft_ms'], 0)} ms{power}")


def measure(rig: Rig, profile: str, host_data: Mapping[str, Any],
            depths: Sequence[tuple[int, str]], gen: int, repeat: int,
            say: Callable[[str], None], now: datetime.datetime | None = None
            ) -> tuple[str, list[dict[str, Any]], str | None]:
    """Run the sweep on the rig: (run id, records, why it ended early or None)."""
    when = now or datetime.datetime.now(datetime.UTC)
    run_id = f"{when:%Y%m%dT%H%M%SZ}-{rig.name}-{profile}"
    argv = ssh_argv(rig.name, host_data, rig_command(rig, profile, depths, gen, repeat))
    head: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    total, done, ended = len(depths) * repeat, 0, None
    stream = events(argv)
    try:
        for event in stream:
            kind = event.get("event")
            if kind == "start":
                head = run_head(rig, profile, event, run_id, when)
                fits = [d for d, _ in depths if d + gen <= (event.get("n_ctx") or 0)]
                total = len(fits) * repeat
                gpus = ", ".join(head["gpus"]) or "none (no power measured)"
                say(f"{rig.name}: {profile} ({head['alias']}), {head['engine']['kind']} "
                    f"{head['engine']['build'] or '?'}, n_ctx {head['n_ctx']}, GPUs: {gpus}")
            elif kind == "skip":
                rec = {**head, "kind": "skip", "depth": event["depth"],
                       "label": event["label"], "notes": [event["note"]]}
                records.append(rec)
                say(f"skipped {event['note']}")
            elif kind == "result":
                rec = record(head, event)
                records.append(rec)
                done += 1
                say(progress_line(done, total, rec))
            elif kind == "end":
                if event.get("error"):
                    ended = event["error"]
                elif event.get("stopped"):
                    ended = "stopped"
                if event.get("unit") != "active":
                    say(f"warning: {service_name(profile)} is {event.get('unit')} after the "
                        "run (the bench never stops it)")
            elif kind == "exit" and event.get("rc") and ended is None:
                ended = f"garage-bench exited with status {event['rc']}"
                if event["rc"] == 127:
                    ended += " (not installed: deploy the rig with this llm-garage first)"
                elif event["rc"] == 255:
                    ended += " (ssh could not reach the rig, or the connection broke)"
    except KeyboardInterrupt:
        ended = "stopped (Ctrl-C)"
    finally:
        stream.close()
    return run_id, records, ended


# --- storage ----------------------------------------------------------------------------------

def bench_dir(rig: Rig, inventory: str | Path) -> Path:
    path = Path(rig.data.bench_dir)
    return path if path.is_absolute() else Path(inventory).resolve().parent / path


def results_file(directory: Path, rig: str) -> Path:
    return directory / f"{rig}.jsonl"


def append(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def load_runs(paths: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every stored run, by id, in the order they were written."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("run"):
                runs.setdefault(rec["run"], []).append(rec)
    return runs


def find_run(runs: Mapping[str, list], wanted: str) -> str:
    """A run by its id, or by a part of it that names one run only."""
    if wanted in runs:
        return wanted
    matches = [r for r in runs if wanted in r]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise BenchError(f"no stored run matches {wanted!r} (runs: "
                         f"{', '.join(runs) or 'none yet'})")
    raise BenchError(f"{wanted!r} matches {len(matches)} runs ({', '.join(matches)}); "
                     "give more of the id")


# --- tables -----------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _spread(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(statistics.stdev(values), digits)}"


def summary(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per depth, in depth order: the mean (and the values) of each column over the repeats."""
    by_depth: dict[int, list[Mapping[str, Any]]] = {}
    labels: dict[int, str] = {}
    for rec in records:
        if rec.get("kind") != "result":
            continue
        by_depth.setdefault(rec["depth"], []).append(rec)
        labels[rec["depth"]] = rec["label"]
    rows = []
    for depth in sorted(by_depth):
        recs = by_depth[depth]
        row: dict[str, Any] = {"depth": depth, "label": labels[depth], "n": len(recs)}
        for name in ("prefill_tps", "decode_tps", "ttft_ms", "prefill_w", "decode_w",
                     "prefill_j_per_token", "decode_j_per_token", "prefill_tokens_per_kwh",
                     "decode_tokens_per_kwh"):
            values = [r[name] for r in recs if r.get(name) is not None]
            row[name] = values
            row[name + "_mean"] = statistics.fmean(values) if values else None
        rows.append(row)
    return rows


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The seeds' table: Context | Prefill t/s | Decode t/s | TTFT ms | Power W | Decode
    tokens/kWh (mean ± standard deviation over the repeats; power while decoding)."""
    out = [_row(TABLE_HEAD), _row(["---"] + ["---:"] * (len(TABLE_HEAD) - 1))]
    for r in rows:
        out.append(_row([r["label"], _spread(r["prefill_tps"]), _spread(r["decode_tps"]),
                         _spread(r["ttft_ms"], 0), _spread(r["decode_w"]),
                         _spread(r["decode_tokens_per_kwh"], 0)]))
    return out


def energy_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = [_row(ENERGY_HEAD), _row(["---"] + ["---:"] * (len(ENERGY_HEAD) - 1))]
    for r in rows:
        out.append(_row([r["label"], _spread(r["prefill_w"]), _spread(r["prefill_j_per_token"], 3),
                         _spread(r["prefill_tokens_per_kwh"], 0), _spread(r["decode_w"]),
                         _spread(r["decode_j_per_token"], 3)]))
    return out


def describe(recs: Sequence[Mapping[str, Any]]) -> str:
    """One line naming what a run measured."""
    head = recs[0]
    engine, gpus = head.get("engine") or {}, head.get("gpus") or []
    limits = sorted({w for w in head.get("power_limit_w") or [] if w is not None})
    power = "/".join(f"{w:g}" for w in limits) + " W limit" if limits else "no GPU power"
    repeats = max((r.get("repeat") or 0 for r in recs), default=0)
    return (f"{head['run']}: rig {head['rig']}, profile {head['profile']} "
            f"({head.get('alias')}), {engine.get('kind')} {engine.get('ref')} "
            f"(build {engine.get('build')}), {len(gpus)} GPU(s), {power}, args "
            f"{head.get('args_digest')}, {head.get('gen')} generated, {repeats} repeat(s)")


def run_report(recs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A run as Markdown: what it measured, the seeds' table, energy per phase, notes."""
    rows = summary(recs)
    out = [describe(recs), ""] + markdown_table(rows)
    if any(r["decode_w"] for r in rows):
        out += ["", *energy_table(rows)]
    notes = []
    for rec in recs:
        for note in rec.get("notes") or []:
            where = rec["label"] + (f" #{rec['repeat']}" if rec.get("repeat") else "")
            notes.append(f"- {where}: {note}" if rec.get("kind") == "result" else f"- {note}")
    if notes:
        out += ["", "Notes:", *dict.fromkeys(notes)]
    return out


def _delta(a: float | None, b: float | None, digits: int = 1) -> str:
    if a is None or b is None:
        return f"{_fmt(a, digits)} → {_fmt(b, digits)}"
    pct = f" ({round((b - a) / a * 100, 1) + 0.0:+.1f}%)" if a else ""  # never "-0.0%"
    return f"{_fmt(a, digits)} → {_fmt(b, digits)}{pct}"


def compare_report(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
                   ) -> list[str]:
    """Two runs side by side: what differs between them, then per context depth both runs
    have, each column as A → B (change in %)."""
    ha, hb = a[0], b[0]
    out = [f"A: {describe(a)}", f"B: {describe(b)}", ""]
    differs = []
    for name, key in (("rig", "rig"), ("profile", "profile"), ("engine", "engine"),
                      ("model files", "model"), ("server arguments", "args_digest"),
                      ("power limits (W)", "power_limit_w"), ("GPUs", "gpus")):
        if ha.get(key) != hb.get(key):
            differs.append(f"- {name}: {_short(ha.get(key))} → {_short(hb.get(key))}")
    out += ["What differs:", *(differs or ["- nothing in the run's key"]), ""]
    ra = {r["depth"]: r for r in summary(a)}
    rb = {r["depth"]: r for r in summary(b)}
    out += [_row(TABLE_HEAD), _row(["---"] + ["---:"] * (len(TABLE_HEAD) - 1))]
    for depth in sorted(set(ra) & set(rb)):
        x, y = ra[depth], rb[depth]
        out.append(_row([x["label"]] + [
            _delta(x[name + "_mean"], y[name + "_mean"], digits)
            for name, digits in (("prefill_tps", 1), ("decode_tps", 1), ("ttft_ms", 0),
                                 ("decode_w", 1), ("decode_tokens_per_kwh", 0))]))
    only = sorted(set(ra) ^ set(rb))
    if only:
        out += ["", "Measured in one run only: " + ", ".join(
            (ra.get(d) or rb[d])["label"] for d in only)]
    return out


def _short(value: Any) -> str:
    if isinstance(value, dict):
        if "commit" in value:
            return f"{value.get('kind')} {value.get('ref')} ({(value.get('commit') or '?')[:12]})"
        files = value.get("files") or {}
        return ", ".join(f"{n} {(s or '?')[:12]}" for n, s in sorted(files.items())) or "?"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


# --- chart ------------------------------------------------------------------------------------

CHART_MISSING = ("the chart needs matplotlib, an optional extra: pip install "
                 "'llm-garage[chart]' (./scripts/setup installs it); the table and the "
                 "JSON Lines are written without it")


def chart(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> dict[str, list[str]]:
    """A PNG at `path`: prefill and decode t/s, and decode tokens/kWh, against context, one
    line per run. Returns each panel's lines (the runs drawn in it). Raises BenchError when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise BenchError(CHART_MISSING) from None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
    drawn: dict[str, list[str]] = {}
    titles = ("Prefill t/s", "Decode t/s", "Decode tokens/kWh")
    columns = ("prefill_tps_mean", "decode_tps_mean", "decode_tokens_per_kwh_mean")
    for ax, title, column in zip(axes, titles, columns, strict=True):
        top = 0.0
        for run_id, recs in runs.items():
            rows = [r for r in summary(recs) if r[column] is not None]
            top = max([top] + [r[column] for r in rows])
            if rows:
                ax.plot([r["depth"] for r in rows], [r[column] for r in rows], marker="o",
                        label=run_id)
                drawn.setdefault(title, []).append(run_id)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["depth"]: r["label"] for recs in runs.values()
                        for r in summary(recs)}.items())
        ax.set_xticks([d for d, _ in ticks], [label for _, label in ticks])
        ax.minorticks_off()
        ax.set_ylim(0, top * 1.15 or 1)
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no power measured", ha="center", va="center",
                    transform=ax.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def say_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
