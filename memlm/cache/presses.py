"""Presses: compress a row's prompt once, after its prefill, to a target ratio (kvpress's presses).

Eviction policies (policies.py) hold a row under a budget while it *generates*; a press compresses
what the row was *given*: after the prompt's forward it scores every prompt slot and keeps the best
`1 - ratio` share of them (`ratio` is the share removed, kvpress's `compression_ratio`). The cache
compacts the row (`KVCache.compact`), so kept slots keep the positions their keys were rotated
with, and the row goes on exactly as if only the kept tokens' keys and values had been computed.

What a press reads of the prompt is a `PromptView` (built by press_hook.py from the cache and the
queries captured during the prefill): keys and values, the last `window` queries (SnapKV, TOVA),
the mean and covariance of the prompt's queries before RoPE (expected attention), the attention
every prompt query paid each slot (observed attention) and the learned importance of each slot.

Per head and per layer: kvpress keeps a top-k per layer and KV head; memlm's cache drops a slot
from every layer and head at once (one position table per row), so a press that scores per layer
and head (`per_layer`: SnapKV, expected attention, KNorm, TOVA) averages its scores over layers and
heads and keeps one set. `pyramid:<press>` (PyramidKV's per-layer budgets) is an approximation of
that kind: each layer's vote is weighted by the budget PyramidKV would give it (lower layers more),
one set is kept; true per-layer budgets need per-layer lengths in the cache (not built).

Definitions follow kvpress (github.com/NVIDIA/kvpress, kvpress/presses/*): window sizes, pooling
kernels, the sinks expected attention and StreamingLLM keep, the max-plus-one a kept window gets.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from memlm.errors import InvalidRequestError


@dataclass(slots=True)
class PromptView:
    """What a press sees of one row's prompt: its first `n` slots, after the prefill."""

    keys: torch.Tensor  # [layers, kv_heads, n, head_dim] as attention reads them (the cache's basis)
    values: torch.Tensor  # [layers, kv_heads, n, head_dim]
    # [layers, heads, w, head_dim] the observation window's queries (after RoPE, in the keys' basis)
    window: torch.Tensor | None = None
    window_slots: torch.Tensor | None = None  # [w] slot of each window query: it saw the slots <= its own
    query_mean: torch.Tensor | None = None  # [layers, heads, head_dim] prompt queries before RoPE, past the sinks
    query_cov: torch.Tensor | None = None  # [layers, heads, head_dim, head_dim] their covariance
    future_rotation: torch.Tensor | None = None  # [head_dim, head_dim] RoPE averaged over the coming positions
    attention_sum: torch.Tensor | None = None  # [n] attention the prompt's queries paid each slot (mean heads, layers)
    importance: torch.Tensor | None = None  # [n] learned importance of each slot

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def kept_count(n: int, ratio: float) -> int:
    """Slots kept of n at a compression ratio (kvpress: int(n * (1 - ratio))), at least one."""
    return max(1, int(n * (1 - ratio) + 1e-9))


def layer_mean(scores: torch.Tensor, layer_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, heads, n] -> [n]: the mean over heads, then over layers (weighted, if given)."""
    per_layer = scores.float().mean(dim=1)
    if layer_weights is None:
        return per_layer.mean(dim=0)
    w = layer_weights.to(per_layer)
    return (per_layer * w[:, None]).sum(0) / w.sum()


def _kept_first(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Scores with `slots` raised above every other score (kvpress pads kept windows with max + 1)."""
    scores = scores.clone()
    scores[..., slots] = scores.amax() + 1
    return scores


