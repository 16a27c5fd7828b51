"""The Llama-family decoder (Llama, SmolLM, Qwen2, Qwen3, Gemma 3, Phi-3) in plain PyTorch.

Contract used by every memory system: `embed(ids)`, `forward(embeds, positions, cache) -> hidden`
(final-norm hidden states), `logits(hidden)`. Taking embeddings rather than ids is what lets latent
memory insert vectors that are not tokens.

Decode speed on CPU is dominated by weight reads and per-op Python overhead, so the projections
are fused: one QKV matmul and one gate/up matmul per layer, and RoPE tables are computed once per
forward and shared by all layers.

A right-padded chunk (ragged prompts, or one row inserting 8 latents while the others feed one
token) runs packed: the projections and MLPs, most of the compute, see only the real tokens, and
only attention works on the padded [B, T] layout, so padding costs no matmul work.

Sliding-window layers (Gemma 3's five in six, Phi-3's all) share the one KV cache with the global
layers and mask it to their window: a key is visible when its position is within `sliding_window`
of the query's. Masking by stored position rather than by slot keeps it right after eviction
(slots then skip positions). The cache therefore holds every token the global layers need; an
eviction budget bounds it for all layers alike (docs/architecture.md, "Sliding windows").
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from memlm.adapters.lora import lora_for_tokens
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
        self.sliding = cfg.is_sliding(layer_idx)  # picks the model's local RoPE tables and window mask
        # Gemma scales scores by query_pre_attn_scalar^-1/2; None is SDPA's default, head_dim^-1/2.
        self.scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None

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
        in_place = None
        if cache is not None:
            q = cache.prepare_queries(q)
            if not self.sliding and getattr(cache, "attends_in_place", False):  # short chunks, read in place
                in_place = cache.attend_in_place(self.layer_idx, q, k, v, self.scale or self.head_dim**-0.5)
            if in_place is None:
                k, v = cache.update(self.layer_idx, k, v)
            if cache.query_observer is not None:  # a press reads the prompt's queries
                cache.observe_queries(self.layer_idx, qk[:, :, :heads], q)
        if in_place is not None:
            out, weights = in_place
            if weights is not None:
                cache.observe_attention(self.layer_idx, weights)
        elif cache is not None and cache.track_attention:  # an eviction policy needs the weights
            out, weights = attention_with_weights(q, k, v, mask, self.scale)
            cache.observe_attention(self.layer_idx, weights)
        elif packing is not None and packing.decoding_rows:
            # Requests joining mid-batch: the first rows feed one token each, the rest whole prompts.
            # Attend the one-token rows with their single query instead of a padded chunk of them.
            r, gqa = packing.decoding_rows, heads != kv_heads
            out = q.new_zeros(q.shape)
            out[:r, :, :1] = F.scaled_dot_product_attention(
                q[:r, :, :1], k[:r], v[:r], attn_mask=mask[:r, :, :1], enable_gqa=gqa, scale=self.scale
            )
            out[r:] = F.scaled_dot_product_attention(
                q[r:], k[r:], v[r:], attn_mask=mask[r:], enable_gqa=gqa, scale=self.scale
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads, scale=self.scale
            )
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


def attention_with_weights(q, k, v, mask, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns its weights [B, H, T, S] (SDPA does not expose them)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        # The norm before the MLP (Llama's name for it; Gemma calls it pre_feedforward_layernorm).
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Gemma's "sandwich": norms on the attention's and the MLP's outputs, before each residual.
        self.attn_output_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norms else None
        self.mlp_output_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norms else None
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoEBlock.from_config(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.hidden_act)

    def forward(self, x, cos, sin, mask, cache, packing: Packing | None = None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, packing)
        if self.attn_output_norm is not None:
            attended = self.attn_output_norm(attended)
        x = x + attended
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp_output_norm(mlp) if self.mlp_output_norm is not None else mlp)


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
            cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Sliding layers' own RoPE base (Gemma 3: 10k beside the global layers' 1M), unscaled.
        local = cfg.local_rope_theta
        local_freq = rope_frequencies(cfg.rotary_dim, local, None, cfg.max_position_embeddings)[0] if local else None
        self.register_buffer("local_inv_freq", local_freq, persistent=False)
        self.register_buffer("embed_scale", torch.tensor(cfg.embed_scale), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    supports_eviction = True  # its state is a KV cache: eviction policies apply
    # With quantized weights and the native kernels: runs decode steps and short chunks in one call.
    native_decoder = None
    # Per-request LoRA adapters (memlm.adapters.bank.AdapterBank): each row's from the state.
    adapter_bank = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.embed_scale != 1.0:  # Gemma: sqrt(hidden), rounded to the weights' dtype as transformers does
            return self.embed_tokens(ids) * self.embed_scale.to(self.dtype)
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
        adapters: list[int] | None = None,
    ) -> KVCache:
        """The per-batch generation state of this family: a KV cache, paged on the engine's block pool,
        or contiguous (in `kv_type`, the model's dtype by default); `adapters`: each row's LoRA
        adapter index in `adapter_bank` (0: none)."""
        cache = KVCache.for_model(
            self.config, batch, capacity, self.dtype, self.device, track_attention, track_importance, pool,
            kv_type, rotate_keys,
        )  # fmt: skip
        if adapters is not None:
            cache.adapters = torch.tensor(adapters, dtype=torch.int32)
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
        lora_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run [B, T, d] embeddings at positions [B, T] (negative = right padding) -> hidden [B, T, d].

        With a cache, the chunk is appended to each row's history; without one, the chunk is a
        whole sequence attended causally, or as `mask` [B, 1, T, T] (True = may attend) says.
        `depth` runs only the first layers (a truncated weaver); the final norm still applies.
        `lora_tokens` [B, T] bool: the tokens that run with the model's own LoRA (`add_lora`) on,
        every other token without it (a latent weaver's queries inside the reasoner's step); their
        attention is left out of the cache's statistics.
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
            return self.norm(native.step(self, embeds, positions, cache, lora_tokens))
        rope = {False: rope_cos_sin(positions, self.inv_freq, self.attention_scaling, embeds.dtype)}
        if mask is not None:
            if cache is not None:
                raise ValueError("an explicit mask is for cache-less forwards")
        elif cache is None:
            chunk = positions.shape[1]
            causal = torch.ones(chunk, chunk, dtype=torch.bool, device=embeds.device).tril()
            mask = (causal[None] & (positions >= 0)[:, None, :])[:, None]
        else:
            mask = cache.begin(positions) if lora_tokens is None else cache.begin(positions, lora_tokens)
        masks = {False: mask}
        if any(layer.self_attn.sliding for layer in layers):
            local = self.local_inv_freq
            rope[True] = rope_cos_sin(positions, local, 1.0, embeds.dtype) if local is not None else rope[False]
            key_positions = positions if cache is None else cache.slot_positions()
            masks[True] = window_mask(mask, positions, key_positions, self.config.sliding_window)
        packing = Packing(positions >= 0) if Packing.worthwhile(positions) else None
        x = packing.pack(embeds) if packing is not None else embeds
        with self._selecting_adapters(cache, positions.shape, packing), self._own_lora_for(lora_tokens, packing):
            for layer in layers:
                sliding = layer.self_attn.sliding
                x = layer(x, *rope[sliding], masks[sliding], cache, packing)
        if cache is not None:
            cache.end()
        x = self.norm(x)
        return packing.unpack(x) if packing is not None else x

    def _selecting_adapters(self, cache, shape: tuple[int, int], packing: Packing | None):
        """The adapter bank, told each token's adapter (its row's, from the state), while the layers
        run; nothing when no row uses one (the base model as it is)."""
        rows = getattr(cache, "adapters", None)
        if self.adapter_bank is None or rows is None or not bool(rows.any()):
            return contextlib.nullcontext()
        tokens = rows.to(self.device)[:, None].expand(shape)  # [B, T]: the projections see tokens row-major
        return self.adapter_bank.selecting(packing.pack(tokens) if packing is not None else tokens.reshape(-1))

    def _own_lora_for(self, tokens: torch.Tensor | None, packing: Packing | None):
        """The model's own LoRA on for these tokens only, while the layers run (nothing when None)."""
        if tokens is None:
            return contextlib.nullcontext()
        return lora_for_tokens(self, packing.pack(tokens) if packing is not None else tokens.reshape(-1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


def window_mask(mask, query_positions, key_positions, window: int) -> torch.Tensor | None:
    """`mask` [B, 1, T, S] (None: all visible) narrowed to keys whose position is within `window`
    of the query's (transformers' and llama.cpp's rule: key > query - window). Key positions [B, S]
    are the cache's per slot, so a row whose old slots were evicted still masks by time, not slot."""
    if int(query_positions.max()) < window:  # no query is far enough along to lose a key
        return mask
    near = key_positions[:, None, None, :] > query_positions[:, None, :, None] - window
    return near if mask is None else mask & near
