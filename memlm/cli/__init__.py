"""The `memlm` command line: generate, chat, info, eval, train, bench (this module), and the
command groups of their own modules: `data` (tokenizers, packed token data) and `lcm` (codebook
memory: training stages, evaluation, safety grids), registered at the bottom.

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
train_app = typer.Typer(no_args_is_help=True, help="Training commands (shared loop: progress, checkpoints, --resume).")
app.add_typer(train_app, name="train")
data_app = typer.Typer(no_args_is_help=True, help="Training data: BPE tokenizers and packed token files.")
app.add_typer(data_app, name="data")
lcm_app = typer.Typer(no_args_is_help=True, help="Codebook-memory (LCM) models: safety grids.")
app.add_typer(lcm_app, name="lcm")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name or path (HF folder or .gguf).")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Weights: float32, bfloat16, int8 (dynamic int8 linears), or GGUF blocks q4_0, q4_1, q8_0 "
        "(native kernels; a GGUF file's own blocks are used as they are). Add :q8_0 (e.g. q4_1:q8_0) to "
        "quantize activations per block like llama.cpp: faster, not exact."
    ),
]
TriggerOpt = Annotated[
    str | None, typer.Option(help="Override the memory's trigger: always, never, or learned (if it has one).")
]
DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_POLICIES = ("full", "window", "clear", "sinks", "h2o", "tova", "learned")


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
    kv_policy: Annotated[
        str, typer.Option(help="KV-cache eviction: full, window, clear, sinks, h2o, tova, learned.")
    ] = "full",
    kv_budget: Annotated[int | None, typer.Option(help="Most tokens the KV cache keeps (with --kv-policy).")] = None,
    kv_predictor: Annotated[
        str | None, typer.Option(help="Importance predictor folder for --kv-policy learned.")
    ] = None,
    kv_window: Annotated[
        int | None, typer.Option(help="--kv-policy learned: the most recent tokens always kept (default 8).")
    ] = None,
    kv_ratio: Annotated[
        float | None,
        typer.Option(help="--kv-policy learned: share of older tokens an eviction keeps, in (0, 1] (default 0.5)."),
    ] = None,
    kv_rescore: Annotated[
        float | None,
        typer.Option(help="--kv-policy learned: share of kept older tokens chosen by current attention (default 0)."),
    ] = None,
    kv_spans: Annotated[
        bool, typer.Option("--kv-spans", help="--kv-policy h2o, tova, learned: keep or drop numbers whole.")
    ] = False,
    kv_evict_prompt: Annotated[
        bool | None,
        typer.Option(
            "--kv-evict-prompt/--kv-keep-prompt",
            help="--kv-policy learned: let prompt tokens compete on their score, or keep them all "
            "(default: as the predictor was trained, --prompt or not).",
            show_default=False,
        ),
    ] = None,
    memory: Annotated[str | None, typer.Option(help="Latent memory folder (from `memlm train weaver`).")] = None,
    trigger: TriggerOpt = None,
    show_insertions: Annotated[
        bool, typer.Option("--show-insertions", help="Mark where latent memory was inserted (no streaming).")
    ] = False,
    show_memory: Annotated[
        bool, typer.Option("--show-memory", help="LCM models: per token, the loop steps and grids used.")
    ] = False,
):
    """Complete one prompt and print the result."""
    from memlm.cache.policies import make_policy

    params = _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
    options = {}
    if kv_policy == "learned":
        if kv_predictor is None:
            raise MemlmError("--kv-policy learned needs --kv-predictor DIR (from `memlm train predictor`)")
        from memlm.cache.importance import load_predictor

        options["predictor"], predictor_config = load_predictor(kv_predictor)
        tuning = {"window": kv_window, "ratio": kv_ratio, "rescore": kv_rescore, "evict_prompt": kv_evict_prompt}
        options |= {k: v for k, v in tuning.items() if v is not None}
    elif kv_window is not None or kv_ratio is not None or kv_rescore is not None or kv_evict_prompt is not None:
        raise MemlmError(
            "--kv-window, --kv-ratio, --kv-rescore and --kv-evict-prompt are options of --kv-policy learned"
        )
    if kv_spans:
        from memlm.cache.policies import SPAN_POLICIES

        if kv_policy not in SPAN_POLICIES:
            raise MemlmError(f"--kv-spans is an option of --kv-policy {', '.join(SPAN_POLICIES)}")
        options["spans"] = True
    policy = make_policy(kv_policy, kv_budget, **options)  # bad names and budgets fail before the model loads
    if show_insertions and memory is None:
        raise MemlmError("--show-insertions needs --memory DIR")
    if not prompt.strip():
        raise MemlmError("prompt is empty")
    engine = _load(model, dtype)
    if kv_policy == "learned":
        from memlm.cache.importance import check_predictor

        check_predictor(kv_predictor, predictor_config, engine.config, model)
    request = prompt
    if chat and engine.tokenizer.chat_template:
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    latent = _load_memory(memory, engine, trigger)
    if show_memory:
        if not getattr(engine.model, "has_memory", False):
            raise MemlmError("--show-memory needs an LCM model with a memory (memlm train lcm)")
        out = engine.generate(request, params, kv_policy=policy)
        print(_memory_table(engine.tokenizer, out))
        _note_halt(out.finish_reason)
        return
    if show_insertions:
        from memlm.latent.memory import mark_insertions

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


def _load_memory(folder: str | None, engine, trigger: str | None = None):
    if folder is None:
        if trigger is not None:
            raise MemlmError("--trigger needs --memory DIR")
        return None
    from memlm.latent.memory import LatentMemory

    return LatentMemory.load(folder, engine, trigger=trigger)


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
    from memlm.lcm.model import LCMModel

    if not engine.tokenizer.chat_template and isinstance(engine.model, LCMModel):
        from memlm.lcm.config import PLAIN_CHAT_TEMPLATE  # an LCM trained on plain text: turns as plain lines

        engine.tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        params.stop.append("\nUser:")
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
    from memlm.lcm.model import LCMModel

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
        "kv_bytes_per_token": c.kv_bytes_per_token(engine.model.dtype.itemsize),
        "chat_template": bool(engine.tokenizer.chat_template),
        "source": engine.source,
    }
    _print_facts(facts, as_json)


def _print_facts(facts: dict, as_json: bool) -> None:
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
    dtype: Annotated[
        str,
        typer.Option(help="memlm weights, comma-separated: float32, bfloat16, int8, q4_0, q4_1, q8_0 (:q8_0 = int8 "
                     "activation blocks, e.g. q4_1:q8_0)."),
    ] = "int8",
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    quality: Annotated[
        bool, typer.Option("--quality/--no-quality", help="Report each dtype's quality against float32.")
    ] = True,
    against: Annotated[
        str, typer.Option(help="Reference engines, comma-separated: hf (transformers fp32), llama.cpp (same GGUF).")
    ] = "hf",
    plot: Annotated[str | None, typer.Option(help="Write a PNG of decode tok/s per engine and batch here.")] = None,
):
    """memlm vs Hugging Face transformers (and llama.cpp): prefill and decode tok/s, peak RSS, quality."""
    sizes = tuple(_int_list(batch_sizes, "--batch-sizes"))
    if new_tokens < 2 or threads < 1:
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
        against=tuple(against.split(",")),
        plot_path=plot,
    )


@bench_app.command("serve")
def bench_serve(
    model: ModelOpt = DEFAULT_MODEL,
    clients: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients.")] = "1,4,16,64",
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 64,
    threads: Annotated[int, typer.Option(help="torch threads of the server.")] = 2,
    dtype: DtypeOpt = "float32",
    memory: Annotated[str | None, typer.Option(help="A latent memory folder: some requests use it.")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG plot here.")] = None,
    seconds: Annotated[float, typer.Option(help="Each level: clients send requests back to back this long.")] = 60.0,
    workload: Annotated[
        str, typer.Option(help="mixed: sampling, KV policies and --memory mixed in; plain: greedy requests only.")
    ] = "mixed",
):
    """Concurrent streaming clients (openai client) against memlm serve on loopback: throughput, TTFT,
    latency against one-at-a-time, and a check that no answer is lost, duplicated or crossed."""
    levels = tuple(_int_list(clients, "--clients"))
    if max_tokens < 1 or threads < 1 or not 1 <= seconds <= 600:
        raise MemlmError("--max-tokens and --threads must be >= 1, --seconds in 1..600")
    if workload not in ("mixed", "plain"):
        raise MemlmError(f"--workload is mixed or plain, not {workload!r}")
    if max(levels) > 256:
        raise MemlmError("--clients: at most 256 concurrent clients (the benchmark is bounded)")
    from memlm.bench.serve import run_serve_bench

    run_serve_bench(model, levels, max_tokens, threads, dtype, memory, json_path, plot, seconds, workload)


@bench_app.command("moe")
def bench_moe(
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs per cell (the median is reported).")] = 20,
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
):
    """MoE dispatch: grouped (sort + offsets) and gathered (bmm) against the per-expert loop."""
    if threads < 1 or repeats < 1:
        raise MemlmError("--threads and --repeats must be >= 1")
    from memlm.bench.moe import run_moe_bench

    run_moe_bench(threads, repeats, json_path)


@bench_app.command("kv")
def bench_kv(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")] = "chain_sum",
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets (tokens per sequence).")] = "96,112,128,160",
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = ",".join(ALL_POLICIES),
    predictor: Annotated[
        str | None,
        typer.Option(help="Importance predictor folder for learned; comma-separated: one learned:<label> row each."),
    ] = None,
    window: Annotated[int | None, typer.Option(help="learned: recent tokens always kept (default 8).")] = None,
    ratio: Annotated[
        float | None, typer.Option(help="learned: share of older tokens an eviction keeps (default 0.5).")
    ] = None,
    rescore: Annotated[
        float | None,
        typer.Option(help="learned: share of kept older tokens chosen by the newest query's attention (default 0)."),
    ] = None,
    evict_prompt: Annotated[
        bool | None,
        typer.Option(
            "--evict-prompt/--keep-prompt",
            help="learned: let prompt tokens compete on their score, or keep them all (default: as each "
            "predictor was trained, --prompt or not).",
            show_default=False,
        ),
    ] = None,
    spans: Annotated[
        str,
        typer.Option(
            help="h2o, tova, learned keep numbers whole: off, on, both (a +spans row beside each), "
            "or a comma-separated list of those policies that get a +spans row."
        ),
    ] = "off",
    n: Annotated[int, typer.Option(help="Held-out problems.")] = 64,
    split: Annotated[str, typer.Option(help="Held-out split: val (to choose settings) or test (to report).")] = "test",
    probe_n: Annotated[int, typer.Option(help="Retrieval probes (0 = none).")] = 32,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Most tokens per answer (default: the task's own, 256; long_mult 512).")
    ] = None,
    dtype: DtypeOpt = "float32",
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG of accuracy vs budget here.")] = None,
):
    """Accuracy, peak KV bytes and decode tok/s for each (policy, budget), plus a retrieval probe."""
    sizes = _int_list(budgets, "--budgets")
    if n < 1 or batch_size < 1 or probe_n < 0:
        raise MemlmError("--n and --batch-size must be >= 1, --probe-n >= 0")
    from memlm.bench.kv import run_kv_bench

    run_kv_bench(
        model,
        task,
        sizes,
        [p.strip() for p in policies.split(",") if p.strip()],
        n,
        predictor=predictor,
        json_path=json_path,
        plot_path=plot,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        probe_n=probe_n,
        dtype=dtype,
        window=window,
        ratio=ratio,
        rescore=rescore,
        evict_prompt=evict_prompt,
        split=split,
        spans=spans,
    )


@bench_app.command("memgen")
def bench_memgen(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")] = "chain_sum",
    n: Annotated[int, typer.Option(help="Held-out problems.")] = 64,
    lora_sft: Annotated[str | None, typer.Option(help="LoRA-SFT adapter folder (`memlm train sft`).")] = None,
    weaver: Annotated[str | None, typer.Option(help="Weaver memory folder (`memlm train weaver`).")] = None,
    weaver_trigger: Annotated[
        str | None, typer.Option(help="Weaver + learned trigger memory folder (`memlm train trigger`).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    speed_tokens: Annotated[
        int, typer.Option(help="Also time answers forced to this many new tokens, batched and one by one (0 = skip).")
    ] = 128,
    retain_task: Annotated[
        str | None, typer.Option(help="Forgetting: also score this task, one the reasoner could already do.")
    ] = None,
    text: Annotated[
        str | None, typer.Option(help="Forgetting: perplexity on this text (gensim:enwiki, gensim:lee or a file).")
    ] = None,
    text_windows: Annotated[int, typer.Option(help="Windows of 256 tokens of --text.")] = 16,
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG here.")] = None,
):
    """Vanilla vs LoRA-SFT vs MemGen weaver vs weaver + learned trigger: accuracy, insertions, speed,
    and with --retain-task / --text what each keeps of what the reasoner could already do."""
    from memlm.bench.memgen import run_memgen_bench
    from memlm.data.tasks import get_task

    get_task(task)
    if retain_task:
        get_task(retain_task)
    if n < 1 or batch_size < 1 or speed_tokens < 0 or text_windows < 1:
        raise MemlmError("--n, --batch-size and --text-windows must be >= 1, --speed-tokens >= 0")
    run_memgen_bench(
        model,
        task,
        n,
        lora_sft,
        weaver,
        weaver_trigger,
        json_path,
        plot,
        batch_size,
        speed_tokens=speed_tokens,
        retain_task=retain_task,
        text=text,
        text_windows=text_windows,
    )


eval_app = typer.Typer(
    invoke_without_command=True,
    help="Task accuracy (`memlm eval --model M --task T`) or `memlm eval lcm` (codebook memory in bits/byte).",
)
app.add_typer(eval_app, name="eval")


@eval_app.callback()
def evaluate(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")] = "chain_sum",
    n: Annotated[int, typer.Option(help="Held-out problems (the task's test split).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Most tokens per answer (default: the task's own, 256; long_mult 512).")
    ] = None,
    dtype: DtypeOpt = "float32",
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    show: Annotated[int, typer.Option(help="Print this many completions.")] = 0,
    memory: Annotated[str | None, typer.Option(help="Latent memory folder (from `memlm train weaver`).")] = None,
    trigger: TriggerOpt = None,
):
    """Accuracy on held-out problems with the task's own scorer, tokens generated, decode tok/s."""
    if ctx.invoked_subcommand is not None:  # `memlm eval lcm ...`: its own options
        return
    from memlm.data.evaluate import evaluate_task
    from memlm.data.tasks import get_task

    if n < 1 or batch_size < 1:
        raise MemlmError("--n and --batch-size must be >= 1")
    the_task = get_task(task)
    engine = _load(model, dtype)
    latent = _load_memory(memory, engine, trigger)
    problems = the_task.problems(n, "test")
    result = evaluate_task(engine, the_task, problems, batch_size, max_new_tokens, memory=latent)
    for text, score, problem in list(zip(result.completions, result.scores, problems, strict=True))[:show]:
        print(f"--- {problem.question}\n{text}\n[score {score}, expected {problem.answer}]")
    summary = {"model": model, "memory": memory, "trigger": latent.config["trigger"] if latent else None, "task": task}
    summary.update(result.summary())
    print(json.dumps(summary, indent=2))
    if json_path:
        from memlm.atomic import write_json_atomic

        write_json_atomic(json_path, summary)