class Press(ABC):
    """Scores a row's prompt slots; `keep` picks the best `1 - ratio` share."""

    name: ClassVar[str]
    per_layer: ClassVar[bool] = False  # `scores` is [layers, heads, n] (else [n])
    window: int = 0  # observation-window queries the prefill must keep (PromptView.window)
    needs_query_stats: ClassVar[bool] = False  # PromptView.query_mean / query_cov / future_rotation
    needs_attention: ClassVar[bool] = False  # PromptView.attention_sum: the prefill tracks attention
    needs_importance: ClassVar[bool] = False  # PromptView.importance: the learned predictor runs
    question_window: ClassVar[bool] = False  # the window is the question (a benchmark feeds it apart)
    ratio_free: ClassVar[bool] = True  # `flat_scores` do not depend on the ratio: one scoring serves all

    def __init__(self, ratio: float):
        if not 0 <= ratio < 1:
            raise InvalidRequestError(f"press {self.name}: the ratio removed must be in [0, 1), got {ratio}")
        self.ratio = ratio

    @abstractmethod
    def scores(self, view: PromptView) -> torch.Tensor: ...

    def flat_scores(self, view: PromptView) -> torch.Tensor:
        """[n] one score per slot (a per-layer press's scores averaged over layers and heads)."""
        scores = self.scores(view)
        return layer_mean(scores) if self.per_layer else scores.float()

    def keep(self, view: PromptView, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Ascending slot indices to keep (all of them at ratio 0); `scores`: this press's
        `flat_scores(view)` if already computed (at another ratio, when `ratio_free`)."""
        n = view.length
        count = kept_count(n, self.ratio)
        if count >= n:
            return torch.arange(n)
        scores = self.flat_scores(view) if scores is None else scores
        return scores.topk(count).indices.sort().values.cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


class RandomPress(Press):
    """A baseline: slots scored at random (seeded, so a benchmark is repeatable)."""

    name = "random"

    def __init__(self, ratio: float, seed: int = 0):
        super().__init__(ratio)
        self.seed = seed

    def scores(self, view: PromptView) -> torch.Tensor:
        return torch.rand(view.length, generator=torch.Generator().manual_seed(self.seed))


class StreamingLLMPress(Press):
    """StreamingLLM: the first `sinks` slots (attention sinks) and the most recent ones."""

    name = "streaming_llm"
    ratio_free = False

    def __init__(self, ratio: float, sinks: int = 4):
        super().__init__(ratio)
        self.sinks = sinks

    def scores(self, view: PromptView) -> torch.Tensor:
        n = view.length
        pruned = n - kept_count(n, self.ratio)
        scores = torch.ones(n)
        scores[self.sinks : self.sinks + pruned] = 0
        return scores


class KNormPress(Press):
    """Keys with a small norm draw more attention (arXiv 2406.11430): score = -||k||."""

    name = "knorm"
    per_layer = True

    def scores(self, view: PromptView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)


def window_attention(view: PromptView) -> torch.Tensor:
    """[layers, heads, w, n] what each window query paid each prompt slot: softmax over the slots it
    saw (a query inside the prompt sees the slots up to its own; one after it, all of them)."""
    q, k = view.window.float(), view.keys.float()
    layers, heads, w, d = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    # each KV head against its group of query heads at once (no copy of the keys per query head)
    grouped = q.reshape(layers, kv_heads, heads // kv_heads * w, d) / math.sqrt(d)
    logits = (grouped @ k.transpose(-1, -2)).view(layers, heads, w, n)
    seen = torch.arange(n, device=q.device)[None, :] <= view.window_slots.to(q.device)[:, None]  # [w, n]
    return logits.masked_fill_(~seen, float("-inf")).softmax(dim=-1)


def window_inside(view: PromptView) -> torch.Tensor:
    """The window's slots that are prompt slots (a question fed after the prompt has none)."""
    slots = view.window_slots
    return slots[slots < view.length]


class SnapKVPress(Press):
    """SnapKV (arXiv 2404.14469): the last `window` queries vote for the slots by the attention they
    paid them (mean over the window), average-pooled over neighbours (kernel 5), mean over the
    query heads of each KV head; the window itself is always kept."""

    name = "snapkv"
    per_layer = True

    def __init__(self, ratio: float, window: int = 64, kernel: int = 5):
        super().__init__(ratio)
        self.window, self.kernel = window, kernel

    def scores(self, view: PromptView) -> torch.Tensor:
        if view.window is None:
            raise InvalidRequestError(f"press {self.name}: the prefill kept no observation window")
        inside = window_inside(view)
        votes = window_attention(view).mean(dim=2)  # [L, H, n]
        layers, heads, n = votes.shape
        scored = int(inside.min()) if inside.numel() else n  # the slots before the window (all, for a question)
        if scored == 0:  # the whole prompt is the window: nothing to choose
            return torch.ones(layers, view.keys.shape[1], n)
        pooled = F.avg_pool1d(votes[..., :scored].reshape(-1, 1, scored), self.kernel, 1, self.kernel // 2)
        kv_heads = view.keys.shape[1]
        scores = pooled.reshape(layers, kv_heads, heads // kv_heads, scored).mean(dim=2)
        return F.pad(scores, (0, n - scored), value=float(scores.amax()) + 1 if scored else 1.0)


class SnapKVQuestionPress(SnapKVPress):
    """SnapKV with the question as its window (kvpress's compress_questions): query-aware, so it
    keeps what this question needs and nothing promises it keeps what the next one will.
    `memlm bench press` feeds the question after the context and compresses the context by the
    question's queries; in `generate` the prompt's last `window` tokens are the window, as for
    snapkv (when the prompt ends with its question, that is this press)."""

    name = "snapkv_question"
    question_window = True


class TOVAPress(Press):
    """TOVA (arXiv 2401.06104) at prefill: the attention of the prompt's last query, mean over all
    query heads, per layer; the last slot is kept."""

    name = "tova"
    per_layer = True
    window = 1

    def scores(self, view: PromptView) -> torch.Tensor:
        if view.window is None:
            raise InvalidRequestError("press tova: the prefill kept no observation window")
        last = window_attention(view)[:, :, -1:].mean(dim=1)  # [L, 1, n]
        return _kept_first(last, window_inside(view)[-1:])


class ObservedAttentionPress(Press):
    """The mean attention each slot received from the prompt's queries (H2O at prefill): the sum
    over queries divided by how many queries could see it (n - slot), mean over heads and layers."""

    name = "observed_attention"
    needs_attention = True

    def scores(self, view: PromptView) -> torch.Tensor:
        if view.attention_sum is None:
            raise InvalidRequestError("press observed_attention: the prefill tracked no attention")
        n = view.length
        seen_by = torch.arange(n, 0, -1, device=view.attention_sum.device).float()
        return view.attention_sum.float() / seen_by


def mean_rotation(rope, start: int, count: int, head_dim: int) -> torch.Tensor:
    """[head_dim, head_dim] M with x @ M = the mean over positions start..start+count-1 of RoPE(x):
    `rope(x [T, D], positions [T])` applied to the identity at every position, averaged."""
    eye = torch.eye(head_dim)
    positions = torch.arange(start, start + count)
    rotated = rope(
        eye[None].expand(count, head_dim, head_dim).reshape(-1, head_dim), positions.repeat_interleave(head_dim)
    )
    return rotated.reshape(count, head_dim, head_dim).mean(dim=0)


class ExpectedAttentionPress(Press):
    """Expected attention (kvpress): the attention future queries are expected to pay each slot.
    The prompt's queries (before RoPE, past the first `sinks`) give a mean and a covariance; RoPE
    averaged over the next `future` positions rotates them; with a = exp(q.k / sqrt(d)) and q
    Gaussian, E[a] = exp(mu.k / sqrt(d) + k^T S k / (2 d)), softmaxed over the slots, mean over each
    KV head's query heads, times ||v||; the sinks are kept."""

    name = "expected_attention"
    per_layer = True
    needs_query_stats = True

    def __init__(self, ratio: float, future: int = 512, sinks: int = 4, covariance: bool = True, vnorm: bool = True):
        super().__init__(ratio)
        self.future, self.sinks, self.covariance, self.vnorm = future, sinks, covariance, vnorm

    def scores(self, view: PromptView) -> torch.Tensor:
        if view.query_mean is None or view.future_rotation is None:
            raise InvalidRequestError("press expected_attention: the prefill kept no query statistics")
        if view.length <= self.sinks:  # nothing but sinks: all kept
            return torch.ones(view.keys.shape[:3])
        rot = view.future_rotation.float()
        mu = view.query_mean.float() @ rot  # [L, H, D]
        k = view.keys.float()[:, :, self.sinks :]  # [L, KV, n', D]
        layers, kv_heads, n, d = k.shape
        groups = mu.shape[1] // kv_heads
        # each KV head's keys against its group's query heads at once: [L, KV, n', G]
        logits = k @ mu.view(layers, kv_heads, groups, d).transpose(-1, -2) / math.sqrt(d)
        if self.covariance:  # + k^T S_h k / (2d) for each head h of the group, from one product
            cov = (rot.T @ view.query_cov.float() @ rot).view(layers, kv_heads, groups, d, d)
            spread = k @ cov.permute(0, 1, 3, 2, 4).reshape(layers, kv_heads, d, groups * d)
            spread = spread.view(layers, kv_heads, n, groups, d).mul_(k[:, :, :, None])
            logits += spread.sum(-1) / d / 2
        scores = logits.softmax(dim=2).mean(dim=-1)  # softmax over the slots, then mean over the group
        if self.vnorm:
            scores = scores * view.values.float()[:, :, self.sinks :].norm(dim=-1)
        return F.pad(scores, (min(self.sinks, view.length), 0), value=float(scores.amax()) + 1)


class LearnedPress(Press):
    """The DynTS predictor's architecture on prompt tokens (KVzap's idea): each slot's predicted
    importance, from its final hidden state, trained on the attention many future questions about
    the same context pay it (memlm/train/press.py), so it is query-agnostic."""

    name = "learned"
    needs_importance = True

    def __init__(self, ratio: float, predictor):
        super().__init__(ratio)
        self.predictor = predictor

    def scores(self, view: PromptView) -> torch.Tensor:
        if view.importance is None:
            raise InvalidRequestError("press learned: the prefill scored no importance")
        return view.importance.float()


def pyramid_weights(layers: int, beta: float = 20) -> torch.Tensor:
    """[layers] PyramidKV's per-layer budgets, relative: a straight line from the bottom layer's
    (2 - 1/beta) to the top's 1/beta, as KVCache-Factory's formula (the total is the same share)."""
    low, high = 1 / beta, 2 - 1 / beta
    if layers == 1:
        return torch.ones(1)
    return high - torch.arange(layers) * (high - low) / (layers - 1)


class PyramidPress(Press):
    """`pyramid:<press>`: a per-layer press whose layers vote with PyramidKV's budgets as weights
    (one kept set for all layers; see the module's note)."""

    def __init__(self, inner: Press, beta: float = 20):
        super().__init__(inner.ratio)
        self.inner, self.beta = inner, beta
        self.name = f"pyramid:{inner.name}"
        self.window = inner.window
        self.needs_query_stats, self.question_window = inner.needs_query_stats, inner.question_window

    def scores(self, view: PromptView) -> torch.Tensor:
        return self.inner.scores(view)

    def flat_scores(self, view: PromptView) -> torch.Tensor:
        scores = self.inner.scores(view)
        return layer_mean(scores, pyramid_weights(scores.shape[0], self.beta).to(scores.device))


PRESSES: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (
        RandomPress,
        StreamingLLMPress,
        KNormPress,
        SnapKVPress,
        SnapKVQuestionPress,
        ExpectedAttentionPress,
        TOVAPress,
        ObservedAttentionPress,
        LearnedPress,
    )
}
PYRAMID = "pyramid:"


def press_names() -> list[str]:
    per_layer = [name for name, cls in PRESSES.items() if cls.per_layer]
    return [*PRESSES, *(PYRAMID + name for name in per_layer)]


def check_press(name: str) -> None:
    """A press name is known (`pyramid:` wraps a per-layer press), or a one-line error."""
    inner = name.removeprefix(PYRAMID)
    if inner not in PRESSES:
        raise InvalidRequestError(f"unknown KV press {name!r}; choose one of {', '.join(press_names())}")
    if inner != name and not PRESSES[inner].per_layer:
        per_layer = ", ".join(n for n, cls in PRESSES.items() if cls.per_layer)
        raise InvalidRequestError(f"pyramid: wraps a press that scores per layer ({per_layer}), not {inner!r}")


def make_press(name: str, ratio: float, predictor=None) -> Press:
    check_press(name)
    inner = name.removeprefix(PYRAMID)
    if inner == "learned":
        if predictor is None:
            raise InvalidRequestError("press learned needs a predictor (--kv-predictor DIR)")
        press: Press = LearnedPress(ratio, predictor)
    else:
        press = PRESSES[inner](ratio)
    return PyramidPress(press) if inner != name else press
