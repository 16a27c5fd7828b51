"""Working memory in the decode loop: the KV cache's two row hooks (memlm.generation.hooks).

After every forward, `ImportanceHook` gives each new token its learned importance (rows grouped by
predictor, one call each), and `EvictionHook` records each row's peak and lets its policy bring it
back under budget (`policy.select` over a `RowView`; the cache compacts). Each request's record
(`KVRecord`, in `request.records["kv"]`) holds its peak, what it lost, and where its answer starts
(the policy's end-of-thinking marker, once the text shows it: answer tokens are never evicted).
For a policy with an observation window (`policy.observe` > 0: SnapKV, R-KV) the record also
keeps what the last `observe` queries paid each position, so the policy object holds no row state.

Both hooks implement the RowHook protocol structurally: this package sits below the engine.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

import torch

from memlm.cache.policies import RowView
from memlm.hook_defaults import QuietHook

KEY = "kv"


@dataclass(slots=True)
class KVRecord:
    """One request's life in the KV cache."""

    peak_kv_tokens: int = 0  # most tokens held at once
    evicted_positions: list[int] = field(default_factory=list)
    protected_from: int | None = None  # position where the end-of-thinking marker begins
    scanned: int = 0  # characters of the text already searched for that marker
    # (positions, attention the newest query paid them) after each of the last `policy.observe` forwards
    observed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def completion_fields(self) -> dict:
        return {"peak_kv_tokens": self.peak_kv_tokens}


def kv_record(request) -> KVRecord | None:
    return request.records.get(KEY)


class ImportanceHook(QuietHook):
    """DynTS: the learned importance of each token written, from its final hidden state."""

    phase = "predictor"

    def after_forward(self, rows, state, hidden: torch.Tensor, steps) -> None:
        if not state.track_importance:
            return
        scores = torch.zeros(hidden.shape[:2], device=hidden.device)
        groups: dict[int, tuple[object, list[int]]] = {}
        for row, r in enumerate(rows):
            predictor = r.kv_policy.predictor if r.kv_policy is not None else None
            if predictor is not None:
                groups.setdefault(id(predictor), (predictor, []))[1].append(row)
        for predictor, members in groups.values():
            scores[members] = predictor(hidden[members]).float()
        state.record_importance(scores)


class EvictionHook(QuietHook):
    """Each row under its policy's budget after every forward; peaks and evictions on the record."""

    phase = "eviction"

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def join(self, rows, state) -> None:
        for r in rows:
            r.records[KEY] = KVRecord()

    def after_forward(self, rows, state, hidden, steps) -> None:
        lengths = state.lengths.tolist()  # one host sync; what eviction drops is subtracted, not re-read
        for row, (r, length, step) in enumerate(zip(rows, lengths, steps, strict=True)):
            record: KVRecord = r.records[KEY]
            record.peak_kv_tokens = max(record.peak_kv_tokens, length)
            policy = r.kv_policy
            if policy is not None and policy.observe and state.track_attention:
                record.observed.append(
                    (state.positions[row, :length].clone(), state.attention_last[row, :length].clone())
                )
                del record.observed[: -policy.observe]
            if policy is not None and length > policy.budget:
                step.evicted = self._evict(state, row, length, r, record)
            step.kv_tokens = length - len(step.evicted)

    def _evict(self, cache, row: int, length: int, r, record: KVRecord) -> list[int]:
        view = RowView(
            positions=cache.positions[row, :length],
            prompt_length=len(r.prompt_ids),
            attention_sum=cache.attention_sum[row, :length] if cache.track_attention else None,
            attention_last=cache.attention_last[row, :length] if cache.track_attention else None,
            importance=cache.importance[row, :length] if cache.track_importance else None,
            protected_from=record.protected_from,
        )
        if r.kv_policy.observe and record.observed:
            view.attention_window = observed_attention(record.observed, view.positions)
        if r.kv_policy.needs_keys:
            view.keys = cache.row_keys(row, length)  # [layers, kv_heads, n, head_dim]
        if r.kv_policy.spans:
            unit = r.kv_policy.spans
            marked = marked_tokens(self.tokenizer, unit, self.vocab_size)
            view.joins_previous = joins_previous(r, view.positions, unit, marked)
        keep = r.kv_policy.select(view)
        if keep is None:
            return []
        dropped = torch.ones(length, dtype=torch.bool, device=keep.device)
        dropped[keep] = False
        positions = view.positions[dropped.to(view.positions.device)].tolist()
        record.evicted_positions += positions
        cache.compact(row, keep)
        return positions

    def after_take(self, rows, state, steps) -> None:
        """Find where each answer starts, once the text shows the policy's end-of-thinking marker."""
        for r in rows:
            marker = r.kv_policy.end_of_thinking if r.kv_policy is not None else None
            record: KVRecord = r.records[KEY]
            if not marker or record.protected_from is not None:
                continue
            at = r.text.find(marker, max(0, record.scanned - len(marker)))
            record.scanned = len(r.text)
            if at >= 0:
                # the output token whose text reaches past the marker's first character
                record.protected_from = len(r.prompt_ids) + bisect.bisect_right(r.text_ends, at)


def observed_attention(observed: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor) -> torch.Tensor:
    """[n] the mean attention the observed queries paid each of `positions` (0 from a query that
    came before the slot was written, or after it was evicted: it could not attend to it)."""
    top = max(int(positions.max()), *(int(p.max()) for p, _ in observed)) + 1
    total = torch.zeros(top, device=positions.device)
    for pos, attention in observed:
        total.index_add_(0, pos.to(total.device), attention.to(total.device).float())
    return total[positions] / len(observed)


@functools.lru_cache(maxsize=8)
def marked_tokens(tokenizer, unit: str, vocab_size: int) -> torch.Tensor:
    """[vocab] bool, built once per tokenizer (a hook lives one batch; a vocabulary scan takes up to
    ~0.7 s): for "numbers" the tokens that are pieces of a number, for "lines" the tokens that end a
    line (hold a newline)."""
    mask = tokenizer.digit_token_mask() if unit == "numbers" else tokenizer.newline_token_mask()
    return torch.tensor(mask + [False] * max(0, vocab_size - len(mask)), dtype=torch.bool)


def joins_previous(r, positions: torch.Tensor, unit: str, marked: torch.Tensor) -> torch.Tensor:
    """[n] bool: the slot continues the span of the slot before, fed right after it. "numbers": both
    are digit tokens (`marked`: the digit tokens). "lines": the slot before does not end its line
    (`marked`: the tokens holding a newline); a latent vector (no token) ends its span."""
    positions = positions.cpu()
    tokens = r.tokens_at(positions)
    known = tokens >= 0
    mark = marked[tokens.clamp(min=0)] & known
    joins = torch.zeros_like(mark)
    consecutive = positions[1:] == positions[:-1] + 1
    if unit == "numbers":
        joins[1:] = mark[1:] & mark[:-1] & consecutive
    else:
        joins[1:] = known[1:] & known[:-1] & ~mark[:-1] & consecutive
    return joins
