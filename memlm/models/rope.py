"""Rotary position embeddings and the scaling variants of Llama / Qwen / SmolLM configs.

Each variant only changes the inverse frequencies (and, for YaRN, a scale on cos/sin), so the
model computes cos/sin for arbitrary per-token positions at run time. That is what lets the KV
cache keep keys after RoPE with their original positions and evict slots without re-rotation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memlm.errors import ModelFormatError


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2], attention_scaling) for a config's RoPE. `head_dim` is the
    rotated part of a head (all of it but for partial rotary: Phi-4-mini rotates 3/4)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling, max_positions)
    if rope_type == "longrope":
        return _longrope(inv_freq, scaling, max_positions)
    raise ModelFormatError(
        f"unsupported rope_type {rope_type!r} (memlm supports default, linear, llama3, yarn, longrope)"
    )


def _longrope(inv_freq: torch.Tensor, s: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE with its short factors, the ones for contexts up to the original length.

    transformers switches to the long factors for a whole forward once a sequence passes
    `original_max_position_embeddings` (keys already in its cache keep the short ones); memlm stores
    keys rotated once, so it keeps the short factors throughout: exact up to the original length.
    """
    original = s.get("original_max_position_embeddings")
    short = s.get("short_factor")
    if not original or short is None or len(short) != inv_freq.numel():
        raise ModelFormatError(
            f"longrope needs original_max_position_embeddings and {inv_freq.numel()} short_factor values"
        )
    factor = s.get("factor") or max_positions / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq / torch.tensor(short, dtype=torch.float32), float(attention_factor)


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_extrapolating = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolating) + extrapolation * keep_extrapolating
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of shape [B, 1, T, head_dim] for integer positions [B, T] (padding may be negative).

    Returns (cos, signed_sin), where signed_sin = [-sin, sin] over the two halves: the sign of the
    half-split rotation folded into the table once per forward instead of into every layer.
    """
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, None], signed_sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by the half-split convention of Hugging Face checkpoints.

    rotate_half(x) * sin == roll(x, D/2) * signed_sin: one roll instead of slice, negate, concat.
    Tables narrower than D (partial rotary) rotate the first dimensions and pass the rest.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, signed_sin), x[..., rot:]), dim=-1)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
