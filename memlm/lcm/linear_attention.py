"""Causal linear attention with a constant-size recurrent state, and the block both LCM stacks use.

phi(x) = elu(x) + 1 keeps features positive, so attention is phi(q) . sum_s phi(k_s) v_s^T divided by
phi(q) . sum_s phi(k_s). Those two sums are the whole state of a head: [d_k, d_v] and [d_k],
independent of the sequence length. One code path serves training and generation: a chunk of T
tokens is computed in parallel inside the chunk (masked phi(Q) phi(K)^T, like softmax attention
without the softmax) and through the state across chunks; T = 1 is the incremental update.

A short causal depthwise convolution before the attention gives each token its local word order
(linear attention alone only sees a normalised bag of the past); its state is the last kernel-1
inputs. Padding (positions < 0, right-padded batches) never enters any state.

A `Reach` bounds what a stack sees of the past: the text is cut into segments of W tokens at
absolute positions 0, W, 2W, ..., and a token attends to (and convolves over) its own segment only;
the state is cleared when a segment ends. Every layer cuts at the same places, so nothing leaks
across a cut through depth (a sliding window of W per layer would reach L x W tokens back).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from memlm.models.layers import RMSNorm
from memlm.models.moe import MoEBlock

CHUNK = 256  # tokens computed in parallel at once: bounds the [T, T] score memory of long prefills


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


@dataclass(frozen=True)
class Reach:
    """Where the view of the past is cut, for one chunk of a batch: token t sees positions of its own
    segment (position // window) only. `positions` [B, T] are absolute (padding < 0, right-padded)."""

    positions: torch.Tensor
    valid: torch.Tensor
    window: int

    # Cached: every layer of a stack reads them for the same chunk.
    @cached_property
    def segments(self) -> torch.Tensor:
        """[B, T] the segment of each token; padding -2 (its keys are zero anyway)."""
        return torch.where(self.valid, self.positions.div(self.window, rounding_mode="floor"), -2)

    @cached_property
    def before(self) -> torch.Tensor:
        """[B] the segment of the last token already in the state (-1: the state is empty)."""
        first = self.positions[:, 0]  # right padding: column 0 is each row's first new token
        return torch.where(self.valid[:, 0] & (first > 0), (first - 1).div(self.window, rounding_mode="floor"), -1)

    def conv_mask(self, kernel: int) -> torch.Tensor:
        """[B, T, kernel]: which inputs of each token's convolution window lie in its own segment.
        Input j of token t is position t - (kernel - 1) + j: inside iff j >= kernel - 1 - (t mod W)."""
        offset = self.positions.remainder(self.window)
        return torch.arange(kernel, device=offset.device) >= (kernel - 1 - offset)[..., None]


@dataclass
class BlockState:
    """The recurrent state of one block for a batch: constant in size, however long the text."""

    kv: torch.Tensor  # [B, H, d_k, d_v]: sum of phi(k) v^T
    k_sum: torch.Tensor  # [B, H, d_k]: sum of phi(k)
    conv: torch.Tensor  # [B, kernel - 1, d]: the last inputs of the causal convolution

    @classmethod
    def zeros(cls, batch: int, heads: int, head_dim: int, width: int, kernel: int, dtype, device) -> BlockState:
        return cls(
            torch.zeros(batch, heads, head_dim, head_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, head_dim, dtype=dtype, device=device),
            torch.zeros(batch, kernel - 1, width, dtype=dtype, device=device),
        )

    def select(self, rows: torch.Tensor) -> BlockState:
        return BlockState(self.kv[rows], self.k_sum[rows], self.conv[rows])

    def cat(self, other: BlockState) -> BlockState:
        """This state's rows followed by another's."""
        return BlockState(
            torch.cat((self.kv, other.kv)), torch.cat((self.k_sum, other.k_sum)), torch.cat((self.conv, other.conv))
        )

    def assign(self, rows: torch.Tensor, other: BlockState) -> None:
        """Overwrite these rows with another state's rows (a re-encoded copy)."""
        self.kv[rows] = other.kv.to(self.kv.dtype)
        self.k_sum[rows] = other.k_sum.to(self.k_sum.dtype)
        self.conv[rows] = other.conv.to(self.conv.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.k_sum, self.conv))


