"""What the learned KV policy costs per decode step (predictor + eviction, as shares of the whole
step), at batch 1 and 8, token by token and by whole spans, without the accuracy cells that
`memlm bench kv` runs first: for measuring on a quiet machine.

    python -m memlm.bench.kv_cost --model bench/models/pair-search-lora --task pair_search \
        --predictor bench/models/pair-search-predictor --budget 108 --ratio 1.0 --units tokens,lines
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from memlm.bench.kv import policy_cost, spec_factory
from memlm.bench.report import print_table, write_outputs
from memlm.cache.importance import load_predictor
from memlm.cache.policies import SPAN_UNITS
from memlm.data.tasks import get_task
from memlm.errors import MemlmError
from memlm.generation.engine import Engine

UNITS = ("tokens", *SPAN_UNITS)  # tokens: no spans


def measure(model, task_name, predictor_dir, budget, units, *, window=8, ratio=None, n=64, dtype="float32",
            batches=(1, 8), max_new_tokens=None) -> dict:  # fmt: skip
    """{unit: [policy_cost at each batch]} for the learned policy on the task's test problems."""
    bad = [u for u in units if u not in UNITS]
    if bad:
        raise MemlmError(f"--units are {', '.join(UNITS)}; got {bad[0]!r}")
    engine = Engine.load(model, dtype=dtype)
    task = get_task(task_name)
    problems = task.problems(n, "test")
    predictor, _ = load_predictor(predictor_dir, engine.config, model)
    costs = {}
    for unit in units:
        spans = False if unit == "tokens" else unit
        variant = (predictor_dir, predictor, {"window": window, "ratio": ratio})
        factory = spec_factory("learned", budget, variant, spans)
        tokens = max_new_tokens or task.max_new_tokens
        costs[unit] = [policy_cost(engine, task, problems, factory, batch, tokens) for batch in batches]
    return {"model": model, "task": task_name, "predictor": predictor_dir, "budget": budget, "window": window,
            "ratio": ratio, "dtype": dtype, "threads": torch.get_num_threads(), "cost": costs}  # fmt: skip


def print_costs(report: dict, console) -> None:
    rows = [
        [unit, str(c["batch"]), f"{c['step_ms']:.1f}", f"{c['predictor_frac']:.1%}", f"{c['eviction_frac']:.1%}",
         f"{c['overhead_frac']:.1%}"]  # fmt: skip
        for unit, cells in report["cost"].items()
        for c in cells
    ]
    columns = ("spans", "batch", "step ms", "predictor", "eviction", "together")
    title = f"learned policy cost per decode step, budget {report['budget']}"
    print_table(console, title, columns, rows, left=("spans",))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memlm.bench.kv_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--predictor", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--units", default="tokens,lines", help=f"comma-separated: {', '.join(UNITS)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    console = Console()
    try:
        batches = [int(b) for b in args.batches.split(",")]
        report = measure(args.model, args.task, args.predictor, args.budget, args.units.split(","),
                         window=args.window, ratio=args.ratio, n=args.n, dtype=args.dtype, batches=batches)  # fmt: skip
    except (MemlmError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print_costs(report, console)
    if args.json:
        write_outputs(report, console, args.json)


if __name__ == "__main__":
    main()
