"""Model configuration: one dataclass for every Llama-family decoder memlm runs.

Hugging Face `config.json` files come in two dialects: transformers 4 keeps `rope_theta` and
`rope_scaling` at the top level, transformers 5 folds both into `rope_parameters`. Both are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memlm.errors import ModelFormatError

# model_type -> how its attention projections are shaped
_ARCHES = {
    "llama": dict(qkv_bias=None, o_bias=None, qk_norm=False),  # None: follows config.attention_bias
    "qwen2": dict(qkv_bias=True, o_bias=False, qk_norm=False),
    "qwen3": dict(qkv_bias=None, o_bias=None, qk_norm=True),
    # Mixture-of-experts families: the same attention, an MoE FFN block (memlm/models/moe.py).
    "mixtral": dict(qkv_bias=False, o_bias=False, qk_norm=False),
    "qwen2_moe": dict(qkv_bias="qkv_bias", o_bias=False, qk_norm=False),  # a str: that config field, default True
    "qwen3_moe": dict(qkv_bias=None, o_bias=None, qk_norm=True),
}
_ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Mixture of experts (0 experts: a dense model). `moe_layers` lists the layers with an MoE block.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen2-MoE has one, with a sigmoid gate)
    norm_topk_prob: bool = False  # renormalise the chosen experts' weights to sum to 1
    moe_layers: tuple[int, ...] = ()

    def kv_bytes_per_token(self, element_size: int = 4) -> int:
        """Bytes of keys + values one token occupies across all layers (fp32 by default)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in _ARCHES:
            raise ModelFormatError(f"unsupported model_type {model_type!r}; memlm runs {', '.join(sorted(_ARCHES))}")
        if d.get("use_sliding_window"):
            raise ModelFormatError("sliding-window attention configs are not supported yet")
        shape = _ARCHES[model_type]
        attention_bias = bool(d.get("attention_bias", False))
        if isinstance(shape["qkv_bias"], str):
            shape = {**shape, "qkv_bias": bool(d.get(shape["qkv_bias"], True))}
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = _rope_from_hf(d)
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                arch=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope.pop("rope_theta"),
                rope_scaling=rope or None,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=attention_bias if shape["qkv_bias"] is None else shape["qkv_bias"],
                o_bias=attention_bias if shape["o_bias"] is None else shape["o_bias"],
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=shape["qk_norm"],
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                **_moe_from_hf(model_type, d),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"config.json is missing or has a bad field: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers-compatible config.json for this model (used when caching conversions)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        d = {
            "architectures": [_ARCH_CLASSES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        if self.arch == "qwen2_moe":
            d["qkv_bias"] = self.qkv_bias
        if self.arch == "mixtral":
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.experts_per_token)
            d["intermediate_size"] = self.expert_intermediate_size
        elif self.num_experts:
            d.update(
                num_experts=self.num_experts,
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.experts_per_token,
                moe_intermediate_size=self.expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(self.num_layers) if i not in self.moe_layers],
            )
            if self.shared_expert_intermediate_size:
                d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return d

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def _moe_from_hf(model_type: str, d: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config (empty for dense families)."""
    layers = int(d["num_hidden_layers"])
    if model_type == "mixtral":  # every layer sparse; the top-k weights are always renormalised
        return dict(
            num_experts=int(d["num_local_experts"]),
            experts_per_token=int(d["num_experts_per_tok"]),
            expert_intermediate_size=int(d["intermediate_size"]),
            norm_topk_prob=True,
            moe_layers=tuple(range(layers)),
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; older files say num_experts
        experts = int(d["num_experts"] if "num_experts" in d else d["num_local_experts"])
        step = int(d.get("decoder_sparse_step", 1))
        dense = set(d.get("mlp_only_layers") or [])
        sparse = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        return dict(
            num_experts=experts,
            experts_per_token=int(d["num_experts_per_tok"]),
            expert_intermediate_size=int(d["moe_intermediate_size"]),
            shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
            if model_type == "qwen2_moe"
            else 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            moe_layers=sparse,
        )
    return {}


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """Normalise both config dialects to {"rope_theta": θ, "rope_type": ..., <scaling params>}."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return {"rope_theta": float(theta)}
    return {"rope_theta": float(theta), "rope_type": rope_type, **params}
