"""Batched token selection with per-row parameters.

Each row of the batch may have its own temperature / top-k / top-p / min-p / repetition penalty
and its own seeded generator, so a request samples the same tokens whatever else shares its batch.
All filters work on one descending sort of the logits (skipped when none is on), in the order
Hugging Face applies them: repetition penalty, temperature, top-k, top-p, min-p. OpenAI's presence
and frequency penalties come first (over the tokens generated so far, as vLLM), and a
structured-output mask before all.
OpenAI's logit_bias is added to the raw logits, before everything (so a -100 bias bans a token).
"""

from __future__ import annotations

import torch

from memlm.generation.params import SamplingParams


class BatchSampler:
    """Selects the next token for every row; rebuilt when the batch's membership changes."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None], device="cpu"):
        self.params = params
        self.generators = generators
        self.all_greedy = all(p.greedy for p in params)
        # Only the sampled rows pay for the sort over the vocabulary; greedy rows take the argmax.
        self.sampled = [row for row, p in enumerate(params) if not p.greedy]
        self.sampled_index = torch.tensor(self.sampled, dtype=torch.long, device=device)
        chosen = [params[row] for row in self.sampled]
        self.filters = any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in chosen)
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)[:, None]
        self.temperature = as_tensor([p.temperature for p in chosen], torch.float32)
        self.top_k = as_tensor([p.top_k for p in chosen], torch.long)
        self.top_p = as_tensor([p.top_p for p in chosen], torch.float32)
        self.min_p = as_tensor([p.min_p for p in chosen], torch.float32)
        self.penalty = as_tensor([p.repetition_penalty for p in params], torch.float32)
        self.presence = as_tensor([p.presence_penalty for p in params], torch.float32)
        self.frequency = as_tensor([p.frequency_penalty for p in params], torch.float32)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.any_openai_penalty = any(p.presence_penalty or p.frequency_penalty for p in params)
        self.biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]

    def __call__(
        self, logits: torch.Tensor, history: TokenHistory | None = None, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B]. `history` holds the tokens to penalise; `allowed`
        [B, V] bool, the tokens a structured-output grammar permits (None: all)."""
        if self.biased:
            logits = self.add_logit_bias(logits)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if history is not None:
            if self.any_openai_penalty:
                counts = history.output_counts.float()
                logits = logits - self.frequency * counts - self.presence * (counts > 0).float()
            if self.any_penalty:
                logits = apply_repetition_penalty(logits, history.seen(), self.penalty)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        tokens = logits.argmax(dim=-1)
        probs, order = self.filtered_probs(logits.index_select(0, self.sampled_index))
        picks = self.draw(probs)
        tokens[self.sampled_index] = picks if order is None else order.gather(1, picks[:, None])[:, 0]
        return tokens

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of `probs` [n, V], drawn with that row's generator: inverse transform
        sampling, one uniform number per row (from its own generator, so a row's draw does not depend
        on its neighbours) against the batch's cumulative sums at once; a loop of torch.multinomial,
        one call per row, cost 2.7 ms a row at SmolLM2's vocabulary."""
        uniform = torch.cat([torch.rand(1, generator=self.generators[row]) for row in self.sampled])
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        # u in [0, total): the first index whose cumulative sum exceeds it has a non-zero probability
        # (u == total, at the very top of the range, would land on a filtered row's zero tail).
        u = torch.minimum(uniform.to(probs.device)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)

    def add_logit_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """Each biased row's logit_bias added to its logits (ids past the vocabulary were refused earlier)."""
        rows, ids, values = [], [], []
        for row, bias in self.biased:
            rows += [row] * len(bias)
            ids += list(bias)
            values += list(bias.values())
        logits = logits.clone()
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)
        return logits

    def filtered_probs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits of the sampled rows [n, V] -> (probabilities in descending-logit order, that order),
        with every filter applied; without filters (temperature alone) the probabilities in vocabulary
        order and None: the sort over the vocabulary was 70% of sampling's time, for nothing.

        The filters keep a prefix of the descending order, most often a short one (top-p 0.95 keeps
        tens of tokens of 49,152 after the first few of a text), so they are first applied to each
        row's CANDIDATES best logits, probabilities normalised over the whole row; only the rows whose
        kept prefix may run past those (the last candidate still kept, as in a flat distribution or
        a temperature-only row beside filtered ones) sort the whole vocabulary."""
        logits = logits / self.temperature
        if not self.filters:
            return logits.softmax(dim=-1), None
        filters = (self.top_k, self.top_p, self.min_p)
        # (a top-k past the candidates needs the k-th logit itself: those sort, as do small vocabularies)
        vocab = logits.shape[-1]
        if vocab <= 2 * CANDIDATES or not bool((self.top_k <= CANDIDATES).all()):
            return _filtered(*logits.sort(dim=-1, descending=True), *filters)
        best, order = logits.topk(CANDIDATES, dim=-1)
        masked = _top_k_masked(best, self.top_k)
        # each row's normaliser: over its top-k, or (no top-k) over the whole row
        whole = logits.logsumexp(dim=-1, keepdim=True)
        norm = torch.where(self.top_k > 0, masked.logsumexp(dim=-1, keepdim=True), whole)
        drop = _top_p_min_p_drop((masked - norm).exp(), self.top_p, self.min_p)
        probs = masked.masked_fill(drop, float("-inf")).softmax(dim=-1)
        open_rows = (~drop[:, -1] & (self.top_k[:, 0] == 0)).nonzero()[:, 0]  # prefix may go on
        if open_rows.numel() == 0:
            return probs, order
        # Those rows over the whole vocabulary; the others' candidates padded with zero probabilities.
        sub = [t.index_select(0, open_rows) for t in filters]
        full_probs, full_order = _filtered(*logits.index_select(0, open_rows).sort(dim=-1, descending=True), *sub)
        closed = torch.ones(len(logits), dtype=torch.bool, device=logits.device).index_fill_(0, open_rows, False)
        padded, every = torch.zeros_like(logits), order.new_zeros(logits.shape)
        padded[closed, :CANDIDATES], every[closed, :CANDIDATES] = probs[closed], order[closed]
        padded[open_rows], every[open_rows] = full_probs, full_order
        return padded, every


def _filtered(sorted_logits, order, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    """The filters over the whole vocabulary in descending order."""
    sorted_logits = _top_k_masked(sorted_logits, top_k)
    drop = _top_p_min_p_drop(sorted_logits.softmax(dim=-1), top_p, min_p)
    return sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1), order


# The filters look at this many of a row's best logits before sorting all of them (see filtered_probs).
CANDIDATES = 1024


def _top_k_masked(sorted_logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Logits in descending order with everything past each row's top_k (0: none) set to -inf."""
    ranks = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)[None, :]
    return sorted_logits.masked_fill((top_k > 0) & (ranks >= top_k), float("-inf"))


