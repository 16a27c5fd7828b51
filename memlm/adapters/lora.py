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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memlm.atomic import atomic_write
from memlm.errors import MemlmError, ModelFormatError
from memlm.quant.qlinear import QLinear

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _is_linear(module: nn.Module) -> bool:
    """A plain Linear, or a quantized one (the adapter then runs beside the quantized base)."""
    return isinstance(module, nn.Linear | QLinear)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # True / False, or (inside `lora_for_tokens`) a bool per token of the forward: which tokens
        # run with the adapter (a latent weaver's queries folded into the reasoner's step).
        self.enabled: bool | torch.Tensor = True

    @property
    def weight(self) -> torch.Tensor:  # what code reading `.weight` of a Linear expects
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        on = self.enabled
        if not isinstance(on, torch.Tensor) and not on:
            return out
        delta = (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scaling
        if not isinstance(on, torch.Tensor):
            return out + delta
        return out + delta * on.reshape(*x.shape[:-1], 1).to(delta.dtype)

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling


def add_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    targets=DEFAULT_TARGETS,
    dropout: float = 0.0,
    depth: int | None = None,
) -> list[str]:
    """Wrap every Linear whose attribute name is in `targets` (in the first `depth` transformer
    layers only, when given); freeze everything else. -> wrapped names."""
    if rank < 1:
        raise MemlmError(f"LoRA rank must be >= 1, got {rank}")
    if getattr(model, "adapter_bank", None) is not None:
        raise MemlmError("this model serves per-request LoRA adapters (an AdapterBank); a LoRA of its own beside "
                         "them (a latent memory's weaver, training) is not supported")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if depth is not None and _layer_index(name) is not None and _layer_index(name) >= depth:
            continue
        for child_name, child in list(module.named_children()):
            if child_name in targets and _is_linear(child):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    # A quantized model's native decode step knows nothing of adapters: it only runs while
    # every adapter is switched off (see NativeDecoder.accepts).
    model.lora_modules = [layer for _, layer in lora_layers(model)]
    if not wrapped:
        raise MemlmError(f"no Linear layer named {', '.join(targets)} to put LoRA on")
    return wrapped


def _layer_index(name: str) -> int | None:
    """The transformer layer a module name lies in ("layers.3.self_attn" -> 3), or None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


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
def lora_switched(model: nn.Module, on: bool | torch.Tensor):
    """Every adapter on (or off, or on for the tokens a bool mask marks) inside the block; as it
    was afterwards."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = on
        yield
    finally:
        for layer, was in zip(layers, saved, strict=True):
            layer.enabled = was


def lora_for_tokens(model: nn.Module, tokens: torch.Tensor):
    """Inside the block, every adapter acts on the tokens where `tokens` (a bool per token, in the
    order the projections see them) is True and on no other; as it was afterwards."""
    return lora_switched(model, tokens)


def lora_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block."""
    return lora_switched(model, False)


def merge_lora(model: nn.Module) -> None:
    """Fold each adapter into its base weight and put the plain Linear back."""
    for name, layer in list(lora_layers(model)):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(layer.base, nn.Linear):
            raise MemlmError("an adapter on quantized weights runs beside them; merge it before quantizing")
        with torch.no_grad():
            layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        setattr(parent, child_name, layer.base)
    model.lora_modules = []


# ---- adapter folders ---------------------------------------------------------------------------
#
# memlm writes adapters in PEFT's format (adapter_config.json with peft_type LORA, r, lora_alpha,
# target_modules, base_model_name_or_path; adapter_model.safetensors with PEFT's key names), so
# `peft` and transformers load them, and it reads PEFT LoRA folders as model paths. memlm's fused
# projections map onto PEFT's separate ones exactly: a LoRA on qkv_proj (A [r, d], B [q+k+v, r]) is
# a LoRA on each of q_proj, k_proj and v_proj with the same A and B's rows split. Folders in
# memlm's earlier format (adapter.safetensors, keys rank/alpha/targets/base_model) still load.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"  # memlm's earlier format
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def save_adapter(folder: str | Path, model: nn.Module, config: dict, dtype=torch.bfloat16) -> Path:
    """Write the adapter in PEFT's format, atomically. `config` must name `base_model`; it is kept
    under the "memlm" key (rank, alpha, targets and training details)."""
    if "base_model" not in config:
        raise MemlmError("an adapter config must name its base_model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in peft_state_dict(model).items()}
    layers = dict(lora_layers(model))
    first = next(iter(layers.values()))
    targets = sorted({key.split(".")[-3] for key in tensors})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config["base_model"],
        "r": first.rank,
        "lora_alpha": first.alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "memlm": config,
    }
    atomic_write(folder / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2)))
    return folder


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names: fused projections split into the model's own."""
    cfg = model.config
    out = {}
    for name, layer in lora_layers(model):
        parent, _, fused = name.rpartition(".")
        parts = _FUSED_PARTS.get(fused, (fused,))
        sizes = _part_sizes(cfg, fused, layer.lora_b.shape[0])
        for part, b in zip(parts, layer.lora_b.detach().split(sizes), strict=True):
            key = f"{_PEFT_PREFIX}model.{_hf_module(parent)}.{part}"
            out[f"{key}.lora_A.weight"] = layer.lora_a.detach().cpu().clone()  # one copy per projection
            out[f"{key}.lora_B.weight"] = b.cpu().clone()
    return out


