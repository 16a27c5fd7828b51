"""Eviction policies: keep each sequence's KV cache under a token budget.

A policy only decides *which slots of one row to keep*; the cache does the rest (`compact`), so
positions stay the ones each key was rotated with and generation goes on without re-prefill.
What a policy protects (the prompt, a recent window, attention sinks) is its own business.

Scored policies (h2o, tova, snapkv, rkv, learned) can keep *whole spans*: `spans="numbers"` (or
True) keeps numbers whole, since a number is several tokens (SmolLM2 writes one token per digit)
and a later line that copies it needs every digit, so losing one digit of a kept number wastes the
slots of the others; `spans="lines"` keeps lines whole, for traces whose unit of reasoning is a line
(a line's tokens are scored as they are written, before the token that shows the line matters: a
search's "yes" comes after the numbers the answer copies). With spans on, the engine marks which
slots continue the span of the slot before (`RowView.joins_previous`), each span scores as its best
slot, and a span is kept or dropped whole.

The engine asks a policy after every forward in which the row grew past its budget, so a row never
holds more than `budget` tokens between steps, and `budget + chunk` while a chunk is written.

Policies that score with an observation window (snapkv, rkv) read the attention the last `observe`
queries paid each slot (`RowView.attention_window`; the eviction hook keeps those queries' rows per
request, so a policy object holds no per-row state); rkv also reads each slot's keys
(`RowView.keys`) for its redundancy score. The oracle (`OraclePolicy`) is the benchmark's ceiling:
it is told, per request, which positions the answer depends on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from memlm.errors import InvalidRequestError


@dataclass(slots=True)
class RowView:
    """What a policy sees of one sequence: its live slots, in time order."""

    positions: torch.Tensor  # [n] original position of each slot
    prompt_length: int  # positions below this are prompt tokens
    attention_sum: torch.Tensor | None = None  # [n] attention each slot received so far (H2O)
    attention_last: torch.Tensor | None = None  # [n] attention from the newest query (TOVA)
    importance: torch.Tensor | None = None  # [n] learned importance of each slot (DynTS)
    protected_from: int | None = None  # positions from here on are the answer (after the end-of-thinking marker)
    joins_previous: torch.Tensor | None = None  # [n] bool: this slot continues the previous slot's span (spans)
    # [n] attention each slot received from the last `observe` queries (mean over them, heads and
    # layers; a slot written after a query counts 0 for it): SnapKV's and R-KV's observation window
    attention_window: torch.Tensor | None = None
    keys: torch.Tensor | None = None  # [layers, kv_heads, n, head_dim] each slot's keys (R-KV's redundancy)

    @property
    def length(self) -> int:
        return self.positions.numel()


class KVPolicy(ABC):
    name: ClassVar[str]
    needs_attention: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False  # the eviction hook fills RowView.keys
    observe: int = 0  # queries whose attention the hook keeps for RowView.attention_window (0: none)
    predictor = None  # an ImportancePredictor the engine runs on each new token's hidden state (DynTS)
    end_of_thinking: str | None = None  # text after which the engine reports `protected_from`
    spans: str | None = None  # "numbers" or "lines" kept whole: the engine fills `RowView.joins_previous`
    press = None  # a press (memlm.cache.presses) compressing the prompt once after its prefill

    def __init__(self, budget: int):
        if budget < 1:
            raise InvalidRequestError(f"{self.name}: budget must be >= 1, got {budget}")
        self.budget = budget

    def check_prompt(self, prompt_length: int) -> None:  # noqa: B027  (most policies accept any prompt)
        """Reject prompts the policy cannot fit (policies that never evict the prompt)."""

    def select(self, row: RowView) -> torch.Tensor | None:
        """Ascending slot indices to keep, or None to keep everything."""
        if row.length <= self.budget:
            return None
        keep = self._keep(row)
        return keep.sort().values

    @abstractmethod
    def _keep(self, row: RowView) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"


class FullPolicy(KVPolicy):
    """No eviction: the reference every other policy is measured against."""

    name = "full"

    def __init__(self, budget: int | None = None):
        self.budget = budget or 2**62

    def _keep(self, row: RowView) -> torch.Tensor:  # never reached: length <= budget
        return torch.arange(row.length)


class WindowPolicy(KVPolicy):
    """Keep the most recent `budget` tokens."""

    name = "window"

    def _keep(self, row: RowView) -> torch.Tensor:
        return torch.arange(row.length - self.budget, row.length)


class ClearPolicy(KVPolicy):
    """Past the budget, drop everything but the prompt."""

    name = "clear"

    def check_prompt(self, prompt_length: int) -> None:
        if prompt_length >= self.budget:
            raise InvalidRequestError(
                f"clear: the prompt ({prompt_length} tokens) must be shorter than the budget ({self.budget})"
            )

    def _keep(self, row: RowView) -> torch.Tensor:
        return torch.nonzero(row.positions < row.prompt_length).flatten()


class SinksPolicy(KVPolicy):
    """StreamingLLM: the first `sinks` tokens (attention sinks) plus a recent window."""

    name = "sinks"

    def __init__(self, budget: int, sinks: int = 4):
        super().__init__(budget)
        if budget <= sinks:
            raise InvalidRequestError(f"sinks: budget ({budget}) must be larger than the {sinks} sink tokens")
        self.sinks = sinks

    def _keep(self, row: RowView) -> torch.Tensor:
        recent = self.budget - self.sinks
        return torch.cat((torch.arange(self.sinks), torch.arange(row.length - recent, row.length)))


SPAN_UNITS = ("numbers", "lines")


def span_unit(spans: bool | str | None) -> str | None:
    """A `spans` option as the unit kept whole: None (token by token), "numbers" (also True), "lines"."""
    if spans is None or spans is False or spans == "off":
        return None
    if spans is True:
        return "numbers"
    if spans not in SPAN_UNITS:
        raise InvalidRequestError(f"spans must be one of {', '.join(SPAN_UNITS)} (or true / false), got {spans!r}")
    return spans


def span_ids(joins_previous: torch.Tensor) -> torch.Tensor:
    """[n] bool (slot continues the slot before) -> [n] span index, 0 for the first span."""
    starts = ~joins_previous
    starts[:1] = True
    return starts.long().cumsum(0) - 1


def best_whole_spans(scores: torch.Tensor, span: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` slot indices, best first, taking spans whole: a span scores as its best slot,
    spans go in order of score (earlier first on ties), and the span that would not fit whole is
    left out (so an eviction may free a few more slots than asked)."""
    if count >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    best = torch.full((int(span[-1]) + 1,), float("-inf"), device=scores.device)
    best = best.scatter_reduce(0, span, scores.float(), "amax")
    order = best[span].sort(descending=True, stable=True).indices  # a span's slots stay together
    chosen = order[:count]
    cut = span[order[count - 1]] if count else None
    if count and span[order[count]] == cut:
        chosen = chosen[span[chosen] != cut]
    return chosen


