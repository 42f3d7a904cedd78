"""Stand-ins for what test rigs cannot reach or have: the Hugging Face API (`hf_server`), a
llama.cpp-like engine repository (`engine_repo`, source tree in `engine/`), small GGUF files
(`gguf_gen`) and NVIDIA's GPU tools (`gpu`)."""
