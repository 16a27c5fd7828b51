"""The decode loop: tokenize, prefill once, decode incrementally with the KV cache, sample, stop,
detokenize. Batched (prompts of different lengths, each finishing on its own) and streamed.

Rows that finish leave the batch at once (their cache rows are dropped), so a long request does
not make finished ones keep paying for decode steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from memlm.cache.kv_cache import KVCache
from memlm.cache.policies import FullPolicy, KVPolicy, RowView
from memlm.errors import InvalidRequestError
from memlm.generation.detokenizer import IncrementalDetokenizer, StopMatcher, token_at_char
from memlm.generation.params import SamplingParams
from memlm.generation.sampling import BatchSampler
from memlm.models.llama import LlamaModel
from memlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from memlm.latent.memory import LatentMemory
    from memlm.lcm.model import LCMModel

Message = dict[str, str]
Prompt = str | list[Message]
PolicyArg = KVPolicy | Sequence[KVPolicy | None] | None


@dataclass(slots=True)
class Completion:
    index: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end token, stop string or stop token), "length", or "halted" (LCM danger grid)
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    peak_kv_tokens: int = 0  # most tokens this sequence held in the KV cache at once
    logprobs: list[float] | None = None  # teacher forcing (Engine.score): log p of each given token
    greedy_hits: list[bool] | None = None  # ... and whether it was the most likely token
    insertions: list[int] | None = None  # latent memory: inserted after this many output tokens (0 = the prompt)
    memory_trace: list[dict] | None = None  # codebook memory: the reasoning loop behind each output token


@dataclass(slots=True)
class StreamDelta:
    index: int  # which request of the batch
    text: str
    finish_reason: str | None = None


@dataclass(slots=True)
class _Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    kv_policy: KVPolicy | None = None
    peak_kv_tokens: int = 0
    protected_from: int | None = None  # position where the policy's end-of-thinking marker begins
    output_ids: list[int] = field(default_factory=list)
    text_ends: list[int] = field(default_factory=list)  # len(text) after each output token
    forced: list[int] | None = None  # teacher forcing: the tokens to feed instead of sampling
    logprobs: list[float] = field(default_factory=list)
    greedy_hits: list[bool] = field(default_factory=list)
    insertions: list[int] | None = None
    memory_trace: list[dict] | None = None
    text: str = ""
    streamed: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def append(self, token: int) -> str:
        """Take one sampled token; return the text that may be shown now."""
        self.output_ids.append(token)
        p = self.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._finish("stop", token)
        else:
            before = len(self.text)
            self.text += self.detokenizer.push(token)
            if len(self.output_ids) >= p.max_new_tokens:
                self._finish("length")
            self.text_ends.append(len(self.text))
            marker = self.kv_policy.end_of_thinking if self.kv_policy is not None else None
            if marker and self.protected_from is None:
                self._find_marker(marker, before)
            hit = self.stops.find(self.text, before)
            if hit is not None:
                self.text = self.text[: hit[0]]
                self.finish_reason, self.stop_reason = "stop", hit[1]
        shown = len(self.text) if self.finish_reason else self.stops.safe_length(self.text)
        delta, self.streamed = self.text[self.streamed : shown], max(self.streamed, shown)
        return delta

    def _find_marker(self, marker: str, before: int) -> None:
        """Note the position of the token where `marker` starts, once the text shows it."""
        at = self.text.find(marker, max(0, before - len(marker)))
        if at >= 0:
            self.protected_from = len(self.prompt_ids) + token_at_char(self.text_ends, at)

    def halt(self) -> str:
        """The model's danger grid stopped this request: end it without another token."""
        self._finish("halted", "danger")
        delta, self.streamed = self.text[self.streamed :], len(self.text)
        return delta

    def _finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.text += self.detokenizer.flush()

    def completion(self) -> Completion:
        return Completion(
            self.index,
            self.text,
            self.output_ids,
            self.prompt_ids,
            self.finish_reason,
            self.stop_reason,
            self.peak_kv_tokens,
            self.logprobs if self.forced is not None else None,
            self.greedy_hits if self.forced is not None else None,
            self.insertions,
            self.memory_trace,
        )


