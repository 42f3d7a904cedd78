"""The CUDA side of engine planning: the toolkit's full version in the build key, and the
checks made before any build, fed with this machine's real nvcc where it has one (its
`--list-gpu-arch`, its version, its missing cuBLAS) and with stand-in answers only for what
a real compiler here cannot show (another release, another driver)."""

from __future__ import annotations

import subprocess

import pytest

from llm_garage.facts.engine import CudaToolkit
from llm_garage.plans.engines import (
    CUDA_WHEELS,
    MIN_DRIVER,
    CudaInstall,
    driver_too_old,
    min_driver,
)
from llm_garage.plans.engines import plan as plan_builds
from llm_garage.settings import flags_hash
from tests.unit.test_engine import SHA_B, Facts, problems_for, refs, rig_for, toolkit_12_8

TAG = refs(f"{SHA_B}\trefs/tags/b8137")


@pytest.fixture(scope="module")
def real_toolkit():
    """CudaToolkit's answer on this machine: its real command, run here."""
    out = subprocess.run(["sh", "-c", CudaToolkit.command], capture_output=True, text=True,
                         timeout=120).stdout
    toolkit = CudaToolkit().process(out.splitlines())
    if toolkit is None:
        pytest.skip("no nvcc on this machine")
    return toolkit


def real_facts(toolkit: dict, **table) -> Facts:
    """Facts with this machine's toolkit and a driver just new enough for it."""
    driver = {"version": min_driver(toolkit["version"]) or "580.65.06", "error": None}
    return Facts(GitRemoteRefs=TAG, CudaToolkit=toolkit, NvidiaDriver=driver, **table)


def plan_one(engine: dict, facts: Facts, **data):
    (plan,) = plan_builds(rig_for({"ref": "b8137", **engine}, **data), facts)
    return plan


# --- the build key ---------------------------------------------------------------------------

def test_a_toolkit_update_builds_a_new_folder_and_the_old_toolkit_finds_the_old_one():
    old = plan_one({}, Facts(GitRemoteRefs=TAG))
    new = plan_one({}, Facts(GitRemoteRefs=TAG,
                             CudaToolkit=toolkit_12_8(release="12.8.61")))
    again = plan_one({}, Facts(GitRemoteRefs=TAG))
    assert dict(old.flags) == dict(new.flags)  # same flags, another compiler
    assert old.key != new.key and old.stamp != new.stamp
    assert again.key == old.key  # rollback to the old toolkit finds its build
    assert old.cuda_toolkit == "12.8.93" and "with CUDA 12.8.93" in old.describe()


def test_a_cpu_only_key_ignores_the_toolkit():
    keys = {plan_one({"cuda": False}, Facts(GitRemoteRefs=TAG, CudaToolkit=tk)).key
            for tk in (None, toolkit_12_8(), toolkit_12_8(release="13.0.88"))}
    assert len(keys) == 1
    (key,) = keys
    flags = rig_for({"ref": "b8137", "cuda": False}).engines["llama"].cmake_flags(None)
    assert key == f"{SHA_B[:12]}-{flags_hash(flags)}"


def test_the_real_toolkit_version_enters_the_key(real_toolkit):
    facts = real_facts(real_toolkit)
    plan = plan_one({"cmake_extra": {"CUDA_cublas_LIBRARY": "/x/libcublas.so"}}, facts)
    assert plan.cuda_toolkit == real_toolkit["release"]
    assert plan.key.endswith(flags_hash(dict(plan.flags), real_toolkit["release"]))


# --- every build input pinned ----------------------------------------------------------------

def test_llama_cpp_never_downloads_the_prebuilt_web_ui_unless_asked():
    assert dict(plan_one({}, Facts(GitRemoteRefs=TAG)).flags)["LLAMA_USE_PREBUILT_UI"] == "OFF"
    mine = plan_one({"cmake_extra": {"LLAMA_USE_PREBUILT_UI": "ON"}}, Facts(GitRemoteRefs=TAG))
    assert dict(mine.flags)["LLAMA_USE_PREBUILT_UI"] == "ON"
    ik = rig_for({"kind": "ik_llama.cpp", "ref": SHA_B}).engines["llama"]
    assert "LLAMA_USE_PREBUILT_UI" not in ik.cmake_flags(["86"])


# --- architectures: the compiler's own list --------------------------------------------------

