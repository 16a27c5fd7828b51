"""Map Hugging Face parameter names onto memlm's fused layout, and build a model from them."""

from __future__ import annotations

import contextlib

import torch

from memlm.errors import ModelFormatError
from memlm.models.config import ModelConfig
from memlm.models.llama import LlamaModel


def fuse_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names (q_proj/k_proj/v_proj, gate_proj/up_proj, model.* prefix) -> memlm's fused names."""
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return hf.pop(name)
        except KeyError:
            raise ModelFormatError(f"weights are missing tensor {name!r}") from None

    hf = dict(hf)
    out["embed_tokens.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if cfg.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "self_attn.qkv_proj.weight"] = torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"], dim=0)
        if cfg.qkv_bias:
            out[dst + "self_attn.qkv_proj.bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
        out[dst + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        if cfg.o_bias:
            out[dst + "self_attn.o_proj.bias"] = take(attn + "o_proj.bias")
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = take(attn + "q_norm.weight")
            out[dst + "self_attn.k_norm.weight"] = take(attn + "k_norm.weight")
        mlp = src + "mlp."
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")], dim=0
        )
        if cfg.mlp_bias:
            out[dst + "mlp.gate_up_proj.bias"] = torch.cat([take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")])
            out[dst + "mlp.down_proj.bias"] = take(mlp + "down_proj.bias")
        out[dst + "mlp.down_proj.weight"] = take(mlp + "down_proj.weight")
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
    leftovers = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ModelFormatError(f"weights have {len(leftovers)} unexpected tensors, e.g. {leftovers[0]!r}")
    return out


def unfuse_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """memlm's fused names -> Hugging Face names: the inverse of `fuse_hf_state_dict`."""
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = state[src + f"self_attn.qkv_proj.{suffix}"].split((q_size, kv_size, kv_size))
            for p, tensor in zip("qkv", parts, strict=True):
                out[dst + f"self_attn.{p}_proj.{suffix}"] = tensor
        for suffix in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            gate, up = state[src + f"mlp.gate_up_proj.{suffix}"].chunk(2)
            out[dst + f"mlp.gate_proj.{suffix}"], out[dst + f"mlp.up_proj.{suffix}"] = gate, up
        names = ["self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"]
        names += ["post_attention_layernorm.weight"]
        names += ["self_attn.o_proj.bias"] if cfg.o_bias else []
        names += ["mlp.down_proj.bias"] if cfg.mlp_bias else []
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if cfg.qk_norm else []
        for name in names:
            out[dst + name] = state[src + name]
    return out


def build_model(cfg: ModelConfig, hf_state_dict: dict[str, torch.Tensor], dtype=torch.float32) -> LlamaModel:
    fused = fuse_hf_state_dict(hf_state_dict, cfg)
    with _skip_init():
        model = LlamaModel(cfg)
    for name, tensor in fused.items():
        expected = _param_shape(model, name)
        if tuple(tensor.shape) != expected:
            raise ModelFormatError(f"tensor {name} has shape {tuple(tensor.shape)}, config implies {expected}")
    result = model.load_state_dict({k: v.to(dtype) for k, v in fused.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ModelFormatError(f"weights are missing {len(missing)} tensors, e.g. {missing[0]!r}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _skip_init():
    """Build modules without random initialisation: every parameter is overwritten by a checkpoint.

    (The meta device would do too, but its first use imports sympy and dynamo: two seconds.)
    """
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _param_shape(model: LlamaModel, name: str) -> tuple[int, ...]:
    try:
        return tuple(model.get_parameter(name).shape)
    except AttributeError:
        raise ModelFormatError(f"unexpected tensor {name!r} for this architecture") from None
