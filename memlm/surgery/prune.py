"""Structured pruning: remove whole layers, FFN channels or attention-head groups that contribute
least, measured on calibration text, and return a smaller model of the same family.

Criteria (one forward pass over the calibration windows, with hooks):
* layers: block influence, 1 - cos(input, output) of each decoder block, averaged over tokens (a
  block that barely turns its input contributes little);
* ffn: activation-weighted magnitude of each intermediate channel, mean |silu(gate) * up| times
  the norm of its column of down_proj; every layer keeps the same number (one intermediate_size);
* heads: the same for attention, per KV group (a KV head and the query heads that share it, so the
  grouped-query structure stays), mean |head output| times the norm of its o_proj columns.
`criterion="random"` picks uniformly instead: the control a measured criterion must beat.

The result is built from the pruned Hugging Face tensors with a smaller config, so memlm,
transformers and the quantized path load it like any other checkpoint (`save_model`).
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from memlm.errors import MemlmError
from memlm.formats.weights import build_model, unfuse_state_dict
from memlm.models.llama import LlamaModel

METHODS = ("layers", "ffn", "heads")


@torch.no_grad()
def importance(model: LlamaModel, method: str, windows: list[list[int]]) -> list[list[float]] | list[float]:
    """Scores of the prunable units: per layer (layers), or per layer and channel / KV group."""
    cfg = model.config
    found: dict = {}
    hooks = []
    for i, block in enumerate(model.layers):
        if method == "layers":
            def on_block(module, args, output, i=i):
                x, y = args[0].float(), output.float()
                cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
                found.setdefault(i, []).append((1 - cos).flatten())
            hooks.append(block.register_forward_hook(on_block))
        elif method == "ffn":
            def on_down(module, args, i=i):
                found.setdefault(i, []).append(args[0].float().abs().reshape(-1, args[0].shape[-1]).mean(0))
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(on_down))
        else:
            def on_o(module, args, i=i):
                heads = args[0].float().reshape(-1, cfg.num_heads, cfg.head_dim).abs().mean(dim=(0, 2))
                found.setdefault(i, []).append(heads)
            hooks.append(block.self_attn.o_proj.register_forward_pre_hook(on_o))
    try:
        for ids in windows:
            tokens = torch.tensor([ids], device=model.device)
            model(model.embed(tokens), torch.arange(len(ids), device=model.device)[None])
    finally:
        for h in hooks:
            h.remove()
    if method == "layers":
        return [float(torch.cat(found[i]).mean()) for i in range(cfg.num_layers)]
    scores = []
    for i, block in enumerate(model.layers):
        activity = torch.stack(found[i]).mean(0)
        if method == "ffn":
            scores.append((activity * block.mlp.down_proj.weight.float().norm(dim=0)).tolist())
        else:
            columns = block.self_attn.o_proj.weight.float().view(cfg.hidden_size, cfg.num_heads, cfg.head_dim)
            per_head = activity * columns.norm(dim=(0, 2))
            scores.append(per_head.view(cfg.num_kv_heads, -1).sum(1).tolist())  # per KV group
    return scores


def prune(
    model: LlamaModel,
    method: str,
    amount: float,
    windows: list[list[int]] | None = None,
    criterion: str = "measured",
    seed: int = 0,
) -> tuple[LlamaModel, dict]:
    """-> (the smaller model, what was removed). `amount` is the fraction of layers, FFN channels or
    KV groups to remove."""
    cfg = model.config
    if method not in METHODS:
        raise MemlmError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < amount < 1:
        raise MemlmError(f"the amount to prune is a fraction in (0, 1), got {amount}")
    if criterion not in ("measured", "random"):
        raise MemlmError(f"criterion is measured or random, not {criterion!r}")
    if method == "ffn" and cfg.num_experts:
        raise MemlmError("ffn pruning is for dense FFNs; this model has mixture-of-experts blocks")
    units = {"layers": cfg.num_layers, "ffn": cfg.intermediate_size, "heads": cfg.num_kv_heads}[method]
    remove = round(amount * units)
    if not 0 < remove < units:
        raise MemlmError(f"pruning {amount:.0%} of {units} {method} removes {remove}: nothing, or everything")
    rng = random.Random(seed)
    if criterion == "measured":
        if not windows:
            raise MemlmError("measured pruning needs calibration text")
        scores = importance(model, method, windows)
    elif method == "layers":
        scores = [rng.random() for _ in range(units)]
    else:
        scores = [[rng.random() for _ in range(units)] for _ in range(cfg.num_layers)]
    state = {k: v.clone() for k, v in unfuse_state_dict(model).items()}  # the pruned model owns its tensors
    if method == "layers":
        keep = sorted(sorted(range(units), key=lambda i: -scores[i])[: units - remove])
        state, new_cfg = _drop_layers(state, cfg, keep)
        removed = {"layers": [i for i in range(units) if i not in keep]}
    else:
        keep = [sorted(sorted(range(units), key=lambda j: -row[j])[: units - remove]) for row in scores]
        state, new_cfg = (_drop_channels if method == "ffn" else _drop_groups)(state, cfg, keep)
        removed = {method: [[j for j in range(units) if j not in row] for row in keep]}
    pruned = build_model(new_cfg, state, model.dtype)
    return pruned, {"method": method, "amount": amount, "criterion": criterion, **removed,
                    "scores": scores if criterion == "measured" else None}


def _drop_layers(state: dict, cfg, keep: list[int]):
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(keep):
        prefix = f"model.layers.{old}."
        out.update({f"model.layers.{new}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
    moe_layers = tuple(new for new, old in enumerate(keep) if old in cfg.moe_layers)
    return out, replace(cfg, num_layers=len(keep), moe_layers=moe_layers)


def _drop_channels(state: dict, cfg, keep: list[list[int]]):
    out = dict(state)
    for i, channels in enumerate(keep):
        index = torch.tensor(channels)
        mlp = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            out[mlp + f"{name}.weight"] = state[mlp + f"{name}.weight"][index]
            if cfg.mlp_bias:
                out[mlp + f"{name}.bias"] = state[mlp + f"{name}.bias"][index]
        out[mlp + "down_proj.weight"] = state[mlp + "down_proj.weight"][:, index]
    return out, replace(cfg, intermediate_size=len(keep[0]))


def _drop_groups(state: dict, cfg, keep: list[list[int]]):
    out = dict(state)
    group = cfg.num_heads // cfg.num_kv_heads
    d = cfg.head_dim
    for i, groups in enumerate(keep):
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in groups])
        q_rows = torch.cat([torch.arange(g * group * d, (g + 1) * group * d) for g in groups])
        attn = f"model.layers.{i}.self_attn."
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[attn + f"{name}.weight"] = state[attn + f"{name}.weight"][rows]
            if cfg.qkv_bias:
                out[attn + f"{name}.bias"] = state[attn + f"{name}.bias"][rows]
        out[attn + "o_proj.weight"] = state[attn + "o_proj.weight"][:, q_rows]
    kv = len(keep[0])
    return out, replace(cfg, num_heads=kv * group, num_kv_heads=kv)
