"""Read a Hugging Face model folder: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from memlm.errors import ModelFormatError
from memlm.models.config import ModelConfig
from memlm.quant.qweight import unpack_quantized
from memlm.tokenizer import Tokenizer


def read_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict, Tokenizer]:
    """(config, weights, tokenizer). Weights are tensors under HF names, and `QWeight`s for the
    quantized matrices of a folder memlm wrote from a GGUF file's blocks."""
    folder = Path(folder)
    config_dict = _read_json(folder / "config.json")
    generation = folder / "generation_config.json"
    if generation.is_file():  # chat models often list their end-of-turn token only here
        eos = _read_json(generation).get("eos_token_id")
        if eos is not None:
            config_dict["eos_token_id"] = eos
    config = ModelConfig.from_hf(config_dict)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                metadata = handle.metadata()
            weights.update(unpack_quantized(load_file(str(f)), metadata))
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"cannot read {f}: {e}") from None
    return config, weights, Tokenizer.from_folder(folder)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path.parent} has no {path.name}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None
