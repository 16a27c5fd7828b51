"""Model configuration: one dataclass for every Llama-family decoder memlm runs.

Hugging Face `config.json` files come in two dialects: transformers 4 keeps `rope_theta` and
`rope_scaling` at the top level, transformers 5 folds both into `rope_parameters` (per layer type
for Gemma 3). Both are read.

Gemma 3 and Phi-3 are the Llama decoder with switches: Gemma's sliding-window layers with their own
RoPE base, norms on the attention and MLP outputs ("sandwich"), a gelu-tanh MLP, scaled token
embeddings, its own attention scale and an optional final-logit soft-cap; Phi's fused projections
(the same layout as memlm's) and RoPE on part of each head. Gemma's RMSNorm multiplies by
(1 + weight): memlm keeps that sum as the norm's weight (`norm_offset` says what to add on reading
a checkpoint and subtract on writing one), as llama.cpp's GGUF files do, so one RMSNorm serves all.
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
    "gemma3_text": dict(qkv_bias=None, o_bias=None, qk_norm=True),
    "phi3": dict(qkv_bias=False, o_bias=False, qk_norm=False),
}
_ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer type names
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


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
    # Gemma 3 / Phi-3 switches (the defaults are Llama's).
    hidden_act: str = "silu"  # the gated MLP's activation: silu or gelu_tanh
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # scores scale by its -1/2 power (None: head_dim's)
    sandwich_norms: bool = False  # RMSNorms on the attention and MLP outputs too, before the residual
    sliding_window: int | None = None  # a sliding layer's query sees keys at positions > its own - this
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer; () with a window: every layer slides
    local_rope_theta: float | None = None  # sliding layers' RoPE base, unscaled (Gemma 3); None: as global
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    partial_rotary_factor: float = 1.0  # RoPE on the first fraction of each head (Phi-4-mini: 0.75)

    @property
    def norm_offset(self) -> float:
        """Added to every RMSNorm weight of a checkpoint on reading (Gemma's (1 + weight) norms)."""
        return 1.0 if self.arch == "gemma3_text" else 0.0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether this layer attends only to the last `sliding_window` positions."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == SLIDING

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
        if d.get("use_bidirectional_attention"):
            raise ModelFormatError("bidirectional (embedding) Gemma configs are not decoders; memlm runs causal ones")
        shape = _ARCHES[model_type]
        attention_bias = bool(d.get("attention_bias", False))
        if isinstance(shape["qkv_bias"], str):
            shape = {**shape, "qkv_bias": bool(d.get(shape["qkv_bias"], True))}
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = _rope_from_hf(d, model_type)
            switches = _gemma_phi_from_hf(model_type, d, hidden, rope)  # takes Gemma's local θ, Phi's factor
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
                **switches,
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
            "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(self.hidden_act, self.hidden_act),
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
        if self.arch == "phi3":
            rope["partial_rotary_factor"] = self.partial_rotary_factor
            # pad_token_id: memlm keeps none, and Phi3Config's default (32000) is outside small vocabularies
            d.update(
                partial_rotary_factor=self.partial_rotary_factor, sliding_window=self.sliding_window, pad_token_id=None
            )
            if "original_max_position_embeddings" in rope:
                d["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        if self.arch == "gemma3_text":
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta}
            d.update(
                hidden_activation="gelu_pytorch_tanh",
                rope_parameters={FULL: rope, SLIDING: local},
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types),
                final_logit_softcapping=self.final_logit_softcapping,
            )
            del d["rope_theta"]
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


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x  # transformers' strict configs want an int


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


def _rope_from_hf(d: dict[str, Any], model_type: str = "llama") -> dict[str, Any]:
    """Normalise both config dialects to {"rope_theta": θ, "rope_type": ..., <scaling params>}.

    Gemma 3's per-layer-type parameters give the global layers' RoPE, plus "local_rope_theta"."""
    params = dict(d.get("rope_parameters") or {})
    local = None
    if model_type == "gemma3_text":
        if FULL in params or SLIDING in params:  # transformers 5: one dict per layer type
            local = (params.get(SLIDING) or {}).get("rope_theta")
            params = dict(params.get(FULL) or {})
        local = float(local or d.get("rope_local_base_freq") or 10000.0)
        params.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    legacy = d.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    # Phi-3 keeps these beside the RoPE parameters in transformers 5; they are not a scaling.
    params.pop("partial_rotary_factor", None)
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "su":  # Phi-3's first name for longrope
        rope_type = "longrope"
    if rope_type == "longrope":
        params.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    out = {"rope_theta": float(theta)}
    if rope_type != "default":
        out.update(rope_type=rope_type, **params)
    if local is not None:
        out["local_rope_theta"] = local
    return out


def _gemma_phi_from_hf(model_type: str, d: dict[str, Any], hidden: int, rope: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 3 / Phi-3 switches of a config (empty for the other families). Pops Gemma's local
    RoPE base out of `rope`, leaving the global layers' RoPE."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise ModelFormatError(f"unsupported activation {act!r} (memlm runs {', '.join(sorted(_ACTIVATIONS))})")
    out: dict[str, Any] = {"hidden_act": _ACTIVATIONS[act]}
    if model_type == "phi3":
        params = d.get("rope_parameters") or {}
        out["partial_rotary_factor"] = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
        if d.get("sliding_window"):
            out["sliding_window"] = int(d["sliding_window"])
    elif model_type == "gemma3_text":
        # transformers ignores attn_logit_softcapping for Gemma 3 (its attention never passes it on),
        # and llama.cpp's converter asserts it is unset: memlm follows both.
        window = d.get("sliding_window")
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        layers = int(d["num_hidden_layers"])
        types = d.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        cap = d.get("final_logit_softcapping")
        out.update(
            embed_scale=float(hidden**0.5),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
            sandwich_norms=True,
            sliding_window=int(window) if window else None,
            layer_types=tuple(types),
            local_rope_theta=rope.pop("local_rope_theta"),
            final_logit_softcapping=float(cap) if cap else None,
        )
    return out