@train_app.command("sft")
def train_sft(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[
        str,
        typer.Option(
            help="Reasoning task (memlm.data.tasks), or a mix NAME:WEIGHT,... (shares of the training problems); "
            "every task is evaluated."
        ),
    ] = "chain_sum",
    out: Annotated[str, typer.Option("--out", help="Output folder (adapter/ or model/, train/, eval.json).")] = "",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 250,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tune.")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 32.0,
    n_train: Annotated[int, typer.Option(help="Training problems (train split).")] = 4000,
    n_eval: Annotated[int, typer.Option(help="Held-out problems scored at the end (0 = skip).")] = 64,
    n_val_loss: Annotated[
        int, typer.Option(help="Validation problems whose loss is logged at each checkpoint (0 = skip).")
    ] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 25,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
):
    """Fine-tune a model on a task's worked solutions (LoRA by default); save it for --model."""
    from memlm.train.sft import SFTConfig, run_sft

    _out_dir(out)
    report = run_sft(
        SFTConfig(
            model=model,
            task=task,
            out_dir=out,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            n_train=n_train,
            n_eval=n_eval,
            n_val_loss=n_val_loss,
            grad_accum=grad_accum,
            save_every=save_every,
            resume=resume,
        )
    )
    print(json.dumps(report, indent=2))


