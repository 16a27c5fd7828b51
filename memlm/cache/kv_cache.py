"""The KV cache of a batch of sequences of different lengths.

Each row (sequence) fills its slots from 0 to `lengths[row]`; slot order is time order. Where the
keys and values live is the store's business (kv_store.py): one contiguous tensor per batch
(`ContiguousStore`, [layers, batch, kv_heads, capacity, width]), or blocks of an engine-wide pool
through a block table per row (`PagedStore`, blocks.py), in fp32, bf16 or ggml's q8_0/q4_0 blocks
(kv_format.py), keys optionally rotated. This class keeps what every store shares: the lengths,
the slot bookkeeping that moves with the slots, and the forward-pass protocol. Keys are stored
*after* RoPE, and `positions[row, slot]` remembers the position each slot was rotated with, so
evicting tokens is only "keep these slots" (`compact`): no re-rotation, no re-prefill, and the
remaining tokens keep attending exactly as before.

A forward pass over a chunk of T new tokens per row is bracketed by `begin` (claims the slots
`lengths[row] .. lengths[row] + T` and builds the attention mask every layer shares), one `update`
per layer (writes that layer's keys/values and returns the live window), and `end` (advances each
row by its number of real, non-padding tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlm.cache.blocks import BlockPool
from memlm.cache.eviction import EvictionHook, ImportanceHook
from memlm.cache.kv_format import kv_format, rotate, stored_as
from memlm.cache.kv_store import ContiguousStore, NativeKV, PagedStore
from memlm.cache.prefix import BlockHook
from memlm.cache.press_hook import PressHook
from memlm.kernels import native_attention


@dataclass(slots=True)
class _Step:
    rows: torch.Tensor  # [B, T] row index of each new token
    slots: torch.Tensor  # [B, T] slot each new token is written to
    width: int  # number of slots attention looks at: max(lengths) + T
    real: torch.Tensor  # [B] number of non-padding tokens in the chunk
    is_real: torch.Tensor  # [B, T] bool: not padding
    counted: torch.Tensor  # [B, T] bool: queries whose attention the statistics count
    queries: tuple | None = None  # attend_in_place's (rows, steps, slots seen) of the real tokens


# Chunks of up to this many new tokens per row attend in place (decode steps, a memory's
# insertions); longer ones (prefill) gather the rows and use SDPA, whose blocked kernel wins there.
IN_PLACE_MAX_CHUNK = 16


class KVCache:
    supports_eviction = True  # its rows hold tokens a KV policy may drop
    # A decode step's attention may read the stored rows in place (attend_in_place), which sees
    # exactly slots 0..length of each row: a subclass whose `begin` masks slots otherwise opts out.
    attends_in_place = True

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        track_attention: bool = False,
        track_importance: bool = False,
        kv_type: str | None = None,
        rotate_keys: bool = False,
        pool: BlockPool | None = None,
    ):
        """A contiguous cache in `dtype` (or `kv_type`), or, given a pool, rows of its blocks (the
        pool's format and rotation then apply)."""
        if pool is not None:
            self.store: ContiguousStore | PagedStore = PagedStore(pool, batch_size)
            self.format, self.rotate_keys = pool.format, pool.rotate
        else:
            self.format = kv_format(kv_type, head_dim) if kv_type else stored_as(dtype)
            self.store = ContiguousStore(num_layers, batch_size, num_kv_heads, head_dim, capacity, self.format, device)
            self.rotate_keys = rotate_keys
        self.compute_dtype = dtype  # what attention reads: the model's dtype
        self._capacity = capacity
        self.positions = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # The LoRA adapter each row runs with (memlm.adapters.bank; 0: none): the model's forward
        # reads it, so rows with different adapters share one batch.
        self.adapters = torch.zeros(batch_size, dtype=torch.int32)
        # Attention statistics for eviction policies, per slot, averaged over heads and layers:
        # what every query so far paid each slot (H2O) and what the newest query paid (TOVA).
        self.track_attention = track_attention
        self.attention_sum = torch.zeros(batch_size, capacity, device=device) if track_attention else None
        self.attention_last = torch.zeros(batch_size, capacity, device=device) if track_attention else None
        # A learned importance score per slot (DynTS), written by the engine after each forward.
        self.track_importance = track_importance
        self.importance = torch.zeros(batch_size, capacity, device=device) if track_importance else None
        self.num_layers = num_layers
        # While prompts with a press are fed: sees each layer's queries (memlm.cache.press_hook).
        self.query_observer = None
        # The model's RoPE, (x [N, head_dim], positions [N]) -> rotated: expected attention averages
        # it over the coming positions (set by the model's new_state).
        self.rope = None
        self._step: _Step | None = None
        self.last_step: _Step | None = None  # the chunk most recently written, for `record`

    @classmethod
    def for_model(
        cls,
        config,
        batch_size: int,
        capacity: int,
        dtype=torch.float32,
        device="cpu",
        track_attention=False,
        track_importance=False,
        pool: BlockPool | None = None,
        kv_type: str | None = None,
        rotate_keys: bool = False,
    ) -> KVCache:
        return cls(
            config.num_layers,
            batch_size,
            config.num_kv_heads,
            config.head_dim,
            capacity,
            dtype,
            device,
            track_attention,
            track_importance,
            kv_type,
            rotate_keys,
            pool,
        )

    def _per_slot(self) -> list[tuple[str, int]]:
        """(name, value of an empty slot) of the [batch, capacity] tensors that move with the slots."""
        names = [("positions", -1)]
        names += [("attention_sum", 0), ("attention_last", 0)] if self.track_attention else []
        names += [("importance", 0)] if self.track_importance else []
        return names

    # ---- shape -------------------------------------------------------------------------------

    @property
    def paged(self) -> bool:
        return self.store.paged

    @property
    def k(self) -> torch.Tensor:
        """The contiguous store's keys [layers, batch, kv_heads, capacity, width] (stored form)."""
        return self.store.k

    @property
    def v(self) -> torch.Tensor:
        return self.store.v

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        """Slots each row may use before the bookkeeping grows (the store may hold fewer)."""
        return self._capacity

    @property
    def bytes_per_token(self) -> int:
        if self.paged:
            return int(self.store.pool.bytes_per_token)
        k = self.store.k
        return 2 * self.num_layers * k.shape[2] * k.shape[4] * k.element_size()

    def bytes_in_use(self) -> int:
        """Bytes of keys and values held by live tokens across the batch."""
        return int(self.lengths.sum()) * self.bytes_per_token

    def bytes_allocated(self) -> int:
        return self.store.bytes_allocated()

    def ensure_capacity(self, needed: int) -> None:
        """Grow the per-slot bookkeeping (doubling) so every row can hold `needed` slots."""
        if needed > self._capacity:
            self._grow_exactly(max(needed, 2 * self._capacity))

    # ---- one forward pass --------------------------------------------------------------------

    def begin(self, positions: torch.Tensor, uncounted: torch.Tensor | None = None) -> torch.Tensor | None:
        """Claim slots for a chunk of new tokens; return the boolean mask [B, 1, T, width], or None
        when nothing needs masking (attention kernels are much faster without a mask).

        `positions` is [B, T]; a negative position marks right-padding (the row has fewer new
        tokens than the longest row). Padding is written to slots past the row's length (a paged
        store sends it to its scratch block), so it is never attended to by real tokens.
        `uncounted` [B, T]: tokens whose attention the statistics leave out (a memory's queries:
        an eviction policy must not count what they looked at).
        """
        batch, chunk = positions.shape
        steps = torch.arange(chunk, device=positions.device)
        slots = self.lengths[:, None] + steps  # [B, T]
        width = int(self.lengths.max()) + chunk
        is_real = positions >= 0
        real = is_real.sum(1)
        self.ensure_capacity(width)
        self.store.reserve(self.lengths + (real if self.paged else chunk))
        rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, chunk)
        self.positions[rows, slots] = positions
        counted = is_real if uncounted is None else is_real & ~uncounted
        self._step = _Step(rows=rows, slots=slots, width=width, real=real, is_real=is_real, counted=counted)
        if chunk == 1 and width == int(self.lengths.min()) + 1:
            return None  # one new token per row and equal lengths: every query sees every slot
        # A query at slot s sees every live slot <= s: its own row's history plus the chunk so far.
        keys = torch.arange(width, device=positions.device)
        return (keys[None, None, :] <= slots[:, :, None])[:, None]

    def slot_positions(self) -> torch.Tensor:
        """[B, width]: the position each slot the chunk being written attends to holds (-1: empty),
        for masks by position rather than slot (sliding-window layers)."""
        return self.positions[:, : self._step.width]

    def prepare_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, T, D] in the keys' basis: rotated as the stored keys are (scores unchanged)."""
        return rotate(q) if self.rotate_keys else q

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a layer's new keys/values [B, H, T, D]; return its live keys/values [B, H, width, D]
        as attention reads them (decoded from the stored form)."""
        self._write(layer, k, v)
        keys, values = self.store.read(layer, self._step.width)
        return self.format.decode(keys, self.compute_dtype), self.format.decode(values, self.compute_dtype)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        step = self._step
        if self.rotate_keys:
            k = rotate(k)
        fmt = self.format
        k, v = fmt.encode(k.transpose(1, 2)), fmt.encode(v.transpose(1, 2))  # [B, T, H, width]
        self.store.write(layer, step.rows, step.slots, step.is_real, k, v)

    def attend_in_place(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A short chunk's attention (a decode step, a memory's inserted positions; at most
        IN_PLACE_MAX_CHUNK new tokens per row) read where the keys and values are stored, by the
        native kernels: writes the layer's new keys/values [B, H, T, D] and returns (out [B, H, T, D],
        zeros at padding, and the weights [B, H, T, width] when the cache tracks attention), or None
        where it does not apply (a longer chunk, another dtype or device, no kernels), for `update`.
        What it saves is the read: gathering every row's blocks (or slicing and decoding a
        contiguous store) into one tensor per layer and step. Prefill keeps SDPA's blocked kernel."""
        step, lib = self._step, native_attention()
        batch, heads, chunk, head_dim = q.shape
        if lib is None or not self.attends_in_place or chunk > IN_PLACE_MAX_CHUNK or q.device.type != "cpu":
            return None
        if q.dtype != torch.float32 or self.compute_dtype != torch.float32:
            return None
        if step.queries is None:  # once per step: each real token's row and how many slots it sees
            rows, at = step.is_real.nonzero(as_tuple=True)
            step.queries = (rows, at, step.slots[rows, at] + 1)
        rows, at, count = step.queries
        self._write(layer, k, v)
        out, probs = self.store.native().attend(
            lib, layer, q.transpose(1, 2)[rows, at], rows, count, scale, step.width, self.track_attention
        )
        if chunk == 1 and rows.numel() == batch:  # a decode step: one query per row, in row order
            return out[:, :, None], probs[:, :, None] if probs is not None else None
        full = q.new_zeros(batch, chunk, heads, head_dim)
        full[rows, at] = out
        weights = None
        if probs is not None:
            weights = probs.new_zeros(batch, chunk, heads, step.width)
            weights[rows, at] = probs
            weights = weights.transpose(1, 2)
        return full.transpose(1, 2), weights

    def row_keys(self, row: int, length: int) -> torch.Tensor:
        """One row's first `length` keys, every layer: [layers, kv_heads, length, head_dim] as attention
        reads them (rotated if the cache rotates keys: cosine similarities are unchanged)."""
        return self.format.decode(self.store.row(row, length)[0], self.compute_dtype)

    def observe_attention(self, layer: int, weights: torch.Tensor) -> None:
        """Record one layer's attention weights [B, H, T, width] of the chunk being written."""
        step = self._step
        received = weights.float().mean(dim=1) / self.num_layers  # [B, T, width], mean over heads and layers
        self.attention_sum[:, : step.width] += (received * step.counted[..., None]).sum(dim=1)
        last = received[torch.arange(received.shape[0], device=received.device), (step.real - 1).clamp(min=0)]
        if layer == 0:
            self.attention_last.zero_()
        self.attention_last[:, : step.width] += last

    def observe_queries(self, layer: int, q_pre: torch.Tensor, q: torch.Tensor) -> None:
        """Show the query observer one layer's queries of the chunk being written: q_pre [B, T, H, D]
        before RoPE, q [B, H, T, D] as attention uses them."""
        step = self._step
        self.query_observer.observe(layer, step.slots, step.real, q_pre, q)

    def native_target(self) -> tuple[NativeKV, torch.Tensor, int]:
        """(the store's native view, slots [B, T], width) of the chunk being written: for a native
        decode step that writes its keys and values into the store itself instead of `update`."""
        step = self._step
        return self.store.native(), step.slots, step.width

    def observe_attention_total(self, received: torch.Tensor) -> None:
        """Record a one-token-per-row step's attention [B, width], already averaged over heads and
        layers: what `observe_attention` accumulates over the layers of such a step."""
        width = received.shape[1]
        self.attention_sum[:, :width] += received
        self.attention_last.zero_()
        self.attention_last[:, :width] = received

    def end(self) -> None:
        self.lengths += self._step.real
        self.last_step, self._step = self._step, None

    def record_importance(self, scores: torch.Tensor) -> None:
        """Store a score [B, T] for each token of the chunk just written (padding lands past the row's end)."""
        step = self.last_step
        self.importance[step.rows, step.slots] = scores.to(self.importance.dtype)

    # ---- reshaping the batch and evicting ------------------------------------------------------

    def compact(self, row: int, keep: torch.Tensor) -> None:
        """Keep only the slots `keep` (ascending slot indices) of one row, packed to the front."""
        keep = keep.to(self.lengths.device)
        n = keep.numel()
        self.store.compact(row, keep)
        for name, empty in self._per_slot():
            values = getattr(self, name)
            values[row, :n] = values[row, keep]
            values[row, n:] = empty
        self.lengths[row] = n

    def truncate(self, lengths: torch.Tensor) -> None:
        """Forget each row's slots from `lengths[row]` on (e.g. temporary query tokens)."""
        lengths = lengths.to(self.lengths.device)
        dead = torch.arange(self.capacity, device=lengths.device)[None, :] >= lengths[:, None]
        for name, empty in self._per_slot():
            getattr(self, name).masked_fill_(dead, empty)
        self.lengths = torch.minimum(self.lengths, lengths)
        self.store.truncate(self.lengths)

    def extend(self, other: KVCache) -> None:
        """Append another cache's rows to this batch (requests joining a running batch)."""
        width = max(self.capacity, other.capacity)
        for cache in (self, other):
            cache._grow_exactly(width)
        self.track(other.track_attention, other.track_importance)
        other.track(self.track_attention, self.track_importance)
        self.store.extend(other.store)
        for name, _ in self._per_slot():
            setattr(self, name, torch.cat((getattr(self, name), getattr(other, name))))
        self.lengths = torch.cat((self.lengths, other.lengths))
        self.adapters = torch.cat((self.adapters, other.adapters))
        self.last_step = None

    def _grow_exactly(self, width: int) -> None:
        grow = width - self._capacity
        if grow <= 0:
            return
        for name, empty in self._per_slot():
            setattr(self, name, torch.nn.functional.pad(getattr(self, name), (0, grow), value=empty))
        self._capacity = width

    def track(self, attention: bool, importance: bool) -> None:
        """Start recording attention statistics / importance scores (from zero) if not yet."""
        shape, device = (self.batch_size, self.capacity), self.lengths.device
        if attention and not self.track_attention:
            self.track_attention = True
            self.attention_sum = torch.zeros(shape, device=device)
            self.attention_last = torch.zeros(shape, device=device)
        if importance and not self.track_importance:
            self.track_importance = True
            self.importance = torch.zeros(shape, device=device)

    def reserve_rows(self, rows: int) -> None:
        """Room for `rows` rows in all, so that rows joining by `extend` up to that many do not regrow the buffers."""
        self.store.reserve_rows(rows)

    def stop_tracking_attention(self) -> None:
        """Drop the attention statistics (the forward then needs no attention weights: faster)."""
        self.track_attention, self.attention_sum, self.attention_last = False, None, None

    def row_hooks(self, tokenizer, vocab_size: int) -> list:
        """The cache's part in the decode loop: a paged cache's blocks (memlm.cache.prefix), learned
        importance, the prompt's press (memlm.cache.press_hook) and eviction (memlm.cache.eviction)."""
        hooks = [BlockHook(self.store.pool)] if self.paged else []
        return hooks + [ImportanceHook(), PressHook(), EvictionHook(tokenizer, vocab_size)]

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these rows of the batch (e.g. drop finished sequences); a paged store releases
        the blocks of the rows that leave."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        kept = rows.tolist()
        self.store.select_rows(kept, rows)
        for name, _ in self._per_slot():
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.lengths = self.lengths.index_select(0, rows)
        self.adapters = self.adapters.index_select(0, rows.cpu())
        self.last_step = None  # its row indices no longer apply
