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
        order and None: the sort over the vocabulary was 70% of sampling's time, for nothing."""
        logits = logits / self.temperature
        if not self.filters:
            return logits.softmax(dim=-1), None
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        k = torch.where(self.top_k > 0, self.top_k, logits.shape[-1])
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= self.top_p
        # min-p: drop tokens below min_p times the most likely token's probability.
        drop |= probs < self.min_p * probs[:, :1]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return sorted_logits.softmax(dim=-1), order


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