def _delimiters(given: list[str] | None) -> tuple[str, ...]:
    """--delimiter values -> the memory's delimiters ('\\n' written on a command line is a newline)."""
    from memlm.latent.delimiters import DEFAULT_DELIMITERS

    if not given:
        return DEFAULT_DELIMITERS
    out = tuple(d.replace("\\n", "\n") for d in given)
    if any(not d for d in out):
        raise MemlmError("--delimiter must not be empty")
    return out


@train_app.command("predictor")
def train_predictor(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")] = "chain_sum",
    out: Annotated[str, typer.Option("--out", help="Output folder (predictor.safetensors + predictor.json).")] = "",
    n_train: Annotated[int, typer.Option(help="Training problems whose traces are labelled.")] = 512,
    n_val: Annotated[int, typer.Option(help="Held-out problems for loss and rank agreement.")] = 64,
    marker: Annotated[str, typer.Option(help="Text that ends the thinking part.")] = "Answer:",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    batch_tokens: Annotated[int, typer.Option(help="Thinking tokens per step.")] = 512,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Traces generated together.")] = 16,
    label: Annotated[
        str,
        typer.Option(
            help="Importance label: answer (attention from answer tokens, DynTS), future_max or future_decay "
            "(from every later query), future_far (from queries more than --horizon tokens later)."
        ),
    ] = "answer",
    decay: Annotated[float, typer.Option(help="future_decay: weight decay^(distance - 1).")] = 0.95,
    horizon: Annotated[
        int, typer.Option(help="future_far: only queries further than this count (the policy's --window).")
    ] = 16,
    prompt: Annotated[
        bool, typer.Option("--prompt", help="Label prompt tokens too (for the learned policy's --evict-prompt).")
    ] = False,
    dtype: DtypeOpt = "float32",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
):
    """Train the DynTS importance predictor on the frozen model's own traces (MSE on attention labels)."""
    from memlm.train.predictor import PredictorConfig, run_predictor_training

    _out_dir(out)
    metrics = run_predictor_training(
        PredictorConfig(
            model=model,
            task=task,
            out_dir=out,
            n_train=n_train,
            n_val=n_val,
            marker=marker,
            steps=steps,
            batch_tokens=batch_tokens,
            lr=lr,
            batch_size=batch_size,
            label=label,
            decay=decay,
            horizon=horizon,
            prompt=prompt,
            dtype=dtype,
            resume=resume,
        ),
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps(metrics, indent=2))


