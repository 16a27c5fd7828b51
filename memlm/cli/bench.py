"""`memlm bench ...`: benchmarks that print a table and write JSON (decode, serve, moe, kv, press, memgen, prune)."""

from __future__ import annotations

from typing import Annotated

import typer

from memlm.cli.options import (
    ALL_POLICIES,
    DEFAULT_MODEL,
    BatchSizeOpt,
    DtypeOpt,
    JsonOpt,
    KvMemoryOpt,
    MaxTokensOpt,
    ModelOpt,
    PrefixCachingOpt,
    TaskOpt,
    int_list,
)
from memlm.data.tasks import get_task
from memlm.errors import MemlmError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print a table and write JSON.")


@bench_app.command("decode")
def bench_decode(
    model: ModelOpt = DEFAULT_MODEL,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per sequence.")] = 64,
    threads: Annotated[int, typer.Option(help="torch threads for each engine.")] = 2,
    dtype: Annotated[
        str,
        typer.Option(help="memlm weights, comma-separated: float32, bfloat16, int8, q4_0, q4_1, q8_0, q4_k, ... (:q8_0 "
                     "= int8 activation blocks, e.g. q4_1:q8_0), or a file type Q4_K_M, Q5_K_M, Q6_K (the model "
                     "written by memlm quantize, run on its own blocks). A dtype listed twice runs twice."),
    ] = "int8",
    json_path: JsonOpt = None,
    quality: Annotated[
        bool, typer.Option("--quality/--no-quality", help="Report each dtype's quality against float32.")
    ] = True,
    against: Annotated[
        str, typer.Option(help="Reference engines, comma-separated: hf (transformers fp32), llama.cpp (same GGUF).")
    ] = "hf",
    plot: Annotated[str | None, typer.Option(help="Write a PNG of decode tok/s per engine and batch here.")] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(help="Prompts of this many tokens of sample.txt (default: the short chat-templated prompts)."),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (the best counts), after one warm-up.")] = 3,
):
    """memlm vs Hugging Face transformers (and llama.cpp): prefill and decode tok/s, peak RSS, quality."""
    sizes = tuple(int_list(batch_sizes, "--batch-sizes"))
    if new_tokens < 2 or threads < 1:
        raise MemlmError("batch sizes and threads must be >= 1, new tokens >= 2")
    if prompt_tokens is not None and prompt_tokens < 1:
        raise MemlmError("--prompt-tokens must be >= 1")
    from memlm.bench.decode import run_decode_bench  # lazy: torch and the engines

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
        prompt_tokens=prompt_tokens,
        repeats=repeats,
    )


@bench_app.command("serve")
def bench_serve(
    model: ModelOpt = DEFAULT_MODEL,
    clients: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients.")] = "1,4,16,64",
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 64,
    threads: Annotated[int, typer.Option(help="torch threads of the server.")] = 2,
    dtype: DtypeOpt = "float32",
    memory: Annotated[str | None, typer.Option(help="A latent memory folder: some requests use it.")] = None,
    json_path: JsonOpt = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG plot here.")] = None,
    seconds: Annotated[float, typer.Option(help="Each level: clients send requests back to back this long.")] = 60.0,
    workload: Annotated[
        str,
        typer.Option(
            help="mixed: sampling, KV policies and --memory mixed in; plain: greedy requests only; prefix: plain "
            "requests after one shared ~1,000-token system prompt; lora: --lora-count random LoRA adapters "
            "batched together against the same load on the base model alone."
        ),
    ] = "mixed",
    prefix_caching: PrefixCachingOpt = True,
    lora_count: Annotated[int, typer.Option(help="--workload lora: how many adapters (made in runs/).")] = 4,
    lora_rank: Annotated[int, typer.Option(help="--workload lora: their rank, on every projection.")] = 8,
):
    """Concurrent streaming clients (openai client) against memlm serve on loopback: throughput, TTFT,
    latency against one-at-a-time, and a check that no answer is lost, duplicated or crossed."""
    levels = tuple(int_list(clients, "--clients"))
    if max_tokens < 1 or threads < 1 or not 1 <= seconds <= 600:
        raise MemlmError("--max-tokens and --threads must be >= 1, --seconds in 1..600")
    if workload not in ("mixed", "plain", "prefix", "lora"):
        raise MemlmError(f"--workload is mixed, plain, prefix or lora, not {workload!r}")
    if lora_count < 1 or lora_rank < 1:
        raise MemlmError("--lora-count and --lora-rank must be >= 1")
    if max(levels) > 256:
        raise MemlmError("--clients: at most 256 concurrent clients (the benchmark is bounded)")
    from memlm.bench.serve import run_serve_bench  # lazy: the server and its clients

    server_args = () if prefix_caching else ("--no-prefix-caching",)
    if workload == "lora":
        from memlm.bench.serve_lora import run_lora_bench

        run_lora_bench(model, levels, max_tokens, threads, dtype, json_path, seconds, server_args, lora_count,
                       lora_rank)
        return
    run_serve_bench(model, levels, max_tokens, threads, dtype, memory, json_path, plot, seconds, workload, server_args)


