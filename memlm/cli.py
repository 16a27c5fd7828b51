"""The `memlm` command line: generate, chat, info, bench.

User mistakes (bad flags, unknown models, corrupt files) end as one line on stderr and exit code 2;
tracebacks are for bugs.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from memlm.errors import MemlmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="memlm: run language models with first-class memory.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print a table and write JSON.")
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name or path (HF folder or .gguf).")]
DtypeOpt = Annotated[str, typer.Option(help="Weights: float32, bfloat16, or int8 (dynamic int8 linears).")]
DEFAULT_MODEL = "smollm2-135m-instruct"


def _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed):
    from memlm.generation.params import SamplingParams

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop=list(stop or []),
        seed=seed,
    )


def _load(model: str, dtype: str):
    import memlm

    return memlm.load(model, dtype=dtype)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message unless --no-chat).")],
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "float32",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="System message (chat mode).")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Apply the model's chat template.")] = True,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")] = True,
    kv_policy: Annotated[str, typer.Option(help="KV-cache eviction: full, window, clear, sinks, h2o, tova.")] = "full",
    kv_budget: Annotated[int | None, typer.Option(help="Most tokens the KV cache keeps (with --kv-policy).")] = None,
):
    """Complete one prompt and print the result."""
    from memlm.cache.policies import make_policy

    params = _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
    policy = make_policy(kv_policy, kv_budget)
    if not prompt.strip():
        raise MemlmError("prompt is empty")
    engine = _load(model, dtype)
    request = prompt
    if chat and engine.tokenizer.chat_template:
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if stream:
        for delta in engine.stream(request, params, kv_policy=policy):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(engine.generate(request, params, kv_policy=policy).text)


@app.command()
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "float32",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option()] = 0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    min_p: Annotated[float, typer.Option()] = 0.0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
):
    """Interactive chat with history. /reset forgets the conversation, /exit (or Ctrl-D) quits."""
    params = _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, None, seed)
    engine = _load(model, dtype)
    if not engine.tokenizer.chat_template:
        raise MemlmError(f"{model} has no chat template; use `memlm generate --no-chat`")
    try:
        import readline  # noqa: F401  (line editing and history for input())
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


@app.command()
def info(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Architecture, parameter count, KV bytes per token, and where the weights came from."""
    engine = _load(model, dtype)
    c = engine.config
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
        "kv_bytes_per_token": c.kv_bytes_per_token(engine.model.dtype.itemsize),
        "chat_template": bool(engine.tokenizer.chat_template),
        "source": engine.source,
    }
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key.replace("_", " "), shown)
    Console().print(table)


@bench_app.command("decode")
def bench_decode(
    model: ModelOpt = DEFAULT_MODEL,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per sequence.")] = 64,
    threads: Annotated[int, typer.Option(help="torch threads for each engine.")] = 2,
    dtype: DtypeOpt = "int8",
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="Report int8 vs fp32 quality.")] = True,
):
    """memlm vs Hugging Face transformers generate: prefill and decode tok/s, peak RSS."""
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise MemlmError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1 or new_tokens < 2 or threads < 1:
        raise MemlmError("batch sizes and threads must be >= 1, new tokens >= 2")
    from memlm.bench.decode import run_decode_bench

    run_decode_bench(
        model=model,
        batch_sizes=sizes,
        new_tokens=new_tokens,
        threads=threads,
        dtype=dtype,
        json_path=json_path,
        quality=quality,
    )


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except MemlmError as e:
        _fail(str(e))
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # command-line usage errors: bad option, bad value, missing argument
        _fail(e.format_message() if hasattr(e, "format_message") else str(e))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    if message:  # empty for "no arguments: help was shown"
        print(f"memlm: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
