"""The Llama-family decoder (Llama, SmolLM, Qwen2, Qwen3) in plain PyTorch.

Contract used by every memory system: `embed(ids)`, `forward(embeds, positions, cache) -> hidden`
(final-norm hidden states), `logits(hidden)`. Taking embeddings rather than ids is what lets latent
memory insert vectors that are not tokens.

Decode speed on CPU is dominated by weight reads and per-op Python overhead, so the projections
are fused: one QKV matmul and one gate/up matmul per layer, and RoPE tables are computed once per
forward and shared by all layers.

A right-padded chunk (ragged prompts, or one row inserting 8 latents while the others feed one
token) runs packed: the projections and MLPs, most of the compute, see only the real tokens, and
only attention works on the padded [B, T] layout, so padding costs no matmul work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlm.cache.blocks import BlockPool
from memlm.cache.kv_cache import KVCache
from memlm.models.config import ModelConfig
from memlm.models.layers import GatedMLP, RMSNorm
from memlm.models.moe import MoEBlock
from memlm.models.rope import apply_rope, rope_cos_sin, rope_frequencies


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, packing: Packing | None = None) -> torch.Tensor:
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        if packing is not None:
            qkv = packing.unpack(qkv)
        batch, chunk, _ = qkv.shape
        # Queries and keys are rotated together: one RoPE application per layer, not two.
        qk = qkv[..., : self.split[0] + self.split[1]].view(batch, chunk, heads + kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :heads]), self.k_norm(qk[:, :, heads:])), dim=2)
        q, k = apply_rope(qk.transpose(1, 2), cos, sin).split((heads, kv_heads), dim=1)
        v = qkv[..., self.split[0] + self.split[1] :].view(batch, chunk, kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            q = cache.prepare_queries(q)
            k, v = cache.update(self.layer_idx, k, v)
            if cache.query_observer is not None:  # a press reads the prompt's queries
                cache.observe_queries(self.layer_idx, qk[:, :, :heads], q)
        if cache is not None and cache.track_attention:  # an eviction policy needs the weights
            out, weights = attention_with_weights(q, k, v, mask)
            cache.observe_attention(self.layer_idx, weights)
        elif packing is not None and packing.decoding_rows:
            # Requests joining mid-batch: the first rows feed one token each, the rest whole prompts.
            # Attend the one-token rows with their single query instead of a padded chunk of them.
            r, gqa = packing.decoding_rows, heads != kv_heads
            out = q.new_zeros(q.shape)
            out[:r, :, :1] = F.scaled_dot_product_attention(
                q[:r, :, :1], k[:r], v[:r], attn_mask=mask[:r, :, :1], enable_gqa=gqa
            )
            out[r:] = F.scaled_dot_product_attention(q[r:], k[r:], v[r:], attn_mask=mask[r:], enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
        out = out.transpose(1, 2).reshape(batch, chunk, -1)
        return self.o_proj(packing.pack(out) if packing is not None else out)


class Packing:
    """The real (non-padding) tokens of a [B, T] chunk, for running token-wise layers on them alone."""

    def __init__(self, real: torch.Tensor):
        self.index = real.flatten().nonzero().squeeze(1)  # real: [B, T] bool
        self.shape = tuple(real.shape)
        # How many leading rows hold exactly one token while later rows hold more (0: not that shape).
        counts = real.sum(1).tolist()
        leading = next((i for i, n in enumerate(counts) if n != 1), len(counts))
        self.decoding_rows = leading if 0 < leading < len(counts) and real.shape[1] > 1 else 0

    @staticmethod
    def worthwhile(positions: torch.Tensor) -> bool:
        """Pack when at least a quarter of the chunk is padding: below that, gathers cost more than they save."""
        padding = int((positions < 0).sum())
        return padding * 4 >= positions.numel() and padding < positions.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at padding"""
        out = x.new_zeros((self.shape[0] * self.shape[1], *x.shape[1:]))
        return out.index_copy(0, self.index, x).unflatten(0, self.shape)


def attention_with_weights(q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns its weights [B, H, T, S] (SDPA does not expose them)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoEBlock.from_config(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, cos, sin, mask, cache, packing: Packing | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, packing)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.attention_scaling = rope_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    supports_eviction = True  # its state is a KV cache: eviction policies apply
    # With quantized weights and the native kernels: runs decode steps and short chunks in one call.
    native_decoder = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def new_state(
        self,
        batch: int,
        capacity: int,
        track_attention=False,
        track_importance=False,
        pool: BlockPool | None = None,
        kv_type: str | None = None,
        rotate_keys: bool = False,
    ) -> KVCache:
        """The per-batch generation state of this family: a KV cache, paged on the engine's block pool,
        or contiguous (in `kv_type`, the model's dtype by default)."""
        cache = KVCache.for_model(
            self.config, batch, capacity, self.dtype, self.device, track_attention, track_importance, pool,
            kv_type, rotate_keys,
        )  # fmt: skip
        cache.rope = self.rope_at
        return cache

    def rope_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, head_dim] rotated at positions [N] as this model's queries and keys are."""
        cos, sin = rope_cos_sin(positions[None].to(x.device), self.inv_freq, self.attention_scaling, x.dtype)
        return apply_rope(x[None, None], cos, sin)[0, 0]

    def new_pool(self, **options) -> BlockPool:
        """The engine's KV block pool for this model (memlm.cache.blocks)."""
        return BlockPool.for_model(self.config, device=self.device, **options)

    def forward_tokens(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids in, hidden states out: the engine's entry point shared with other families."""
        return self(self.embed(ids), positions, cache)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """Run [B, T, d] embeddings at positions [B, T] (negative = right padding) -> hidden [B, T, d].

        With a cache, the chunk is appended to each row's history; without one, the chunk is a
        whole sequence attended causally, or as `mask` [B, 1, T, T] (True = may attend) says.
        `depth` runs only the first layers (a truncated weaver); the final norm still applies.
        """
        layers = self.layers if depth is None else self.layers[:depth]
        native = self.native_decoder
        if (
            native is not None
            and cache is not None
            and mask is None
            and len(layers) == len(self.layers)
            and native.accepts(self, embeds, positions, cache)
        ):
            return self.norm(native.step(self, embeds, positions, cache))
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.attention_scaling, embeds.dtype)
        if mask is not None:
            if cache is not None:
                raise ValueError("an explicit mask is for cache-less forwards")
        elif cache is None:
            chunk = positions.shape[1]
            causal = torch.ones(chunk, chunk, dtype=torch.bool, device=embeds.device).tril()
            mask = (causal[None] & (positions >= 0)[:, None, :])[:, None]
        else:
            mask = cache.begin(positions)
        packing = Packing(positions >= 0) if Packing.worthwhile(positions) else None
        x = packing.pack(embeds) if packing is not None else embeds
        for layer in layers:
            x = layer(x, cos, sin, mask, cache, packing)
        if cache is not None:
            cache.end()
        x = self.norm(x)
        return packing.unpack(x) if packing is not None else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
