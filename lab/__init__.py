"""What is neither llm-garage nor its tests: the test rigs, the stand-ins (Hugging Face API,
engine repository, GGUF files, GPU tools), the sandbox runner and what tests and benchmarks
share. Not part of the installed package."""
