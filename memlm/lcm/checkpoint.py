"""LCM model folders: what `memlm train lcm` writes and `--model` loads.

    config.json             LCMConfig, "model_type": "memlm-lcm"
    model.safetensors       the weights (the decoder's tied LM head stored once)
    safety.safetensors      the value and danger grids (planted by users, rewritten on their own)
    tokenizer.json, tokenizer_config.json
    memlm_source.json       how it was made (stage, steps, data)

Folders are written into a temporary sibling and renamed into place, so a reader never sees a
half-written model; the safety file is replaced atomically on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memlm.atomic import atomic_folder, atomic_write
from memlm.errors import ModelFormatError
from memlm.lcm.config import LCMConfig
from memlm.lcm.model import LCMModel

WEIGHTS, SAFETY, CONFIG, SOURCE = "model.safetensors", "safety.safetensors", "config.json", "memlm_source.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _weights(model: LCMModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    state.pop("decoder.lm_head.weight", None)  # tied to decoder.embed.weight
    return {k: v.detach().to(dtype).cpu().contiguous() for k, v in state.items() if not k.startswith("memory.safety.")}


def _safety(model: LCMModel) -> dict[str, torch.Tensor]:
    if not model.has_memory:
        return {}
    return {k: v.detach().float().cpu().contiguous() for k, v in model.memory.safety.state_dict().items()}


def save_lcm(
    folder: str | Path, model: LCMModel, tokenizer_dir: str | Path, note: dict | None = None, dtype=torch.float32
) -> Path:
    """`dtype=torch.bfloat16` halves the folder (a small model to commit); loading returns float32."""
    with atomic_folder(folder) as tmp:
        save_file(_weights(model, dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_file(_safety(model), str(tmp / SAFETY), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(model.config.to_json(), indent=2))
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, tmp / name)
        (tmp / SOURCE).write_text(json.dumps(note or {}, indent=2))
    return Path(folder)


def save_safety(folder: str | Path, model: LCMModel) -> None:
    """Rewrite only the safety grids of a saved model (after planting codes)."""
    atomic_write(Path(folder) / SAFETY, lambda p: save_file(_safety(model), str(p), metadata={"format": "pt"}))


def read_config(folder: str | Path) -> LCMConfig:
    path = Path(folder) / CONFIG
    try:
        return LCMConfig.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None


def load_lcm(folder: str | Path, **runtime) -> LCMModel:
    """Build the model of an LCM folder; `runtime` overrides switches such as max_loop_steps."""
    folder = Path(folder)
    cfg = read_config(folder)
    if runtime:
        cfg = cfg.with_runtime(**runtime)
    model = LCMModel(cfg)
    try:
        weights = load_file(str(folder / WEIGHTS))
        safety = load_file(str(folder / SAFETY)) if (folder / SAFETY).is_file() else {}
    except (OSError, SafetensorError) as e:
        raise ModelFormatError(f"cannot read the weights of {folder}: {e}") from None
    expected = _weights(model)
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise ModelFormatError(
            f"{folder}: weights do not match its config.json ({'missing' if missing else 'unexpected'} {name})"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ModelFormatError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, config says {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights, strict=False)
    if safety and model.has_memory:
        s = model.memory.safety
        for name, tensor in safety.items():
            setattr(s, name, tensor.to(torch.bool) if name == "value_allowed" else tensor)
    model.eval()
    return model