def _top(scores: torch.Tensor, row: RowView, older: int, count: int, spans: str | None) -> torch.Tensor:
    """The `count` best of the older slots [0, older): token by token, or whole spans. A span that
    runs into the kept recent slots is kept whole too."""
    scores = scores[:older]
    if not spans or row.joins_previous is None:
        return scores.topk(count).indices
    span = span_ids(row.joins_previous.to(scores.device))
    if older < row.length and bool(row.joins_previous[older]):
        scores = scores.masked_fill(span[:older] == span[older], float("inf"))
    return best_whole_spans(scores, span[:older], count)


class _ScoredPolicy(KVPolicy):
    """Keep a recent window, then the best-scoring older tokens up to the budget."""

    needs_attention = True

    def __init__(self, budget: int, window: int, spans: bool | str = False):
        super().__init__(budget)
        if budget <= window:
            raise InvalidRequestError(f"{self.name}: budget ({budget}) must be larger than the window ({window})")
        self.window, self.spans = window, span_unit(spans)

    @abstractmethod
    def scores(self, row: RowView) -> torch.Tensor: ...

    def _keep(self, row: RowView) -> torch.Tensor:
        older = row.length - self.window
        best = _top(self.scores(row), row, older, self.budget - self.window, self.spans)
        return torch.cat((best, torch.arange(older, row.length)))


