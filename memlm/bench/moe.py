"""`memlm bench moe`: the MoE block's dispatch strategies against the per-expert loop.

One MoE block (router, routed experts, no shared expert), random weights, float32, run on token
counts that stand for decode at batch 1 and 8 and for a prefill chunk. Each strategy is timed as
the median of `repeats` runs after a warm-up, one after the other in this process:

* loop: for each expert that got tokens, find them with a mask and run it (transformers' way);
* grouped: sort the (token, expert) pairs by expert, run each expert once on its contiguous slice;
* gathered: gather the chosen experts' weights, two batched matmuls for all pairs.

Every strategy's output is checked against the loop's before it is timed.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console

from memlm.bench.report import print_table, write_outputs
from memlm.models.moe import MoEBlock

CONFIGS = {  # name -> (hidden, expert intermediate, experts, top-k)
    "tiny": (64, 96, 8, 2),
    "mid": (1024, 768, 32, 4),  # one layer of a Qwen3-MoE-like model at a third of the width
}
SHAPES = {"decode b=1": 1, "decode b=8": 8, "prefill 256": 256}
STRATEGIES = ("loop", "grouped", "gathered")


def _time(block: MoEBlock, x: torch.Tensor, repeats: int, budget_s: float = 5.0) -> float:
    """Median of `repeats` runs (fewer once a cell has taken `budget_s`: the slowest cells take seconds)."""
    with torch.no_grad():
        block(x)
        times = []
        while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
            start = time.perf_counter()
            block(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_moe_bench(threads: int = 2, repeats: int = 20, json_path: str | None = None) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for name, (hidden, intermediate, experts, top_k) in CONFIGS.items():
        torch.manual_seed(0)
        block = MoEBlock(hidden, intermediate, experts, top_k, normalize=True).eval()
        for shape, tokens in SHAPES.items():
            x = torch.randn(tokens, hidden)
            with torch.no_grad():
                block.dispatch = "loop"
                reference = block(x)
            row = {"config": name, "shape": shape, "tokens": tokens}
            for strategy in STRATEGIES:
                block.dispatch = strategy
                with torch.no_grad():
                    torch.testing.assert_close(block(x), reference, atol=1e-4, rtol=1e-4)
                row[f"{strategy}_ms"] = round(1e3 * _time(block, x, repeats), 3)
            for strategy in ("grouped", "gathered"):
                row[f"{strategy}_speedup"] = round(row["loop_ms"] / row[f"{strategy}_ms"], 2)
            rows.append(row)
    result = {"benchmark": "moe-dispatch", "threads": threads, "repeats": repeats, "configs": CONFIGS,
              "rows": rows, "date": time.strftime("%Y-%m-%d")}
    console = Console(width=140)
    columns = ("config", "shape", "loop", "grouped", "gathered", "grouped vs loop", "gathered vs loop")
    cells = [[r["config"], r["shape"], f"{r['loop_ms']:.3f} ms", f"{r['grouped_ms']:.3f} ms",
              f"{r['gathered_ms']:.3f} ms", f"{r['grouped_speedup']:.2f}x", f"{r['gathered_speedup']:.2f}x"]
             for r in rows]
    print_table(console, f"MoE block dispatch, float32, {threads} threads (median of {repeats})", columns, cells)
    write_outputs(result, console, json_path)
    return result
