"""Latent memory in the decode loop: the row hook of one LatentMemory (memlm.generation.hooks).

One hook per memory per running batch, serving the requests that use it: the weaver's cache (one
row per request, in `requests` order; none for a weaver that reads the reasoner's states) and what
each request has read and inserted so far. In a step:

* join: prompt latents go right after each prompt (`request.pending_embeds`, fed with the prompt);
* after_sample: the requests whose last token is a delimiter, with insertions left, ask the trigger
  on the delimiter's hidden state (a `sequence` trigger on its probe of the reasoner's cache). A
  weaver that writes keys and values keeps the sampled token and feeds it after its latent slots:
  its queries are queued before the token
  (`request.pending_queries`) and run inside the next step's forward with the weaver's LoRA on for
  them alone, their keys and values staying as the slots (no pass of its own: a kv weaver runs all
  the reasoner's layers). Any other weaver's latents are fed at the next step, and the sampled
  token is dropped (`RowStep.take = False`);
* after_take: those latents are woven, from everything the request has read and written;
* retire: finished requests leave the weaver's cache.

A weaver that reads the reasoner's states has no cache of its own. Its prompt latents need the
reasoner's pass over the prompt, so they come one step later, the way a delimiter's do.

Each request's record (`LatentRecord`, `request.records["latent"]`) holds where latents went in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memlm.generation.hooks import ModelState, RowStep
from memlm.hook_defaults import QuietHook

KEY = "latent"


@dataclass(slots=True)
class LatentRecord:
    insertions: list[int] = field(default_factory=list)  # after this many output tokens (0 = the prompt)
    positions: list[tuple[int, int]] = field(default_factory=list)  # (first position, slots) of each insertion

    def completion_fields(self) -> dict:
        return {"insertions": self.insertions}


def latent_record(request) -> LatentRecord | None:
    return request.records.get(KEY)


class LatentHook(QuietHook):
    phase = "latent"

    def __init__(self, memory):
        self.memory = memory
        self.requests: list = []
        self._row: dict[int, int] = {}  # id(request) -> its row in `requests` (a step asks per request)
        self.cache = None
        self.fed: list[int] = []  # tokens of each request the weaver has read
        self.inserted: list[int] = []  # inference insertions so far
        self.last_at: list[int] = []  # output length at the last insertion (never twice in a row)
        self.awaiting_prompt: list[bool] = []  # states weaver: prompt latents still to write
        self._weaving: list = []  # requests whose latents are woven after this step's tokens are taken

    # ---- the hook -------------------------------------------------------------------------------

    def join(self, rows: list, state: ModelState) -> None:
        for r, latents in zip(rows, self._add(rows), strict=True):
            r.records[KEY] = LatentRecord()
            if latents is not None:  # latent memory right after the prompt
                self._pend(r, latents)
                r.records[KEY].insertions.append(0)

    def after_sample(self, rows: list, state: ModelState, tokens: list[int], last: torch.Tensor,
                     steps: list[RowStep]) -> None:
        """Choose who inserts now; a keys-and-values weaver's queries and the others' latents go in at the next step."""
        at = {id(r): row for row, r in enumerate(rows)}
        members = [r for r in self.requests if r.forced is None or len(r.output_ids) < len(r.forced)]
        index = [at[id(r)] for r in members]
        inserting = self._choose(members, [tokens[i] for i in index], last[index], state, index)
        for r in inserting:
            r.records[KEY].insertions.append(len(r.output_ids))
        if inserting and self.memory.weaver.writes_kv:  # its queries run in the next step's forward, before the token
            for r in inserting:
                kind = "prompt" if self.awaiting_prompt[self._row[id(r)]] else "inference"
                r.pending_queries = self.memory.weaver.queries(kind).detach()
                r.records[KEY].positions.append((r.next_position, r.pending_queries.shape[0]))
            self._inserted(inserting)
            inserting = []
        for r in inserting:  # the peeked token is dropped: the next one is sampled after the latents
            steps[at[id(r)]].take = False
        self._weaving = inserting

    def after_take(self, rows: list, state: ModelState, steps) -> None:
        if not self._weaving:
            return
        wanted, self._weaving = self._weaving, []
        rows_of = {id(r): row for row, r in enumerate(rows)}
        for r, latents in zip(wanted, self._latents(wanted, state, [rows_of[id(r)] for r in wanted]), strict=True):
            self._pend(r, latents)

    def retire(self, keep: list[int], rows: list) -> bool:
        """Only the unfinished requests stay (in their order); False once none is left."""
        staying = [r for r in self.requests if not r.finished]
        if staying:
            self._keep(staying)
        return bool(staying)

    # ---- the session: weaver cache and counts ----------------------------------------------------------

    def _pend(self, r, latents: torch.Tensor) -> None:
        """Feed these latents at the next step, after the request's pending tokens."""
        r.pending_embeds = latents
        r.records[KEY].positions.append((r.next_position + len(r.pending_ids), latents.shape[0]))

    def _add(self, requests: list) -> list[torch.Tensor | None]:
        """Take these requests in; -> the latents to insert right after each prompt (None: none,
        or, for a weaver that reads the reasoner's states, not yet)."""
        memory, states = self.memory, self.memory.weaver.reads_states
        if not states:
            capacity = max(len(r.prompt_ids) for r in requests) + memory.extra_slots() + 16
            fresh = memory.weaver.new_cache(len(requests), capacity)
            if self.cache is None:
                self.cache = fresh
            else:
                self.cache.extend(fresh)
        first = len(self.requests)
        self.requests += requests
        self._row.update((id(r), first + i) for i, r in enumerate(requests))
        self.fed += [0] * len(requests)
        self.inserted += [0] * len(requests)
        self.last_at += [-1] * len(requests)
        self.awaiting_prompt += [states and memory.prompt_latents() > 0] * len(requests)
        if memory.prompt_latents() == 0 or states:
            return [None] * len(requests)
        rows = range(first, len(self.requests))
        latents = self._weave({row: self.requests[row].prompt_ids for row in rows}, "prompt")
        for row in rows:
            self.last_at[row] = 0
        return [latents[row] for row in rows]

    def _choose(self, requests: list, following: list[int], hidden: torch.Tensor, state, state_rows: list[int]) -> list:
        """The requests that insert now: their last token is a delimiter (given the token sampled after
        it), they have insertions left, and the trigger fires on the delimiter's hidden state (or, for
        a trigger that reads the sequence, on its probe of the reasoner's cache `state`).
        `requests` are some of this session's, `following` their sampled tokens, `hidden` [n, d],
        `state_rows` their rows of `state`."""
        memory, candidates, prompt = self.memory, [], []
        for i, (r, token) in enumerate(zip(requests, following, strict=True)):
            row, output = self._row[id(r)], r.output_ids
            if self.awaiting_prompt[row]:  # the prompt's latents are not the trigger's to decide
                prompt.append(r)
                continue
            if not output or self.inserted[row] >= memory.max_inference_aug or self.last_at[row] == len(output):
                continue
            previous = output[-2] if len(output) > 1 else r.prompt_ids[-1]
            if memory.delimiters.is_insertion_point(previous, output[-1], token):
                candidates.append(i)
        if not candidates:
            return prompt
        asking = [requests[i] for i in candidates]
        features = getattr(memory.trigger, "features", None)
        if features is None:
            seen = hidden[candidates]
        else:
            rows = [state_rows[i] for i in candidates]
            seen = features(memory.weaver, state, rows, [r.next_position for r in asking])
        fire = memory.trigger.decide(seen, asking).tolist()
        return prompt + [r for r, yes in zip(asking, fire, strict=True) if yes]

    def _latents(self, inserting: list, state, state_rows: list[int]) -> list[torch.Tensor]:
        """Latents for these requests, from everything they have read and written so far.

        A weaver that reads the reasoner's states reads them from `state` (the reasoner's cache),
        where request `inserting[i]` is row `state_rows[i]`."""
        if self.memory.weaver.reads_states:
            woven = self.memory.weaver.weave_states(state, *self._state_layout(inserting, state, state_rows))
            latents = [woven[at] for at in state_rows]
        else:
            rows = [self._row[id(r)] for r in inserting]
            by_row = self._weave({row: self.requests[row].prompt_ids + self.requests[row].output_ids for row in rows})
            latents = [by_row[row] for row in rows]
        self._inserted(inserting)
        return latents

    def _state_layout(self, inserting: list, state, state_rows: list[int]) -> tuple[list[int], list[str | None]]:
        """Per row of the reasoner's `state`: where the queries start, and which to run (None: none)."""
        kinds: list[str | None] = [None] * state.batch_size
        starts = [0] * state.batch_size
        for r, at in zip(inserting, state_rows, strict=True):
            kinds[at] = "prompt" if self.awaiting_prompt[self._row[id(r)]] else "inference"
            starts[at] = r.next_position
        return starts, kinds

    def _inserted(self, inserting: list) -> None:
        for r in inserting:
            row = self._row[id(r)]
            if self.awaiting_prompt[row]:
                self.awaiting_prompt[row] = False
            else:
                self.inserted[row] += 1
            self.last_at[row] = len(r.output_ids)

    def _weave(self, sequences: dict[int, list[int]], kind: str = "inference") -> list:
        n = len(self.requests)
        pending = [sequences[row][self.fed[row] :] if row in sequences else [] for row in range(n)]
        kinds = [kind if row in sequences else None for row in range(n)]
        latents = self.memory.weaver.weave(self.cache, pending, kinds)
        for row, seq in sequences.items():
            self.fed[row] = len(seq)
        return latents

    def _keep(self, requests: list) -> None:
        """Only these requests stay (in this order, a subsequence of the current one)."""
        rows = [self._row[id(r)] for r in requests]
        if self.cache is not None:
            self.cache.select_rows(rows)
        self.requests = list(requests)
        self._row = {id(r): i for i, r in enumerate(requests)}
        self.fed = [self.fed[i] for i in rows]
        self.inserted = [self.inserted[i] for i in rows]
        self.last_at = [self.last_at[i] for i in rows]
        self.awaiting_prompt = [self.awaiting_prompt[i] for i in rows]