class H2OPolicy(_ScoredPolicy):
    """Heavy hitters: attention accumulated over every query so far, plus a recent window."""

    name = "h2o"

    def __init__(self, budget: int, window: int | None = None, spans: bool | str = False):
        super().__init__(budget, budget // 2 if window is None else window, spans)

    def scores(self, row: RowView) -> torch.Tensor:
        return row.attention_sum


class TOVAPolicy(_ScoredPolicy):
    """Token Omission Via Attention: the newest query's attention, averaged over heads (and layers)."""

    name = "tova"

    def __init__(self, budget: int, window: int = 1, spans: bool | str = False):
        super().__init__(budget, window, spans)  # the newest token itself always stays

    def scores(self, row: RowView) -> torch.Tensor:
        return row.attention_last


def pooled(scores: torch.Tensor, kernel: int, how: str) -> torch.Tensor:
    """[n] -> [n] smoothed over neighbouring slots (SnapKV's pooling: a token near an attended one
    is kept with it), "avg" or "max" over a centred window of odd width `kernel`."""
    if kernel <= 1:
        return scores
    x = scores.float()[None, None]
    if how == "max":
        return torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2)[0, 0]
    return torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)[0, 0]


class SnapKVPolicy(_ScoredPolicy):
    """SnapKV applied at every decoding step: the last `window` queries (its observation window)
    vote for the older slots by the attention they paid them (mean over those queries, heads and
    layers), pooled over neighbours (average, kernel 5); the window stays, the best older slots
    fill the rest of the budget. SnapKV compresses a prompt once; here it runs whenever the row
    passes its budget, as kvpress's decoding wrapper does, so its vote is always the latest."""

    name = "snapkv"
    kernel, pooling = 5, "avg"

    def __init__(self, budget: int, window: int = 8, spans: bool | str = False):
        super().__init__(budget, window, spans)
        self.observe = window

    def importance(self, row: RowView) -> torch.Tensor:
        votes = row.attention_window if row.attention_window is not None else row.attention_last
        return pooled(votes, self.kernel, self.pooling)

    def scores(self, row: RowView) -> torch.Tensor:
        return self.importance(row)