@train_app.command("weaver")
def train_weaver(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")] = "chain_sum",
    out: Annotated[str, typer.Option("--out", help="Output folder (memory/, train/, eval.json).")] = "",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 250,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    prompt_latents: Annotated[int, typer.Option(help="Latents inserted after the prompt.")] = 8,
    inference_latents: Annotated[int, typer.Option(help="Latents inserted at a delimiter.")] = 8,
    lora_rank: Annotated[int, typer.Option(help="The weaver's LoRA rank.")] = 16,
    max_inference_aug: Annotated[int, typer.Option(help="Most insertions per answer.")] = 8,
    weaver_layers: Annotated[
        int | None, typer.Option(help="Truncated weaver: only the reasoner's first N layers (default all).")
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            help="Latents at step 0: random; delimiter (copies of the delimiter's embedding); gated (those "
            "copies, plus the weaver's states behind a gate that starts shut)."
        ),
    ] = "random",
    weaver_input: Annotated[
        str,
        typer.Option(
            help="What the weaver reads: embeddings (its own pass over the tokens) or states (the "
            "reasoner's KV cache)."
        ),
    ] = "embeddings",
    weaver_output: Annotated[
        str,
        typer.Option(
            help="What the weaver writes: embeddings (latent tokens the reasoner reads) or kv (the latent "
            "slots' keys and values at every layer; needs --weaver-input states)."
        ),
    ] = "embeddings",
    delimiter: Annotated[
        list[str] | None,
        typer.Option(
            help="Insertion point: latents go after a token ending in this text (repeatable; '\\n' is a "
            "newline). Default: ',', '.', newline."
        ),
    ] = None,
    n_train: Annotated[int, typer.Option(help="Training problems (train split).")] = 4000,
    n_eval: Annotated[int, typer.Option(help="Held-out problems scored at the end (0 = skip).")] = 64,
    n_val_loss: Annotated[
        int, typer.Option(help="Validation problems whose loss is logged at each checkpoint (0 = skip).")
    ] = 32,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 25,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
):
    """Train the MemGen weaver (SFT, reasoner frozen); save a latent memory for --memory."""
    from memlm.train.weaver import WeaverConfig, run_weaver_training

    _out_dir(out)
    from memlm.data.tasks import get_task

    get_task(task)  # an unknown task fails before the model loads
    from memlm.latent.weaver import WEAVER_INPUTS, WEAVER_OUTPUTS

    if weaver_input not in WEAVER_INPUTS:
        raise MemlmError(f"unknown weaver input {weaver_input!r}; choose from {', '.join(WEAVER_INPUTS)}")
    if weaver_output not in WEAVER_OUTPUTS:
        raise MemlmError(f"unknown weaver output {weaver_output!r}; choose from {', '.join(WEAVER_OUTPUTS)}")
    if weaver_output == "kv" and (weaver_input != "states" or weaver_layers is not None or init == "gated"):
        raise MemlmError("--weaver-output kv needs --weaver-input states, all layers and an ungated init")
    report = run_weaver_training(
        WeaverConfig(
            model=model,
            task=task,
            out_dir=out,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            prompt_latents=prompt_latents,
            inference_latents=inference_latents,
            lora_rank=lora_rank,
            max_inference_aug=max_inference_aug,
            weaver_layers=weaver_layers,
            init=init,
            weaver_input=weaver_input,
            weaver_output=weaver_output,
            delimiters=_delimiters(delimiter),
            n_train=n_train,
            n_eval=n_eval,
            n_val_loss=n_val_loss,
            save_every=save_every,
            resume=resume,
        )
    )
    print(json.dumps(report, indent=2))