@bench_app.command("kv-cache")
def bench_kv_cache(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "q4_1",
    parts: Annotated[str, typer.Option(help="Comma-separated: quality, capacity, speed.")] = "quality,capacity,speed",
    policies: Annotated[str, typer.Option(help="Quality: eviction policies beside each KV type.")] = "sinks,tova",
    budget: Annotated[int, typer.Option(help="Quality: the policies' token budget.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per bench prompt (quality, speed).")] = 128,
    kv_memory: KvMemoryOpt = "1GiB",
    conversation: Annotated[int, typer.Option(help="Capacity: tokens per conversation (prompt + answer).")] = 2048,
    capacity_policy: Annotated[str, typer.Option(help="Capacity: the policy kept at 25% of a conversation.")] = "tova",
    steps: Annotated[int, typer.Option(help="Capacity: decode steps timed at full concurrency.")] = 8,
    batches: Annotated[str, typer.Option(help="Speed: batch sizes.")] = "1,8",
    repeats: Annotated[int, typer.Option(help="Speed: interleaved runs; the best counts.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    json_path: JsonOpt = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG plot here.")] = None,
):
    """The KV cache as capacity: quality per KV type (perplexity, KL, greedy agreement against the fp32
    cache, alone and with eviction), conversations per memory budget (paged or contiguous, per type),
    and decode speed of paged blocks against the contiguous cache."""
    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    unknown = set(chosen) - {"quality", "capacity", "speed"}
    if unknown or not chosen:
        raise MemlmError(f"--parts takes quality, capacity, speed; got {parts!r}")
    named = tuple(p.strip() for p in policies.split(",") if p.strip())
    for name in (*named, capacity_policy):
        if name not in ("window", "sinks", "h2o", "tova"):
            raise MemlmError(f"policy {name!r}: choose window, sinks, h2o or tova")
    if budget < 8 or new_tokens < 1 or conversation < 64 or steps < 1 or repeats < 1 or threads < 1:
        raise MemlmError("--budget >= 8, --conversation >= 64, and --new-tokens, --steps, --repeats, --threads >= 1")
    from memlm.bench.kv_cache import run_kv_cache_bench  # lazy: torch

    sizes = tuple(int_list(batches, "--batches"))
    run_kv_cache_bench(model, dtype, chosen, named, budget, new_tokens, kv_memory, conversation, 64, steps,
                       capacity_policy, sizes, repeats, threads, json_path, plot)  # fmt: skip


@bench_app.command("moe")
def bench_moe(
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs per cell (the median is reported).")] = 20,
    json_path: JsonOpt = None,
):
    """MoE dispatch: grouped (sort + offsets) and gathered (bmm) against the per-expert loop."""
    if threads < 1 or repeats < 1:
        raise MemlmError("--threads and --repeats must be >= 1")
    from memlm.bench.moe import run_moe_bench  # lazy: torch

    run_moe_bench(threads, repeats, json_path)