class CausalConv(nn.Module):
    """Depthwise causal convolution, identity at initialisation."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        weight = torch.zeros(width, kernel)
        weight[:, -1] = 1.0
        self.weight = nn.Parameter(weight)
        self.kernel = kernel

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, state: BlockState | None, reach: Reach | None = None
    ) -> torch.Tensor:
        batch, length, width = x.shape
        past = state.conv if state is not None else x.new_zeros(batch, self.kernel - 1, width)
        full = torch.cat((past.to(x.dtype), x), dim=1)  # [B, k-1+T, d]
        windows = full.unfold(1, self.kernel, 1)  # [B, T, d, k]
        if reach is not None:  # inputs from before the token's segment start count as zero
            windows = windows * reach.conv_mask(self.kernel)[:, :, None, :].to(x.dtype)
        out = (windows * self.weight).sum(-1)
        if state is not None:  # the last k-1 real inputs of each row carry over
            real = valid.sum(1)  # [B]
            index = real[:, None] + torch.arange(self.kernel - 1, device=x.device)[None]  # [B, k-1]
            state.conv = full.gather(1, index[..., None].expand(-1, -1, width)).to(state.conv.dtype)
        return out


class LinearAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, state: BlockState | None, reach: Reach | None = None
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = phi(q), phi(k) * valid[:, None, :, None].to(x.dtype)  # padding adds nothing to the sums
        if state is None:
            kv = x.new_zeros(batch, self.heads, self.head_dim, self.head_dim)
            k_sum = x.new_zeros(batch, self.heads, self.head_dim)
        else:
            kv, k_sum = state.kv.to(x.dtype), state.k_sum.to(x.dtype)
        if reach is not None:
            segments, state_segment = reach.segments, reach.before
        outs = []
        for start in range(0, length, CHUNK):
            qc, kc, vc = (t[:, :, start : start + CHUNK] for t in (q, k, v))
            n = qc.shape[2]
            scores = (qc @ kc.transpose(-1, -2)).tril() if n > 1 else qc @ kc.transpose(-1, -2)
            q_state = qc
            if reach is not None:  # within the chunk: same segment only; from the state: the state's segment
                seg = segments[:, start : start + n]
                scores = scores * (seg[:, :, None] == seg[:, None, :])[:, None].to(x.dtype)
                q_state = qc * (seg == state_segment[:, None])[:, None, :, None].to(x.dtype)
            numerator = scores @ vc + q_state @ kv
            denominator = scores.sum(-1) + (q_state * k_sum[:, :, None]).sum(-1)
            outs.append(numerator / (denominator[..., None] + 1e-6))
            if reach is None:
                kv = kv + kc.transpose(-1, -2) @ vc
                k_sum = k_sum + kc.sum(2)
                continue
            # The state after the chunk holds its last segment only (the old state too if that is the same).
            real = reach.valid[:, start : start + n]
            last = (real.sum(1) - 1).clamp_min(0)
            last_segment = torch.where(real.any(1), seg.gather(1, last[:, None])[:, 0], state_segment)
            keep = (last_segment == state_segment).to(x.dtype)
            kc = kc * (seg == last_segment[:, None])[:, None, :, None].to(x.dtype)
            kv = kv * keep[:, None, None, None] + kc.transpose(-1, -2) @ vc
            k_sum = k_sum * keep[:, None, None] + kc.sum(2)
            state_segment = last_segment
        if state is not None:
            state.kv, state.k_sum = kv.to(state.kv.dtype), k_sum.to(state.k_sum.dtype)
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return self.out(out.transpose(1, 2).reshape(batch, length, width))


class GLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """x + attention(conv(norm(x))), then x + GLU(norm(x)): residual and normalised."""

    def __init__(self, width: int, heads: int, hidden: int, kernel: int, experts: int = 0, top_k: int = 2):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.conv = CausalConv(width, kernel)
        self.attention = LinearAttention(width, heads)
        if experts:
            self.mlp = MoEBlock(width, hidden, experts, top_k, normalize=True)
        else:
            self.mlp = GLU(width, hidden)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, state: BlockState | None = None, reach: Reach | None = None
    ) -> torch.Tensor:
        x = x + self.attention(self.conv(self.norm1(x), valid, state, reach), valid, state, reach)
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """Embedding-free stack of blocks with per-layer additive conditioning (the decoder's z_q)."""

    def __init__(self, layers: int, width: int, heads: int, hidden: int, kernel: int, experts: int = 0, top_k: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, hidden, kernel, experts, top_k) for _ in range(layers))
        self.norm = RMSNorm(width)
        self.heads, self.width, self.kernel = heads, width, kernel

    def new_state(self, batch: int, dtype, device) -> list[BlockState]:
        head_dim = self.width // self.heads
        return [
            BlockState.zeros(batch, self.heads, head_dim, self.width, self.kernel, dtype, device) for _ in self.blocks
        ]

    def forward(
        self, x, valid, states: list[BlockState] | None = None, conditions=None, reach: Reach | None = None
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if conditions is not None:
                x = x + conditions[i]
            x = block(x, valid, states[i] if states is not None else None, reach)
        return self.norm(x)
