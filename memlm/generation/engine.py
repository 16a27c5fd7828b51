"""The decode loop: tokenize, prefill, decode incrementally with the model's state (a KV cache, or
LCM's recurrent sums), sample, stop, detokenize. Batched and streamed, with continuous batching.

The loop is step-wise (`add_request`, `step`, `abort`). A step:

    admit -> join -> feed -> forward -> [hooks: after_forward] -> logits + sample
          -> [hooks: after_sample] -> take tokens -> [hooks: after_take] -> retire

Waiting requests join the running batch; every row feeds its chunk in one forward (batch.py); every
row samples one token. Memories take part through row hooks (hooks.py): the model's state brings
its own (a KV cache its eviction, the LCM its halts) and a request's `memory` brings one (latent
memory). The engine names none of them. Finished and aborted requests leave the batch at once.
`generate`, `stream` and `score` are thin users of the same steps, so the server and the library
cannot drift apart.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path

import torch

from memlm.adapters.bank import AdapterBank, adapter_index
from memlm.cache.blocks import KVCacheConfig
from memlm.cache.policies import FullPolicy, KVPolicy
from memlm.cache.prefix import KVAdmission, slots_needed
from memlm.cache.spec import PolicySpec
from memlm.errors import InvalidRequestError
from memlm.formats.loading import load_model
from memlm.generation.batch import Batch, PhaseClock, feed
from memlm.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from memlm.generation.hooks import RowMemory, RowStep
from memlm.generation.library import BatchAPI, Prompt
from memlm.generation.params import SamplingParams
from memlm.generation.request import Completion, Request, StreamDelta
from memlm.generation.sampling import BatchSampler, TokenHistory
from memlm.generation.scheduler import Scheduler
from memlm.generation.structured import StructuredOutput, allowed_tokens
from memlm.tokenizer import Tokenizer

__all__ = ["Completion", "Engine", "Request", "StreamDelta"]

_STATE = "state"  # the batch's hooks are keyed (_STATE, i) for the state's, id(memory) for a memory's


def _is_state_hook(key) -> bool:
    return isinstance(key, tuple) and key[0] == _STATE


# Slots a joining request's cache row is given up front; past that the cache grows by doubling.
_INITIAL_OUTPUT_SLOTS = 1024


class Engine(BatchAPI):
    def __init__(
        self,
        model,  # LlamaModel or LCMModel: embed / forward_tokens / logits / new_state
        tokenizer: Tokenizer,
        name: str = "",
        source: str = "",
        dtype: str = "float32",
        num_parameters: int | None = None,
        max_batch: int = 256,
        max_queue: int | None = None,
        # Prompt tokens joining the batch in one step: 2048 bounds a batched prefill's activations
        # (a 1B model's 8 x 512-token prefill peaked 2258 MB at 4096, 2034 MB at 2048, prefill and
        # decode speed unchanged; bench/README.md, issue 27). A longer prompt still joins alone.
        max_prefill_tokens: int = 2048,
        kv_cache: KVCacheConfig | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.name, self.source, self.dtype = name, source, dtype
        self.num_parameters = num_parameters or sum(p.numel() for p in model.parameters())
        self.config = model.config
        self.eos_ids = frozenset(model.config.eos_token_ids)
        self.scheduler = Scheduler(max_batch, max_queue, max_prefill_tokens)
        self._batch: Batch | None = None
        # The KV cache's storage: a block pool shared by every batch (paged), or per-batch tensors.
        self.kv_cache = kv_cache or KVCacheConfig()
        self.kv_pool = self.kv_cache.pool_for(model)
        self._admission = KVAdmission(self.kv_pool) if self.kv_pool is not None else None
        self._state_options = self._kv_state_options()
        self._structured = None
        self._ids = itertools.count()
        # Wall-clock per phase of decode steps (steps no request joins), summed: set to {} to record
        # (benchmarks: what a KV policy's predictor and eviction cost against the whole step).
        self.timings: dict[str, float] | None = None

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32", activations: str = "float32", **options) -> Engine:
        """Load a model by name or path; `options`: scheduling limits and `kv_cache` (KVCacheConfig)."""
        m = load_model(name_or_path, dtype, activations)
        return cls(m.model, m.tokenizer, m.name, m.source, m.dtype, m.num_parameters, **options)

    def _kv_state_options(self) -> dict:
        """What `model.new_state` takes besides the batch: the pool, or a contiguous cache's type."""
        if self.kv_pool is not None:
            return {"pool": self.kv_pool}
        if not self.model.supports_eviction:  # not a KV cache (the LCM's recurrent state)
            return {}
        return {"kv_type": self.kv_cache.kv_type, "rotate_keys": self.kv_cache.rotate}

    # ---- the step-wise API: continuous batching ------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt | list[int],
        params: SamplingParams | None = None,
        kv_policy: KVPolicy | PolicySpec | None = None,
        memory: RowMemory | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> Request:
        """Queue one request (a prompt, a chat, or token ids); it joins the running batch at a coming
        `step()`, with the LoRA `adapter` of that name (`add_adapter`) or the base model. Raises
        InvalidRequestError for a bad request, QueueFullError when the queue is full."""
        is_ids = isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
        ids = list(prompt) if is_ids else self.encode_prompt(prompt)
        request = self.make_request(
            ids, params or SamplingParams(), kv_policy, memory, request_id=request_id, adapter=adapter
        )
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
        """(token slots in use, token slots allocated) over the running batch's KV cache (0, 0 without
        one); for a paged cache, (blocks held, blocks in the pool) in tokens."""
        if self.kv_pool is not None:
            pool = self.kv_pool
            return pool.blocks_used * pool.block_size, pool.num_blocks * pool.block_size
        state = self._batch.state if self._batch is not None else None
        if state is None or not state.supports_eviction:  # a recurrent state holds no token slots
            return 0, 0
        return int(state.lengths.sum()), state.batch_size * state.capacity

    # ---- LoRA adapters: many beside one base, a row's chosen per request ------------------------------

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Register a LoRA adapter folder (PEFT's or memlm's format) under `name`; requests choose it
        with `adapter=name`. Rows with different adapters (or none) share every batch."""
        AdapterBank.of(self.model).add(name, folder)

    @property
    def adapters(self) -> dict[str, str]:
        """The registered adapters: name -> folder."""
        bank = getattr(self.model, "adapter_bank", None)
        return dict(bank.sources) if bank is not None else {}

    def structured_output(self):
        """The structured-output compiler for this tokenizer (built on first use)."""
        if self._structured is None:
            self._structured = StructuredOutput(self.tokenizer, self.config.vocab_size, sorted(self.eos_ids))
        return self._structured

    def make_request(
        self,
        ids: list[int],
        p: SamplingParams,
        policy: KVPolicy | PolicySpec | None = None,
        memory: RowMemory | None = None,
        index: int | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> Request:
        """A validated request (not yet queued)."""
        adapter_index(self.model, adapter)  # an unknown name: UnknownAdapterError (the server's 404)
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
        if isinstance(policy, PolicySpec):
            policy = policy.build()
        if isinstance(policy, FullPolicy) and policy.press is None:  # no eviction: the same as no policy
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
            adapter,
        )
        if self.kv_pool is not None:  # one that could never fit the pool is refused now, not queued
            self.kv_pool.check_fits(slots_needed(request))
        return request

    # ---- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Admit waiting requests, feed every running row its chunk in one forward, sample one token per
        row. -> one StreamDelta per running request."""
        joining = self.scheduler.admit(self._admission)
        if joining:
            self._join(joining)
        batch, rows = self._batch, self.scheduler.running
        if batch is None:
            return []
        state, hooks = batch.state, list(batch.hooks.values())
        clock = PhaseClock(None if joining else self.timings)
        steps = [RowStep(inserted=r.vectors_pending) for r in rows]
        hidden, last = feed(self.model, rows, state)
        clock("forward")
        for hook in hooks:
            hook.after_forward(rows, state, hidden, steps)
            clock(hook.phase)
        raw = self.model.logits(last[:, None])[:, 0]
        tokens = self._sample(batch, rows, raw).tolist()
        for hook in hooks:
            hook.after_sample(rows, state, tokens, last, steps)
        deltas = self._take(batch, rows, tokens, raw, steps)
        for hook in hooks:
            hook.after_take(rows, state, steps)
        self._retire()
        clock("sampling")
        clock.count_step()
        return deltas

    def _join(self, joining: list[Request]) -> None:
        """New rows for these requests: a fresh state appended to the batch's, each row's first chunk
        its prompt; each hook takes in the rows it serves."""
        policies = [r.kv_policy for r in joining if r.kv_policy is not None]
        extra = max((r.memory.extra_slots() for r in joining if r.memory is not None), default=0)
        capacity = max(min(slots_needed(r), len(r.prompt_ids) + _INITIAL_OUTPUT_SLOTS + extra) for r in joining)
        options = dict(self._state_options)
        if any(r.adapter is not None for r in joining):  # each row's LoRA adapter, read by the forward
            options["adapters"] = [adapter_index(self.model, r.adapter) for r in joining]
        fresh = self.model.new_state(
            len(joining),
            capacity,
            any(p.needs_attention for p in policies),
            any(p.predictor is not None for p in policies),
            **options,
        )
        batch = self._batch
        if batch is None:
            hooks = fresh.row_hooks(self.tokenizer, self.config.vocab_size)
            batch = self._batch = Batch(fresh, {(_STATE, i): hook for i, hook in enumerate(hooks)})
        else:
            batch.state.extend(fresh)
            batch.sampler = None
        if batch.history is None and any(r.params.penalised for r in joining):
            batch.history = TokenHistory(self.config.vocab_size, self.model.device)
            batch.history.extend([r.prompt_ids for r in self.scheduler.running if r not in joining])
        if batch.history is not None:
            batch.history.extend([r.prompt_ids for r in joining])
        now = time.monotonic()
        for r in joining:
            r.pending_ids, r.next_position, r.joined = list(r.prompt_ids), 0, now
        # The state's hooks serve every row; a memory's hook only the requests using that memory (one
        # already in the batch must not take in the newcomers that do not use it).
        served: dict[object, list[Request]] = {key: list(joining) for key in batch.hooks if _is_state_hook(key)}
        for r in joining:
            if r.memory is not None:
                if id(r.memory) not in batch.hooks:
                    batch.hooks[id(r.memory)] = r.memory.row_hook()
                served.setdefault(id(r.memory), []).append(r)
        for key, rows in served.items():
            batch.hooks[key].join(rows, batch.state)

    def _sample(self, batch: Batch, rows: list[Request], raw: torch.Tensor) -> torch.Tensor:
        """One token per row: penalties, grammar masks and min_new_tokens applied; teacher-forced rows
        take their given token."""
        logits = self._suppress_early_end(raw, rows)
        if batch.sampler is None:
            batch.sampler = BatchSampler([r.params for r in rows], [r.generator for r in rows], self.model.device)
        tokens = batch.sampler(logits, batch.history, self._allowed(rows))
        if any(r.forced is not None for r in rows):
            forced = torch.tensor(
                [r.forced[len(r.output_ids)] if r.forced is not None else -1 for r in rows], device=tokens.device
            )
            tokens = torch.where(forced >= 0, forced, tokens)
        return tokens

    def _take(self, batch: Batch, rows: list[Request], tokens: list[int], raw, steps: list[RowStep]):
        """Each row takes its token (unless a hook said otherwise) -> its StreamDelta."""
        deltas, took = [], []
        for row, (r, token, step) in enumerate(zip(rows, tokens, steps, strict=True)):
            seen = dict(request=r, evicted=step.evicted, inserted=step.inserted, kv_tokens=step.kv_tokens)
            if step.halted:
                deltas.append(StreamDelta(r.index, r.halt(), r.finish_reason, **seen))
            elif not step.take:
                deltas.append(StreamDelta(r.index, "", None, **seen))
            else:
                took.append(row)
                if r.wants_logprobs:
                    _record_logprobs(r, raw[row], token)
                position = r.token_position
                text = r.append(token)
                r.pending_ids = [token]
                deltas.append(StreamDelta(r.index, text, r.finish_reason, token_id=token, position=position, **seen))
        if batch.history is not None:
            batch.history.record(took, [tokens[row] for row in took])
        return deltas

    def _allowed(self, rows: list[Request]) -> torch.Tensor | None:
        """[B, V] bool: what structured-output grammars allow next (None when no row has one)."""
        constrained = [row for row, r in enumerate(rows) if r.grammar is not None]
        if not constrained:
            return None
        vocab = self.config.vocab_size
        allowed = torch.ones(len(rows), vocab, dtype=torch.bool)
        allowed[constrained] = allowed_tokens([rows[row].grammar for row in constrained], vocab)
        return allowed.to(self.model.device)

    def _retire(self) -> None:
        """Finished and aborted requests leave the batch: their rows are dropped from every state."""
        batch, running = self._batch, self.scheduler.running
        keep = [row for row, r in enumerate(running) if not r.finished]
        if len(keep) == len(running):
            return
        self.scheduler.running = [running[row] for row in keep]
        if not keep:
            if self.kv_pool is not None:
                batch.state.select_rows([])  # the rows' blocks go back to the pool (published ones stay cached)
            self._batch = None  # an idle engine holds no batch state
            return
        index = torch.tensor(keep, device=self.model.device)
        batch.state.select_rows(index)
        if batch.history is not None:
            batch.history.select_rows(index)
        for key, hook in list(batch.hooks.items()):
            if not hook.retire(keep, self.scheduler.running):
                del batch.hooks[key]
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