@bench_app.command("press")
def bench_press(
    model: ModelOpt = DEFAULT_MODEL,
    presses: Annotated[
        str, typer.Option(help="Comma-separated presses (learned needs --predictor; pyramid:<press> for per-layer).")
    ] = "random,streaming_llm,knorm,snapkv,snapkv_question,expected_attention,tova,observed_attention,pyramid:snapkv",
    ratios: Annotated[str, typer.Option(help="Comma-separated compression ratios (the share removed).")] = (
        "0.25,0.5,0.75,0.9"
    ),
    tasks: Annotated[
        str, typer.Option(help="Comma-separated: needle, multi_key, multi_value, variable_track, multi_query.")
    ] = "needle,multi_key,multi_value,variable_track,multi_query",
    lengths: Annotated[str, typer.Option(help="Comma-separated context lengths in tokens.")] = "1000,2000,4000",
    n: Annotated[int, typer.Option(help="Problems per task and length (test seeds).")] = 8,
    predictor: Annotated[str | None, typer.Option(help="The learned press's folder (`memlm train press`).")] = None,
    skip_unusable: Annotated[
        bool,
        typer.Option("--skip-unusable/--press-all", help="Skip pressing a task the full cache scores under 60% on."),
    ] = True,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    dtype: DtypeOpt = "float32",
    json_path: JsonOpt = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG of score vs compression ratio per task here.")] = None,
):
    """Score against compression ratio for each press, task and length: one prefill per problem."""
    from memlm.cache.presses import check_press
    from memlm.data.long_context import TASKS

    names = [p for p in presses.split(",") if p]
    for name in names:
        check_press(name)
    if "learned" in names and predictor is None:
        raise MemlmError("the learned press needs --predictor DIR (from `memlm train press`)")
    chosen = [t for t in tasks.split(",") if t]
    if not chosen or set(chosen) - set(TASKS):
        raise MemlmError(f"--tasks: choose from {', '.join(TASKS)}")
    try:
        shares = tuple(float(r) for r in ratios.split(",") if r)
    except ValueError:
        raise MemlmError(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    if not shares or not all(0 < r < 1 for r in shares):
        raise MemlmError("--ratios must be in (0, 1)")
    sizes = tuple(int_list(lengths, "--lengths"))
    if n < 1 or threads < 1:
        raise MemlmError("--n and --threads must be >= 1")
    import torch  # lazy: torch
    from rich.console import Console

    from memlm.bench.press import run_press_bench
    from memlm.cache.importance import load_predictor
    from memlm.cli.options import load_engine

    torch.set_num_threads(threads)
    engine = load_engine(model, dtype)
    loaded = load_predictor(predictor, engine.config, model)[0] if predictor else None
    run_press_bench(engine, tuple(names), shares, tuple(chosen), sizes, n, loaded, skip_unusable, json_path, plot,
                    Console())  # fmt: skip


@bench_app.command("kv")
def bench_kv(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "chain_sum",
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets (tokens per sequence).")] = "96,112,128,160",
    policies: Annotated[
        str, typer.Option(help="Comma-separated policies; oracle too, for a task that knows its answers' key lines.")
    ] = ",".join(ALL_POLICIES),
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
            help="learned: let prompt tokens compete on their score, or keep them all (default: keep them, "
            "however the predictor was trained; a --predictor DIR:evict-prompt opts in for its row alone).",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="learned: threshold mode, keep older tokens whose importance is >= this (the budget a hard cap) "
            "instead of the top --ratio of them."
        ),
    ] = None,
    spans: Annotated[
        str,
        typer.Option(
            help="h2o, tova, snapkv, rkv, learned keep spans whole: off, on, both (a spanned row beside each), "
            "or a comma-separated list of those policies that get a spanned row."
        ),
    ] = "off",
    span_unit: Annotated[
        str, typer.Option(help="What --spans keeps whole: numbers (rows named +spans) or lines (rows named +lines).")
    ] = "numbers",
    n: Annotated[int, typer.Option(help="Held-out problems.")] = 64,
    split: Annotated[str, typer.Option(help="Held-out split: val (to choose settings) or test (to report).")] = "test",
    probe_n: Annotated[int, typer.Option(help="Retrieval probes (0 = none).")] = 32,
    batch_size: BatchSizeOpt = 16,
    max_new_tokens: MaxTokensOpt = None,
    dtype: DtypeOpt = "float32",
    json_path: JsonOpt = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG of accuracy vs budget here.")] = None,
):
    """Accuracy, peak KV bytes and decode tok/s for each (policy, budget), plus a retrieval probe."""
    sizes = int_list(budgets, "--budgets")
    if n < 1 or batch_size < 1 or probe_n < 0:
        raise MemlmError("--n and --batch-size must be >= 1, --probe-n >= 0")
    from memlm.bench.kv import run_kv_bench  # lazy: torch and the engine

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
        threshold=threshold,
        split=split,
        spans=spans,
        span_unit=span_unit,
    )


