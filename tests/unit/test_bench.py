"""`llm-garage bench`: depths, the formulas, the records, the tables and the comparison, the
chart, and the rig-side garage-bench run locally against a stand-in server (mainline and
ik_llama.cpp timings) with the stand-in nvidia-smi drawing a power per phase."""

from __future__ import annotations

import http.server
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.standins.gpu import fake_gpu_files
from llm_garage import bench
from llm_garage.layout import script_source
from llm_garage.settings import load_rig

SCRIPT = script_source("garage-bench")


def load_script():
    loader = importlib.machinery.SourceFileLoader("garage_bench", SCRIPT)
    spec = importlib.util.spec_from_loader("garage_bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# --- depths and formulas --------------------------------------------------------------------

def test_depths_in_the_seeds_words():
    assert bench.parse_depths("4k,16k,32k,64k,128k,262k") == [
        (4096, "4K"), (16384, "16K"), (32768, "32K"), (65536, "64K"), (131072, "128K"),
        (262144, "262K")]
    assert bench.parse_depths(" 1000, 2K,0.5k") == [(1000, "1000"), (2048, "2K"), (512, "0.5K")]
    for bad in ("", "4x", "-3", "0"):
        with pytest.raises(bench.BenchError):
            bench.parse_depths(bad)


def test_tokens_per_kwh_against_the_seed():
    # 46.3 t/s at 818 W: 203,765 tokens/kWh (the post lists 203,854 from unrounded inputs).
    assert round(bench.tokens_per_kwh(46.3, 818)) == 203765
    assert bench.joules_per_token(46.3, 818) == pytest.approx(17.667, abs=1e-3)
    assert bench.tokens_per_kwh(46.3, None) is None and bench.tokens_per_kwh(0, 818) is None


MAINLINE = {"cache_n": 0, "prompt_n": 4096, "prompt_ms": 2048.0, "prompt_per_second": 2000.0,
            "predicted_n": 128, "predicted_ms": 3200.0, "predicted_per_second": 40.0}
IK = {"prompt_n": 4096, "prompt_ms": 2048.0, "predicted_n": 128, "predicted_ms": 3200.0}


def result(timings, **extra):
    return {"depth": 4096, "label": "4K", "repeat": 1, "gen": 128, "cache_n": None,
            "prompt_per_second": None, "predicted_per_second": None, **timings, **extra}


@pytest.mark.parametrize("timings", [MAINLINE, IK], ids=["mainline", "ik"])
def test_speeds_from_either_shape_of_timings(timings):
    rec = bench.record({"run": "r"}, result(timings, prefill_w=800.0, decode_w=500.0,
                                            prefill_samples=20, decode_samples=32))
    assert rec["prefill_tps"] == pytest.approx(2000.0)
    assert rec["decode_tps"] == pytest.approx(40.0)
    assert rec["ttft_ms"] == 2048.0
    assert rec["prefill_j_per_token"] == pytest.approx(0.4)
    assert rec["decode_j_per_token"] == pytest.approx(12.5)
    assert rec["decode_tokens_per_kwh"] == pytest.approx(40 * 3.6e6 / 500)
    assert rec["prefill_tokens_per_kwh"] == pytest.approx(2000 * 3.6e6 / 800)
    assert rec["notes"] == []
    assert rec["cache_n"] == timings.get("cache_n")


def test_notes_say_what_was_not_as_asked():
    rec = bench.record({}, result({**MAINLINE, "cache_n": 4000, "prompt_n": 96,
                                   "predicted_n": 100}, decode_samples=0, prefill_samples=3))
    assert rec["notes"] == [
        "the server reused 4000 cached prompt tokens", "generated 100 tokens, not 128",
        "a phase shorter than the power sampling interval: its power is the nearest sample"]
    rec = bench.record({}, result({**IK, "prompt_n": 4000}))
    assert rec["notes"] == ["the prompt was 4000 tokens, not 4096"]


# --- power over a phase -----------------------------------------------------------------------

def test_window_average_sums_each_gpus_mean_inside_the_window():
    gb = load_script()
    samples = []
    for k in range(20):  # every 0.1 s: GPU 0 and GPU 1, prefill before t=1.0, decode after
        t = k * 0.1
        samples += [(t, 0, 300.0 if t < 1.0 else 200.0), (t + 0.001, 1, 310.0 if t < 1.0
                                                            else 210.0), (t, 2, 999.0)]
    assert gb.window_average(samples, [0, 1], 0.0, 0.95) == (pytest.approx(610.0), 10)
    assert gb.window_average(samples, [0, 1], 1.0, 1.95) == (pytest.approx(410.0), 10)
    assert gb.window_average(samples, [0], 0.0, 1.95)[0] == pytest.approx(250.0)
    # A window between two samples: the sample nearest its middle, and 0 inside.
    assert gb.window_average(samples, [0, 1], 1.02, 1.04) == (pytest.approx(410.0), 0)
    # Trimmed: the samples near the edges are left out, at most 15% of the window each side
    # (here [0.6425, 1.3075]: 0.7 to 0.9 at 300 W, 1.0 to 1.3 at 200 W).
    assert gb.window_average(samples, [0], 0.5, 1.45) == (pytest.approx(250.0), 10)
    assert gb.window_average(samples, [0], 0.5, 1.45, trim=0.2) == (pytest.approx(1700 / 7), 7)
    assert gb.window_average(samples, [], 0, 1) == (None, 0)
    assert gb.window_average(samples, [5], 0, 1) == (None, 0)
    when = time.mktime((2026, 11, 30, 8, 30, 0, 0, 0, -1)) + 0.125
    assert gb.parse_sample("2026/11/30 08:30:00.125, 0, 123.45\n") == (when, 0, 123.45)
    assert gb.parse_sample("N/A, 1, 99.5", arrived=7.0) == (7.0, 1, 99.5)
    assert gb.parse_sample("2026/11/30 08:30:00.125, 0, [N/A]") is None
    assert gb.parse_sample("timestamp, index, power.draw") is None


def test_prompt_is_exactly_the_depth():
    gb = load_script()
    unique, filler = [7, 8, 9], [1, 2, 3, 4]
    assert gb.prompt_tokens(unique, filler, 12) == [7, 8, 9, 1, 2, 3, 4, 1, 2, 3, 4, 1]
    assert gb.prompt_tokens(unique, filler, 2) == [7, 8]


# --- garage-bench against a stand-in server ---------------------------------------------------

class StandIn(http.server.BaseHTTPRequestHandler):
    """llama-server's surface as garage-bench uses it: the prompt takes 0.6 ms a token, each
    generated token 6 ms (phases long enough to sample on a busy machine), and the phase is
    written where the stand-in nvidia-smi reads it."""

    key = "k-secret-1"
    ik = False
    n_ctx = 4096
    phase_file: Path
    prompts: list

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self):
        return self.headers.get("Authorization") == f"Bearer {self.key}"

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {"status": "ok"})
        if not self._authorized():
            return self._send(401, {"error": {"message": "Invalid API Key"}})
        if self.path == "/props":
            if self.ik:
                return self._send(200, {"n_ctx": self.n_ctx})
            return self._send(200, {"default_generation_settings": {"n_ctx": self.n_ctx},
                                    "build_info": "b1-abc"})
        self._send(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if not self._authorized():
            return self._send(401, {"error": {"message": "Invalid API Key"}})
        if self.path == "/tokenize":
            return self._send(200, {"tokens": [hash(w) % 1000 for w in
                                               body["content"].split()]})
        prompt = body["prompt"]
        type(self).prompts.append(prompt)
        n = body["n_predict"]
        self.phase_file.write_text("prefill\n")
        t0 = time.monotonic()
        time.sleep(len(prompt) * 0.0006)
        prompt_ms = (time.monotonic() - t0) * 1000
        self.phase_file.write_text("decode\n")
        t1 = time.monotonic()
        time.sleep(n * 0.006)
        predicted_ms = (time.monotonic() - t1) * 1000
        self.phase_file.write_text("idle\n")
        timings = {"prompt_n": len(prompt), "prompt_ms": prompt_ms,
                   "prompt_per_second": len(prompt) * 1000 / prompt_ms, "predicted_n": n,
                   "predicted_ms": predicted_ms,
                   "predicted_per_second": n * 1000 / predicted_ms}
        if not self.ik:
            timings["cache_n"] = 0
        self._send(200, {"content": "x", "timings": timings})

    def log_message(self, *args):
        pass


@pytest.fixture
def rig_side(tmp_path):
    """A stand-in server, the stand-in nvidia-smi (two RTX 3090s, 300 W prefill, 200 W
    decode), a stand-in systemctl saying the unit is active, and the unit file."""
    phase = tmp_path / "phase"
    phase.write_text("idle\n")
    for path, (content, mode) in fake_gpu_files(
            "rtx3090", 2, power_draw_by_phase={"prefill": 300, "decode": 200},
            phase_file=str(phase)).items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\necho active\n")
    (bin_dir / "systemctl").chmod(0o755)
    # The unit names a build (its stamp gives the commit) and a snapshot of two blobs.
    build = tmp_path / "builds/llama/0123456789ab-f00d/bin"
    build.mkdir(parents=True)
    (build.parent / "stamp").write_text("0123456789abcdef0123456789abcdef01234567 f00d\n")
    blobs, snap = tmp_path / "models/.blobs", tmp_path / "models/tiny/c0ffee"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(("m-00001-of-00002.gguf", "m-00002-of-00002.gguf")):
        sha = f"{i:x}" * 64
        (blobs / sha).write_bytes(b"GGUF")
        (snap / name).symlink_to(blobs / sha)
    units = tmp_path / "units"
    units.mkdir()
    (units / "llama-server-t.service").write_text(
        f"[Service]\nExecStart={build}/llama-server -m {snap}/m-00001-of-00002.gguf "
        "--port 8080\n")
    key = tmp_path / "key"
    key.write_text("k-secret-1\n")
    handler = type("Handler", (StandIn,), {"phase_file": phase, "prompts": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               FAKE_NVIDIA_ROOT=str(tmp_path))

    def run(*extra, stdin=subprocess.DEVNULL):
        argv = [sys.executable, SCRIPT, "--unit", "llama-server-t.service", "--url",
                f"http://127.0.0.1:{server.server_address[1]}", "--key-file", str(key),
                "--nvidia-smi", str(tmp_path / "usr/bin/nvidia-smi"), "--unit-dir",
                str(units), "--sample-ms", "20", *extra]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                              stdin=stdin)

    yield handler, run
    server.shutdown()
    server.server_close()


def events_of(out):
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("ik", [False, True], ids=["mainline", "ik"])
def test_garage_bench_measures_each_depth_with_the_power_of_each_phase(rig_side, ik):
    handler, run = rig_side
    handler.ik = ik
    out = run("--depths", "1000,2000,8000", "--labels", "1000,2000,8K", "--gen", "100",
              "--repeat", "2", "--gpus", "0,1")
    assert out.returncode == 0, out.stderr
    assert "k-secret-1" not in out.stdout + out.stderr
    events = events_of(out)
    start = events[0]
    assert start["event"] == "start" and start["n_ctx"] == 4096
    assert start["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert start["build"] == "0123456789ab-f00d"
    assert start["models"] == {"m-00001-of-00002.gguf": "0" * 64,
                               "m-00002-of-00002.gguf": "1" * 64}
    assert [(g["index"], g["power_limit_w"]) for g in start["gpus"]] == [(0, 350.0), (1, 350.0)]
    results = [e for e in events if e["event"] == "result"]
    assert [(r["depth"], r["repeat"]) for r in results] == [(1000, 1), (1000, 2), (2000, 1),
                                                           (2000, 2)]
    skip = [e for e in events if e["event"] == "skip"]
    assert skip == [{"event": "skip", "depth": 8000, "label": "8K", "note": "8K: 8000 tokens "
                     "and 100 generated exceed the 4096 tokens of context a request gets"}]
    assert events[-1] == {"event": "end", "measurements": 4, "stopped": False, "error": None,
                          "unit": "active"}
    # The warm-up, then one prompt per measurement: exactly the depth, never the same start.
    prompts = handler.prompts[1:]
    assert [len(p) for p in prompts] == [1000, 1000, 2000, 2000]
    assert len({tuple(p[:3]) for p in prompts}) == 4
    for r in results:
        assert r["prompt_n"] == r["depth"] and r["predicted_n"] == 100
        assert (r["cache_n"] is None) == ik
        # 2 GPUs at 300 W (+0.37 W for GPU 1) while the prompt is evaluated, 200 W decoding.
        assert r["prefill_w"] == pytest.approx(600.37, abs=30)
        assert r["decode_w"] == pytest.approx(400.37, abs=10)
        assert r["decode_samples"] >= 10
        rec = bench.record({}, r)
        assert rec["decode_tps"] == pytest.approx(166.7, rel=0.2)
        assert rec["decode_tokens_per_kwh"] == pytest.approx(
            rec["decode_tps"] * 3.6e6 / r["decode_w"])


def test_garage_bench_one_gpu_and_no_gpu(rig_side):
    _, run = rig_side
    out = run("--depths", "500", "--gen", "100", "--repeat", "1", "--gpus", "1")
    assert out.returncode == 0, out.stderr
    (r,) = [e for e in events_of(out) if e["event"] == "result"]
    assert r["decode_w"] == pytest.approx(200.37, abs=10), r
    out = run("--depths", "500", "--gen", "50", "--repeat", "1", "--gpus", "none")
    assert out.returncode == 0, out.stderr
    events = events_of(out)
    assert events[0]["power"] is False
    (r,) = [e for e in events if e["event"] == "result"]
    assert "decode_w" not in r
    out = run("--depths", "500", "--gpus", "7")
    assert out.returncode == 1 and "GPU 7 is not among the rig's GPUs (0, 1)" in out.stderr


def test_garage_bench_refuses_a_wrong_key_and_an_inactive_unit(rig_side, tmp_path):
    handler, run = rig_side
    handler.key = "another"
    out = run("--depths", "500")
    assert out.returncode == 1 and "GET /props answered 401" in out.stderr
    assert events_of(out)[-1]["error"].startswith("GET /props answered 401")
    (tmp_path / "bin/systemctl").write_text("#!/bin/sh\necho inactive\n")
    out = run("--depths", "500")
    assert out.returncode == 1
    assert "llama-server-t.service is inactive: deploy it first" in out.stderr


def test_garage_bench_stops_when_its_connection_goes(rig_side, tmp_path):
    """--stop-on-eof: the end of standard input stops the run at once; nothing is restarted."""
    _, run = rig_side
    started = time.monotonic()
    out = run("--depths", "3000", "--gen", "1000", "--repeat", "5", "--stop-on-eof")
    assert time.monotonic() - started < 5  # five 6 s decodes were asked for
    assert out.returncode == 130
    assert events_of(out)[-1]["stopped"] is True
    assert events_of(out)[-1]["unit"] == "active"


# --- tables, comparison, chart, storage -------------------------------------------------------

def head(run, commit="c" * 40, limit=350.0):
    return {"format": 1, "run": run, "rig": "garage", "profile": "q", "alias": "q",
            "engine": {"name": "llama", "kind": "llama.cpp", "ref": "b8137", "commit": commit,
                       "build": commit[:12] + "-f"},
            "model": {"name": "q", "repo": "o/r", "files": {"a.gguf": "e" * 64}},
            "args_digest": "d1", "power_limit_w": [limit, limit], "gpus": ["0: x", "1: x"],
            "n_ctx": 262144}


def records(run, decode, power, **kw):
    out = []
    for depth, label, prefill in ((4096, "4K", 1000.0), (16384, "16K", 800.0)):
        for rep, jitter in ((1, -1.0), (2, 1.0)):
            out.append(bench.record(head(run, **kw), result(
                {"prompt_n": depth, "prompt_ms": depth / (prefill + jitter) * 1000,
                 "predicted_n": 128, "predicted_ms": 128 / (decode + jitter) * 1000,
                 "cache_n": 0}, depth=depth, label=label, repeat=rep, prefill_w=power + 100,
                decode_w=power)))
    return out


def test_the_seeds_table_with_the_spread_over_repeats():
    rows = bench.summary(records("r1", 46.3, 818.0))
    lines = bench.markdown_table(rows)
    assert lines[0] == ("| Context | Prefill t/s | Decode t/s | TTFT ms | Power W | "
                        "Decode tokens/kWh |")
    assert lines[2].startswith("| 4K | 1,000.0 ± 1.4 | 46.3 ± 1.4 | 4,096 ± 6 | 818.0 ± 0.0 |")
    assert lines[2].endswith("| 203,765 ± 6,224 |")
    assert lines[3].startswith("| 16K | 800.0 ± 1.4 |")
    assert len(lines) == 4
    report = bench.run_report(records("r1", 46.3, 818.0))
    assert report[0].startswith("r1: rig garage, profile q (q), llama.cpp b8137")
    assert "| Context | Prefill W | Prefill J/token | Prefill tokens/kWh | Decode W | " \
           "Decode J/token |" in report


def test_compare_shows_what_differs_and_the_deltas():
    a = records("20261130T080000Z-garage-q", 40.0, 700.0, limit=300.0)
    b = records("20261130T090000Z-garage-q", 46.3, 818.0, commit="d" * 40)
    lines = bench.compare_report(a, b)
    assert "- engine: llama.cpp b8137 (cccccccccccc) → llama.cpp b8137 (dddddddddddd)" in lines
    assert "- power limits (W): 300.0, 300.0 → 350.0, 350.0" in lines
    row = next(line for line in lines if line.startswith("| 4K |"))
    assert "| 40.0 → 46.3 (+15.7%) |" in row and "| 700.0 → 818.0 (+16.9%) |" in row
    same = bench.compare_report(a, a)
    assert "- nothing in the run's key" in same


def test_runs_are_stored_as_json_lines_and_found_by_part_of_their_id(tmp_path):
    path = bench.results_file(tmp_path / "bench-results", "garage")
    bench.append(path, records("20261130T080000Z-garage-q", 40.0, 700.0))
    bench.append(path, records("20261130T090000Z-garage-q", 46.3, 818.0))
    lines = path.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x)["rig"] == "garage" for x in lines)
    runs = bench.load_runs([path])
    assert list(runs) == ["20261130T080000Z-garage-q", "20261130T090000Z-garage-q"]
    assert bench.find_run(runs, "T0900") == "20261130T090000Z-garage-q"
    with pytest.raises(bench.BenchError, match="matches 2 runs"):
        bench.find_run(runs, "garage")
    with pytest.raises(bench.BenchError, match="no stored run matches 'x'"):
        bench.find_run(runs, "x")


