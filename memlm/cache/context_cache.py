"""One context, prefilled once, pressed, and asked many questions (kvpress's pipeline, on memlm's cache).

`prefill_context` runs the context through the model once with whatever the presses will read
(attention statistics, the query observer) and returns a `ContextCache`; `press_copy` presses a copy
of it; `ask` answers one question greedily from another copy (`ask_each`: from many caches in one
batch), fed after the context at the positions it would have had (a pressed context keeps its
original positions), so every question of a multi-query problem reads the same pressed context,
and no question's queries shaped it unless the press was told to use them (`question_view`: snapkv_question).

Used by `memlm bench press` and by the learned press's labels (memlm/train/press.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from memlm.cache.kv_cache import KVCache
from memlm.cache.press_hook import PromptQueries, prompt_view
from memlm.cache.presses import Press, PromptView


@dataclass
class ContextCache:
    cache: KVCache  # one row: the context's slots
    length: int  # context tokens
    hidden: torch.Tensor  # [n, d] final-norm hidden states of the context
    queries: PromptQueries | None
    seconds: float  # the prefill's wall-clock


def split_prompt(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids) of the chat prompt whose user message is context + question: the
    context part is the longest prefix shared with the chat rendered up to the question's start."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + question}], add_generation_prompt=True)
    ids = tokenizer.encode(text)
    head = tokenizer.encode(text[: text.index(context) + len(context)])
    shared = 0
    while shared < min(len(head), len(ids)) and head[shared] == ids[shared]:
        shared += 1
    return ids[:shared], ids[shared:]


@torch.inference_mode()
def prefill_context(model, ids: list[int], capacity: int, window: int = 0, stats: bool = False,
                    track_attention: bool = False) -> ContextCache:  # fmt: skip
    """The context's forward, observing what presses read: `window` last queries and query
    statistics (`stats`), attention statistics (`track_attention`)."""
    cache = model.new_state(1, capacity, track_attention)
    queries = PromptQueries(window, stats) if window or stats else None
    cache.query_observer = queries
    start = time.perf_counter()
    hidden = model.forward_tokens(torch.tensor([ids], device=model.device), torch.arange(len(ids))[None], cache)
    seconds = time.perf_counter() - start
    cache.query_observer = None
    return ContextCache(cache, len(ids), hidden[0], queries, seconds)


def copy_cache(cache: KVCache) -> KVCache:
    """An independent copy (the model's RoPE and the observer are shared, not copied)."""
    keep = {id(cache.rope): cache.rope, id(cache.query_observer): cache.query_observer}
    return copy.deepcopy(cache, memo=keep)


def context_view(ctx: ContextCache, press: Press, importance: torch.Tensor | None = None) -> PromptView:
    view = prompt_view(ctx.cache, 0, ctx.length, press, ctx.queries)
    view.importance = importance
    return view


@torch.inference_mode()
def question_view(model, ctx: ContextCache, question: list[int], press: Press) -> PromptView:
    """The view of a press whose window is the question: the question is fed on a copy of the
    context and its queries observed (they saw every context slot)."""
    cache = copy_cache(ctx.cache)
    queries = PromptQueries(len(question), False)
    cache.query_observer = queries
    positions = torch.arange(ctx.length, ctx.length + len(question))[None]
    model.forward_tokens(torch.tensor([question], device=model.device), positions, cache)
    cache.query_observer = None
    return prompt_view(cache, 0, ctx.length, press, queries)


def press_copy(ctx: ContextCache, keep: torch.Tensor) -> KVCache:
    """A copy of the context's cache holding only the slots `keep`."""
    cache = copy_cache(ctx.cache)
    cache.compact(0, keep)
    return cache


@torch.inference_mode()
def ask(model, cache: KVCache, next_position: int, question: list[int], max_new_tokens: int, eos_ids,
        stop=None) -> list[int]:  # fmt: skip
    """Greedy answer to `question` fed on a copy of `cache` at positions from `next_position`
    (until an end token, `max_new_tokens`, or `stop(tokens so far)`)."""
    return ask_each(model, [cache], next_position, question, max_new_tokens, eos_ids, stop)[0]


@torch.inference_mode()
def ask_each(model, caches: list[KVCache], next_position: int, question: list[int], max_new_tokens: int,
             eos_ids, stop=None) -> list[list[int]]:  # fmt: skip
    """`ask` of every one-row cache in `caches` (e.g. one context under different presses), decoded
    as one batch: rows may hold different numbers of slots (the cache masks each row's own), and a
    row leaves the batch when it stops. The caches' contents are left as they were."""
    batch = copy_cache(caches[0])
    batch.stop_tracking_attention()  # nothing reads the statistics here, and the forward is faster without
    batch.reserve_rows(len(caches))
    for other in caches[1:]:
        batch.extend(copy_cache(other) if other.paged else other)  # a paged store's extend moves the blocks
    batch.stop_tracking_attention()  # (extend tracks if a joining row did)
    live = list(range(len(caches)))  # the caller's index of each batch row
    outs: list[list[int]] = [[] for _ in caches]
    ids = torch.tensor([question] * len(caches), device=model.device)
    position = next_position
    for _ in range(max_new_tokens):
        positions = torch.arange(position, position + ids.shape[1])[None].expand(len(live), -1)
        hidden = model.forward_tokens(ids, positions, batch)
        tokens = model.logits(hidden[:, -1]).argmax(-1).tolist()
        position += ids.shape[1]
        going = []
        for row, (index, token) in enumerate(zip(live, tokens, strict=True)):
            if token in eos_ids:
                continue
            outs[index].append(token)
            if stop is None or not stop(outs[index]):
                going.append(row)
        if not going:
            break
        if len(going) < len(live):
            batch.select_rows(going)
            live = [live[row] for row in going]
        ids = torch.tensor([[tokens[row]] for row in going], device=model.device)
    return outs
