"""What to copy into a test rig so that it looks like a machine with NVIDIA GPUs.

``fake_gpu_files`` returns the files only; the rig harness pushes them (over SSH, or straight
into the rig's root filesystem). Device nodes are left alone: nothing on a rig opens them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

FAKES_DIR = Path(__file__).resolve().parent

NVIDIA_SMI_PATH = "/usr/bin/nvidia-smi"
GPUS_JSON_PATH = "/etc/fake-nvidia/gpus.json"
CUDA_VERSION_PATH = "/etc/fake-nvidia/cuda_version"
NVCC_PATH = "/usr/local/cuda/bin/nvcc"
# An empty file where NVIDIA's packages put cuBLAS: the engine plan looks for it before a CUDA
# build; the fixture engine never links it.
CUBLAS_PATH = "/usr/local/cuda/lib64/libcublas.so"

GPU_MODELS = ("rtx3090", "rtxpro6000")


def fake_gpu_files(
    model: str | Sequence[str],
    count: int,
    cuda_version: str | None = None,
    *,
    driver_version: str | None = None,
    power_draw_by_phase: dict[str, float] | None = None,
    phase_file: str | None = None,
) -> dict[str, tuple[bytes, int]]:
    """Map each rig path to (content, mode) for a rig with ``count`` GPUs of ``model``.

    ``model`` is one of GPU_MODELS, or a sequence of them (one per GPU, in index order; then
    ``count`` must equal its length). With ``cuda_version`` ("12.8", or a full "12.8.93") the
    rig also gets a CUDA toolkit that answers ``nvcc --version`` at /usr/local/cuda/bin/nvcc,
    which is not on PATH, as with NVIDIA's packages, and an empty cuBLAS file beside it.
    ``power_draw_by_phase`` and ``phase_file`` make each GPU draw the power of the phase the
    fixture engine writes into that file (see nvidia-smi's doc).
    """
    models = [model] * count if isinstance(model, str) else list(model)
    if len(models) != count:
        raise ValueError(f"{len(models)} models given for count {count}")
    for m in models:
        if m not in GPU_MODELS:
            raise ValueError(f"unknown GPU model {m!r}; known: {', '.join(GPU_MODELS)}")
    config: dict[str, object]
    if len(set(models)) <= 1:
        config = {"model": models[0] if models else GPU_MODELS[0], "count": count}
    else:
        config = {"gpus": [{"model": m} for m in models]}
    if driver_version:
        config["driver_version"] = driver_version
    if power_draw_by_phase:
        config["power_draw_by_phase"] = dict(power_draw_by_phase)
        config["phase_file"] = phase_file
    files = {
        NVIDIA_SMI_PATH: ((FAKES_DIR / "nvidia-smi").read_bytes(), 0o755),
        GPUS_JSON_PATH: ((json.dumps(config, sort_keys=True) + "\n").encode(), 0o644),
    }
    if cuda_version:
        parts = cuda_version.split(".")
        if len(parts) < 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"CUDA version must look like 12.8 or 12.8.93, not {cuda_version!r}")
        files[NVCC_PATH] = ((FAKES_DIR / "nvcc").read_bytes(), 0o755)
        files[CUDA_VERSION_PATH] = ((cuda_version + "\n").encode(), 0o644)
        files[CUBLAS_PATH] = (b"", 0o644)
    return files
