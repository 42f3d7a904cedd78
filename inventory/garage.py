# The two reference rigs. Copy this file, change addresses and paths, and run
#
#     llm-garage check inventory/garage.py      # offline: validate and print the plan
#     pyinfra inventory/garage.py deploy.py     # converge every rig
#
# Every setting, its default and its meaning: README.md, "Settings reference".

from pathlib import Path

# Every model pinned to a commit and exact files by `llm-garage lock inventory/garage.py`;
# every host of the run names the same lock.
COMMON = {"models_lock": str(Path(__file__).with_name("garage.lock.json"))}

# Models are described once and shared by the rigs that serve them.
QWEN_122B_Q6 = {
    "repo": "unsloth/Qwen3.5-122B-A10B-GGUF",
    "revision": "main",
    "quant": "UD-Q6_K_XL",  # 4 shards, ~105 GB
}
QWEN_397B_TQ1 = {
    "repo": "unsloth/Qwen3.5-397B-A17B-GGUF",
    "revision": "main",
    "files": ["Qwen3.5-397B-A17B-UD-TQ1_0.gguf"],  # one file, ~88 GB
}
QWEN_397B_IQ4_KSS = {
    "repo": "ubergarm/Qwen3.5-397B-A17B-GGUF",
    "revision": "main",
    "quant": "IQ4_KSS",  # 6 shards, ik_llama.cpp quant
}

# Sampling and server flags the Qwen3.5 posts recommend for the 3090 rig.
QWEN_ON_3090S = {
    "ctx_size": 262144,
    "n_gpu_layers": 999,
    "cache_type_k": "q8_0",
    "cache_type_v": "q8_0",
    "split_mode": "layer",
    "parallel": 1,
    "no_warmup": True,
    "jinja": True,
    "temp": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "min_p": 0.0,
}

garage = [
    (
        "garage",  # six RTX 3090 (24 GB each)
        {
            "ssh_hostname": "192.168.1.50",
            "ssh_user": "root",
            **COMMON,
            "gpu_count": 6,
            "gpu_memory_mib": 24576,  # nvidia-smi memory.total of an RTX 3090
            "gpu_power_limit_w": 350,
            "engines": {
                "llama": {
                    "kind": "llama.cpp",
                    "ref": "b8137",  # fixes Qwen3.5 tool-call crashes seen on b7991
                    # cuda, fa_all_quants, static Release build: defaults of this rig
                },
            },
            "models": {
                "qwen3.5-122b-q6": QWEN_122B_Q6,
                "qwen3.5-397b-tq1": QWEN_397B_TQ1,
            },
            "profiles": {
                "qwen122": {
                    "model": "qwen3.5-122b-q6",
                    "engine": "llama",
                    "port": 8000,
                    "alias": "qwen3.5-122b",
                    "tensor_split": [0.9, 1, 1, 1, 1, 1],  # GPU 0 also drives the display
                    **QWEN_ON_3090S,
                },
                "qwen397": {
                    "model": "qwen3.5-397b-tq1",
                    "engine": "llama",
                    "port": 8000,
                    "alias": "qwen3.5-397b",
                    "enabled": False,  # one model at a time on this rig
                    **QWEN_ON_3090S,
                },
            },
        },
    ),
]

epyc = [
    (
        "epyc",  # AMD EPYC 9175F, one RTX PRO 6000 Blackwell (96 GB)
        {
            "ssh_hostname": "192.168.1.51",
            "ssh_user": "root",
            **COMMON,
            "gpu_count": 1,
            "engines": {
                "ik": {
                    "kind": "ik_llama.cpp",
                    "ref": "8337e4cd3861406fc04e0854b1409cd1b027fbc9",  # main, 2026-08-15
                },
            },
            "models": {
                "qwen3.5-397b-iq4kss": QWEN_397B_IQ4_KSS,
            },
            "profiles": {
                "qwen397": {
                    "model": "qwen3.5-397b-iq4kss",
                    "engine": "ik",
                    "port": 8000,
                    "alias": "qwen3.5-397b-iq4kss",
                    "cpu_moe": True,
                    "flash_attn": "on",
                    "no_mmap": True,
                    "batch_size": 2048,
                    "ubatch_size": 2048,
                    "threads": 13,
                    "threads_batch": 24,
                    "ctx_size": 262144,
                    "jinja": True,
                    "temp": 0.7,
                    "repeat_penalty": 1.2,
                    "min_p": 0.01,
                    "top_p": 0.95,
                    "top_k": 40,
                },
            },
            # The coding agent on this box lists the models of both rigs.
            "opencode_client": True,
        },
    ),
]