def test_the_chart_has_one_line_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    a = records("run-a", 40.0, 700.0)
    b = records("run-b", 46.3, 818.0)
    drawn = bench.chart({"run-a": a, "run-b": b}, tmp_path / "c.png")
    assert drawn == {"Prefill t/s": ["run-a", "run-b"], "Decode t/s": ["run-a", "run-b"],
                     "Decode tokens/kWh": ["run-a", "run-b"]}
    assert image.imread(tmp_path / "c.png").shape[:2] == (480, 1500)
    # Without power, the energy panel has no line.
    no_power = [{**r, "decode_tokens_per_kwh": None} for r in a]
    assert "Decode tokens/kWh" not in bench.chart({"a": no_power}, tmp_path / "d.png")


def test_the_chart_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(bench.BenchError, match=r"pip install 'llm-garage\[chart\]'"):
        bench.chart({"a": records("a", 40.0, 700.0)}, tmp_path / "c.png")


# --- reaching the rig -------------------------------------------------------------------------

def a_rig(gpu_count=2, **profile):
    rig, errors = load_rig("garage", {
        "gpu_count": gpu_count,
        "engines": {"llama": {"kind": "llama.cpp", "ref": "b8137", "cuda": gpu_count > 0}},
        "models": {"q": {"repo": "o/r", "revision": "main", "quant": "Q4_K_M"}},
        "profiles": {"q": {"model": "q", "engine": "llama", "port": 8000, **profile}}})
    assert not errors, errors
    return rig


