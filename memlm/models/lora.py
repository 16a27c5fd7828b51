"""LoRA adapters that share the frozen base weights.

`add_lora(model, rank, alpha, targets)` wraps the chosen Linear layers in place: each wrapper
holds a reference to the original layer (same weight storage, still frozen) plus two small
trainable matrices, y = base(x) + (alpha / rank) * B(A(x)). B starts at zero, so a freshly added
adapter changes nothing. Adapters can be switched off (`lora_disabled(model)`), which turns the
same module back into the base model without a second copy of its weights (latent memory's
weaver and reasoner rely on that), or merged into the base weights for inference at full speed.

memlm fuses q/k/v and gate/up into one Linear each, so an adapter on `qkv_proj` adapts the three
projections together (rank r on the fused output rather than r per projection).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from memlm.errors import MemlmError, ModelFormatError

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:  # what code reading `.weight` of a Linear expects
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling


def add_lora(
    model: nn.Module, rank: int = 16, alpha: float = 32.0, targets=DEFAULT_TARGETS, dropout: float = 0.0
) -> list[str]:
    """Wrap every Linear whose attribute name is in `targets`; freeze everything else. -> wrapped names."""
    if rank < 1:
        raise MemlmError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise MemlmError(f"no Linear layer named {', '.join(targets)} to put LoRA on")
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: what an adapter checkpoint holds."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_a"] = layer.lora_a.detach().cpu().contiguous()
        out[f"{name}.lora_b"] = layer.lora_b.detach().cpu().contiguous()
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    layers = dict(lora_layers(model))
    expected = {f"{n}.lora_{p}" for n in layers for p in "ab"}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise MemlmError(f"LoRA tensors do not match the model (missing {missing[:2]}, unexpected {extra[:2]})")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in "ab":
                target = getattr(layer, f"lora_{part}")
                source = tensors[f"{name}.lora_{part}"]
                if source.shape != target.shape:
                    raise MemlmError(f"LoRA tensor {name}.lora_{part} has shape {tuple(source.shape)}")
                target.copy_(source)


@contextlib.contextmanager
def lora_switched(model: nn.Module, on: bool):
    """Every adapter on (or off) inside the block; as it was afterwards."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = on
        yield
    finally:
        for layer, was in zip(layers, saved, strict=True):
            layer.enabled = was


def lora_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block."""
    return lora_switched(model, False)


def merge_lora(model: nn.Module) -> None:
    """Fold each adapter into its base weight and put the plain Linear back."""
    for name, layer in list(lora_layers(model)):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        setattr(parent, child_name, layer.base)


# ---- adapter folders: adapter.safetensors + adapter_config.json naming the base model ----------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def save_adapter(folder: str | Path, model: nn.Module, config: dict, dtype=torch.bfloat16) -> Path:
    """Write the adapter tensors and a JSON config (which must name `base_model`), atomically."""
    from safetensors.torch import save_file

    from memlm.atomic import atomic_write

    if "base_model" not in config:
        raise MemlmError("an adapter config must name its base_model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in lora_state_dict(model).items()}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return folder


def read_adapter_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    for key in ("base_model", "rank", "alpha", "targets"):
        if key not in config:
            raise ModelFormatError(f"{folder / ADAPTER_CONFIG} lacks {key!r}")
    return config


def apply_adapter(model: nn.Module, folder: Path, merge: bool = True) -> dict:
    """Put the adapter of `folder` on `model` (merged into the weights by default); -> its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(folder)
    add_lora(model, config["rank"], config["alpha"], tuple(config["targets"]))
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"cannot read {folder / ADAPTER_WEIGHTS}: {e}") from None
    dtype = next(layer.lora_a.dtype for _, layer in lora_layers(model))
    try:
        load_lora_state_dict(model, {k: v.to(dtype) for k, v in tensors.items()})
    except MemlmError as e:
        raise ModelFormatError(f"{folder}: {e} (base model {config['base_model']!r})") from None
    if merge:
        merge_lora(model)
    model.requires_grad_(False)
    return config
