"""`memlm bench prune`: what structured pruning costs in quality and buys in speed.

For each method (layers, ffn, heads) and amount (10 %, 25 %, 40 % by default), the model is pruned
twice: by the measured criterion and by random choice (the control the criterion must beat).
Calibration and evaluation text are different documents of the Wikipedia sample in the gensim
wheel: even-numbered documents calibrate, odd-numbered ones evaluate. Reported per row:
parameters, held-out perplexity (the evaluation windows, whole-window forward), and greedy decode
tok/s at batch 1 and 8 (best of two runs), all in this process, one model after the other. With
`heal_steps`, the measured rows of `heal_methods` are also healed (LoRA on the calibration windows,
merged) and measured again.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch
from rich.console import Console

from memlm.bench.decode import perplexity
from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.data.corpus import read_documents, token_windows
from memlm.formats.loading import load_model
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.surgery.prune import prune
from memlm.train.heal import heal


def decode_speed(model, tokenizer, batch: int, new_tokens: int = 32) -> float:
    engine = Engine(model, tokenizer)
    prompts = [[{"role": "user", "content": f"Tell me about topic number {i}."}] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        engine.generate(prompts, params)
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def run_prune_bench(model_name: str, amounts=(0.1, 0.25, 0.4), methods=("layers", "ffn", "heads"), threads: int = 2,
                    windows: int = 16, seq_len: int = 256, json_path: str | None = None,
                    plot_path: str | None = None, heal_steps: int = 0, heal_methods=("layers",)) -> dict:
    torch.set_num_threads(threads)
    loaded = load_model(model_name)
    model, tokenizer = loaded.model, loaded.tokenizer
    docs = read_documents("gensim:enwiki")
    calibration = token_windows(tokenizer, docs[0::2], windows, seq_len)
    evaluation = token_windows(tokenizer, docs[1::2], windows, seq_len)
    evaluation_ids = [t for window in evaluation for t in window]  # scored window by window
    console = Console(width=140)

    def measure(m, **fields) -> dict:
        row = {**fields, "parameters": sum(p.numel() for p in m.parameters()),
               "perplexity": perplexity(m, evaluation_ids, window=seq_len),
               "decode_b1_tok_s": decode_speed(m, tokenizer, 1), "decode_b8_tok_s": decode_speed(m, tokenizer, 8)}
        console.print(row)
        return row

    rows = [measure(model, method="none", amount=0.0, criterion="-")]
    for method in methods:
        for amount in amounts:
            units = {"layers": model.config.num_layers, "ffn": model.config.intermediate_size,
                     "heads": model.config.num_kv_heads}[method]
            if not 0 < round(amount * units) < units:
                continue  # e.g. 10 % of 3 KV groups: nothing to remove
            for criterion in ("measured", "random"):
                pruned, report = prune(model, method, amount, calibration, criterion, seed=0)
                removed = report[method] if method == "layers" else None
                rows.append(measure(pruned, method=method, amount=amount, criterion=criterion, removed=removed))
                if heal_steps and criterion == "measured" and method in heal_methods:
                    with tempfile.TemporaryDirectory() as scratch:
                        heal(pruned, calibration, heal_steps, scratch, progress=False)
                    label = f"measured+{heal_steps} healing"
                    rows.append(measure(pruned, method=method, amount=amount, criterion=label, removed=removed))
    base = rows[0]
    for r in rows:
        r["perplexity_ratio"] = round(r["perplexity"] / base["perplexity"], 3)
        r["decode_b1_speedup"] = round(r["decode_b1_tok_s"] / base["decode_b1_tok_s"], 3)
        r["decode_b8_speedup"] = round(r["decode_b8_tok_s"] / base["decode_b8_tok_s"], 3)
    result = {"benchmark": "prune", "model": model_name, "threads": threads, "calibration_windows": len(calibration),
              "evaluation_windows": len(evaluation), "seq_len": seq_len,
              "healing": {"steps": heal_steps, "methods": list(heal_methods), "lora_rank": 16, "batch": 4,
                          "text": "the calibration windows"} if heal_steps else None, "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    columns = ("method", "amount", "criterion", "parameters", "perplexity", "vs original", "b1 speed-up",
               "b8 speed-up")
    cells = [[r["method"], f"{r['amount']:.0%}", r["criterion"], f"{r['parameters'] / 1e6:.1f} M",
              f"{r['perplexity']:.1f}", f"{r['perplexity_ratio']:.2f}x", f"{r['decode_b1_speedup']:.2f}x",
              f"{r['decode_b8_speedup']:.2f}x"] for r in rows]
    print_table(console, f"structured pruning of {model_name}, {threads} threads", columns, cells)
    write_outputs(result, console, json_path, plot_path, _plot)
    return result


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    rows = result["rows"][1:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, color in zip(("layers", "ffn", "heads"), ("C0", "C1", "C2"), strict=True):
        for criterion, style in (("measured", "o-"), ("random", "x--")):
            mine = [r for r in rows if r["method"] == method and r["criterion"] == criterion]
            healed = [r for r in rows if r["method"] == method and r["criterion"].startswith("measured+")]
            if healed and criterion == "measured":
                left.plot([100 * r["amount"] for r in healed], [r["perplexity_ratio"] for r in healed], "s:",
                          color=color, label=f"{method}, measured + healing")
            if mine:
                amounts = [100 * r["amount"] for r in mine]
                ratios = [r["perplexity_ratio"] for r in mine]
                left.plot(amounts, ratios, style, color=color, label=f"{method}, {criterion}")
                right.plot(amounts, [r["decode_b1_speedup"] for r in mine], style, color=color)
    left.set(yscale="log", xlabel="% removed", ylabel="held-out perplexity / original", title="quality")
    right.set(xlabel="% removed", ylabel="decode tok/s / original (batch 1)", title="speed")
    left.legend(fontsize=8)
    fig.suptitle(f"memlm prune — {result['model']}")
    fig.tight_layout()
    save_figure(fig, path)