def test_the_command_on_the_rig_names_the_key_file_never_the_key(monkeypatch):
    monkeypatch.setenv("GARAGE_KEY", "sk-never-shown")
    rig = a_rig(api_key_env="GARAGE_KEY", cuda_visible_devices=[1])
    command = bench.rig_command(rig, "q", bench.parse_depths("4k,262k"), 128, 3)
    assert command[0] == "/opt/llm-garage/bin/garage-bench"
    assert command[command.index("--depths") + 1] == "4096,262144"
    assert command[command.index("--labels") + 1] == "4K,262K"
    assert command[command.index("--gpus") + 1] == "1"
    assert command[command.index("--key-file") + 1] == "/etc/llm-garage/llama-server-q.key"
    argv = bench.ssh_argv("garage", {"ssh_hostname": "10.0.0.5", "ssh_user": "root",
                                     "ssh_key": "/k", "ssh_port": 2222, "_sudo": True},
                          command)
    assert argv[:6] == ["ssh", "-T", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    assert argv[-2] == "10.0.0.5" and argv[-1].startswith("sudo -n /opt/llm-garage/bin/")
    assert "-p" in argv and "2222" in argv and "/k" in argv
    assert not any("sk-never-shown" in word for word in argv)
    assert bench.gpus_arg(a_rig(), "q") == "all"
    assert bench.gpus_arg(a_rig(gpu_count=0), "q") == "none"


def test_the_argument_digest_follows_the_server_arguments():
    assert bench.args_digest(a_rig(), "q") == bench.args_digest(a_rig(), "q")
    assert bench.args_digest(a_rig(), "q") != bench.args_digest(a_rig(ctx_size=8192), "q")
    assert bench.args_digest(a_rig(), "q") != bench.args_digest(
        a_rig(environment={"GGML_CUDA_P2P": "1"}), "q")


def test_profile_choice():
    assert bench.choose_profile(a_rig(), None) == "q"
    with pytest.raises(bench.BenchError, match="no profile 'x'"):
        bench.choose_profile(a_rig(), "x")
    with pytest.raises(bench.BenchError, match="profile 'q' is disabled"):
        bench.choose_profile(a_rig(enabled=False), "q")


# --- the command ------------------------------------------------------------------------------

def write_inventory(tmp_path, **extra):
    data = {"ssh_hostname": "127.0.0.1", "ssh_port": 9, "ssh_user": "root", "gpu_count": 2,
            "engines": {"llama": {"kind": "llama.cpp", "ref": "b8137"}},
            "models": {"q": {"repo": "o/r", "revision": "main", "quant": "Q4_K_M"}},
            "profiles": {"q": {"model": "q", "engine": "llama", "port": 8000}}, **extra}
    path = tmp_path / "inv" / "garage.py"
    path.parent.mkdir()
    path.write_text(f"rigs = [('garage', {data!r})]\n")
    return path


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llm_garage.cli", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(SCRIPT).parents[2])})


def test_the_command_lists_and_compares_runs_stored_beside_the_inventory(tmp_path):
    inventory = write_inventory(tmp_path)
    results = bench.results_file(inventory.parent / "bench-results", "garage")
    bench.append(results, records("20261130T080000Z-garage-q", 40.0, 700.0, limit=300.0))
    bench.append(results, records("20261130T090000Z-garage-q", 46.3, 818.0))
    out = cli(inventory, "--list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines()] == [
        "20261130T080000Z-garage-q", "20261130T090000Z-garage-q"]
    out = cli(inventory, "--compare", "T08", "T09", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "- power limits (W): 300.0, 300.0 → 350.0, 350.0" in out.stdout
    assert "| 16K | 800.0 → 800.0 (+0.0%) | 40.0 → 46.3 (+15.7%) |" in out.stdout
    out = cli(inventory, "--compare", "garage", "T09", cwd=tmp_path)
    assert out.returncode == 1 and "'garage' matches 2 runs" in out.stderr


def test_the_command_says_when_the_rig_is_out_of_reach(tmp_path):
    inventory = write_inventory(tmp_path)
    out = cli(inventory, "--depths", "1k", cwd=tmp_path)
    assert out.returncode == 1
    assert "the bench ended early: garage-bench exited with status 255 (ssh could not reach " \
           "the rig" in out.stderr
    assert not (inventory.parent / "bench-results").exists()  # nothing measured, nothing kept
    out = cli(inventory, "--depths", "4x", cwd=tmp_path)
    assert out.returncode == 1 and "'4x' is not a token count" in out.stderr
    out = cli(inventory, "--limit", "other", cwd=tmp_path)
    assert out.returncode == 1 and "no rig other in the inventory (rigs: garage)" in out.stderr
