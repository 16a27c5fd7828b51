"""`memlm eval`: task accuracy of a model (with a latent memory), `memlm eval lcm` (bits per byte
of a codebook-memory model against its baselines) and `memlm eval lcm-reach` (what its memory
carries when the decoder's view is bounded)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from memlm.atomic import write_json_atomic
from memlm.cli.options import (
    DEFAULT_MODEL,
    BatchSizeOpt,
    DataOpt,
    DtypeOpt,
    JsonOpt,
    MaxTokensOpt,
    MemoryOpt,
    ModelOpt,
    TaskOpt,
    TriggerOpt,
    int_list,
    load_engine,
    load_memory,
)
from memlm.data.tasks import get_task
from memlm.errors import MemlmError

eval_app = typer.Typer(
    invoke_without_command=True,
    help="Task accuracy (`memlm eval --model M --task T`) or `memlm eval lcm` (codebook memory in bits/byte).",
)


@eval_app.callback()
def evaluate(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "chain_sum",
    n: Annotated[int, typer.Option(help="Held-out problems (the task's test split).")] = 64,
    batch_size: BatchSizeOpt = 16,
    max_new_tokens: MaxTokensOpt = None,
    dtype: DtypeOpt = "float32",
    json_path: JsonOpt = None,
    show: Annotated[int, typer.Option(help="Print this many completions.")] = 0,
    memory: MemoryOpt = None,
    trigger: TriggerOpt = None,
):
    """Accuracy on held-out problems with the task's own scorer, tokens generated, decode tok/s."""
    if ctx.invoked_subcommand is not None:  # `memlm eval lcm ...`: its own options
        return
    from memlm.data.evaluate import evaluate_task  # lazy: torch and the engine

    if n < 1 or batch_size < 1:
        raise MemlmError("--n and --batch-size must be >= 1")
    the_task = get_task(task)
    engine = load_engine(model, dtype)
    latent = load_memory(memory, engine, trigger)
    problems = the_task.problems(n, "test")
    result = evaluate_task(engine, the_task, problems, batch_size, max_new_tokens, memory=latent)
    for text, score, problem in list(zip(result.completions, result.scores, problems, strict=True))[:show]:
        print(f"--- {problem.question}\n{text}\n[score {score}, expected {problem.answer}]")
    summary = {"model": model, "memory": memory, "trigger": latent.config["trigger"] if latent else None, "task": task}
    summary.update(result.summary())
    print(json.dumps(summary, indent=2))
    if json_path:
        write_json_atomic(json_path, summary)


@eval_app.command("lcm")
def eval_lcm(
    model: Annotated[list[str], typer.Option("--model", "-m", help="LCM model folder; repeat for seeds.")],
    data: DataOpt = "",
    decoder: Annotated[list[str] | None, typer.Option(help="Decoder-alone folder(s), same budget.")] = None,
    transformer: Annotated[list[str] | None, typer.Option(help="Same-size transformer folder(s).")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Retrained variant NAME=DIR (repeatable).")] = None,
    windows: Annotated[int, typer.Option(help="Held-out windows of --seq-len tokens.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per held-out window.")] = 256,
    stream_len: Annotated[int, typer.Option(help="Tokens per stream for the re-encode measurement.")] = 2048,
    contexts: Annotated[
        str, typer.Option(help="Context lengths for the decode-cost curve.")
    ] = "256,512,1024,2048,4096",
    json_path: JsonOpt = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="Write a PNG here.")] = None,
):
    """Held-out bits per byte of an LCM against its baselines, ablations, drift, decode cost."""
    from memlm.bench.lcm import LCMBenchConfig, run_lcm_bench  # lazy: torch

    if not data:
        raise MemlmError("--data is required")
    variants = {}
    for item in variant or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise MemlmError(f"--variant takes NAME=DIR, got {item!r}")
        variants[name] = folder
    if windows < 1 or seq_len < 2 or stream_len < 2:
        raise MemlmError("--windows must be >= 1, --seq-len and --stream-len >= 2")
    cfg = LCMBenchConfig(
        data=data,
        lcm=list(model),
        decoder=list(decoder or []),
        transformer=list(transformer or []),
        variants=variants,
        seq_len=seq_len,
        windows=windows,
        stream_len=stream_len,
        contexts=tuple(int_list(contexts, "--contexts")),
    )
    result = run_lcm_bench(cfg, json_path, plot_path)
    print(
        json.dumps(
            {"main": result["main"], "ablations": result["ablations"], "retrained": result["retrained"]}, indent=2
        )
    )


@eval_app.command("lcm-reach")
def eval_lcm_reach(
    lcm: Annotated[list[str], typer.Option("--lcm", help="LCM folder with a bounded decoder; repeat for seeds.")],
    data: DataOpt = "",
    continuous: Annotated[list[str] | None, typer.Option(help="The same LCM with z unquantised (per seed).")] = None,
    decoder: Annotated[list[str] | None, typer.Option(help="The bounded decoder alone (per seed).")] = None,
    unbounded: Annotated[list[str] | None, typer.Option(help="An unbounded decoder alone (per seed).")] = None,
    windows: Annotated[int, typer.Option(help="Held-out windows of --seq-len tokens.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per held-out window (beyond 4W).")] = 1024,
    probes: Annotated[int, typer.Option(help="Retrieval probes (facts stated early, asked late).")] = 64,
    json_path: JsonOpt = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="Write a PNG here.")] = None,
):
    """Does the codebook memory carry the past that a bounded decoder cannot see? Bits/byte by position."""
    from memlm.bench.lcm_reach import ReachBenchConfig, run_reach_bench  # lazy: torch

    if not data:
        raise MemlmError("--data is required")
    if windows < 1 or probes < 2:
        raise MemlmError("--windows must be >= 1 and --probes >= 2")
    models = {"lcm": list(lcm), "continuous": continuous, "decoder": decoder, "unbounded": unbounded}
    cfg = ReachBenchConfig(
        data=data, models={k: list(v) for k, v in models.items() if v}, seq_len=seq_len, windows=windows, probes=probes
    )
    result = run_reach_bench(cfg, json_path, plot_path)
    print(
        json.dumps(
            {"summary": {k: m["summary"]["bpb"] for k, m in result["models"].items()}, "goals": result["goals"]},
            indent=2,
        )
    )


@eval_app.command("lcm-safety")
def eval_lcm_safety(
    model: Annotated[str, typer.Option("--model", "-m", help="LCM model folder (with a memory).")] = "",
    data: DataOpt = "",
    json_path: JsonOpt = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="Write a PNG here.")] = None,
):
    """The default safety grids on a labelled set (harmful / borderline / benign look-alikes) and held-out text."""
    from memlm.bench.lcm_safety import SafetyBenchConfig, run_safety_bench  # lazy: torch
    from memlm.lcm.config import LCMConfig

    if not data or not model:
        raise MemlmError("--model and --data are required")
    if not LCMConfig.is_lcm_folder(model):
        raise MemlmError(f"{model} is not an LCM model folder")
    result = run_safety_bench(SafetyBenchConfig(model=model, data=data), json_path, plot_path)
    print(
        json.dumps(
            {"default": result["default"], "separation": result["separation"], "goals": result["goals"]}, indent=2
        )
    )
