"""`memlm prune`: structured pruning of a Llama-family model (memlm/surgery/prune.py)."""

from __future__ import annotations

import json
import tempfile
from typing import Annotated

import typer

from memlm.cli.options import DEFAULT_MODEL, ModelOpt, check_out
from memlm.data.corpus import corpus_windows
from memlm.errors import MemlmError


def prune(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="layers, ffn (intermediate channels) or heads (KV groups).")] = "layers",
    amount: Annotated[float, typer.Option(help="Fraction of the layers / channels / groups to remove.")] = 0.25,
    calib: Annotated[str, typer.Option(help="Calibration text: a corpus name or a text file.")] = "gensim:enwiki",
    out: Annotated[str, typer.Option("--out", help="Output folder (a Hugging Face model folder).")] = "",
    criterion: Annotated[str, typer.Option(help="measured (block influence / activation x weight) or random.")] = (
        "measured"
    ),
    windows: Annotated[int, typer.Option(help="Calibration windows.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the random criterion.")] = 0,
    heal_steps: Annotated[
        int, typer.Option(help="Then heal: a LoRA fine-tune of this many steps on the calibration text (0 = none).")
    ] = 0,
):
    """Remove the least important layers, FFN channels or attention-head groups; write a smaller model."""
    # lazy: the model, the surgery and healing load torch
    from memlm.formats.loading import load_model, save_model
    from memlm.surgery.prune import METHODS
    from memlm.surgery.prune import prune as prune_model
    from memlm.train.heal import heal

    if method not in METHODS:
        raise MemlmError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < amount < 1:
        raise MemlmError(f"--amount is a fraction in (0, 1), got {amount}")
    if windows < 1 or seq_len < 2 or heal_steps < 0:
        raise MemlmError("--windows must be >= 1, --seq-len >= 2 and --heal-steps >= 0")
    check_out(out)
    loaded = load_model(model)
    if not hasattr(loaded.model, "layers"):
        raise MemlmError("memlm prune works on Llama-family models (this one is an LCM)")
    needs_text = criterion == "measured" or heal_steps
    calibration = None
    if needs_text:
        calibration = corpus_windows(loaded.tokenizer, calib, windows, seq_len, "calibration text")
    pruned, report = prune_model(loaded.model, method, amount, calibration if criterion == "measured" else None,
                                 criterion, seed)
    if heal_steps:
        with tempfile.TemporaryDirectory() as scratch:  # the loop's checkpoints; the model is saved below
            last = heal(pruned, calibration, heal_steps, scratch, batch_size=min(4, len(calibration)), seed=seed)
        report["healing"] = {"steps": heal_steps, "lora_rank": 16, "final_loss": last.get("loss")}
    before = sum(p.numel() for p in loaded.model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    note = {"pruned_from": model, "calibration": calib, "windows": windows, "seq_len": seq_len, **report}
    save_model(out, pruned, loaded.tokenizer, note=note)
    summary = {k: v for k, v in report.items() if k != "scores"}
    print(json.dumps({"out": out, "parameters_before": before, "parameters_after": after, **summary}))