class Engine:
    def __init__(
        self,
        model: LlamaModel | LCMModel,
        tokenizer: Tokenizer,
        name: str = "",
        source: str = "",
        dtype: str = "float32",
        num_parameters: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.name, self.source, self.dtype = name, source, dtype
        self.num_parameters = num_parameters or sum(p.numel() for p in model.parameters())
        self.config = model.config
        self.eos_ids = frozenset(model.config.eos_token_ids)

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32") -> Engine:
        from memlm.models.loading import load_model

        m = load_model(name_or_path, dtype)
        return cls(m.model, m.tokenizer, m.name, m.source, m.dtype, m.num_parameters)

    # ---- prompts -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A string is used as is; a list of chat messages goes through the chat template."""
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            if not prompt:
                raise InvalidRequestError("chat has no messages")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        else:
            raise InvalidRequestError("a prompt is a string or a list of {'role', 'content'} messages")
        if not text.strip():
            raise InvalidRequestError("prompt is empty")
        return self.tokenizer.encode(text)

    def _batch(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and all(isinstance(m, dict) for m in prompts)
        )
        if single:
            return [self.encode_prompt(prompts)], True
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError("give a prompt string, a chat (list of messages), or a non-empty list of those")
        return [self.encode_prompt(p) for p in prompts], False

    # ---- public API -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a batch (-> list of Completions, in order).

        `params` and `kv_policy` are one for all requests or one per request. A KV policy keeps
        the request's cache under its token budget (see memlm.cache.policies). A LatentMemory
        inserts latent embeddings after the prompt and at delimiters (see memlm.latent)."""
        ids, single = self._batch(prompts)
        completions = self.generate_tokens(ids, params, kv_policy, memory)
        return completions[0] if single else completions

    def generate_tokens(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> list[Completion]:
        requests = self._requests(prompt_ids, params, kv_policy)
        for _ in self._run(requests, memory):
            pass
        return [r.completion() for r in requests]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> Iterator[StreamDelta]:
        """Yield text deltas as they become final; each request's last delta carries its finish_reason."""
        ids, _ = self._batch(prompts)
        for deltas in self._run(self._requests(ids, params, kv_policy), memory):
            yield from deltas

    def score(
        self,
        prompt_ids: list[list[int]],
        continuations: list[list[int]],
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> list[Completion]:
        """Teacher forcing: feed each continuation after its prompt through the same decode loop
        (cache, eviction policy and all) and report, per continuation token, its log-probability
        and whether greedy decoding would have chosen it (`Completion.logprobs`, `.greedy_hits`).

        This measures what a KV policy forgets: score a known answer after a long context."""
        if len(continuations) != len(prompt_ids) or any(not c for c in continuations):
            raise InvalidRequestError("give one non-empty continuation per prompt")
        params = [SamplingParams(max_new_tokens=len(c), ignore_eos=True) for c in continuations]
        requests = self._requests(prompt_ids, params, kv_policy)
        for r, c in zip(requests, continuations, strict=True):
            if max(c) >= self.config.vocab_size or min(c) < 0:
                raise InvalidRequestError("continuation has token ids outside the vocabulary")
            if r.params.max_new_tokens < len(c):
                raise InvalidRequestError("prompt + continuation exceed the model's context")
            r.forced = list(c)
        for _ in self._run(requests, memory):
            pass
        return [r.completion() for r in requests]

    # ---- the loop --------------------------------------------------------------------------------

    def _requests(self, prompt_ids, params, kv_policy: PolicyArg = None) -> list[_Request]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if kv_policy is None or isinstance(kv_policy, KVPolicy):
            kv_policy = [kv_policy] * len(prompt_ids)
        if len(params) != len(prompt_ids) or len(kv_policy) != len(prompt_ids):
            raise InvalidRequestError(
                f"{len(prompt_ids)} prompts but {len(params)} sampling params and {len(kv_policy)} KV policies"
            )
        limit = self.config.max_position_embeddings
        requests = []
        for i, (ids, p, policy) in enumerate(zip(prompt_ids, params, kv_policy, strict=True)):
            p.validate()
            if not ids:
                raise InvalidRequestError("prompt is empty")
            if len(ids) >= limit:
                raise InvalidRequestError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
            if max(ids) >= self.config.vocab_size or min(ids) < 0:
                raise InvalidRequestError("prompt has token ids outside the vocabulary")
            if len(ids) + p.max_new_tokens > limit:  # never run past the model's context
                p = replace(p, max_new_tokens=limit - len(ids))
            generator = None
            if not p.greedy:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(p.seed if p.seed is not None else torch.seed())
            if isinstance(policy, FullPolicy):  # no eviction: the same as no policy, for every family
                policy = None
            if policy is not None:
                if not self.model.supports_eviction:
                    raise InvalidRequestError(
                        "KV-cache eviction policies need a model with a KV cache; this model keeps a "
                        "constant-size recurrent state instead"
                    )
                policy.check_prompt(len(ids))
            detokenizer = IncrementalDetokenizer(self.tokenizer)
            requests.append(
                _Request(i, list(ids), p, self.eos_ids, detokenizer, StopMatcher(p.stop), generator, policy)
            )
        return requests

    @torch.inference_mode()
    def _run(self, requests: list[_Request], memory: LatentMemory | None = None) -> Iterator[list[StreamDelta]]:
        model, device = self.model, self.model.device
        if memory is not None and not model.supports_eviction:
            raise InvalidRequestError("latent memory needs a Llama-family model (it inserts into a KV cache)")
        batch = len(requests)
        longest = max(len(r.prompt_ids) for r in requests)
        extra = memory.extra_slots() if memory is not None else 0
        capacity = max(_slots_needed(r) for r in requests) + extra
        policies = [r.kv_policy for r in requests if r.kv_policy is not None]
        track = any(p.needs_attention for p in policies)
        scored = any(p.predictor is not None for p in policies)
        cache = model.new_state(batch, capacity, track, scored)  # a KV cache, or a recurrent state (LCM)
        halting = hasattr(cache, "halted")  # a model that may stop a row itself (LCM's danger grid)
        traced = hasattr(cache, "traces")
        if traced:
            for r in requests:
                r.memory_trace = []

        # Prefill: one forward over the right-padded prompts (padding has position -1).
        ids = torch.zeros(batch, longest, dtype=torch.long)
        positions = torch.full((batch, longest), -1, dtype=torch.long)
        for row, r in enumerate(requests):
            n = len(r.prompt_ids)
            ids[row, :n] = torch.tensor(r.prompt_ids)
            positions[row, :n] = torch.arange(n)
        ids, positions = ids.to(device), positions.to(device)
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        hidden = model.forward_tokens(ids, positions, cache)
        if scored:
            _score(cache, hidden, requests)
        _evict(cache, requests)
        # Shaped [B, 1, d] like a decode step: the next token's logits are computed the same way.
        last_hidden = hidden[torch.arange(batch, device=device), lengths - 1]
        next_position = lengths[:, None]

        latent = None
        if memory is not None:
            from memlm.latent.memory import LatentSession

            latent = LatentSession(memory, [r.prompt_ids for r in requests], longest + capacity)
            for r in requests:
                r.insertions = []
            prompt_latents = latent.prompt_latents([r.prompt_ids for r in requests])
            if prompt_latents is not None:  # latent memory right after the prompt: a small prefill
                for r in requests:
                    r.insertions.append(0)
                chunk, chunk_positions, real = _chunk([None] * batch, prompt_latents, next_position, model)
                hidden = model(chunk, chunk_positions, cache)
                if scored:
                    _score(cache, hidden, requests)
                _evict(cache, requests)
                last_hidden = hidden[torch.arange(batch, device=device), real - 1]
                next_position = next_position + real[:, None]
        logits = model.logits(last_hidden[:, None])[:, 0]

        seen = None
        if any(r.params.repetition_penalty != 1.0 for r in requests):
            seen = torch.zeros(batch, self.config.vocab_size, dtype=torch.bool, device=device)
            for row, r in enumerate(requests):
                seen[row, r.prompt_ids] = True

        active = list(requests)
        sampler = BatchSampler([r.params for r in active], [r.generator for r in active], device)
        while True:
            halted = cache.halted.tolist() if halting else None
            logits = self._suppress_early_end(logits, active)
            tokens = sampler(logits, seen)
            if any(r.forced is not None for r in active):
                tokens = _force(logits, tokens, active)
            inserting = []
            if latent is not None:  # rows whose last token is a delimiter may insert instead of taking a token
                rows = [(r.prompt_ids, r.output_ids) for r in active]
                inserting = latent.choose(rows, tokens.tolist(), last_hidden)
            deltas, keep = [], []
            for row, (r, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
                if halted is not None and halted[row]:
                    deltas.append(StreamDelta(r.index, r.halt(), r.finish_reason))
                    continue
                if traced:
                    r.memory_trace.append(cache.traces[row])
                if row in inserting:  # the peeked token is dropped: the next one is sampled after the latents
                    if r.forced is not None:
                        r.logprobs.pop(), r.greedy_hits.pop()
                    r.insertions.append(len(r.output_ids))
                    keep.append(row)
                    continue
                text = r.append(token)
                if text or r.finish_reason:
                    deltas.append(StreamDelta(r.index, text, r.finish_reason))
                if r.finish_reason is None:
                    keep.append(row)
            yield deltas
            if not keep:
                return
            latents = [None] * len(active)
            if inserting:
                latents = latent.inference_latents([(r.prompt_ids, r.output_ids) for r in active], inserting)
            if len(keep) < len(active):  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                cache.select_rows(index)
                tokens, next_position = tokens[index], next_position[index]
                seen = seen[index] if seen is not None else None
                active = [active[i] for i in keep]
                latents = [latents[i] for i in keep]
                if latent is not None:
                    latent.select_rows(keep)
                sampler = BatchSampler([r.params for r in active], [r.generator for r in active], device)
            inserted = {row for row, x in enumerate(latents) if x is not None}
            if seen is not None:
                took = torch.tensor([row not in inserted for row in range(len(active))], device=device)
                seen[torch.arange(len(active), device=device)[took], tokens[took]] = True
            if inserted:
                chunk, chunk_positions, real = _chunk(tokens.tolist(), latents, next_position, model)
                hidden = model(chunk, chunk_positions, cache)
            else:
                real = torch.ones(len(active), dtype=torch.long, device=device)
                hidden = model.forward_tokens(tokens[:, None], next_position, cache)
            if scored:
                _score(cache, hidden, active)
            _evict(cache, active)
            last_hidden = hidden[torch.arange(len(active), device=device), real - 1]
            logits = model.logits(last_hidden[:, None])[:, 0]
            next_position = next_position + real[:, None]

    def _suppress_early_end(self, logits: torch.Tensor, active: list[_Request]) -> torch.Tensor:
        """Mask end tokens for rows still short of min_new_tokens (as transformers' min_new_tokens)."""
        rows = [i for i, r in enumerate(active) if len(r.output_ids) < r.params.min_new_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for row in rows:
            ends = list(self.eos_ids | set(active[row].params.stop_token_ids))
            logits[row, ends] = float("-inf")
        return logits


def _chunk(tokens: list, latents: list, next_position: torch.Tensor, model) -> tuple:
    """One forward's input when some rows insert latents [K, d] and the others feed one token
    (None: the row feeds nothing). -> (embeds [B, W, d], positions [B, W], real tokens per row)."""
    batch, device = len(latents), model.device
    width = max([1] + [x.shape[0] for x in latents if x is not None])
    embeds = torch.zeros(batch, width, model.config.hidden_size, dtype=model.dtype, device=device)
    positions = torch.full((batch, width), -1, dtype=torch.long, device=device)
    real = torch.zeros(batch, dtype=torch.long, device=device)
    for row in range(batch):
        if latents[row] is not None:
            n = latents[row].shape[0]
            embeds[row, :n] = latents[row].to(model.dtype)
        elif tokens[row] is not None:
            n = 1
            embeds[row, 0] = model.embed(torch.tensor([tokens[row]], device=device))[0]
        else:
            continue
        positions[row, :n] = next_position[row, 0] + torch.arange(n, device=device)
        real[row] = n
    return embeds, positions, real


def _force(logits: torch.Tensor, tokens: torch.Tensor, active: list[_Request]) -> torch.Tensor:
    """Replace sampled tokens by the forced ones, scoring each against the model's prediction."""
    tokens = tokens.clone()
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logits.argmax(dim=-1).tolist()
    for row, r in enumerate(active):
        if r.forced is None:
            continue
        token = r.forced[len(r.output_ids)]
        r.logprobs.append(float(logprobs[row, token]))
        r.greedy_hits.append(best[row] == token)
        tokens[row] = token
    return tokens


def _slots_needed(r: _Request) -> int:
    """Cache slots a request can occupy: all its tokens, or its budget plus the token being written."""
    total = len(r.prompt_ids) + r.params.max_new_tokens
    if r.kv_policy is None:
        return total
    return min(total, max(r.kv_policy.budget, len(r.prompt_ids)) + 1)


def _score(cache: KVCache, hidden: torch.Tensor, active: list[_Request]) -> None:
    """Give each new token its learned importance (rows grouped by predictor: one call each)."""
    scores = torch.zeros(hidden.shape[:2], device=hidden.device)
    groups: dict[int, tuple[object, list[int]]] = {}
    for row, r in enumerate(active):
        predictor = r.kv_policy.predictor if r.kv_policy is not None else None
        if predictor is not None:
            groups.setdefault(id(predictor), (predictor, []))[1].append(row)
    for predictor, rows in groups.values():
        scores[rows] = predictor(hidden[rows]).float()
    cache.record_importance(scores)


def _evict(cache: KVCache, active: list[_Request]) -> None:
    """After a forward: record each row's peak, and let its policy bring it back under budget."""
    if not getattr(cache, "supports_eviction", True):  # a recurrent state holds no tokens to evict
        return
    lengths = cache.lengths.tolist()
    for row, (r, length) in enumerate(zip(active, lengths, strict=True)):
        r.peak_kv_tokens = max(r.peak_kv_tokens, length)
        policy = r.kv_policy
        if policy is None or length <= policy.budget:
            continue
        view = RowView(
            positions=cache.positions[row, :length],
            prompt_length=len(r.prompt_ids),
            attention_sum=cache.attention_sum[row, :length] if cache.track_attention else None,
            attention_last=cache.attention_last[row, :length] if cache.track_attention else None,
            importance=cache.importance[row, :length] if cache.track_importance else None,
            protected_from=r.protected_from,
        )
        keep = policy.select(view)
        if keep is not None:
            cache.compact(row, keep)