@bench_app.command("memgen")
def bench_memgen(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "chain_sum",
    n: Annotated[int, typer.Option(help="Held-out problems.")] = 64,
    lora_sft: Annotated[
        list[str] | None,
        typer.Option(help="LoRA-SFT adapter folder (`memlm train sft`); repeatable as LABEL=PATH, one row each."),
    ] = None,
    weaver: Annotated[
        list[str] | None,
        typer.Option(help="Weaver memory folder (`memlm train weaver`), run `always`; repeatable as LABEL=PATH."),
    ] = None,
    weaver_trigger: Annotated[
        str | None, typer.Option(help="Weaver + learned trigger memory folder (`memlm train trigger`).")
    ] = None,
    caps: Annotated[
        str | None, typer.Option(help="Comma-separated insertion caps: each weaver again with at most N per answer.")
    ] = None,
    batch_size: BatchSizeOpt = 16,
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
    json_path: JsonOpt = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG here.")] = None,
):
    """Vanilla vs LoRA-SFT vs MemGen weaver vs weaver + learned trigger: accuracy, insertions, speed,
    and with --retain-task / --text what each keeps of what the reasoner could already do."""
    from memlm.bench.memgen import run_memgen_bench  # lazy: torch and the engine

    get_task(task)
    if retain_task:
        get_task(retain_task)
    if n < 1 or batch_size < 1 or speed_tokens < 0 or text_windows < 1:
        raise MemlmError("--n, --batch-size and --text-windows must be >= 1, --speed-tokens >= 0")
    cap_list = int_list(caps, "--caps") if caps else None
    if cap_list and not weaver:
        raise MemlmError("--caps limits a --weaver's insertions: give one")
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
        caps=cap_list,
    )


@bench_app.command("prune")
def bench_prune(
    model: ModelOpt = DEFAULT_MODEL,
    amounts: Annotated[str, typer.Option(help="Comma-separated percentages to remove.")] = "10,25,40",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    json_path: JsonOpt = None,
    plot: Annotated[str | None, typer.Option(help="Write a PNG plot here.")] = None,
    heal_steps: Annotated[int, typer.Option(help="Also heal the measured layer-pruned models this many steps.")] = 0,
):
    """Each method at each amount, measured criterion vs random: parameters, held-out perplexity, decode tok/s."""
    from memlm.bench.prune import run_prune_bench  # lazy: torch

    percents = int_list(amounts, "--amounts")
    if max(percents) >= 100 or threads < 1 or heal_steps < 0:
        raise MemlmError("--amounts are percentages below 100; --threads >= 1; --heal-steps >= 0")
    run_prune_bench(model, tuple(p / 100 for p in percents), threads=threads, json_path=json_path, plot_path=plot,
                    heal_steps=heal_steps)