def test_the_real_compilers_list_decides(real_toolkit):
    listed = real_toolkit["arches"]
    assert listed and "86" in listed
    facts = real_facts(real_toolkit)
    extra = {"cmake_extra": {"CUDA_cublas_LIBRARY": "/x/libcublas.so"}}
    plan = plan_one({"cuda_architectures": [86], **extra}, facts)
    assert plan.architectures == ("86",)
    lowest = min(listed, key=int)
    if int(lowest) <= 61:
        pytest.skip(f"this nvcc still lists compute_{lowest}")
    text = problems_for({"ref": "b8137", "cuda_architectures": [61, 86], **extra}, facts)
    release = ".".join(map(str, real_toolkit["version"]))
    assert (f"engines.llama (ref 'b8137'): architecture 61 is not in "
            f"`{real_toolkit['nvcc']} --list-gpu-arch` (CUDA {release}: {lowest},") in text
    assert f"Fix: build with an older CUDA toolkit (CUDA {real_toolkit['version'][0]} starts " \
           f"at compute_{lowest}), or drop 61." in text
    assert "architecture 86" not in text


def test_blackwell_is_refused_by_a_list_without_it():
    facts = Facts(GitRemoteRefs=TAG, GpuComputeCaps={"caps": ["12.0"], "error": None},
                  CudaToolkit=toolkit_12_8(version=(12, 6), release="12.6.85",
                                           arches=[a for a in toolkit_12_8()["arches"]
                                                   if int(a) < 100]))
    text = problems_for({"ref": "b8137"}, facts, gpu_count=1)
    assert "architecture 120 is not in `/usr/local/cuda/bin/nvcc --list-gpu-arch` (CUDA 12.6:" \
        in text
    assert "Fix: install CUDA 12.8 or newer, or drop 120." in text


def test_the_table_is_only_a_fallback(caplog):
    # A list that names 120 wins over the table (which says 12.8 for 120).
    facts = Facts(GitRemoteRefs=TAG, GpuComputeCaps={"caps": ["12.0"], "error": None},
                  CudaToolkit=toolkit_12_8(version=(12, 4), release="12.4.131",
                                           arches=["86", "120"]),
                  NvidiaDriver={"version": "580.95.05", "error": None})
    assert plan_one({}, facts, gpu_count=1).architectures == ("120",)
    # Without a list the table decides, and the run says so.
    facts.table["CudaToolkit"] = toolkit_12_8(version=(12, 4), release="12.4.131", arches=None)
    text = problems_for({"ref": "b8137"}, facts, gpu_count=1)
    assert "architecture 120 needs CUDA >= 12.8" in text
    assert "--list-gpu-arch gave no list; architectures checked against" in caplog.text


# --- driver ----------------------------------------------------------------------------------

def test_driver_table():
    assert min_driver((12, 8)) == "570.26" and min_driver((13, 0)) == "580.65.06"
    assert min_driver((12, 7)) == MIN_DRIVER[(12, 6)]  # no 12.7 release: the floor below
    assert min_driver((13, 5)) == MIN_DRIVER[(13, 2)]  # newer than the table: its major's last
    # rows checked against NVIDIA's table (CUDA 13.2 Update 2 release notes, Table 3)
    assert (min_driver((11, 7)), min_driver((13, 1)), min_driver((13, 2))) == \
        ("515.43.04", "590.44.01", "595.45.04")
    assert min_driver((10, 2)) is None
    assert driver_too_old("570.172.08", (13, 0)) == "580.65.06"
    assert driver_too_old("580.65.06", (13, 0)) is None
    assert driver_too_old("570.9.1", (12, 8)) == "570.26"  # compared part by part, as numbers
    assert driver_too_old("560.35.03", (12, 8)) == "570.26"


def test_a_driver_older_than_the_real_toolkit_is_refused(real_toolkit):
    need = min_driver(real_toolkit["version"])
    if need is None:
        pytest.skip("this toolkit is older than the driver table")
    major = int(need.split(".")[0])
    facts = Facts(GitRemoteRefs=TAG, CudaToolkit=real_toolkit,
                  NvidiaDriver={"version": f"{major - 10}.86.10", "error": None})
    text = problems_for({"ref": "b8137", "cuda_architectures": [86],
                         "cmake_extra": {"CUDA_cublas_LIBRARY": "/x/libcublas.so"}}, facts)
    release = ".".join(map(str, real_toolkit["version"]))
    assert (f"CUDA {release} needs NVIDIA driver >= {need}, but the rig's driver is "
            f"{major - 10}.86.10. Fix: upgrade the NVIDIA driver to {need} or newer") in text


def test_no_driver_to_ask_is_said_not_refused(caplog):
    for driver in (None, {"version": None, "error": "NVIDIA-SMI has failed"}):
        facts = Facts(GitRemoteRefs=TAG, NvidiaDriver=driver)
        assert plan_one({"cuda_architectures": [86]}, facts).architectures == ("86",)
    assert "NVIDIA driver not checked against CUDA 12.8: NVIDIA-SMI has failed" in caplog.text
    assert "not checked against CUDA 12.8: nvidia-smi is not installed" in caplog.text