@train_app.command("trigger")
def train_trigger(
    memory: Annotated[str, typer.Option(help="The trained weaver (memory folder of `memlm train weaver`).")],
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")] = "chain_sum",
    out: Annotated[str, typer.Option("--out", help="Output folder (memory/, train/, eval.json).")] = "",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 60,
    problems_per_step: Annotated[int, typer.Option(help="Problems per step.")] = 4,
    group_size: Annotated[int, typer.Option(help="Sampled answers per problem (the GRPO group).")] = 4,
    temperature: Annotated[float, typer.Option(help="Token sampling temperature of the rollouts.")] = 0.7,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-3,
    penalty: Annotated[float, typer.Option(help="Weight of the insertion penalty.")] = 0.5,
    screen: Annotated[
        int, typer.Option(help="Screen this many training problems; RL draws only those with a mixed group (0 = off).")
    ] = 0,
    n_eval: Annotated[int, typer.Option(help="Held-out problems scored at the end (0 = skip).")] = 64,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
):
    """Train the MemGen trigger by RL (group-baseline REINFORCE, adaptive insertion penalty), weaver frozen."""
    from memlm.data.tasks import get_task
    from memlm.train.trigger import TriggerConfig, run_trigger_training

    _out_dir(out)
    get_task(task)
    report = run_trigger_training(
        TriggerConfig(
            model=model,
            memory=memory,
            task=task,
            out_dir=out,
            steps=steps,
            problems_per_step=problems_per_step,
            group_size=group_size,
            temperature=temperature,
            lr=lr,
            penalty=penalty,
            screen=screen,
            n_eval=n_eval,
            resume=resume,
        )
    )
    print(json.dumps(report, indent=2))


def _out_dir(out: str) -> None:
    """Check --out before any work: required, and a folder that can be created and written."""
    from memlm.atomic import ensure_dir

    if not out:
        raise MemlmError("--out is required")
    ensure_dir(out)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MemlmError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise MemlmError(f"{option} needs positive integers")
    return values


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


# Command groups in their own modules register on the apps above.
from memlm.cli import data_commands, lcm_commands, prune_commands, serve_commands  # noqa: E402, F401

if __name__ == "__main__":
    main()
