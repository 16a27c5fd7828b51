"""The decode loop: tokenize, prefill, decode incrementally with the model's state (a KV cache, or
LCM's recurrent sums), sample, stop, detokenize. Batched and streamed, with continuous batching.

The loop is step-wise (`add_request`, `step`, `abort`): at each step waiting requests join the
running batch, and every row feeds its chunk in one forward -- a joining request its whole prompt,
a running one its last token, a row of a latent memory the latents it inserts -- as one
right-padded chunk (the model packs it, so padding costs no matmul work). Then every row samples
one token. Finished and aborted requests leave the batch at once. `generate`, `stream` and `score`
are thin users of the same steps, so the server and the library cannot drift apart.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from memlm.cache.policies import FullPolicy, KVPolicy, RowView
from memlm.errors import InvalidRequestError
from memlm.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from memlm.generation.params import SamplingParams
from memlm.generation.request import Completion, Request, StreamDelta
from memlm.generation.sampling import BatchSampler, TokenHistory
from memlm.generation.scheduler import Scheduler
from memlm.models.llama import LlamaModel
from memlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from memlm.latent.memory import LatentMemory, LatentSession
    from memlm.lcm.model import LCMModel

Message = dict[str, str]
Prompt = str | list[Message]
PolicyArg = KVPolicy | Sequence[KVPolicy | None] | None
ParamsArg = SamplingParams | Sequence[SamplingParams] | None

__all__ = ["Completion", "Engine", "Request", "StreamDelta"]

# Slots a joining request's cache row is given up front; past that the cache grows by doubling.
_INITIAL_OUTPUT_SLOTS = 1024


@dataclass
class _Batch:
    """The running batch: the model's state (one row per running request, in the scheduler's order)
    and what sampling and latent memory keep beside it."""

    state: object  # KVCache or LCMState
    history: TokenHistory | None = None  # only while some request uses penalties
    sessions: dict[int, LatentSession] = field(default_factory=dict)  # id(memory) -> its session
    sampler: BatchSampler | None = None  # rebuilt when the membership changes

    @property
    def scored(self) -> bool:
        return bool(getattr(self.state, "track_importance", False))


class Engine:
    def __init__(
        self,
        model: LlamaModel | LCMModel,
        tokenizer: Tokenizer,
        name: str = "",
        source: str = "",
        dtype: str = "float32",
        num_parameters: int | None = None,
        max_batch: int = 256,
        max_queue: int | None = None,
        max_prefill_tokens: int = 4096,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.name, self.source, self.dtype = name, source, dtype
        self.num_parameters = num_parameters or sum(p.numel() for p in model.parameters())
        self.config = model.config
        self.eos_ids = frozenset(model.config.eos_token_ids)
        self.scheduler = Scheduler(max_batch, max_queue, max_prefill_tokens)
        self._batch: _Batch | None = None
        self._structured = None
        self._ids = itertools.count()
        # Wall-clock per phase of decode steps (steps no request joins), summed: set to {} to record
        # (benchmarks: what a KV policy's predictor and eviction cost against the whole step).
        self.timings: dict[str, float] | None = None
        self._digit_mask: torch.Tensor | None = None

    def _digit_tokens(self) -> torch.Tensor:
        """[vocab] bool: which tokens are pieces of a number (built on first use, by span-keeping policies)."""
        if self._digit_mask is None:
            mask = self.tokenizer.digit_token_mask()
            mask += [False] * max(0, self.config.vocab_size - len(mask))
            self._digit_mask = torch.tensor(mask, dtype=torch.bool)
        return self._digit_mask

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32", activations: str = "float32", **scheduling) -> Engine:
        from memlm.models.loading import load_model

        m = load_model(name_or_path, dtype, activations)
        return cls(m.model, m.tokenizer, m.name, m.source, m.dtype, m.num_parameters, **scheduling)

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

    def _batch_prompts(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and all(isinstance(m, dict) for m in prompts)
        )
        if single:
            return [self.encode_prompt(prompts)], True
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError("give a prompt string, a chat (list of messages), or a non-empty list of those")
        return [self.encode_prompt(p) for p in prompts], False

    # ---- the library API: whole batches -------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: ParamsArg = None,
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a batch (-> list of Completions, in order).

        `params` and `kv_policy` are one for all requests or one per request. A KV policy keeps
        the request's cache under its token budget (see memlm.cache.policies). A LatentMemory
        inserts latent embeddings after the prompt and at delimiters (see memlm.latent)."""
        ids, single = self._batch_prompts(prompts)
        completions = self.generate_tokens(ids, params, kv_policy, memory)
        return completions[0] if single else completions

    def generate_tokens(
        self,
        prompt_ids: list[list[int]],
        params: ParamsArg = None,
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> list[Completion]:
        requests = self._submit(prompt_ids, params, kv_policy, memory)
        for _ in self._drive(requests):
            pass
        return [r.completion() for r in requests]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: ParamsArg = None,
        kv_policy: PolicyArg = None,
        memory: LatentMemory | None = None,
    ) -> Iterator[StreamDelta]:
        """Yield text deltas as they become final; each request's last delta carries its finish_reason."""
        ids, _ = self._batch_prompts(prompts)
        for deltas in self._drive(self._submit(ids, params, kv_policy, memory)):
            yield from (d for d in deltas if d.text or d.finish_reason)

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
        for c in continuations:
            if max(c) >= self.config.vocab_size or min(c) < 0:
                raise InvalidRequestError("continuation has token ids outside the vocabulary")
        requests = self._build(prompt_ids, params, kv_policy, memory)
        for r, c in zip(requests, continuations, strict=True):
            if r.params.max_new_tokens < len(c):
                raise InvalidRequestError("prompt + continuation exceed the model's context")
            r.forced = list(c)
        for r in requests:
            self.scheduler.add(r, bounded=False)
        for _ in self._drive(requests):
            pass
        return [r.completion() for r in requests]

    def _submit(self, prompt_ids, params, kv_policy, memory) -> list[Request]:
        requests = self._build(prompt_ids, params, kv_policy, memory)  # all valid before any is queued
        for r in requests:
            self.scheduler.add(r, bounded=False)
        return requests

    def _drive(self, requests: list[Request]) -> Iterator[list[StreamDelta]]:
        """Step until these requests are done; yield their deltas of each step. A consumer that stops
        early (or an error) aborts whatever is left of them."""
        mine = {id(r) for r in requests}
        try:
            while not all(r.finished for r in requests):
                yield [d for d in self.step() if id(d.request) in mine]
        finally:
            for r in requests:
                if not r.finished:
                    self.abort(r.id)

    def _build(self, prompt_ids, params, kv_policy, memory) -> list[Request]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if kv_policy is None or isinstance(kv_policy, KVPolicy):
            kv_policy = [kv_policy] * len(prompt_ids)
        if len(params) != len(prompt_ids) or len(kv_policy) != len(prompt_ids):
            raise InvalidRequestError(
                f"{len(prompt_ids)} prompts but {len(params)} sampling params and {len(kv_policy)} KV policies"
            )
        return [
            self.make_request(ids, p, policy, memory, index=i)
            for i, (ids, p, policy) in enumerate(zip(prompt_ids, params, kv_policy, strict=True))
        ]

    # ---- the step-wise API: continuous batching ------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt | list[int],
        params: SamplingParams | None = None,
        kv_policy: KVPolicy | None = None,
        memory: LatentMemory | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue one request (a prompt, a chat, or token ids); it joins the running batch at a coming
        `step()`. Raises InvalidRequestError for a bad request, QueueFullError when the queue is full."""
        is_ids = isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
        ids = list(prompt) if is_ids else self.encode_prompt(prompt)
        request = self.make_request(ids, params or SamplingParams(), kv_policy, memory, request_id=request_id)
        self.scheduler.add(request)
        return request

    @torch.inference_mode()  # the states are inference tensors, changed in place
    def abort(self, request_id: str) -> bool:
        """Stop a request now, waiting or running; its row is freed at once. -> whether it was found."""
        request = self.scheduler.find(request_id)
        if request is None:
            return False
        request.abort()
        if not self.scheduler.drop_waiting(request):
            self._retire()
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def kv_usage(self) -> tuple[int, int]:
        """(token slots in use, token slots allocated) over the running batch's KV cache (0, 0 without one)."""
        state = self._batch.state if self._batch is not None else None
        if state is None or not hasattr(state, "capacity"):
            return 0, 0
        return int(state.lengths.sum()), state.batch_size * state.capacity

    def structured_output(self):
        """The structured-output compiler for this tokenizer (built on first use)."""
        if self._structured is None:
            from memlm.generation.structured import StructuredOutput

            self._structured = StructuredOutput(self.tokenizer, self.config.vocab_size, sorted(self.eos_ids))
        return self._structured

    def make_request(
        self,
        ids: list[int],
        p: SamplingParams,
        policy: KVPolicy | None = None,
        memory: LatentMemory | None = None,
        index: int | None = None,
        request_id: str | None = None,
    ) -> Request:
        """A validated request (not yet queued)."""
        number = next(self._ids)
        limit = self.config.max_position_embeddings
        p.validate()
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= limit:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise InvalidRequestError("prompt has token ids outside the vocabulary")
        if len(ids) + p.max_new_tokens > limit:  # never run past the model's context
            room = limit - len(ids)
            p = replace(p, max_new_tokens=room, min_new_tokens=min(p.min_new_tokens, room))
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
        if memory is not None and not self.model.supports_eviction:
            raise InvalidRequestError("latent memory needs a Llama-family model (it inserts into a KV cache)")
        grammar = self.structured_output().constraint(p.response_format) if p.response_format else None
        request = Request(
            request_id or f"req-{number}",
            number if index is None else index,
            list(ids),
            p,
            self.eos_ids,
            IncrementalDetokenizer(self.tokenizer),
            StopMatcher(p.stop),
            generator,
            policy,
            memory,
            grammar,
        )
        if memory is not None:
            request.insertions = []
            if memory.explore is not None:
                request.decisions = []
        return request

    # ---- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Admit waiting requests, feed every running row its chunk in one forward, sample one token per
        row. -> one StreamDelta per running request."""
        joining = self.scheduler.admit()
        if joining:
            self._join(joining)
        batch, rows = self._batch, self.scheduler.running
        if batch is None:
            return []
        state, device = batch.state, self.model.device
        clock = _PhaseClock(None if joining else self.timings)
        inserted = [0 if r.pending_latents is None else r.pending_latents.shape[0] for r in rows]
        hidden, real = self._feed(rows, state)
        clock("forward")
        if batch.scored:
            _score(state, hidden, rows)
        clock("predictor")
        evicted = _evict(state, rows, self._digit_tokens)
        clock("eviction")
        kv_tokens = state.lengths.tolist() if getattr(state, "supports_eviction", True) else [None] * len(rows)
        last_hidden = hidden[torch.arange(len(rows), device=device), real - 1]
        raw = self.model.logits(last_hidden[:, None])[:, 0]

        halted = state.halted.tolist() if hasattr(state, "halted") else None
        traces = getattr(state, "traces", None)
        logits = self._suppress_early_end(raw, rows)
        allowed = self._allowed(rows)
        if batch.sampler is None:
            batch.sampler = BatchSampler([r.params for r in rows], [r.generator for r in rows], device)
        tokens = batch.sampler(logits, batch.history, allowed)
        if any(r.forced is not None for r in rows):
            forced = [r.forced[len(r.output_ids)] if r.forced is not None else -1 for r in rows]
            tokens = torch.where(torch.tensor(forced, device=device) >= 0, torch.tensor(forced, device=device), tokens)
        chosen = tokens.tolist()
        inserting = self._choose_insertions(batch, rows, chosen, last_hidden)
        state_row = {id(r): row for row, r in enumerate(rows)}
        written = self._write_latents(batch, inserting, state_row)
        for key, slots in written.items():  # latents written this step count as this step's insertion
            inserted[state_row[key]] += slots

        deltas, took = [], []
        for row, (r, token) in enumerate(zip(rows, chosen, strict=True)):
            seen = dict(request=r, evicted=evicted.get(row, []), inserted=inserted[row], kv_tokens=kv_tokens[row])
            if halted is not None and halted[row]:
                deltas.append(StreamDelta(r.index, r.halt(), r.finish_reason, **seen))
                continue
            if traces is not None and r.memory_trace is not None:
                r.memory_trace.append(traces[row])
            if id(r) in inserting:
                r.insertions.append(len(r.output_ids))
                if id(r) not in written:  # the peeked token is dropped: the next one is sampled after the latents
                    deltas.append(StreamDelta(r.index, "", None, **seen))
                    continue
            took.append(row)
            if r.wants_logprobs:
                _record_logprobs(r, raw[row], token)
            position = r.next_position
            text = r.append(token)
            r.pending_ids = [token]
            deltas.append(StreamDelta(r.index, text, r.finish_reason, token_id=token, position=position, **seen))
        if batch.history is not None:
            batch.history.record(took, [chosen[row] for row in took])
        for session in batch.sessions.values():
            wanted = [r for r in session.requests if id(r) in inserting and id(r) not in written]
            if wanted:
                woven = session.inference_latents(wanted, state, [state_row[id(r)] for r in wanted])
                for r, latents in zip(wanted, woven, strict=True):
                    r.pending_latents = latents
        self._retire()
        clock("sampling")
        clock.count_step()
        return deltas

    def _join(self, joining: list[Request]) -> None:
        """New rows for these requests: a fresh state appended to the batch's, each row's first chunk
        its prompt (and the latents a memory writes for it)."""
        policies = [r.kv_policy for r in joining if r.kv_policy is not None]
        extra = max((r.memory.extra_slots() for r in joining if r.memory is not None), default=0)
        capacity = max(min(_slots_needed(r), len(r.prompt_ids) + _INITIAL_OUTPUT_SLOTS) for r in joining) + extra
        fresh = self.model.new_state(
            len(joining),
            capacity,
            any(p.needs_attention for p in policies),
            any(p.predictor is not None for p in policies),
        )
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(fresh)
        else:
            batch.state.extend(fresh)
            batch.sampler = None
        if batch.history is None and any(r.params.penalised for r in joining):
            batch.history = TokenHistory(self.config.vocab_size, self.model.device)
            batch.history.extend([r.prompt_ids for r in self.scheduler.running if r not in joining])
        if batch.history is not None:
            batch.history.extend([r.prompt_ids for r in joining])
        traced, now = hasattr(batch.state, "traces"), time.monotonic()
        for r in joining:
            r.pending_ids, r.next_position, r.joined = list(r.prompt_ids), 0, now
            if traced:
                r.memory_trace = []
        by_memory: dict[int, list[Request]] = {}
        for r in joining:
            if r.memory is not None:
                by_memory.setdefault(id(r.memory), []).append(r)
        for key, group in by_memory.items():
            if key not in batch.sessions:
                from memlm.latent.memory import LatentSession

                batch.sessions[key] = LatentSession(group[0].memory)
            for r, latents in zip(group, batch.sessions[key].add(group), strict=True):
                if latents is not None:  # latent memory right after the prompt
                    r.pending_latents = latents
                    r.insertions.append(0)

    def _feed(self, rows: list[Request], state) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over every row's pending chunk (right-padded). -> (hidden [B, T, d], real tokens [B])."""
        model, device = self.model, self.model.device
        sizes = [len(r.pending_ids) + (0 if r.pending_latents is None else r.pending_latents.shape[0]) for r in rows]
        starts = torch.tensor([r.next_position for r in rows], device=device)
        real = torch.tensor(sizes, device=device)
        width = max(sizes)
        if width == 1 and all(r.pending_latents is None for r in rows):  # plain decode: one token per row
            ids = torch.tensor([r.pending_ids for r in rows], device=device)
            hidden = model.forward_tokens(ids, starts[:, None], state)
        else:
            steps = torch.arange(width, device=device)[None, :]
            positions = torch.where(steps < real[:, None], starts[:, None] + steps, -1)
            if all(r.pending_latents is None for r in rows):
                ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
                for row, r in enumerate(rows):
                    ids[row, : len(r.pending_ids)] = torch.tensor(r.pending_ids, device=device)
                hidden = model.forward_tokens(ids, positions, state)
            else:
                hidden = model(self._embed_chunk(rows, width), positions, state)
        for r, n in zip(rows, sizes, strict=True):
            if r.pending_latents is not None:
                first = r.next_position + len(r.pending_ids)
                r.insertion_positions.append((first, r.pending_latents.shape[0]))
            r.next_position += n
            r.pending_ids, r.pending_latents = [], None
        return hidden, real

    def _embed_chunk(self, rows: list[Request], width: int) -> torch.Tensor:
        """Each row's pending tokens embedded, then its pending latents: [B, width, d], zero padding."""
        model = self.model
        embeds = torch.zeros(len(rows), width, model.config.hidden_size, dtype=model.dtype, device=model.device)
        for row, r in enumerate(rows):
            n = len(r.pending_ids)
            if n:
                embeds[row, :n] = model.embed(torch.tensor(r.pending_ids, device=model.device))
            if r.pending_latents is not None:
                embeds[row, n : n + r.pending_latents.shape[0]] = r.pending_latents.to(model.dtype)
        return embeds

    def _allowed(self, rows: list[Request]) -> torch.Tensor | None:
        """[B, V] bool: what structured-output grammars allow next (None when no row has one)."""
        constrained = [row for row, r in enumerate(rows) if r.grammar is not None]
        if not constrained:
            return None
        from memlm.generation.structured import allowed_tokens

        vocab = self.config.vocab_size
        allowed = torch.ones(len(rows), vocab, dtype=torch.bool)
        allowed[constrained] = allowed_tokens([rows[row].grammar for row in constrained], vocab)
        return allowed.to(self.model.device)

    def _write_latents(self, batch: _Batch, inserting: set[int], state_row: dict[int, int]) -> dict[int, int]:
        """Memories that write keys and values insert now: their latent slots go into the cache at each
        inserting row's next position, and the token just sampled is fed after them (not dropped).
        `state_row`: request id -> its row of the batch's state. -> request id -> slots written."""
        written: dict[int, int] = {}
        for session in batch.sessions.values():
            wanted = [r for r in session.requests if id(r) in inserting]
            if not wanted or not session.memory.weaver.writes_kv:
                continue
            slots = session.write_latents(wanted, batch.state, [state_row[id(r)] for r in wanted])
            for r, k in zip(wanted, slots, strict=True):
                r.insertion_positions.append((r.next_position, k))
                r.next_position += k
                written[id(r)] = k
        return written

    def _choose_insertions(self, batch: _Batch, rows: list[Request], chosen: list[int], hidden) -> set[int]:
        """ids of the requests whose latent memory inserts now (instead of taking the sampled token)."""
        if not batch.sessions:
            return set()
        where = {id(r): row for row, r in enumerate(rows)}
        inserting = set()
        for session in batch.sessions.values():
            members = [r for r in session.requests if r.forced is None or len(r.output_ids) < len(r.forced)]
            index = [where[id(r)] for r in members]
            picked = session.choose(members, [chosen[i] for i in index], hidden[index])
            inserting |= {id(r) for r in picked}
        return inserting

    def _retire(self) -> None:
        """Finished and aborted requests leave the batch: their rows are dropped from every state."""
        batch, running = self._batch, self.scheduler.running
        keep = [row for row, r in enumerate(running) if not r.finished]
        if len(keep) == len(running):
            return
        self.scheduler.running = [running[row] for row in keep]
        if not keep:
            self._batch = None  # an idle engine holds no cache
            return
        index = torch.tensor(keep, device=self.model.device)
        batch.state.select_rows(index)
        if batch.history is not None:
            batch.history.select_rows(index)
        for key, session in list(batch.sessions.items()):
            staying = [r for r in session.requests if not r.finished]
            if staying:
                session.keep(staying)
            else:
                del batch.sessions[key]
        batch.sampler = None

    def _suppress_early_end(self, logits: torch.Tensor, active: list[Request]) -> torch.Tensor:
        """Mask end tokens for rows still short of min_new_tokens (as transformers' min_new_tokens)."""
        rows = [i for i, r in enumerate(active) if len(r.output_ids) < r.params.min_new_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for row in rows:
            ends = list(self.eos_ids | set(active[row].params.stop_token_ids))
            logits[row, ends] = float("-inf")
        return logits


def _record_logprobs(r: Request, logits: torch.Tensor, token: int) -> None:
    """The model's log-probability of the token taken (and its best alternatives, if asked for)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    r.logprobs.append(float(logprobs[token]))
    if r.forced is not None:
        r.greedy_hits.append(int(logits.argmax()) == token)
    k = r.params.logprobs
    if k:
        values, ids = logprobs.topk(k)
        r.top_logprobs.append(list(zip(ids.tolist(), values.tolist(), strict=True)))


def _slots_needed(r: Request) -> int:
    """Cache slots a request can occupy: all its tokens, or its budget plus the token being written."""
    total = len(r.prompt_ids) + r.params.max_new_tokens
    if r.kv_policy is None:
        return total
    return min(total, max(r.kv_policy.budget, len(r.prompt_ids)) + 1)


class _PhaseClock:
    """Adds the time since the previous mark to `totals[phase]` (nothing when totals is None)."""

    def __init__(self, totals: dict[str, float] | None):
        self.totals, self.last = totals, time.perf_counter() if totals is not None else 0.0

    def __call__(self, phase: str) -> None:
        if self.totals is not None:
            now = time.perf_counter()
            self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
            self.last = now

    def count_step(self) -> None:
        if self.totals is not None:
            self.totals["steps"] = self.totals.get("steps", 0) + 1


def _score(cache, hidden: torch.Tensor, active: list[Request]) -> None:
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


def _joins_previous(r: Request, positions: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """[n] bool: the slot holds a digit token fed right after the previous slot's digit token."""
    positions = positions.cpu()
    tokens = r.tokens_at(positions)
    digit = digits[tokens.clamp(min=0)] & (tokens >= 0)
    joins = torch.zeros_like(digit)
    joins[1:] = digit[1:] & digit[:-1] & (positions[1:] == positions[:-1] + 1)
    return joins


def _evict(cache, active: list[Request], digit_tokens=None) -> dict[int, list[int]]:
    """After a forward: record each row's peak, and let its policy bring it back under budget.
    `digit_tokens()` -> the tokenizer's [vocab] digit mask, for policies that keep numbers whole.
    -> per row that evicted, the positions it dropped."""
    if not getattr(cache, "supports_eviction", True):  # a recurrent state holds no tokens to evict
        return {}
    lengths, evicted = cache.lengths.tolist(), {}
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
        if policy.spans and digit_tokens is not None:
            view.joins_previous = _joins_previous(r, view.positions, digit_tokens())
        keep = policy.select(view)
        if keep is not None:
            dropped = torch.ones(length, dtype=torch.bool, device=keep.device)
            dropped[keep] = False
            positions = view.positions[dropped.to(view.positions.device)].tolist()
            r.evicted_positions += positions
            evicted[row] = positions
            cache.compact(row, keep)
    return evicted
