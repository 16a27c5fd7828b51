"""memlm: a runtime for language models with first-class memory."""

__version__ = "0.1.0"


def load(
    name_or_path: str | None = None, dtype: str = "auto", activations: str = "float32", kv_cache=None, adapters=None
):
    """Load a model by name (default: the embedded SmolLM2-135M-Instruct) or path; return an Engine.

    dtype: auto (a GGUF file on its own blocks, anything else float32), float32, bfloat16, int8, or
    GGUF blocks q4_0 / q4_1 / q5_0 / q5_1 / q8_0 / q4_k / q5_k / q6_k (native kernels); with those,
    activations float32 (exact against the quantized weights) or q8_0 (llama.cpp's int8 blocks).
    kv_cache: a memlm.cache.blocks.KVCacheConfig (paged blocks, KV type, pool budget, prefix caching);
    default: paged blocks in the model's dtype, growing as needed, with prefix caching.
    adapters: {name: LoRA adapter folder}, registered for per-request use (`generate(..., adapter=name)`)."""
    # lazy: `import memlm` (every CLI start, `memlm --help`) must not load torch
    from memlm.formats.loading import DEFAULT_MODEL
    from memlm.generation.engine import Engine

    engine = Engine.load(name_or_path or DEFAULT_MODEL, dtype=dtype, activations=activations, kv_cache=kv_cache)
    for name, folder in (adapters or {}).items():
        engine.add_adapter(name, folder)
    return engine


def __getattr__(name):  # lazy: `import memlm` stays cheap for the CLI's --help
    if name in ("Engine", "SamplingParams", "Completion"):
        from memlm import generation

        return getattr(generation, name)
    raise AttributeError(name)
