"""Map Hugging Face parameter names onto memlm's fused layout, and build a model from them."""

from __future__ import annotations

import contextlib

import torch

from memlm.errors import ModelFormatError
from memlm.models.config import ModelConfig
from memlm.models.llama import LlamaModel
from memlm.quant.qlinear import install_quantized, tie_quantized_head
from memlm.quant.qweight import QWeight


def _cat_rows(parts: list) -> torch.Tensor | QWeight:
    """Stack matrices' rows (fusing q/k/v or gate/up). Quantized ones keep their blocks as they are,
    in one format or, when a GGUF file stores q, k and v differently (Q4_K_M's Q6_K v beside Q4_K
    q and k), as a mixed matrix whose parts keep theirs. Quantized beside float becomes fp32."""
    quantized = [isinstance(p, QWeight) for p in parts]
    if all(quantized):
        return QWeight.cat(parts)
    return torch.cat([p.dequantize() if q else p for p, q in zip(parts, quantized, strict=True)], dim=0)


def fuse_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, consume: bool = False) -> dict[str, torch.Tensor]:
    """HF names (q_proj/k_proj/v_proj, gate_proj/up_proj, model.* prefix) -> memlm's fused names.
    With `consume`, tensors are popped from `hf` itself as they are used, so a fused matrix never
    sits beside the parts it was made of (a load's peak memory); otherwise `hf` is left as it was."""
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return hf.pop(name)
        except KeyError:
            raise ModelFormatError(f"weights are missing tensor {name!r}") from None

    def norm(name: str) -> torch.Tensor:  # Gemma's (1 + weight) norms are kept summed (models/config.py)
        w = take(name)
        return w.float() + cfg.norm_offset if cfg.norm_offset else w

    if not consume:
        hf = dict(hf)
    out["embed_tokens.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = norm("model.norm.weight")
    if cfg.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        if attn + "qkv_proj.weight" in hf:  # Phi-3 ships them fused, in memlm's order
            out[dst + "self_attn.qkv_proj.weight"] = take(attn + "qkv_proj.weight")
        else:
            out[dst + "self_attn.qkv_proj.weight"] = _cat_rows([take(attn + f"{p}_proj.weight") for p in "qkv"])
        if cfg.qkv_bias:
            out[dst + "self_attn.qkv_proj.bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
        out[dst + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        if cfg.o_bias:
            out[dst + "self_attn.o_proj.bias"] = take(attn + "o_proj.bias")
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = norm(attn + "q_norm.weight")
            out[dst + "self_attn.k_norm.weight"] = norm(attn + "k_norm.weight")
        mlp = src + "mlp."
        out[dst + "input_layernorm.weight"] = norm(src + "input_layernorm.weight")
        for theirs, ours in _norm_names(cfg):
            out[dst + ours] = norm(src + theirs)
        if cfg.is_moe_layer(i):
            out.update(_fuse_moe(hf, take, src, dst, cfg))
            continue
        if mlp + "gate_up_proj.weight" in hf:  # Phi-3 again
            out[dst + "mlp.gate_up_proj.weight"] = take(mlp + "gate_up_proj.weight")
        else:
            out[dst + "mlp.gate_up_proj.weight"] = _cat_rows(
                [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]
            )
        if cfg.mlp_bias:
            out[dst + "mlp.gate_up_proj.bias"] = torch.cat([take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")])
            out[dst + "mlp.down_proj.bias"] = take(mlp + "down_proj.bias")
        out[dst + "mlp.down_proj.weight"] = take(mlp + "down_proj.weight")
    leftovers = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ModelFormatError(f"weights have {len(leftovers)} unexpected tensors, e.g. {leftovers[0]!r}")
    return out


def _norm_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Hugging Face, memlm) names of a layer's norms after the input norm. Gemma's post_attention_
    layernorm is on the attention's output; memlm's name of that kind is Llama's pre-MLP norm."""
    if cfg.sandwich_norms:
        return [
            ("post_attention_layernorm.weight", "attn_output_norm.weight"),
            ("pre_feedforward_layernorm.weight", "post_attention_layernorm.weight"),
            ("post_feedforward_layernorm.weight", "mlp_output_norm.weight"),
        ]
    return [("post_attention_layernorm.weight", "post_attention_layernorm.weight")]


def _fuse_moe(hf: dict, take, src: str, dst: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One MoE layer: the router, the experts (transformers 5's fused [E, 2I, H] / [E, H, I] tensors, or
    the per-expert tensors of checkpoints on disk: Mixtral's w1/w3/w2, Qwen's gate/up/down_proj), and
    Qwen2-MoE's shared expert with its gate."""
    out = {}
    block = src + ("block_sparse_moe." if src + "block_sparse_moe.gate.weight" in hf else "mlp.")
    out[dst + "mlp.gate.weight"] = take(block + "gate.weight")
    if block + "experts.gate_up_proj" in hf:
        out[dst + "mlp.experts_gate_up"] = take(block + "experts.gate_up_proj")
        out[dst + "mlp.experts_down"] = take(block + "experts.down_proj")
    else:
        names = ("w1", "w3", "w2") if cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        gate_up, down = [], []
        for e in range(cfg.num_experts):
            expert = f"{block}experts.{e}."
            gate_up.append(torch.cat([take(expert + f"{names[0]}.weight"), take(expert + f"{names[1]}.weight")]))
            down.append(take(expert + f"{names[2]}.weight"))
        out[dst + "mlp.experts_gate_up"], out[dst + "mlp.experts_down"] = torch.stack(gate_up), torch.stack(down)
    if cfg.shared_expert_intermediate_size:
        shared = block + "shared_expert."
        out[dst + "mlp.shared.gate_up_proj.weight"] = torch.cat(
            [take(shared + "gate_proj.weight"), take(shared + "up_proj.weight")]
        )
        out[dst + "mlp.shared.down_proj.weight"] = take(shared + "down_proj.weight")
        out[dst + "mlp.shared_gate.weight"] = take(block + "shared_expert_gate.weight")
    return out


def _unfuse_moe(state: dict, src: str, dst: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `_fuse_moe`, in the per-expert layout checkpoints on disk use."""
    block = dst + ("block_sparse_moe." if cfg.arch == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out = {block + "gate.weight": state[src + "mlp.gate.weight"]}
    gate_up, down = state[src + "mlp.experts_gate_up"], state[src + "mlp.experts_down"]
    for e in range(cfg.num_experts):
        gate, up = gate_up[e].chunk(2)
        expert = f"{block}experts.{e}."
        out[expert + f"{names[0]}.weight"], out[expert + f"{names[1]}.weight"] = gate, up
        out[expert + f"{names[2]}.weight"] = down[e]
    if cfg.shared_expert_intermediate_size:
        gate, up = state[src + "mlp.shared.gate_up_proj.weight"].chunk(2)
        out[block + "shared_expert.gate_proj.weight"], out[block + "shared_expert.up_proj.weight"] = gate, up
        out[block + "shared_expert.down_proj.weight"] = state[src + "mlp.shared.down_proj.weight"]
        out[block + "shared_expert_gate.weight"] = state[src + "mlp.shared_gate.weight"]
    return out


def unfuse_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """memlm's fused names -> Hugging Face names: the inverse of `fuse_hf_state_dict`."""
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.norm_offset:  # back to the checkpoint's convention (Gemma: weight, not 1 + weight)
        state = {k: v - cfg.norm_offset if k.endswith("norm.weight") else v for k, v in state.items()}
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    fused = cfg.arch == "phi3"  # its checkpoints keep qkv and gate/up fused, as memlm does
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        if fused:
            for name in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"):
                out[dst + name] = state[src + name]
        for suffix in () if fused else ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = state[src + f"self_attn.qkv_proj.{suffix}"].split((q_size, kv_size, kv_size))
            for p, tensor in zip("qkv", parts, strict=True):
                out[dst + f"self_attn.{p}_proj.{suffix}"] = tensor
        moe = cfg.is_moe_layer(i)
        if moe:
            out.update(_unfuse_moe(state, src, dst, cfg))
        for suffix in () if moe or fused else ("weight", "bias") if cfg.mlp_bias else ("weight",):
            gate, up = state[src + f"mlp.gate_up_proj.{suffix}"].chunk(2)
            out[dst + f"mlp.gate_proj.{suffix}"], out[dst + f"mlp.up_proj.{suffix}"] = gate, up
        names = ["self_attn.o_proj.weight", "input_layernorm.weight"]
        names += [] if moe else ["mlp.down_proj.weight"]
        for theirs, ours in _norm_names(cfg):
            out[dst + theirs] = state[src + ours]
        names += ["self_attn.o_proj.bias"] if cfg.o_bias else []
        names += ["mlp.down_proj.bias"] if cfg.mlp_bias and not moe else []
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if cfg.qk_norm else []
        for name in names:
            out[dst + name] = state[src + name]
    return out


def build_model(cfg: ModelConfig, hf_state_dict: dict, dtype=torch.float32, consume: bool = False) -> LlamaModel:
    """A model from HF-named weights: fp32 tensors, or `QWeight`s that become quantized layers.
    `consume`: empty `hf_state_dict` as it goes (see fuse_hf_state_dict)."""
    fused = fuse_hf_state_dict(hf_state_dict, cfg, consume)
    quantized = {k: fused.pop(k) for k in list(fused) if isinstance(fused[k], QWeight)}
    with _skip_init():
        model = LlamaModel(cfg)
    for name, tensor in (fused | quantized).items():
        expected = _param_shape(model, name)
        if tuple(tensor.shape) != expected:
            raise ModelFormatError(f"tensor {name} has shape {tuple(tensor.shape)}, config implies {expected}")
    result = model.load_state_dict({k: v.to(dtype) for k, v in fused.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in quantized]
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ModelFormatError(f"weights are missing {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, weight in quantized.items():
        install_quantized(model, name, weight)
    if cfg.tie_word_embeddings:
        if "embed_tokens.weight" in quantized:
            tie_quantized_head(model, tied=True)
        else:
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
