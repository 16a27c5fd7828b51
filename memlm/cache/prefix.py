"""A paged cache's part in the loop: which requests fit the pool, and shared prefixes.

`KVAdmission` is the scheduler's question "may this request join now?": yes if the blocks it may
ever claim fit beside what every running row may still claim (a row never meets a full pool, so
nothing is preempted), and it does not share a prompt prefix with a request joining in the same
step (it waits one step and reuses the blocks that request computes instead of computing them too).

`BlockHook` is a RowHook (memlm.generation.hooks): on join it gives each row its block limit and
the longest cached prefix of its prompt (read-only blocks; the row is fed only the rest), and after
each forward it publishes the row's newly filled blocks for later requests.

Who shares: a request without latent memory reuses cached prompt blocks. One without a KV policy
also publishes its blocks (prompt and generated text, so a chat's next turn finds its history); a
row whose policy evicts never publishes (its blocks change), and if it evicts from a reused block
it copies it first (kv_store.PagedStore.compact), so its admission counts room for those copies.
Rows with latent memory neither reuse nor publish: latents shape the keys of every later token.
A row's LoRA adapter is part of its blocks' hash namespace: rows share blocks only with rows of the
same adapter (or of none). Rows with a press neither reuse nor publish: the press reads the queries
of the whole prompt.
At least the prompt's last token is always computed: its logits give the first sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memlm.cache.blocks import BlockPool, chain_hashes
from memlm.hook_defaults import QuietHook

KEY = "prefix"


@dataclass(slots=True)
class BlockRecord:
    """One request's blocks: its chain hashes and how much of its prompt came from the cache."""

    reuses: bool
    publishes: bool
    limit: int  # the most blocks the row may hold
    namespace: str = ""  # what else shaped its keys: the pool's weights, and its LoRA adapter
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks so far
    published: int = 0  # blocks published
    cached_tokens: int = 0  # prompt tokens read from the cache instead of computed

    def completion_fields(self) -> dict:
        return {"cached_tokens": self.cached_tokens}


def cached_tokens(request) -> int:
    """Prompt tokens this request read from the prefix cache (0 before it joins, or without one)."""
    record = request.records.get(KEY)
    return record.cached_tokens if record is not None else 0


def block_record(request, pool: BlockPool, slots: int) -> BlockRecord:
    """The request's record (made on first use: admission, or join), with its prompt's hashes."""
    record = request.records.get(KEY)
    if record is None:
        # a press reads the queries of the whole prompt: its row computes them all
        pressed = request.kv_policy is not None and request.kv_policy.press is not None
        reuses = pool.prefix_caching and request.memory is None and not pressed
        publishes = reuses and request.kv_policy is None
        record = BlockRecord(reuses, publishes, pool.blocks_for(slots), namespace(request, pool))
        if reuses:
            record.hashes = chain_hashes(request.prompt_ids, pool.block_size, record.namespace)
        request.records[KEY] = record
    return record


def namespace(request, pool: BlockPool) -> str:
    """The hash namespace of a request's blocks: a LoRA adapter changes every key and value, so rows
    with different adapters (or none) never share a block."""
    adapter = getattr(request, "adapter", None)
    return pool.namespace if adapter is None else f"{pool.namespace}\x00lora:{adapter}"


def reusable(record: BlockRecord, prompt_length: int, pool: BlockPool) -> list[int]:
    """The cached blocks this prompt may start from (never its last token: its logits are needed)."""
    if not record.reuses:
        return []
    return pool.lookup(record.hashes[: (prompt_length - 1) // pool.block_size])


def slots_needed(r) -> int:
    """Cache slots a request can occupy: all its tokens, or its budget plus the token being written;
    plus the slots its memory inserts."""
    total = len(r.prompt_ids) + r.params.max_new_tokens
    if r.kv_policy is not None:
        total = min(total, max(r.kv_policy.budget, len(r.prompt_ids)) + 1)
    return total + (r.memory.extra_slots() if r.memory is not None else 0)


class KVAdmission:
    def __init__(self, pool: BlockPool):
        self.pool = pool

    def __call__(self, request, joining: list) -> bool:
        pool = self.pool
        record = block_record(request, pool, slots_needed(request))
        cached = reusable(record, len(request.prompt_ids), pool)
        # Another request joining now computes a longer shared prefix: wait one step and reuse it.
        for other in joining:
            theirs = other.records[KEY]
            if theirs.publishes and len(_common(record.hashes, theirs.hashes)) > len(cached):
                return False
        idle = sum(pool.refs[b] == 0 for b in cached)
        need = record.limit - len(cached) + idle + (len(cached) if request.kv_policy is not None else 0)
        claimed = sum(other.records[KEY].limit for other in joining)  # at most: their reuse is not counted
        return pool.can_admit(need + claimed)


def _common(a: list[bytes], b: list[bytes]) -> list[bytes]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


class BlockHook(QuietHook):
    """Row limits, prefix reuse on join, publishing after each forward (a RowHook)."""

    phase = "blocks"

    def __init__(self, pool: BlockPool):
        self.pool = pool

    def join(self, rows, state) -> None:
        pool, store = self.pool, state.store
        first = state.batch_size - len(rows)  # joining rows are the batch's last
        for i, r in enumerate(rows):
            row = first + i
            record = block_record(r, pool, slots_needed(r))
            store.limits[row] = record.limit
            store.copies_allowed[row] = r.kv_policy is not None
            cached = reusable(record, len(r.prompt_ids), pool)
            if record.reuses:
                pool.queries += len(r.prompt_ids)
                pool.hits += len(cached) * pool.block_size
            if not cached:
                continue
            pool.retain(cached)
            n = len(cached) * pool.block_size
            store.tables[row] = list(cached)
            store.invalidate()
            state.lengths[row] = n
            state.positions[row, :n] = state.positions.new_tensor(range(n))
            record.cached_tokens, record.published = n, len(cached) if record.publishes else 0
            r.pending_ids, r.next_position = list(r.prompt_ids[n:]), n

    def after_forward(self, rows, state, hidden, steps) -> None:
        pool, store, size = self.pool, state.store, self.pool.block_size
        lengths = None
        for row, r in enumerate(rows):
            record: BlockRecord = r.records[KEY]
            if not record.publishes:
                continue
            if lengths is None:
                lengths = state.lengths.tolist()
            full = lengths[row] // size
            if full <= record.published:
                continue
            if full > len(record.hashes):  # blocks of generated text: extend the chain
                tokens = r.prompt_ids + r.output_ids
                previous = record.hashes[-1] if record.hashes else None
                start = len(record.hashes)
                record.hashes += chain_hashes(tokens[: full * size], size, record.namespace, start, previous)
            table = store.tables[row]
            for b in range(record.published, full):
                block = pool.publish(table[b], record.hashes[b])
                if block != table[b]:
                    table[b] = block
                    store.invalidate()
            record.published = full
