"""Codebook memory on the command line: `memlm train lcm`, `memlm train lm` (the transformer
baseline), `memlm eval lcm`, `memlm bench lcm-decode` and `memlm lcm danger|value add`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from memlm.cli import _out_dir, eval_app, lcm_app, train_app
from memlm.errors import MemlmError

DataOpt = Annotated[str, typer.Option("--data", help="Packed token data folder (from `memlm data pack`).")]
OutOpt = Annotated[str, typer.Option("--out", help="Output folder (model/, train/, report.json).")]


@train_app.command("lcm")
def train_lcm(
    stage: Annotated[int, typer.Option(help="1: decoder LM; 2: encoder + grids, decoder frozen; 3: joint.")] = 1,
    data: DataOpt = "",
    out: OutOpt = "",
    init: Annotated[str | None, typer.Option(help="The previous stage's model folder (stages 2 and 3).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps of this stage.")] = 240,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 3e-3, 2e-3, 5e-4 by stage).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = 0,
    memory: Annotated[
        str | None,
        typer.Option(
            help="grids (default), continuous, single (one codebook), none (decoder alone); "
            "at stage 2, another kind than --init's builds that memory around its decoder."
        ),
    ] = None,
    hidden_size: Annotated[int, typer.Option(help="Width (stage 1).")] = 192,
    encoder_layers: Annotated[int, typer.Option(help="Encoder blocks (stage 1).")] = 2,
    decoder_layers: Annotated[int, typer.Option(help="Decoder blocks (stage 1).")] = 4,
    z_dim: Annotated[int, typer.Option(help="Bottleneck width (stage 1).")] = 64,
    codes: Annotated[int, typer.Option(help="Codes per grid (stage 1).")] = 64,
    max_loop_steps: Annotated[int, typer.Option(help="Reasoning-loop step limit (stage 1).")] = 3,
    decoder_experts: Annotated[
        int, typer.Option(help="Mixture-of-experts FFNs in the decoder: this many experts (0 = dense; stage 1).")
    ] = 0,
    experts_per_token: Annotated[int, typer.Option(help="Experts each token is routed to (stage 1).")] = 2,
    save_every: Annotated[int, typer.Option(help="Checkpoint (and held-out bits/byte) every N steps.")] = 40,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
):
    """Train one stage of an LCM model (see memlm/train/lcm.py)."""
    from memlm.train.lcm import LCMTrainConfig, run_lcm_stage

    if not data:
        raise MemlmError("--data is required")
    _out_dir(out)
    report = run_lcm_stage(
        LCMTrainConfig(
            data=data,
            out_dir=out,
            stage=stage,
            init=init,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            seed=seed,
            memory=memory,
            hidden_size=hidden_size,
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            z_dim=z_dim,
            codes=codes,
            max_loop_steps=max_loop_steps,
            decoder_experts=decoder_experts,
            decoder_experts_per_token=experts_per_token,
            save_every=save_every,
            resume=resume,
        )
    )
    print(json.dumps({k: report[k] for k in ("stage", "total_steps", "parameters", "final") if k in report}, indent=2))


@train_app.command("lm")
def train_lm(
    data: DataOpt = "",
    out: OutOpt = "",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 480,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = 0,
    hidden_size: Annotated[int, typer.Option(help="Width.")] = 192,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 8,
    save_every: Annotated[int, typer.Option(help="Checkpoint (and held-out bits/byte) every N steps.")] = 40,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
):
    """Train a Llama-architecture transformer from scratch (the LCM's same-size baseline)."""
    from memlm.train.pretrain import LMTrainConfig, run_pretrain

    if not data:
        raise MemlmError("--data is required")
    _out_dir(out)
    report = run_pretrain(
        LMTrainConfig(
            data=data,
            out_dir=out,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            seed=seed,
            hidden_size=hidden_size,
            num_layers=layers,
            save_every=save_every,
            resume=resume,
        )
    )
    print(json.dumps({k: report[k] for k in ("total_steps", "parameters", "final") if k in report}, indent=2))


def _plant(model: str, texts: str, radius: float | None, clear: bool, add):
    from pathlib import Path

    from memlm.lcm.checkpoint import load_lcm, save_safety
    from memlm.lcm.config import LCMConfig
    from memlm.lcm.planting import text_codes
    from memlm.tokenizer import Tokenizer

    if not LCMConfig.is_lcm_folder(model):
        raise MemlmError(f"{model} is not an LCM model folder (config.json with model_type memlm-lcm)")
    lcm = load_lcm(model)
    if not lcm.has_memory:
        raise MemlmError(f"{model} has no memory (decoder alone): it has no safety grids")
    if radius is not None and radius <= 0:
        raise MemlmError("--radius must be > 0")
    safety = lcm.memory.safety
    if clear:
        for name, buffer in safety.named_buffers():
            setattr(safety, name, buffer[:0])
    planted = 0
    if texts:
        path = Path(texts)
        if not path.is_file():
            raise MemlmError(f"--texts: no such file {path}")
        codes, radii = text_codes(lcm, Tokenizer.from_folder(model), path.read_text().splitlines(), radius)
        add(safety, codes, radii)
        planted = codes.shape[0]
    elif not clear:
        raise MemlmError("give --texts FILE (one text per line) or --clear")
    save_safety(model, lcm)
    return {
        "planted": planted,
        "danger_codes": int(safety.danger_codes.shape[0]),
        "value_anchors": int(safety.value_anchors.shape[0]),
    }


TextsOpt = Annotated[str, typer.Option("--texts", help="A file with one example text per line.")]
RadiusOpt = Annotated[float | None, typer.Option(help="Radius of each code (default: from the text itself).")]
ClearOpt = Annotated[bool, typer.Option("--clear", help="Remove this model's planted codes first.")]
LCMModelOpt = Annotated[str, typer.Option("--model", "-m", help="LCM model folder.")]


@lcm_app.command("danger")
def lcm_danger(
    action: Annotated[str, typer.Argument(help="add")],
    model: LCMModelOpt = "",
    texts: TextsOpt = "",
    radius: RadiusOpt = None,
    clear: ClearOpt = False,
):
    """Plant danger codes: generation whose state comes near one halts (finish_reason "halted")."""
    if action != "add":
        raise MemlmError(f"unknown action {action!r}; use: memlm lcm danger add --model DIR --texts FILE")
    print(json.dumps(_plant(model, texts, radius, clear, lambda s, c, r: s.add_danger(c, r))))


@lcm_app.command("value")
def lcm_value(
    action: Annotated[str, typer.Argument(help="add")],
    model: LCMModelOpt = "",
    texts: TextsOpt = "",
    kind: Annotated[str, typer.Option(help="allowed or forbidden.")] = "forbidden",
    radius: RadiusOpt = None,
    clear: ClearOpt = False,
):
    """Plant value anchors: a state inside a forbidden anchor is flagged (and corrected, by default)."""
    if action != "add":
        raise MemlmError(f"unknown action {action!r}; use: memlm lcm value add --model DIR --texts FILE")
    if kind not in ("allowed", "forbidden"):
        raise MemlmError(f"--kind must be allowed or forbidden, got {kind!r}")
    print(json.dumps(_plant(model, texts, radius, clear, lambda s, c, r: s.add_value(c, kind == "allowed", r))))


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
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="Write a PNG here.")] = None,
):
    """Held-out bits per byte of an LCM against its baselines, ablations, drift, decode cost."""
    from memlm.bench.lcm import LCMBenchConfig, run_lcm_bench
    from memlm.cli import _int_list

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
        contexts=tuple(_int_list(contexts, "--contexts")),
    )
    result = run_lcm_bench(cfg, json_path, plot_path)
    print(
        json.dumps(
            {"main": result["main"], "ablations": result["ablations"], "retrained": result["retrained"]}, indent=2
        )
    )
