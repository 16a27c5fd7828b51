"""`memlm lcm danger|value add`, `memlm lcm defaults`: plant a codebook-memory (LCM) model's safety grids
from example texts, or the shipped default set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memlm.errors import MemlmError
from memlm.lcm.config import LCMConfig

lcm_app = typer.Typer(no_args_is_help=True, help="Codebook-memory (LCM) models: safety grids.")


def _plant(model: str, texts: str, radius: float | None, clear: bool, add):
    # lazy: the LCM's checkpoint and planting load torch; the tokenizer, tokenizers and jinja2
    from memlm.lcm.checkpoint import load_lcm, save_safety
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
        safety.clear()
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


@lcm_app.command("defaults")
def lcm_defaults(
    model: LCMModelOpt = "",
    data: Annotated[
        str, typer.Option(help="Packed data (memlm data pack): its train split calibrates the radii.")
    ] = "",
    rate: Annotated[
        float,
        typer.Option(help="Share of ordinary 64-token prompts let inside a grid (sets the radii)."),
    ] = 0.01,
):
    """Replace the safety grids with the shipped defaults (memlm/lcm/default_safety.py), radii calibrated."""
    from memlm.data.packed import TokenData  # lazy: torch
    from memlm.lcm.checkpoint import load_lcm, save_safety
    from memlm.lcm.default_safety import calibration_windows, plant_defaults
    from memlm.tokenizer import Tokenizer

    if not LCMConfig.is_lcm_folder(model):
        raise MemlmError(f"{model} is not an LCM model folder (config.json with model_type memlm-lcm)")
    if not 0 < rate < 1:
        raise MemlmError("--rate must be between 0 and 1")
    if not data:
        raise MemlmError("--data is required (the packed data the model was trained on)")
    lcm = load_lcm(model)
    if not lcm.has_memory:
        raise MemlmError(f"{model} has no memory (decoder alone): it has no safety grids")
    train = TokenData.open(data, "train", vocab_size=lcm.config.vocab_size)
    planted = plant_defaults(lcm, Tokenizer.from_folder(model), calibration_windows(train), rate)
    save_safety(model, lcm)
    print(json.dumps(planted))
