"""Unit files: systemd quoting, the rendered units of the reference rigs, systemd-analyze."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llm_garage import units
from llm_garage.layout import GPU_POWER_UNIT
from llm_garage.settings import load_flags_env, load_rig
from tasks import gpus as gpus_task
from tasks import services as services_task

REPO = Path(__file__).resolve().parents[2]
GARAGE_MODEL = ("/srv/models/qwen3.5-122b-q6/0123456789ab/"
                "Qwen3.5-122B-A10B-UD-Q6_K_XL-00001-of-00004.gguf")


def render(template: str, context: dict) -> str:
    """A unit as the deploy writes it."""
    return units.render(template, context)


def llama_unit(rig, profile: str, model_path: str) -> str:
    return render(services_task.UNIT_TEMPLATE, units.llama_unit_context(rig, profile, model_path))


def gpu_power_unit(rig, nvidia_smi: str) -> str:
    return render(gpus_task.UNIT_TEMPLATE, units.gpu_power_unit_context(rig, nvidia_smi))


def rig(**data):
    raw = {"engines": {"llama": {"kind": "llama.cpp", "ref": "b8137", "cuda": False}},
           "models": {"m": {"repo": "o/m", "revision": "main", "files": ["m.gguf"]}},
           "profiles": {"p": {"model": "m", "engine": "llama", "port": 8080}}}
    for key, value in data.items():
        if key == "profile":
            raw["profiles"]["p"].update(value)
        else:
            raw[key] = value
    built, errors = load_rig("r1", raw)
    assert errors == []
    return built


# --- quoting -------------------------------------------------------------------------------

@pytest.mark.parametrize("word, written", [
    ("-m", "-m"),
    ("/srv/models/a.gguf", "/srv/models/a.gguf"),
    ("0.9,1,1", "0.9,1,1"),
    ("100%", "100%%"),
    ("$HOME", "$$HOME"),
    ("${X}", '"$${X}"'),
    ("two words", '"two words"'),
    ("", '""'),
    (";", '";"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("it's", '"it\'s"'),
    ("line\nbreak\ttab", '"line\\nbreak\\ttab"'),
    ("blk\\.(2[0-9])\\.ffn_.*_exps=CPU", '"blk\\\\.(2[0-9])\\\\.ffn_.*_exps=CPU"'),
    ("50% of $5", '"50%% of $$5"'),
])
def test_exec_word(word, written):
    assert units.exec_word(word) == written


def unquote_exec(line: str) -> list[str]:
    """systemd's reading of an Exec line (specifiers, words, C escapes, $$), for the subset of
    syntax that exec_word writes."""
    words, i, n = [], 0, len(line)
    escapes = {"n": "\n", "t": "\t", "r": "\r", "v": "\v", "f": "\f", "a": "\a", "b": "\b",
               "\\": "\\", '"': '"', "'": "'"}
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i >= n:
            break
        word, quoted = [], False
        while i < n and (quoted or line[i] != " "):
            ch = line[i]
            if ch == '"':
                quoted = not quoted
            elif ch == "\\":
                nxt = line[i + 1]
                if nxt == "x":
                    word.append(chr(int(line[i + 2:i + 4], 16)))
                    i += 2
                else:
                    word.append(escapes[nxt])
                i += 1
            elif ch in "%$" and line[i + 1] == ch:
                word.append(ch)
                i += 1
            else:
                assert ch not in "%$", f"unescaped {ch} in {line!r}"
                word.append(ch)
            i += 1
        words.append("".join(word))
    return words


def test_exec_line_round_trips_awkward_arguments():
    argv = ["/opt/x/llama-server", "--alias", "a b", "", "%h", "$USER", 'q"uote', "\\", "\x01",
            "--chat-template", "{% if x %}{{ '$' }}{% endif %}\n", ";"]
    assert unquote_exec(units.exec_line(argv)) == argv


def test_exec_line_needs_an_absolute_program():
    with pytest.raises(ValueError):
        units.exec_line(["llama-server", "-m", "x"])


def test_environment_word_doubles_only_percent():
    assert units.environment_word("A", "50% $HOME \"x\"") == '"A=50%% $HOME \\"x\\""'
    with pytest.raises(ValueError):
        units.environment_word("1BAD", "x")


# --- the reference rigs --------------------------------------------------------------------

def test_garage_qwen122_exec_start(garage_fleet):
    text = llama_unit(garage_fleet["garage"], "qwen122", GARAGE_MODEL)
    exec_start = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [
        "ExecStart=/opt/llm-garage/builds/llama/current/bin/llama-server"
        f" -m {GARAGE_MODEL} --host 0.0.0.0 --port 8000 --alias qwen3.5-122b"
        " -c 262144 -ngl 999 -ctk q8_0 -ctv q8_0 --split-mode layer -ts 0.9,1,1,1,1,1"
        " --parallel 1 --jinja --no-warmup --temp 0.6 --top-p 0.95 --top-k 20 --min-p 0.0"
    ]


def test_garage_unit_layout(garage_fleet):
    lines = llama_unit(garage_fleet["garage"], "qwen122", GARAGE_MODEL).splitlines()
    assert lines[0].startswith(units.GENERATED_MARKER)
    for expected in [
        "After=network-online.target llm-garage-gpu-power.service",
        "Wants=network-online.target",
        "Type=exec", "User=llama", 'Environment="CUDA_DEVICE_ORDER=PCI_BUS_ID"',
        "Restart=on-failure", "RestartSec=10", "StartLimitBurst=5",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "ReadOnlyPaths=-/opt/llm-garage/builds/llama -/srv/models/qwen3.5-122b-q6 "
        "-/srv/models/.blobs",
        "InaccessiblePaths=-/etc/llm-garage", "WantedBy=multi-user.target",
    ]:
        assert expected in lines
    text = "\n".join(x for x in lines if not x.startswith("#"))
    # Nothing that would put the GPUs behind a device allow-list, no key, no memlock.
    for absent in ("DeviceAllow", "DevicePolicy", "PrivateDevices", "ProtectClock",
                   "LoadCredential", "api-key", "LimitMEMLOCK"):
        assert absent not in text


def test_gpu_power_unit_of_the_garage(garage_fleet):
    text = gpu_power_unit(garage_fleet["garage"], "/usr/bin/nvidia-smi")
    lines = text.splitlines()
    assert "After=nvidia-persistenced.service" in lines
    assert "Before=llama-server-qwen122.service" in lines  # qwen397 is disabled
    assert [x for x in lines if x.startswith("ExecStart=")] == (
        ["ExecStart=/usr/bin/nvidia-smi -pm 1"]
        + [f"ExecStart=/usr/bin/nvidia-smi -i {i} -pl 350" for i in range(6)])
    assert {"Type=oneshot", "RemainAfterExit=yes", "WantedBy=multi-user.target"} <= set(lines)


def test_gpu_power_unit_per_gpu_limits_without_persistence():
    r = rig(gpu_count=2, gpu_power_limit_w=[280, 300.5], gpu_persistence_mode=False)
    assert units.gpu_power_commands(r, "/usr/bin/nvidia-smi") == [
        ["/usr/bin/nvidia-smi", "-i", "0", "-pl", "280"],
        ["/usr/bin/nvidia-smi", "-i", "1", "-pl", "300.5"],
    ]


def test_no_gpu_power_unit_without_gpus_or_settings():
    assert not units.has_gpu_power_unit(rig())
    assert not units.has_gpu_power_unit(rig(gpu_count=1, gpu_persistence_mode=False))
    assert units.has_gpu_power_unit(rig(gpu_count=1))
    assert units.has_gpu_power_unit(rig(gpu_count=1, gpu_persistence_mode=False),
                                    "/usr/bin/nvidia-modprobe")
    assert not units.has_gpu_power_unit(rig(), "/usr/bin/nvidia-modprobe")
    text = llama_unit(rig(), "p", "/srv/models/m/m.gguf")
    assert "After=network-online.target\n" in text


def test_gpu_settings_never_change_the_llama_unit():
    """Turning persistence or limits on or off must not restart (reload) every server."""
    texts = {llama_unit(rig(gpu_count=1, **settings), "p", "/srv/models/m/m.gguf")
             for settings in ({}, {"gpu_persistence_mode": False},
                              {"gpu_power_limit_w": 300})}
    (text,) = texts
    assert "After=network-online.target llm-garage-gpu-power.service\n" in text


def test_gpu_unit_creates_the_device_nodes_first_where_the_driver_can():
    r = rig(gpu_count=1, gpu_power_limit_w=300)
    text = render(gpus_task.UNIT_TEMPLATE, units.gpu_power_unit_context(
        r, "/usr/bin/nvidia-smi", "/usr/bin/nvidia-modprobe"))
    assert [x for x in text.splitlines() if x.startswith("ExecStart=")] == [
        "ExecStart=-/usr/bin/nvidia-modprobe -u -c0", "ExecStart=/usr/bin/nvidia-smi -pm 1",
        "ExecStart=/usr/bin/nvidia-smi -i 0 -pl 300"]


def test_profile_environment_mlock_key_and_home(monkeypatch):
    monkeypatch.setenv("P_KEY", "not-in-the-unit")
    r = rig(gpu_count=2, models_dir="/home/me/models", profile={
        "cuda_visible_devices": [1, 0], "environment": {"GGML_CUDA_P2P": "1",
                                                         "CUDA_DEVICE_ORDER": "FASTEST_FIRST"},
        "mlock": True, "api_key_env": "P_KEY"})
    text = llama_unit(r, "p", "/home/me/models/m/m.gguf")
    lines = text.splitlines()
    assert [x for x in lines if x.startswith("Environment=")] == [
        'Environment="GARAGE_MLOCK=--mlock"',  # the older spelling, for builds before the file
        'Environment="CUDA_DEVICE_ORDER=FASTEST_FIRST"',
        'Environment="CUDA_VISIBLE_DEVICES=1,0"',
        'Environment="GGML_CUDA_P2P=1"',
    ]
    # the build's own spelling, read after (and so over) Environment=
    assert "EnvironmentFile=-/opt/llm-garage/builds/llama/current/load-flags.env" in lines
    assert "LimitMEMLOCK=infinity" in lines
    assert "ProtectHome=read-only" in lines
    assert "LoadCredential=llama-api-key:/etc/llm-garage/llama-server-p.key" in lines
    exec_start = next(x for x in lines if x.startswith("ExecStart="))
    assert exec_start.endswith(
        " $GARAGE_MLOCK --api-key-file ${CREDENTIALS_DIRECTORY}/llama-api-key")
    assert "--mlock " not in exec_start and "not-in-the-unit" not in text


@pytest.mark.parametrize("no_mmap, mlock, variable, old, new", [
    (True, False, "GARAGE_NO_MMAP", ["--no-mmap"], ["--load-mode", "none"]),
    (False, True, "GARAGE_MLOCK", ["--mlock"], ["--load-mode", "mmap+mlock"]),
    (True, True, "GARAGE_NO_MMAP_MLOCK", ["--no-mmap", "--mlock"], ["--load-mode", "mlock"]),
])
def test_load_flags_name_the_builds_spelling(no_mmap, mlock, variable, old, new):
    r = rig(profile={"no_mmap": no_mmap, "mlock": mlock})
    ctx = units.llama_unit_context(r, "p", "/srv/models/m/m.gguf", "abc-def")
    assert ctx["exec_start"].split()[-1] == f"${variable}"
    assert ctx["load_flags_file"] == "/opt/llm-garage/builds/llama/abc-def/load-flags.env"
    # what garage-build writes for either kind of llama-server, as systemd splits $VAR
    for load_mode, words in ((True, new), (False, old)):
        env = dict(line.split("=", 1) for line in load_flags_env(load_mode).splitlines())
        assert env[variable].split() == words
    # the check and the rig document show the older spelling, the digest stays as it was
    assert r.server_args("p", "/m.gguf")[-len(old):] == old
    # nothing to read for a profile that sets neither
    plain = units.llama_unit_context(rig(), "p", "/srv/models/m/m.gguf")
    assert plain["load_flags_file"] is None and "$" not in plain["exec_start"]



def test_model_outside_its_model_dir_is_read_only_too():
    r = rig()
    ctx = units.llama_unit_context(r, "p", "/data/elsewhere/m.gguf")
    assert ctx["read_only_paths"] == ["-/opt/llm-garage/builds/llama", "-/srv/models/m",
                                      "-/srv/models/.blobs", "-/data/elsewhere"]


def test_rendering_is_deterministic(garage_fleet):
    a = llama_unit(garage_fleet["epyc"], "qwen397", "/srv/models/x/a.gguf")
    b = llama_unit(garage_fleet["epyc"], "qwen397", "/srv/models/x/a.gguf")
    assert a == b


def test_units_pass_systemd_analyze_verify(garage_fleet, tmp_path, monkeypatch):
    """systemd's own parser accepts the units (the binaries they name must exist, so the
    garage root and model folder are moved under tmp_path)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed"
    monkeypatch.setenv("T_KEY", "k")
    root = tmp_path / "garage"
    r = rig(garage_root=str(root), models_dir=str(tmp_path / "models"), gpu_count=1,
            gpu_power_limit_w=300, profile={"api_key_env": "T_KEY", "mlock": True,
                                            "extra_args": ["--chat-template", "50% $x \"y\""]})
    binary = Path(r.layout.server_binary("llama"))
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    nvidia_smi = tmp_path / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\n")
    nvidia_smi.chmod(0o755)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "llama-server-p.service").write_text(
        llama_unit(r, "p", str(tmp_path / "models" / "m" / "m.gguf")))
    (unit_dir / GPU_POWER_UNIT).write_text(gpu_power_unit(r, str(nvidia_smi)))
    for name in ("llama-server-p.service", GPU_POWER_UNIT):
        proc = subprocess.run([analyze, "verify", "--man=no", str(unit_dir / name)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        noise = [line for line in proc.stderr.splitlines() if name in line]
        assert noise == [], proc.stderr