def _part_sizes(cfg, fused: str, rows: int) -> tuple[int, ...]:
    if fused == "qkv_proj":
        kv = cfg.num_kv_heads * cfg.head_dim
        return (cfg.num_heads * cfg.head_dim, kv, kv)
    if fused == "gate_up_proj":
        return (rows // 2, rows // 2)
    return (rows,)


def _hf_module(memlm_path: str) -> str:
    """memlm's module path -> the transformers one (`layers.0.mlp.shared` -> `layers.0.mlp.shared_expert`)."""
    return memlm_path.replace(".mlp.shared", ".mlp.shared_expert")


def read_adapter_config(folder: Path) -> dict:
    """-> {"base_model", "rank", "alpha", "targets", "format": "peft" | "memlm", ...} for either format."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    if "peft_type" in config:
        return _peft_config(folder, config)
    for key in ("base_model", "rank", "alpha", "targets"):
        if key not in config:
            raise ModelFormatError(f"{folder / ADAPTER_CONFIG} lacks {key!r}")
    return {**config, "format": "memlm"}


def _peft_config(folder: Path, config: dict) -> dict:
    where = folder / ADAPTER_CONFIG
    if config["peft_type"] != "LORA":
        raise ModelFormatError(f"{where}: PEFT method {config['peft_type']!r} is not supported (only LORA)")
    unsupported = [
        key
        for key, off in (("use_dora", False), ("fan_in_fan_out", False), ("rank_pattern", {}), ("alpha_pattern", {}))
        if config.get(key) not in (off, None)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if config.get("layers_to_transform") is not None:
        unsupported.append("layers_to_transform")
    if unsupported:
        raise ModelFormatError(f"{where}: LoRA options not supported: {', '.join(unsupported)}")
    for key in ("r", "lora_alpha", "base_model_name_or_path"):
        if config.get(key) is None:
            raise ModelFormatError(f"{where} lacks {key!r}")
    return {
        **config.get("memlm", {}),
        "base_model": config["base_model_name_or_path"],
        "rank": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "targets": config.get("target_modules") or [],
        "rslora": bool(config.get("use_rslora", False)),
        "format": "peft",
    }


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder's config and its tensors (PEFT's or memlm's file, as the config says)."""
    config = read_adapter_config(folder)
    weights = folder / (PEFT_WEIGHTS if config["format"] == "peft" else ADAPTER_WEIGHTS)
    try:
        return config, load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"cannot read {weights}: {e}") from None


def apply_adapter(model: nn.Module, folder: Path, merge: bool = True) -> dict:
    """Put the adapter of `folder` on `model`, merged into the weights (default) or beside them (a
    quantized model: merging into 4-bit blocks would round most of a fine-tune away); -> its config."""
    config, tensors = read_adapter(folder)
    if config["format"] == "peft":
        (_merge_peft if merge else _attach_peft)(model, tensors, config, folder)
        model.requires_grad_(False)
        return config
    add_lora(model, config["rank"], config["alpha"], tuple(config["targets"]))
    dtype = next(layer.lora_a.dtype for _, layer in lora_layers(model))
    try:
        load_lora_state_dict(model, {k: v.to(dtype) for k, v in tensors.items()})
    except MemlmError as e:
        raise ModelFormatError(f"{folder}: {e} (base model {config['base_model']!r})") from None
    if merge:
        merge_lora(model)
    model.requires_grad_(False)
    return config


