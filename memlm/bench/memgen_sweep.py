"""The weaver sweep's table and loss curves (`python -m memlm.bench.memgen_sweep [RUNS_DIR]`).

Reads the runs of the sweep (default runs/sweep11: one folder per variant, each from `memlm train
weaver|sft ... --steps 60 --save-every 20 --n-val-loss 32`, commands in bench/README.md) and
writes bench/results/memgen_sweep.json and memgen_sweep.png: training loss and held-out loss
(32 validation problems, teacher-forced) against the step, every variant on the same axes.
Variants already in the JSON and absent from the runs folder are kept (runs/ is not committed,
so a later session adds its variants beside the earlier ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from memlm.bench.report import pyplot, save_figure, write_outputs

VARIANTS = {  # folder -> what changed against the first weaver row
    "sft": "LoRA-SFT of the reasoner (reference)",
    "base": "weaver: random start, 8 latents, all 30 layers, lr 1e-3",
    "delim": "weaver: delimiter start",
    "delim_k2": "weaver: delimiter start, 2 latents",
    "delim_l10": "weaver: delimiter start, first 10 layers",
    "delim_lr3": "weaver: delimiter start, lr 3e-3",
    "eq": "weaver: random start, latents after '=' (where each line's result is written), not at line ends",
    "states": "weaver: random start, reads the reasoner's KV cache (its states) instead of input embeddings",
    "states_gated": "weaver: gated start (newline copies + gate x states, gate at 0), reads the reasoner's KV cache",
    "kv_delim": "weaver: reads the reasoner's KV cache and writes keys and values there (queries start as newlines)",
    "kv_random": "weaver: reads the reasoner's KV cache and writes keys and values there (random queries)",
}
RESULTS = Path("bench/results/memgen_sweep.json")
FIGURE = Path("bench/results/memgen_sweep.png")


def earlier() -> dict:
    """The committed results, step keys back to ints."""
    if not RESULTS.is_file():
        return {}
    out = json.loads(RESULTS.read_text())
    for r in out.values():
        for key in ("val_loss", "train_loss"):
            r[key] = {int(step): value for step, value in r[key].items()}
    return out


def load(runs: Path) -> dict:
    out = earlier()
    for name, label in VARIANTS.items():
        folder = runs / name
        if not (folder / "eval.json").is_file():
            continue
        rows = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
        report = json.loads((folder / "eval.json").read_text())
        out[name] = {
            "label": label,
            "val_loss_start": report.get("val_loss_start"),
            "val_loss": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
            "train_loss": {r["step"]: r["loss"] for r in rows},
            "examples_per_s": sum(r["items_per_s"] for r in rows) / len(rows),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="?", default="runs/sweep11", help="the sweep's runs folder (default runs/sweep11)"
    )
    runs = Path(parser.parse_args().runs)
    results = load(runs)
    if not results:
        raise SystemExit(f"no sweep runs under {runs}")
    print(f"{'variant':11s} {'start':>7s} {'val@20':>7s} {'val@40':>7s} {'val@60':>7s} {'ex/s':>5s}")
    for name, r in results.items():
        v = r["val_loss"]
        print(
            f"{name:11s} {r['val_loss_start']:7.3f} {v.get(20, float('nan')):7.3f} {v.get(40, float('nan')):7.3f} "
            f"{v.get(60, float('nan')):7.3f} {r['examples_per_s']:5.2f}"
        )
    write_outputs(results, Console(), str(RESULTS), str(FIGURE), plot)


def plot(results: dict, path: str) -> None:
    """Training and held-out loss against the step, every variant on the same axes."""
    fig, (train_ax, val_ax) = pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, r in results.items():
        style = {"color": "black", "linewidth": 2} if name == "sft" else {}
        steps = sorted(r["train_loss"])
        train_ax.plot(steps, [r["train_loss"][s] for s in steps], marker="o", label=name, **style)
        points = [0, *sorted(r["val_loss"])]
        values = [r["val_loss_start"], *(r["val_loss"][s] for s in sorted(r["val_loss"]))]
        val_ax.plot(points, values, marker="o", label=name, **style)
    train_ax.set(title="training loss (10-step means)", xlabel="step", ylabel="nats / target token", yscale="log")
    val_ax.set(title="held-out loss (32 validation problems)", xlabel="step")
    val_ax.legend(fontsize=8)
    fig.suptitle("Weaver sweep on chain_sum_mixed: 60 steps x 8 examples, the same draws")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
