"""`memlm generate`, `memlm chat` and `memlm info`: one model, run or described."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from memlm.cli.options import (
    DEFAULT_MODEL,
    DtypeOpt,
    KvBlockSizeOpt,
    KvBudgetOpt,
    KvCacheTypeOpt,
    KvEvictPromptOpt,
    KvMemoryOpt,
    KvPolicyOpt,
    KvPredictorOpt,
    KvPressOpt,
    KvPressRatioOpt,
    KvRatioOpt,
    KvRescoreOpt,
    KvRotateOpt,
    KvSinksOpt,
    KvSpansOpt,
    KvThresholdOpt,
    KvWindowOpt,
    MaxNewTokensOpt,
    MemoryOpt,
    MinPOpt,
    ModelOpt,
    PagedKvOpt,
    PrefixCachingOpt,
    RepetitionPenaltyOpt,
    SeedSamplingOpt,
    StopOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    TriggerOpt,
    check_kv_predictor,
    kv_cache_config,
    load_engine,
    load_kv_predictor,
    load_memory,
    policy_spec,
    sampling_params,
)
from memlm.errors import MemlmError
from memlm.lcm.config import PLAIN_CHAT_TEMPLATE


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message unless --no-chat).")],
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    stop: StopOpt = None,
    seed: SeedSamplingOpt = None,
    system: Annotated[str | None, typer.Option(help="System message (chat mode).")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Apply the model's chat template.")] = True,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")] = True,
    kv_policy: KvPolicyOpt = "full",
    kv_budget: KvBudgetOpt = None,
    kv_predictor: KvPredictorOpt = None,
    kv_window: KvWindowOpt = None,
    kv_ratio: KvRatioOpt = None,
    kv_rescore: KvRescoreOpt = None,
    kv_spans: KvSpansOpt = None,
    kv_evict_prompt: KvEvictPromptOpt = None,
    kv_sinks: KvSinksOpt = None,
    kv_threshold: KvThresholdOpt = None,
    kv_press: KvPressOpt = None,
    kv_press_ratio: KvPressRatioOpt = None,
    cache_type: KvCacheTypeOpt = None,
    cache_memory: KvMemoryOpt = None,
    cache_block_size: KvBlockSizeOpt = 16,
    cache_rotate: KvRotateOpt = False,
    prefix_caching: PrefixCachingOpt = True,
    paged_kv: PagedKvOpt = True,
    memory: MemoryOpt = None,
    trigger: TriggerOpt = None,
    show_insertions: Annotated[
        bool, typer.Option("--show-insertions", help="Mark where latent memory was inserted (no streaming).")
    ] = False,
    show_memory: Annotated[
        bool, typer.Option("--show-memory", help="LCM models: per token, the loop steps and grids used.")
    ] = False,
):
    """Complete one prompt and print the result."""
    spec = policy_spec(**{name: value for name, value in locals().items() if name.startswith("kv_")})
    params = sampling_params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
    predictor, predictor_config = load_kv_predictor(spec)
    policy = spec.build(predictor)  # bad names and budgets fail before the model loads
    kv_cache = kv_cache_config(cache_type, cache_memory, cache_block_size, cache_rotate, prefix_caching, paged_kv)
    if show_insertions and memory is None:
        raise MemlmError("--show-insertions needs --memory DIR")
    if not prompt.strip():
        raise MemlmError("prompt is empty")
    engine = load_engine(model, dtype, kv_cache)
    check_kv_predictor(spec, predictor_config, engine, model)
    request = prompt
    if chat and engine.tokenizer.chat_template:
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    latent = load_memory(memory, engine, trigger)
    if show_memory:
        if not getattr(engine.model, "has_memory", False):
            raise MemlmError("--show-memory needs an LCM model with a memory (memlm train lcm)")
        out = engine.generate(request, params, kv_policy=policy)
        print(_memory_table(engine.tokenizer, out))
        _note_halt(out.finish_reason)
        return
    if show_insertions:
        from memlm.latent.memory import mark_insertions  # lazy: torch

        out = engine.generate(request, params, kv_policy=policy, memory=latent)
        print(mark_insertions(engine.tokenizer, out.token_ids, out.insertions))  # special tokens are skipped
    elif stream:
        for delta in engine.stream(request, params, kv_policy=policy, memory=latent):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            _note_halt(delta.finish_reason)
        sys.stdout.write("\n")
    else:
        out = engine.generate(request, params, kv_policy=policy, memory=latent)
        print(out.text)
        _note_halt(out.finish_reason)


def _note_halt(finish_reason: str | None) -> None:
    if finish_reason == "halted":
        print("memlm: generation halted: the state came near a danger code", file=sys.stderr)


def _memory_table(tokenizer, out) -> str:
    """One line per generated token: the token, the loop steps and grids behind it, flags."""
    lines = [f"{'token':<18} {'steps':>5}  {'distance':>8}  grids"]
    for token, trace in zip(out.token_ids, out.memory_trace or [], strict=False):
        text = repr(tokenizer.decode([token]))[:18]
        flags = (" [value flag]" if trace.get("flagged") else "") + (" [halt]" if trace.get("halted") else "")
        lines.append(f"{text:<18} {trace['steps']:>5}  {trace['distance']:>8.3f}  {','.join(trace['grids'])}{flags}")
    lines.append(f"finish_reason: {out.finish_reason}")
    return "\n".join(lines)


def chat(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 512,
    temperature: TemperatureOpt = 0.0,
    top_k: Annotated[int, typer.Option()] = 0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    min_p: Annotated[float, typer.Option()] = 0.0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
):
    """Interactive chat with history. /reset forgets the conversation, /exit (or Ctrl-D) quits."""
    from memlm.lcm.model import LCMModel  # lazy: torch

    params = sampling_params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, None, seed)
    engine = load_engine(model, dtype)
    if not engine.tokenizer.chat_template and isinstance(engine.model, LCMModel):
        engine.tokenizer.chat_template = PLAIN_CHAT_TEMPLATE  # an LCM trained on plain text: turns as plain lines
        params.stop.append("\nUser:")
    if not engine.tokenizer.chat_template:
        raise MemlmError(f"{model} has no chat template; use `memlm generate --no-chat`")
    try:
        import readline  # noqa: F401  (lazy, optional: line editing and history for input())
    except ImportError:
        pass
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"memlm chat — {engine.name}. /reset to forget, /exit to quit.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        reply = []
        if interactive:
            sys.stdout.write("assistant> ")
        for delta in engine.stream(history, params):
            reply.append(delta.text)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def info(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Architecture, parameter count, KV bytes per token, and where the weights came from."""
    from memlm.lcm.model import LCMModel  # lazy: torch

    engine = load_engine(model, dtype)
    c = engine.config
    if isinstance(engine.model, LCMModel):  # a recurrent state, not a KV cache
        state = engine.model.new_state(1)
        facts = {
            "model": engine.name,
            "architecture": "LCM (codebook memory)",
            "parameters": engine.num_parameters,
            **{k: v for k, v in c.to_json().items() if k not in ("model_type", "z_ablation", "grids_off")},
            "dtype": engine.dtype,
            "state_bytes_per_sequence": state.recurrent_bytes_per_sequence(),
            "danger_codes": int(engine.model.memory.safety.danger_codes.shape[0]) if engine.model.has_memory else 0,
            "source": engine.source,
        }
        _print_facts(facts, as_json)
        return
    facts = {
        "model": engine.name,
        "architecture": c.arch,
        "parameters": engine.num_parameters,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tied_embeddings": c.tie_word_embeddings,
        "qk_norm": c.qk_norm,
        "dtype": engine.dtype,
        **_window_facts(c),
        "kv_bytes_per_token": c.kv_bytes_per_token(engine.model.dtype.itemsize),
        "chat_template": bool(engine.tokenizer.chat_template),
        "source": engine.source,
    }
    _print_facts(facts, as_json)


def _window_facts(c) -> dict:
    """Sliding-window layers (Gemma 3, Phi-3), when the model has them."""
    sliding = sum(c.is_sliding(i) for i in range(c.num_layers))
    if not sliding:
        return {}
    facts = {"sliding_window": c.sliding_window, "sliding_layers": f"{sliding} of {c.num_layers}"}
    if c.local_rope_theta is not None:
        facts["local_rope_theta"] = c.local_rope_theta
    return facts


def _print_facts(facts: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    # lazy: rich's tables cost import time that --help need not pay
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key.replace("_", " "), shown)
    Console().print(table)
