"""Stand-ins for what test rigs cannot have: NVIDIA's nvidia-smi and the CUDA compiler."""

from lab.standins.gpu.install import FAKES_DIR, GPU_MODELS, fake_gpu_files

__all__ = ["FAKES_DIR", "GPU_MODELS", "fake_gpu_files"]
