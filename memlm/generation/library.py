"""The library's whole-batch API: `generate`, `stream` and `score`, thin users of the engine's
step-wise API (`make_request`, `scheduler`, `step`, `abort`), so the library and the server, which
steps the same engine, cannot drift apart. Also how prompts become token ids (chat template)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from memlm.cache.policies import KVPolicy
from memlm.cache.spec import PolicySpec
from memlm.errors import InvalidRequestError
from memlm.generation.hooks import RowMemory
from memlm.generation.params import SamplingParams
from memlm.generation.request import Completion, Request, StreamDelta

Message = dict[str, str]
Prompt = str | list[Message]
PolicyArg = KVPolicy | PolicySpec | Sequence[KVPolicy | PolicySpec | None] | None
ParamsArg = SamplingParams | Sequence[SamplingParams] | None


class BatchAPI:
    """Mixed into Engine: whole batches in, Completions or streamed deltas out."""

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
        memory: RowMemory | None = None,
        adapter: str | None = None,
    ) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a batch (-> list of Completions, in order).

        `params` and `kv_policy` are one for all requests or one per request. A KV policy keeps
        the request's cache under its token budget (a KVPolicy, or a PolicySpec naming one: see
        memlm.cache.policies and memlm.cache.spec). A `memory` brings
        its own row hook: a LatentMemory inserts latents after the prompt and at delimiters (see
        memlm.latent). `adapter` names a LoRA adapter registered with `add_adapter` (None: the base
        model); requests with different adapters batch together."""
        ids, single = self._batch_prompts(prompts)
        completions = self.generate_tokens(ids, params, kv_policy, memory, adapter)
        return completions[0] if single else completions

    def generate_tokens(
        self,
        prompt_ids: list[list[int]],
        params: ParamsArg = None,
        kv_policy: PolicyArg = None,
        memory: RowMemory | None = None,
        adapter: str | None = None,
    ) -> list[Completion]:
        requests = self._submit(prompt_ids, params, kv_policy, memory, adapter)
        for _ in self._drive(requests):
            pass
        return [r.completion() for r in requests]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: ParamsArg = None,
        kv_policy: PolicyArg = None,
        memory: RowMemory | None = None,
        adapter: str | None = None,
    ) -> Iterator[StreamDelta]:
        """Yield text deltas as they become final; each request's last delta carries its finish_reason."""
        ids, _ = self._batch_prompts(prompts)
        for deltas in self._drive(self._submit(ids, params, kv_policy, memory, adapter)):
            yield from (d for d in deltas if d.text or d.finish_reason)

    def score(
        self,
        prompt_ids: list[list[int]],
        continuations: list[list[int]],
        kv_policy: PolicyArg = None,
        memory: RowMemory | None = None,
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

    def _submit(self, prompt_ids, params, kv_policy, memory, adapter=None) -> list[Request]:
        requests = self._build(prompt_ids, params, kv_policy, memory, adapter)  # all valid before any is queued
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

    def _build(self, prompt_ids, params, kv_policy, memory, adapter=None) -> list[Request]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if kv_policy is None or isinstance(kv_policy, KVPolicy | PolicySpec):
            kv_policy = [kv_policy] * len(prompt_ids)
        if len(params) != len(prompt_ids) or len(kv_policy) != len(prompt_ids):
            raise InvalidRequestError(
                f"{len(prompt_ids)} prompts but {len(params)} sampling params and {len(kv_policy)} KV policies"
            )
        return [
            self.make_request(ids, p, policy, memory, index=i, adapter=adapter)
            for i, (ids, p, policy) in enumerate(zip(prompt_ids, params, kv_policy, strict=True))
        ]