def key_redundancy(keys: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """R-KV's redundancy of each slot, [layers, heads, n, d] -> [n] (higher: more redundant).

    Per layer and head: the cosine similarity of every pair of keys (self-similarity zeroed); for
    each slot, the similarity to the most recent slot that resembles it (> threshold) is zeroed too,
    so the newest copy of a repeated thought is the one that survives; the mean similarity of each
    slot to all slots, softmaxed over the slots. Then the mean over layers and heads, because this
    cache evicts a slot from every layer and head at once (R-KV selects per head)."""
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = k @ k.transpose(-1, -2)  # [L, H, n, n]
    n = sim.shape[-1]
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    index = torch.arange(n, device=sim.device)
    similar = sim > threshold
    last = torch.where(similar, index, torch.zeros_like(index)).amax(dim=-1)  # [L, H, n] (0 when none, as R-KV)
    sim.scatter_(-1, last[..., None], 0.0)
    return sim.mean(dim=-1).softmax(dim=-1).mean(dim=(0, 1))


class RKVPolicy(SnapKVPolicy):
    """R-KV (Cai et al. 2025, arXiv 2505.24133): importance minus redundancy, for reasoning traces
    that repeat themselves. Importance is SnapKV's vote of the last `window` queries, max-pooled
    (kernel 7); redundancy is `key_redundancy` of the slots' keys. A slot scores
    `mix * importance - (1 - mix) * redundancy` (mix 0.07, the paper's), the window stays, the best
    older slots fill the budget. R-KV compresses every 128 decoded tokens into a buffer above its
    budget; under a hard cap that would leave a short budget 128 slots short, so this runs at
    every step past the budget, as the other policies here do."""

    name = "rkv"
    needs_keys = True
    kernel, pooling = 7, "max"

    def __init__(
        self, budget: int, window: int = 8, spans: bool | str = False, mix: float = 0.07, threshold: float = 0.5
    ):
        super().__init__(budget, window, spans)
        if not 0 <= mix <= 1:
            raise InvalidRequestError(f"rkv: mix must be in [0, 1], got {mix}")
        self.mix, self.similarity_threshold = mix, threshold

    def scores(self, row: RowView) -> torch.Tensor:
        importance = self.importance(row)
        if row.keys is None:
            raise InvalidRequestError("rkv: the cache gave no keys (RowView.keys)")
        redundancy = key_redundancy(row.keys, self.similarity_threshold).to(importance.device)
        return self.mix * importance - (1 - self.mix) * redundancy


class OraclePolicy(KVPolicy):
    """The ceiling a benchmark measures policies against: it is told which positions the answer
    depends on (`keep`, from the task's generator: e.g. the one line of a search that found the
    answer) and keeps them, the prompt and the answer (unless `evict_prompt`), and fills what is
    left of the budget with the most recent tokens, which the next line reads. Not for serving:
    nothing outside a benchmark knows those positions."""

    name = "oracle"

    def __init__(self, budget: int, keep=(), end_of_thinking: str | None = "Answer:", evict_prompt: bool = False):
        super().__init__(budget)
        self.keep = torch.as_tensor(sorted(set(int(p) for p in keep)), dtype=torch.long)
        self.end_of_thinking, self.evict_prompt = end_of_thinking, bool(evict_prompt)

    def check_prompt(self, prompt_length: int) -> None:
        if not self.evict_prompt and prompt_length + 1 >= self.budget:
            raise InvalidRequestError(
                f"oracle: the prompt ({prompt_length} tokens) and the newest token must fit under the budget "
                f"({self.budget}); prompt tokens are never evicted"
            )

    def ranks(self, row: RowView) -> torch.Tensor:
        """[n] the order of keeping: protected and the newest slot first, then the answer's lines,
        then the rest by recency."""
        positions = row.positions.cpu()
        rank = positions.double()  # recency: a later position ranks higher
        wanted = torch.isin(positions, self.keep)
        rank = torch.where(wanted, rank + 1e9, rank)
        protected = positions < (0 if self.evict_prompt else row.prompt_length)
        if row.protected_from is not None:
            protected |= positions >= row.protected_from
        protected[-1] = True  # the token just written
        return rank.masked_fill(protected, float("inf"))

    def _keep(self, row: RowView) -> torch.Tensor:
        return self.ranks(row).topk(self.budget).indices


def evicts_prompt(evict_prompt: bool | None = None) -> bool:
    """Whether a learned policy lets prompt tokens compete: only when the caller says so. How the
    predictor was trained (`scores_prompt`) never decides it: a predictor trained on prompt tokens
    can rank them, but the seed's contract (the prompt is never evicted) holds unless opted out."""
    return bool(evict_prompt)


def _by_threshold(
    scores: torch.Tensor, row: RowView, older: int, tau: float, cap: int, spans: str | None
) -> torch.Tensor:
    """The older slots scoring >= tau (protected ones are +inf), never more than `cap`: where more
    pass, the best of them (spans kept whole with `spans`)."""
    passing = torch.nonzero(scores[:older] >= tau).flatten()
    if passing.numel() <= cap:
        if not spans or row.joins_previous is None:
            return passing
        # a span whose best slot passes stays whole (its other slots ride along on that score)
        span = span_ids(row.joins_previous.to(scores.device))[:older]
        best = torch.full((int(span[-1]) + 1,), float("-inf"), device=scores.device)
        best = best.scatter_reduce(0, span, scores[:older].float(), "amax")
        whole = torch.nonzero(best[span] >= tau).flatten()
        if whole.numel() <= cap:
            return whole
    return _top(scores.masked_fill(scores < tau, float("-inf")), row, older, cap, spans)


class LearnedPolicy(KVPolicy):
    """DynTS: a learned importance per token; prompt and answer tokens are never evicted unless the
    caller opts in (`evict_prompt=True`).

    Each token gets a score from the predictor (see memlm/cache/importance.py) when it is written.
    Prompt tokens and tokens from the end-of-thinking marker on count as +inf, and the most recent
    `window` tokens always stay. When the row passes its budget, it keeps the window, the protected
    tokens, and, of the other older tokens, either

    * the top `ratio` (rank mode, the default): with ratio < 1 one eviction frees several slots at
      once (fewer, larger evictions, as published); with ratio 1 the row is trimmed back to exactly
      its budget; or
    * those scoring `>= threshold` (threshold mode, the seed's diagram: keep a token while its
      predicted importance clears tau), with the budget as a hard cap: where more pass than fit,
      the best of them.

    Either way a row never holds more than the budget. With `spans`, numbers or lines go whole.

    A score written once cannot tell when a token's use is over: a partial product the predictor
    rightly scored high stays after the line that copies it is done. `rescore` gives that share of
    the kept older slots to the newest query's attention (TOVA's signal, re-read at every
    eviction) and the rest to the learned score: the predictor keeps what the future will need,
    the current query what the present line is using.

    `evict_prompt`: prompt tokens compete on their learned score like thinking tokens (only the
    answer stays protected). DynTS keeps the whole prompt, which costs a short-budget row dearly
    when the prompt is dead early: a long multiplication reads its factors until the last row is
    written, then never again, and TOVA, which may drop them, gets those slots back. Off unless the
    caller turns it on; a predictor trained on prompt tokens too (`memlm train predictor --prompt`)
    is the one whose scores rank prompt and thinking tokens on one scale, but it does not turn it on.
    """

    name = "learned"

    def __init__(
        self,
        budget: int,
        predictor=None,
        window: int = 8,
        ratio: float = 0.5,
        end_of_thinking: str | None = "Answer:",
        spans: bool | str = False,
        rescore: float = 0.0,
        evict_prompt: bool | None = None,
        threshold: float | None = None,
    ):
        super().__init__(budget)
        if predictor is None:
            raise InvalidRequestError("learned: needs an importance predictor (--kv-predictor DIR)")
        if budget <= window:
            raise InvalidRequestError(f"learned: budget ({budget}) must be larger than the window ({window})")
        if not 0 < ratio <= 1:
            raise InvalidRequestError(f"learned: ratio must be in (0, 1], got {ratio}")
        if not 0 <= rescore <= 1:
            raise InvalidRequestError(f"learned: rescore must be in [0, 1], got {rescore}")
        if threshold is not None and not threshold == threshold:  # NaN would keep nothing, silently
            raise InvalidRequestError("learned: threshold must be a number")
        self.threshold = threshold
        self.predictor, self.window, self.ratio, self.end_of_thinking = predictor, window, ratio, end_of_thinking
        self.spans, self.rescore = span_unit(spans), rescore
        self.evict_prompt = evicts_prompt(evict_prompt)
        self.needs_attention = rescore > 0

    def check_prompt(self, prompt_length: int) -> None:
        if not self.evict_prompt and prompt_length + self.window >= self.budget:
            raise InvalidRequestError(
                f"learned: the prompt ({prompt_length} tokens) and the window ({self.window}) must fit "
                f"under the budget ({self.budget}); prompt tokens are never evicted"
            )

    def protected(self, row: RowView) -> torch.Tensor:
        prompt_end = 0 if self.evict_prompt else row.prompt_length
        keep = row.positions < prompt_end
        if row.protected_from is not None:
            keep |= row.positions >= row.protected_from
        return keep

    def _keep(self, row: RowView) -> torch.Tensor:
        older = row.length - self.window
        protected = self.protected(row)[:older]
        scores = row.importance[:older].masked_fill(protected, float("inf"))
        fixed = int(protected.sum())
        cap = self.budget - self.window
        if self.threshold is not None:  # threshold mode: every token that clears tau, the budget a hard cap
            if self.rescore:
                current = row.attention_last[:older].masked_fill(protected, float("inf"))
                now = _top(current, row, older, min(cap, fixed + round(self.rescore * (cap - fixed))), self.spans)
                scores = scores.index_fill(0, now, float("inf"))
            best = _by_threshold(scores, row, older, self.threshold, cap, self.spans)
            return torch.cat((best, torch.arange(older, row.length)))
        count = min(cap, fixed + int(self.ratio * (older - fixed)))
        if self.rescore:  # the current query's share first; the learned score fills the rest
            current = row.attention_last[:older].masked_fill(protected, float("inf"))
            now = _top(current, row, older, fixed + round(self.rescore * (count - fixed)), self.spans)
            scores = scores.index_fill(0, now, float("inf"))
        best = _top(scores, row, older, count, self.spans)
        return torch.cat((best, torch.arange(older, row.length)))


POLICIES: dict[str, type[KVPolicy]] = {
    p.name: p
    for p in (
        FullPolicy,
        WindowPolicy,
        ClearPolicy,
        SinksPolicy,
        H2OPolicy,
        TOVAPolicy,
        SnapKVPolicy,
        RKVPolicy,
        LearnedPolicy,
    )
}
# The policies that rank slots by a score, and so can keep numbers or lines whole (`spans`).
SPAN_POLICIES = ("h2o", "tova", "snapkv", "rkv", "learned")


def make_policy(name: str, budget: int | None = None, **options) -> KVPolicy:
    """A policy by name: `make_policy("sinks", 128, sinks=4)`, `make_policy("learned", 128, predictor=p)`.
    Clear errors for bad names or budgets."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidRequestError(f"unknown KV policy {name!r}; choose one of {', '.join(POLICIES)}")
    if cls is FullPolicy:
        return FullPolicy()
    if budget is None:
        raise InvalidRequestError(f"KV policy {name!r} needs a budget (--kv-budget)")
    return cls(budget, **options)
