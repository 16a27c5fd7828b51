"""One request's life in the engine: its prompt, parameters and memory options, the tokens and text
it has produced. What each memory keeps about it is that memory's own record (`records`, written by
its row hook: memlm.generation.hooks). Also the two records the engine hands out: `StreamDelta`
after each step and `Completion` at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from memlm.cache.policies import KVPolicy
from memlm.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from memlm.generation.params import SamplingParams

if TYPE_CHECKING:
    from memlm.generation.hooks import RowMemory
    from memlm.generation.structured import Grammar


@dataclass(slots=True)
class Completion:
    index: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end token, stop string or stop token), "length", "halted" (LCM danger grid), "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    peak_kv_tokens: int = 0  # KV cache: most tokens this sequence held at once
    cached_tokens: int = 0  # paged KV cache: prompt tokens reused from the prefix cache, not computed
    logprobs: list[float] | None = None  # log p of each token (teacher forcing, or SamplingParams.logprobs)
    greedy_hits: list[bool] | None = None  # teacher forcing: was each given token the most likely one
    insertions: list[int] | None = None  # latent memory: inserted after this many output tokens (0 = the prompt)
    memory_trace: list[dict] | None = None  # codebook memory: the reasoning loop behind each output token
    top_logprobs: list[list[tuple[int, float]]] | None = None  # SamplingParams.logprobs > 0: the alternatives
    # Seconds from arrival to the first output token (prefill and queue), and from it to the last
    # (the decode steps after it): measured where the tokens are taken, so a benchmark reads decode
    # time directly instead of as the difference of two noisy runs.
    ttft_s: float | None = field(default=None, compare=False)
    decode_s: float | None = field(default=None, compare=False)


@dataclass(slots=True)
class StreamDelta:
    """What one engine step did for one request."""

    index: int  # which request of the batch (generate/stream), or the request's place of arrival
    text: str
    finish_reason: str | None = None
    request: Request | None = field(default=None, repr=False, compare=False)
    token_id: int | None = None  # the token taken this step (None: none, e.g. latents were inserted instead)
    evicted: list[int] = field(default_factory=list)  # positions the KV policy dropped this step
    inserted: int = 0  # latent vectors inserted this step
    kv_tokens: int | None = None  # tokens the request holds in the KV cache after this step
    position: int | None = None  # the position the token taken will be fed at


@dataclass(slots=True, eq=False)  # a request is equal only to itself
class Request:
    id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    kv_policy: KVPolicy | None = None
    memory: RowMemory | None = None  # a memory that brings its own row hook (latent memory)
    grammar: Grammar | None = None
    adapter: str | None = None  # the LoRA adapter it runs with (a name in the engine's AdapterBank), or the base
    arrival: float = field(default_factory=time.monotonic)
    joined: float | None = None  # when it joined the running batch (the end of its time in the queue)
    next_position: int = 0  # where the next fed token goes
    pending_ids: list[int] = field(default_factory=list)  # to feed at the next step: the prompt, or the last token
    pending_embeds: torch.Tensor | None = None  # [K, d] vectors a memory feeds after the pending tokens
    # [K, d] a memory's queries, fed *before* the pending tokens with the model's own LoRA on: their
    # keys and values stay in the row's cache as latent slots (a keys-and-values weaver's insertion,
    # done inside the batch's forward instead of a pass of its own)
    pending_queries: torch.Tensor | None = None
    records: dict[str, object] = field(default_factory=dict)  # each row hook's record of this request
    output_ids: list[int] = field(default_factory=list)
    output_positions: list[int] = field(default_factory=list)  # where each output token was (or will be) fed
    text_ends: list[int] = field(default_factory=list)  # len(text) after each output token
    forced: list[int] | None = None  # teacher forcing: the tokens to feed instead of sampling
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    greedy_hits: list[bool] = field(default_factory=list)
    text: str = ""
    streamed: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_at: float | None = None  # time.monotonic() when the first output token was taken
    last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def vectors_pending(self) -> int:
        """Vectors (not tokens) the next step feeds: queued queries and embeddings."""
        return sum(0 if v is None else v.shape[0] for v in (self.pending_queries, self.pending_embeds))

    @property
    def token_position(self) -> int:
        """Where the next sampled token will be fed: after the queries queued before it, if any."""
        return self.next_position + (0 if self.pending_queries is None else self.pending_queries.shape[0])

    @property
    def wants_logprobs(self) -> bool:
        return self.forced is not None or self.params.logprobs is not None

    def append(self, token: int) -> str:
        """Take one sampled token; return the text that may be shown now."""
        self.output_ids.append(token)
        self.output_positions.append(self.token_position)
        self.last_token_at = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = self.last_token_at
        p = self.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._finish("stop", token)
        else:
            before = len(self.text)
            self.text += self.detokenizer.push(token)
            if self.grammar is not None:
                self.grammar.accept(token)
            if len(self.output_ids) >= p.max_new_tokens:
                self._finish("length")
            elif self.grammar is not None and self.grammar.done:
                self._finish("stop")
            self.text_ends.append(len(self.text))
            hit = self.stops.find(self.text, before)
            if hit is not None:
                self.text = self.text[: hit[0]]
                self.finish_reason, self.stop_reason = "stop", hit[1]
        shown = len(self.text) if self.finish_reason else self.stops.safe_length(self.text)
        delta, self.streamed = self.text[self.streamed : shown], max(self.streamed, shown)
        return delta

    def tokens_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The token fed at each position, -1 where none was (a latent vector)."""
        width = max(int(positions.max()) + 1 if positions.numel() else 0, len(self.prompt_ids))
        table = torch.full((width,), -1, dtype=torch.long)
        table[: len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.long)
        fed = [(p, t) for p, t in zip(self.output_positions, self.output_ids, strict=True) if p < width]
        if fed:
            where, ids = zip(*fed, strict=True)
            table[list(where)] = torch.tensor(ids, dtype=torch.long)
        return table[positions.cpu()]

    def halt(self) -> str:
        """The model's danger grid stopped this request: end it without another token."""
        self._finish("halted", "danger")
        delta, self.streamed = self.text[self.streamed :], len(self.text)
        return delta

    def abort(self) -> None:
        self.finish_reason = self.finish_reason or "abort"

    def _finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.text += self.detokenizer.flush()

    def completion(self) -> Completion:
        scored = self.wants_logprobs
        memories = {}
        for record in self.records.values():
            memories.update(record.completion_fields())
        return Completion(
            self.index,
            self.text,
            self.output_ids,
            self.prompt_ids,
            self.finish_reason,
            self.stop_reason,
            logprobs=self.logprobs if scored else None,
            greedy_hits=self.greedy_hits if self.forced is not None else None,
            top_logprobs=self.top_logprobs if scored and self.params.logprobs else None,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            decode_s=None if self.first_token_at is None else self.last_token_at - self.first_token_at,
            **memories,
        )
