"""Presses in the decode loop: capture what a press reads during the prompt's forward, then press.

A request's press rides on its KV policy (`policy.press`, set by `PolicySpec.build`; the policy is
`FullPolicy` when only a press is asked for), so the request, the engine and the server carry
nothing new. A press and an eviction policy combine: the press compresses the prompt once after
its prefill, the policy then holds the row under its budget while it generates (its `RowView`
sees the pressed prompt).

`PromptQueries` is the cache's query observer (`KVCache.query_observer`) for the forward in which
prompts are fed: per row, the last `window` queries of every layer (after RoPE, in the keys' basis)
and the mean and covariance of its queries before RoPE past the first `sinks` (expected
attention). `PressHook` attaches one when a joining row's press needs it, presses each such row
right after that forward, and detaches it. A row with a press never reuses a cached prefix
(prefix.py): the press reads the queries of its whole prompt.

The prompt's last token's logits come from the forward before the press (they give the first
sampled token); every later token reads the pressed cache. The KV record's peak counts the whole
prompt, which the prefill held before the press.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from memlm.cache.eviction import kv_record
from memlm.cache.kv_format import rotate
from memlm.cache.presses import Press, PromptView, mean_rotation
from memlm.hook_defaults import QuietHook

KEY = "press"


def request_press(request) -> Press | None:
    policy = request.kv_policy
    return getattr(policy, "press", None) if policy is not None else None


@dataclass(slots=True)
class PressRecord:
    """One request's press: done once, after the forward that fed its prompt."""

    done: bool = False
    prompt_tokens: int = 0  # prompt slots before the press
    kept: list[int] | None = None  # positions kept
    seconds: float = 0.0  # scoring and selection (and compaction)

    def completion_fields(self) -> dict:
        return {}


class PromptQueries:
    """Queries a press reads, captured while prompts are fed (one forward; rows as in that forward)."""

    def __init__(self, window: int, stats: bool, sinks: int = 4):
        self.window_size, self.stats, self.sinks = window, stats, sinks
        self.window: dict[int, list[torch.Tensor]] = {}  # row -> per layer [heads, w, head_dim]
        self.window_slots: dict[int, torch.Tensor] = {}  # row -> [w]
        self.mean: dict[int, list[torch.Tensor]] = {}  # row -> per layer [heads, head_dim]
        self.cov: dict[int, list[torch.Tensor]] = {}  # row -> per layer [heads, head_dim, head_dim]

    def observe(self, layer: int, slots: torch.Tensor, real: torch.Tensor, q_pre: torch.Tensor, q: torch.Tensor):
        """One layer's queries of the chunk: q_pre [B, T, H, D] before RoPE, q [B, H, T, D] as attention uses them."""
        for row, count in enumerate(real.tolist()):
            if count == 0:
                continue
            if self.window_size:
                low = max(0, count - self.window_size)
                self.window.setdefault(row, []).append(q[row, :, low:count].float())
                self.window_slots[row] = slots[row, low:count]
            if self.stats:
                x = q_pre[row, min(self.sinks, count - 1) : count].float()  # [T, H, D]
                mean = x.mean(dim=0)
                centred = x - mean
                self.mean.setdefault(row, []).append(mean)
                self.cov.setdefault(row, []).append(torch.einsum("thi,thj->hij", centred, centred) / x.shape[0])


def prompt_view(cache, row: int, n: int, press: Press, queries: PromptQueries | None) -> PromptView:
    """The first `n` slots of a row as a press reads them."""
    keys, values = cache.store.row(row, n)
    view = PromptView(
        keys=cache.format.decode(keys, cache.compute_dtype), values=cache.format.decode(values, cache.compute_dtype)
    )
    if queries is not None and row in queries.window:
        view.window = torch.stack(queries.window[row])
        view.window_slots = queries.window_slots[row]
    if queries is not None and row in queries.mean:
        view.query_mean, view.query_cov = torch.stack(queries.mean[row]), torch.stack(queries.cov[row])
    if press.needs_query_stats:
        rotation = mean_rotation(cache.rope, n, getattr(press, "future", 512), view.keys.shape[-1])
        view.future_rotation = rotate(rotation) if cache.rotate_keys else rotation
    if cache.track_attention:
        view.attention_sum = cache.attention_sum[row, :n]
    if cache.track_importance:
        view.importance = cache.importance[row, :n]
    return view


def press_row(cache, row: int, n: int, press: Press, queries: PromptQueries | None) -> torch.Tensor:
    """Press a row's first `n` slots (its prompt) and compact it -> the slot indices kept (of the old row)."""
    keep = press.keep(prompt_view(cache, row, n, press, queries))
    length = int(cache.lengths[row])
    keep = torch.cat((keep.to(cache.lengths.device), torch.arange(n, length, device=cache.lengths.device)))
    cache.compact(row, keep)
    return keep


class PressHook(QuietHook):
    """Each row with a press is pressed once, right after the forward that fed its prompt."""

    phase = "press"

    def join(self, rows, state) -> None:
        presses = [p for p in map(request_press, rows) if p is not None]
        for r in rows:
            if request_press(r) is not None:
                r.records[KEY] = PressRecord()
        window = max((p.window for p in presses), default=0)
        stats = any(p.needs_query_stats for p in presses)
        if window or stats:
            state.query_observer = PromptQueries(window, stats)

    def after_forward(self, rows, state, hidden, steps) -> None:
        queries = state.query_observer
        for row, r in enumerate(rows):
            press = request_press(r)
            if press is None:
                continue
            record: PressRecord = r.records[KEY]
            if record.done or r.next_position < len(r.prompt_ids):
                continue
            start = time.perf_counter()
            n = len(r.prompt_ids)
            kept_record = kv_record(r)
            if kept_record is not None:  # the prefill held the whole prompt
                kept_record.peak_kv_tokens = max(kept_record.peak_kv_tokens, int(state.lengths[row]))
            positions = state.positions[row, :n].clone()
            keep = press_row(state, row, n, press, queries)
            record.done, record.prompt_tokens = True, n
            record.kept = positions[keep[keep < n].to(positions.device)].tolist()
            record.seconds = time.perf_counter() - start
        state.query_observer = None