def _peft_parts(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict, folder: Path):
    """PEFT's per-projection adapters, grouped by memlm's (possibly fused) module:
    -> (scaling, {module path: [(row start, rows, A, B), ...]})."""
    scaling = config["alpha"] / (math.sqrt(config["rank"]) if config["rslora"] else config["rank"])
    modules = sorted({key[: key.index(".lora_")] for key in tensors if ".lora_" in key})
    if len(modules) * 2 != len(tensors):
        raise ModelFormatError(f"{folder}: expected only lora_A / lora_B tensors in {PEFT_WEIGHTS}")
    fused_of = {part: (fused, i) for fused, parts in _FUSED_PARTS.items() for i, part in enumerate(parts)}
    groups: dict[str, list] = {}
    for module in modules:
        path = module.removeprefix(_PEFT_PREFIX).removeprefix("model.").replace(".shared_expert.", ".shared.")
        parent, _, part = path.rpartition(".")
        try:
            a, b = tensors[f"{module}.lora_A.weight"].float(), tensors[f"{module}.lora_B.weight"].float()
        except KeyError:
            raise ModelFormatError(f"{folder}: {module} lacks lora_A or lora_B") from None
        fused, index = fused_of.get(part, (part, 0))
        try:
            target = model.get_submodule(f"{parent}.{fused}")
        except AttributeError:
            raise ModelFormatError(f"{folder}: LoRA on {module!r}, which this model does not have") from None
        # A (quantized) Linear knows its shape; other adapted modules (an MoE router) by their weight.
        rows, columns = (
            (target.out_features, target.in_features) if hasattr(target, "in_features") else tuple(target.weight.shape)
        )
        sizes = _part_sizes(model.config, fused, rows)
        if (b.shape[0], a.shape[1]) != (sizes[index], columns):
            raise ModelFormatError(
                f"{folder}: {module} has shape {(b.shape[0], a.shape[1])}, the model expects {(sizes[index], columns)}"
            )
        groups.setdefault(f"{parent}.{fused}", []).append((sum(sizes[:index]), sizes[index], a, b))
    return scaling, groups


def _block_diagonal(parts: list, rows: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused module's PEFT parts as one LoRA: A stacks the parts' A, B places each part's B
    (scaled) in its rows and columns, block-diagonal, so B A equals the parts' deltas exactly
    (rank: the parts' ranks summed). -> (A [rank, in], B [rows, rank]), float32."""
    a_all = torch.cat([a for _, _, a, _ in parts])
    b_all = torch.zeros(rows, a_all.shape[0])
    column = 0
    for start, size, a, b in parts:
        b_all[start : start + size, column : column + a.shape[0]] = b * scaling
        column += a.shape[0]
    return a_all, b_all


def _out_features(module: nn.Module) -> int:
    return module.out_features if hasattr(module, "out_features") else module.weight.shape[0]


def _attach_peft(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict, folder: Path) -> None:
    """The adapter beside the weights, unmerged: per fused module one LoRALinear (block-diagonal
    over PEFT's parts, scaling 1: B carries PEFT's)."""
    scaling, groups = _peft_parts(model, tensors, config, folder)
    for path, parts in groups.items():
        parent_name, _, child_name = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        a_all, b_all = _block_diagonal(parts, _out_features(getattr(parent, child_name)), scaling)
        rank = a_all.shape[0]
        layer = LoRALinear(getattr(parent, child_name), rank, float(rank))
        with torch.no_grad():
            layer.lora_a.copy_(a_all)
            layer.lora_b.copy_(b_all)
        setattr(parent, child_name, layer)
    model.lora_modules = [layer for _, layer in lora_layers(model)]


Factors = tuple[torch.Tensor, torch.Tensor]  # (A [rank, in], B [out, rank]): delta W = B A


def read_adapter_deltas(model: nn.Module, folder: str | Path) -> tuple[dict, dict[str, Factors]]:
    """An adapter folder (PEFT's or memlm's earlier format) as low-rank factors per memlm module,
    without touching the model: -> (config, {module path: (A [rank, in], B [out, rank] with the
    scaling folded in)}), float32; delta W = B A. Shapes are checked against `model`."""
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    if config["format"] == "peft":
        scaling, groups = _peft_parts(model, tensors, config, folder)
        return config, {
            path: _block_diagonal(parts, _out_features(model.get_submodule(path)), scaling)
            for path, parts in groups.items()
        }
    scaling = config["alpha"] / config["rank"]
    out = {}
    for key in sorted(tensors):
        path, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b") or f"{path}.lora_a" not in tensors or f"{path}.lora_b" not in tensors:
            raise ModelFormatError(f"{folder}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}")
        if part == "lora_b":
            continue
        a, b = tensors[key].float(), tensors[f"{path}.lora_b"].float()
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise ModelFormatError(f"{folder}: LoRA on {path!r}, which this model does not have") from None
        columns = target.in_features if hasattr(target, "in_features") else target.weight.shape[1]
        shape = (_out_features(target), columns)
        if (b.shape[0], a.shape[1]) != shape or a.shape[0] != b.shape[1]:
            raise ModelFormatError(f"{folder}: {path} has shape {(b.shape[0], a.shape[1])}, the model expects {shape}")
        out[path] = (a, b * scaling)
    return config, out


def _merge_peft(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict, folder: Path) -> None:
    """Add each PEFT module's B @ A * scaling to the rows of memlm's (possibly fused) weight it belongs to."""
    scaling, groups = _peft_parts(model, tensors, config, folder)
    for path, parts in groups.items():
        target = model.get_submodule(path).weight
        with torch.no_grad():
            for start, rows, a, b in parts:
                target[start : start + rows] += ((b @ a) * scaling).to(target.dtype)