# --- cuBLAS ----------------------------------------------------------------------------------

def test_the_real_toolkit_without_cublas_is_refused(real_toolkit):
    if any(c.endswith("/libcublas.so") for c in real_toolkit["cublas"]):
        pytest.skip("this machine's toolkit has cuBLAS")
    facts = real_facts(real_toolkit)
    text = problems_for({"ref": "b8137", "cuda_architectures": [86]}, facts)
    assert f"no cuBLAS (libcublas.so) in {real_toolkit['root']}'s lib64, lib or " \
           "targets/*/lib" in text
    assert "Fix: install cuBLAS for CUDA" in text and "CUDA_cublas_LIBRARY" in text


def test_cublas_without_the_unversioned_link_is_refused_and_cmake_extra_may_name_it():
    wheel = ["/opt/cu13/lib/libcublas.so.13", "/opt/cu13/lib/libcublasLt.so.13"]
    facts = Facts(GitRemoteRefs=TAG, CudaToolkit=toolkit_12_8(cublas=wheel))
    text = problems_for({"ref": "b8137"}, facts)
    assert "cuBLAS has no unversioned libcublas.so link" in text
    assert "link libcublas.so and libcublasLt.so to their .so.12 files" in text
    named = {"CUDA_cublas_LIBRARY": wheel[0], "CUDA_cublasLt_LIBRARY": wheel[1]}
    assert plan_one({"cmake_extra": named}, facts).nvcc == "/usr/local/cuda/bin/nvcc"


# --- cuda_toolkit ----------------------------------------------------------------------------

PINNED_DIR = "/opt/llm-garage/cuda/13.0"


def installed_13_0(**changes):
    """CudaToolkitAt's answer for an installed 13.0 (what the real one says: see below)."""
    root = PINNED_DIR
    return {"nvcc": f"{PINNED_DIR}/bin/nvcc", "root": root, "version": (13, 0),
            "release": "13.0.88", "arches": list(CUDA_WHEELS["13.0"].arches),
            "cublas": [f"{root}/lib64/libcublas.so"], **changes}


def pinned_facts(**table) -> Facts:
    return Facts(**{"GitRemoteRefs": TAG, "CudaToolkit": None,
                    "NvidiaDriver": {"version": "580.95.05", "error": None}, **table})


def test_a_pinned_release_is_installed_from_its_wheels_and_planned_before_it_is_there():
    facts = pinned_facts(CudaToolkitStamp=None)
    plan = plan_one({"cuda_toolkit": "13.0"}, facts)
    install = plan.cuda_install
    assert install.toolkit_dir == PINNED_DIR and install.index == "https://pypi.org/simple"
    assert install.wheels is CUDA_WHEELS["13.0"]
    assert plan.nvcc == f"{PINNED_DIR}/bin/nvcc" and plan.cuda_toolkit == "13.0.88"
    asked = [name for name, _ in facts.asked]
    assert "CudaToolkit" not in asked  # the rig's own nvcc (none here) does not matter
    assert ("CudaToolkitStamp", {"path": f"{PINNED_DIR}/stamp"}) in facts.asked
    assert "CudaToolkitAt" not in asked  # not installed yet: the wheel set's known answers
    # Once installed, the toolkit's own answers; the key is the same, so nothing rebuilds.
    facts = pinned_facts(CudaToolkitStamp=install.stamp, CudaToolkitAt=installed_13_0())
    again = plan_one({"cuda_toolkit": "13.0"}, facts, cuda_wheel_index="http://10.0.0.1/simple")
    assert ("CudaToolkitAt", {"nvcc": f"{PINNED_DIR}/bin/nvcc"}) in facts.asked
    assert again.key == plan.key and again.cuda_install.index == "http://10.0.0.1/simple"


def test_a_stamp_of_other_wheels_installs_again_and_asks_nothing_of_the_old_folder():
    facts = pinned_facts(CudaToolkitStamp="cuda 13.0.48 0123456789abcdef",
                         CudaToolkitAt=installed_13_0(release="13.0.48"))
    plan = plan_one({"cuda_toolkit": "13.0"}, facts)
    assert plan.cuda_toolkit == "13.0.88" and plan.cuda_install.stamp != "cuda 13.0.48 " \
        "0123456789abcdef"
    assert "CudaToolkitAt" not in [name for name, _ in facts.asked]


def test_switching_toolkits_builds_a_new_folder_and_rollback_finds_the_old_one():
    system = plan_one({}, Facts(GitRemoteRefs=TAG))  # the rig's CUDA 12.8.93
    pinned = plan_one({"cuda_toolkit": "13.0"}, pinned_facts())
    back = plan_one({}, Facts(GitRemoteRefs=TAG))
    assert dict(system.flags) == dict(pinned.flags)
    assert pinned.key != system.key and back.key == system.key
    assert system.cuda_install is None and back.nvcc == "/usr/local/cuda/bin/nvcc"