def _top_p_min_p_drop(probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Which tokens (probabilities in descending order, normalised over the whole row) top-p and
    min-p drop: top-p keeps the smallest prefix whose mass reaches p (the first token always stays),
    min-p drops tokens below min_p times the most likely token's probability."""
    mass_before = probs.cumsum(dim=-1) - probs
    return (mass_before >= top_p) | (probs < min_p * probs[:, :1])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


class TokenHistory:
    """Per row, which tokens the prompt holds and how often each was generated: what the penalties
    need. Rows follow the batch (`extend`, `select_rows`) like the model's state."""

    def __init__(self, vocab_size: int, device="cpu"):
        self.vocab_size, self.device = vocab_size, device
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)

    def extend(self, prompts: list[list[int]]) -> None:
        in_prompt = torch.zeros(len(prompts), self.vocab_size, dtype=torch.bool, device=self.device)
        for row, ids in enumerate(prompts):
            in_prompt[row, ids] = True
        counts = torch.zeros(len(prompts), self.vocab_size, dtype=torch.int32, device=self.device)
        self.in_prompt = torch.cat((self.in_prompt, in_prompt))
        self.output_counts = torch.cat((self.output_counts, counts))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.in_prompt, self.output_counts = self.in_prompt[rows], self.output_counts[rows]

    def record(self, rows: list[int], tokens: list[int]) -> None:
        """These rows took these tokens."""
        if rows:
            index = torch.tensor(rows, device=self.device)
            self.output_counts[index, torch.tensor(tokens, device=self.device)] += 1

    def seen(self) -> torch.Tensor:
        return self.in_prompt | (self.output_counts > 0)
