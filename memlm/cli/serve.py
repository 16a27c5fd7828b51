"""`memlm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer

from memlm.cli.options import (
    DEFAULT_MODEL,
    DtypeOpt,
    KvBlockSizeOpt,
    KvCacheTypeOpt,
    KvMemoryOpt,
    KvRotateOpt,
    ModelOpt,
    PagedKvOpt,
    PrefixCachingOpt,
    kv_cache_config,
)
from memlm.errors import MemlmError


def serve(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY'. Prefer the environment variable MEMLM_API_KEY: "
                          "a flag shows in `ps`.", envvar="MEMLM_API_KEY", show_envvar=False),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option(help="With an API key, serve /metrics without it too (for a scraper).")
    ] = False,
    allowed_origins: Annotated[
        list[str] | None, typer.Option(help="Allow browser pages from this origin (CORS; repeatable; '*' for any).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoding at once (continuous batching).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; beyond it, 503 with Retry-After.")] = 256,
    max_tokens_default: Annotated[
        int | None, typer.Option(help="Tokens a chat generates when its request sets no max_tokens "
                                      "(default: up to the context's end, as OpenAI).")
    ] = None,
    max_tokens_cap: Annotated[
        int | None, typer.Option(help="Refuse requests asking for more tokens than this (400); also caps the default.")
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(help="Refuse request bodies larger than this (413), before parsing them.")
    ] = 8 << 20,
    memory: Annotated[
        list[str] | None, typer.Option(help="A latent memory as NAME=DIR (repeatable); requests pick it by name.")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="A LoRA adapter as NAME=DIR (PEFT or memlm folder; repeatable). A request's model "
                          "NAME (or BASE:NAME) selects it; rows with different adapters share each batch."),
    ] = None,
    kv_predictor: Annotated[
        str | None, typer.Option(help="Importance predictor folder: enables kv_policy 'learned'.")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: its name).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    cache_type: KvCacheTypeOpt = None,
    cache_memory: KvMemoryOpt = None,
    cache_block_size: KvBlockSizeOpt = 16,
    cache_rotate: KvRotateOpt = False,
    prefix_caching: PrefixCachingOpt = True,
    paged_kv: PagedKvOpt = True,
):
    """Serve a model over HTTP with OpenAI's API, per-request memory options, metrics and a memory page."""
    # lazy: uvicorn, FastAPI and the model loader (torch) load only when the server starts
    import uvicorn

    from memlm.formats.loading import EMBEDDED, resolve
    from memlm.serve.app import ServeOptions, create_app

    if not 0 < port < 65536:
        raise MemlmError(f"--port must be in 1..65535, got {port}")
    if max_batch < 1 or max_queue < 1:
        raise MemlmError("--max-batch and --max-queue must be >= 1")
    for flag, value in (("--max-tokens-default", max_tokens_default), ("--max-tokens-cap", max_tokens_cap),
                        ("--max-body-bytes", max_body_bytes)):
        if value is not None and value < 1:
            raise MemlmError(f"{flag} must be >= 1, got {value}")
    memories = _named_folders("--memory", memory or [])
    adapters = _named_folders("--lora", lora or [])
    kv_cache = kv_cache_config(cache_type, cache_memory, cache_block_size, cache_rotate, prefix_caching, paged_kv)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise MemlmError(f"--host must be an IP address or localhost, got {host!r}") from None
    resolve(model)  # an unknown model fails here, before the server starts
    name = served_model_name or (model.lower() if model.lower() in EMBEDDED else Path(model).resolve().name)
    if name in adapters:
        raise MemlmError(f"--lora {name}: an adapter needs a name other than the served model's")

    def load():
        # lazy: torch and the engine, on the server's engine thread
        import torch

        import memlm
        from memlm.cache.importance import check_predictor, load_predictor
        from memlm.latent.memory import LatentMemory

        if threads:
            torch.set_num_threads(threads)
        engine = memlm.load(model, dtype=dtype, kv_cache=kv_cache, adapters=adapters)
        loaded = {key: LatentMemory.load(folder, engine) for key, folder in memories.items()}
        predictor = None
        if kv_predictor is not None:
            predictor, config = load_predictor(kv_predictor)
            check_predictor(kv_predictor, config, engine.config, model)
        return engine, loaded, predictor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = ServeOptions(api_key=api_key or None, max_batch=max_batch, max_queue=max_queue,
                           max_tokens_default=max_tokens_default, max_tokens_cap=max_tokens_cap,
                           max_body_bytes=max_body_bytes, public_metrics=public_metrics,
                           allowed_origins=list(allowed_origins or []))
    server = create_app(load, name, options)
    print(f"memlm serve: {name} on http://{host}:{port}  (page at /, OpenAI API at /v1)", flush=True)
    state = server.state.memlm

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the signal handler: end in-flight requests, then uvicorn's shutdown
            state.shut_down()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(server, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()


def _named_folders(flag: str, specs: list[str]) -> dict[str, str]:
    """NAME=DIR options (--memory, --lora) -> {name: folder}, checked before the server starts."""
    out = {}
    for spec in specs:
        key, sep, folder = spec.partition("=")
        if not sep or not key or not folder:
            raise MemlmError(f"{flag} takes NAME=DIR, got {spec!r}")
        if not Path(folder).is_dir():
            raise MemlmError(f"{flag} {key}: no such folder {folder!r}")
        if key in out:
            raise MemlmError(f"{flag} {key!r} given twice")
        out[key] = folder
    return out