def test_a_pin_without_wheels_or_on_another_machine_is_refused():
    text = problems_for({"ref": "b8137", "cuda_toolkit": "11.8"}, pinned_facts())
    assert ("cuda_toolkit '11.8': llm-garage installs only 13.0 from NVIDIA's wheels. Fix: pin "
            "one of 13.0, or install the toolkit yourself and set cuda_toolkit: system.") in text
    text = problems_for({"ref": "b8137", "cuda_toolkit": "13.0"}, pinned_facts(Arch="aarch64"))
    assert "installs Linux x86_64 wheels, but the rig is aarch64" in text


def test_a_pinned_toolkit_is_checked_like_any_other():
    # Before the install, with the wheel set's list: CUDA 13 has no 70; its driver minimum.
    facts = pinned_facts(NvidiaDriver={"version": "570.172.08", "error": None})
    text = problems_for({"ref": "b8137", "cuda_toolkit": "13.0",
                         "cuda_architectures": [70, 120]}, facts)
    assert f"architecture 70 is not in `{PINNED_DIR}/bin/nvcc --list-gpu-arch` (CUDA 13.0: 75," \
        in text
    assert "CUDA 13.0 needs NVIDIA driver >= 580.65.06, but the rig's driver is 570.172.08" in text
    assert "architecture 120" not in text
    # Installed, but its nvcc reports another release: the folder is not what it claims.
    facts = pinned_facts(CudaToolkitStamp=CudaInstall("13.0", PINNED_DIR, "", CUDA_WHEELS["13.0"])
                         .stamp, CudaToolkitAt=installed_13_0(version=(12, 9), release="12.9.86"))
    text = problems_for({"ref": "b8137", "cuda_toolkit": "13.0"}, facts)
    assert f"cuda_toolkit is 13.0 but {PINNED_DIR}/bin/nvcc is CUDA 12.9.86. Fix: delete " \
        f"{PINNED_DIR} on the rig so that the next run installs it again." in text


def test_a_stamped_toolkit_without_its_nvcc_is_refused():
    stamp = CudaInstall("13.0", PINNED_DIR, "", CUDA_WHEELS["13.0"]).stamp
    text = problems_for({"ref": "b8137", "cuda_toolkit": "13.0"},
                        pinned_facts(CudaToolkitStamp=stamp, CudaToolkitAt=None))
    assert f"{PINNED_DIR} is stamped as installed, but has no working {PINNED_DIR}/bin/nvcc. " \
        f"Fix: delete {PINNED_DIR} on the rig so that the next run installs it again." in text


def test_the_wheel_sets_architectures_are_what_its_nvcc_lists(real_toolkit):
    wheels = CUDA_WHEELS["13.0"]
    if real_toolkit["release"] != wheels.release:
        pytest.skip(f"this machine's nvcc is {real_toolkit['release']}, not {wheels.release}")
    assert real_toolkit["arches"] == list(wheels.arches)


def test_cuda_toolkit_setting_values():
    from llm_garage.settings import load_rig
    for value in ("system", "13.0", "12.8"):
        _, errors = load_rig("g", {"engines": {"e": {"kind": "llama.cpp", "ref": "b1",
                                                     "cuda_toolkit": value, "cuda": False}}})
        assert errors == []
    _, errors = load_rig("g", {"engines": {"e": {"kind": "llama.cpp", "ref": "b1",
                                                 "cuda_toolkit": "latest", "cuda": False}}})
    assert len(errors) == 1 and "engines.e.cuda_toolkit" in str(errors[0])


def test_check_says_which_toolkit_each_engine_builds_with():
    from llm_garage.cli import plan_lines
    lines = "\n".join(plan_lines(rig_for({"ref": "b8137", "cuda_toolkit": "13.0"},
                                          cuda_wheel_index="http://10.0.0.1/simple")))
    assert ("    CUDA 13.0 (nvcc 13.0.88): installed from 6 NVIDIA wheels on "
            "http://10.0.0.1/simple into /opt/llm-garage/cuda/13.0") in lines
    lines = "\n".join(plan_lines(rig_for({"ref": "b8137"})))
    assert "    CUDA: the rig's nvcc (PATH, else /usr/local/cuda/bin/nvcc)" in lines
    lines = "\n".join(plan_lines(rig_for({"ref": "b8137", "cuda_toolkit": "12.4"})))
    assert "CUDA 12.4: no pinned wheels for it (the deploy refuses it; pinned: 13.0)" in lines
    assert "    CUDA" not in "\n".join(plan_lines(rig_for({"ref": "b8137", "cuda": False})))
