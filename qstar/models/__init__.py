"""Where models come from: hub ids, local directories, GGUF files (``loading``) and tiny random
models built from a config (``random``; ``tiny:ARCH`` model names, tests and benchmarks)."""
