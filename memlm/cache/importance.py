"""The DynTS importance predictor: how much will the answer attend to this token?

An MLP on a token's final-layer hidden state (d -> 2d -> d/2 -> 1, Softplus), one score per token
shared by all layers and heads ("Dynamic Thinking-Token Selection", arXiv 2601.18383). It is
trained with MSE against the attention the answer tokens paid to each thinking token (see
memlm/train/predictor.py); the `learned` KV policy keeps the best-scoring tokens.

A checkpoint is a folder: predictor.safetensors + predictor.json, which names the base model the
hidden states came from. Loading it for another model is an error, not a silent mismatch. A
predictor trained on prompt tokens too (`"prompt": true`, `memlm train predictor --prompt`) says
so (`scores_prompt`), and the learned policy then lets prompt tokens compete by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memlm.atomic import atomic_write
from memlm.errors import ModelFormatError

CONFIG_FILE = "predictor.json"
WEIGHTS_FILE = "predictor.safetensors"


class ImportancePredictor(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.scores_prompt = False  # trained on prompt tokens too: fit to rank them against thinking tokens
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.GELU(),
            nn.Linear(2 * hidden_size, hidden_size // 2),
            nn.GELU(),
            nn.Linear(hidden_size // 2, 1),
            nn.Softplus(),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] final-norm hidden states -> [...] non-negative importance."""
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)


def save_predictor(folder: str | Path, predictor: ImportancePredictor, config: dict) -> Path:
    """Weights and a JSON config naming `base_model`, each written atomically."""
    if "base_model" not in config:
        raise ValueError("a predictor config must name its base_model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {**config, "hidden_size": predictor.hidden_size}
    atomic_write(folder / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return folder


def load_predictor(folder: str | Path, model_config=None, model_name: str | None = None):
    """-> (predictor, config). With a model's config (and name), checks the predictor fits it."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelFormatError(f"{folder} is not an importance predictor (no {CONFIG_FILE})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        hidden_size = int(config["hidden_size"])
        config["base_model"] = str(config["base_model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{folder / CONFIG_FILE} is not a valid predictor config: {e}") from None
    if model_config is not None:
        check_predictor(folder, config, model_config, model_name)
    predictor = ImportancePredictor(hidden_size)
    try:
        predictor.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFormatError(f"cannot load {folder / WEIGHTS_FILE}: {str(e).splitlines()[0]}") from None
    predictor.scores_prompt = bool(config.get("prompt", False))
    return predictor.eval().requires_grad_(False), config


def check_predictor(folder, config: dict, model_config, model_name: str | None = None) -> None:
    """A predictor reads one model's hidden states: refuse any other model."""
    base = config["base_model"]
    if model_config.hidden_size != int(config["hidden_size"]):
        raise ModelFormatError(
            f"predictor {folder} was trained on {base!r} (hidden size {config['hidden_size']}); "
            f"this model's hidden size is {model_config.hidden_size}"
        )
    if model_name is not None and not same_model(base, model_name):
        raise ModelFormatError(f"predictor {folder} was trained on {base!r}, not {model_name!r}")


def same_model(a: str, b: str) -> bool:
    """Names compare case-insensitively; paths compare resolved."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.lower().rstrip("/") == b.lower().rstrip("/")
