"""A preallocated KV cache for a batch of sequences of different lengths.

Layout: keys and values are one tensor each, [layers, batch, kv_heads, capacity, head_dim]. Each
row (sequence) fills its slots from 0 to `lengths[row]`; slot order is time order. Keys are stored
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

from memlm.cache.eviction import EvictionHook, ImportanceHook


@dataclass(slots=True)
class _Step:
    rows: torch.Tensor  # [B, T] row index of each new token
    slots: torch.Tensor  # [B, T] slot each new token is written to
    width: int  # number of slots attention looks at: max(lengths) + T
    real: torch.Tensor  # [B] number of non-padding tokens in the chunk


class KVCache:
    supports_eviction = True  # its rows hold tokens a KV policy may drop

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
    ):
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        # Keys and values live in buffers that may hold more rows than the batch uses (`k` and `v`
        # are views of the first `_rows`): requests joining a running batch are written into spare
        # rows, and leaving ones are closed up by moving only the rows after them.
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        self._rows = batch_size
        self.positions = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Attention statistics for eviction policies, per slot, averaged over heads and layers:
        # what every query so far paid each slot (H2O) and what the newest query paid (TOVA).
        self.track_attention = track_attention
        self.attention_sum = torch.zeros(batch_size, capacity, device=device) if track_attention else None
        self.attention_last = torch.zeros(batch_size, capacity, device=device) if track_attention else None
        # A learned importance score per slot (DynTS), written by the engine after each forward.
        self.track_importance = track_importance
        self.importance = torch.zeros(batch_size, capacity, device=device) if track_importance else None
        self.num_layers = num_layers
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
        )

    def _per_slot(self) -> list[tuple[str, int]]:
        """(name, value of an empty slot) of the [batch, capacity] tensors that move with the slots."""
        names = [("positions", -1)]
        names += [("attention_sum", 0), ("attention_last", 0)] if self.track_attention else []
        names += [("importance", 0)] if self.track_importance else []
        return names

    # ---- shape -------------------------------------------------------------------------------

    @property
    def k(self) -> torch.Tensor:
        """[layers, batch, kv_heads, capacity, head_dim]"""
        return self._k[:, : self._rows]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, : self._rows]

    @property
    def batch_size(self) -> int:
        return self._rows

    @property
    def capacity(self) -> int:
        return self._k.shape[3]

    @property
    def bytes_per_token(self) -> int:
        num_layers, _, heads, _, head_dim = self.k.shape
        return 2 * num_layers * heads * head_dim * self.k.element_size()

    def bytes_in_use(self) -> int:
        """Bytes of keys and values held by live tokens across the batch."""
        return int(self.lengths.sum()) * self.bytes_per_token

    def bytes_allocated(self) -> int:
        return self._k.numel() * self._k.element_size() * 2

    def ensure_capacity(self, needed: int) -> None:
        """Grow the preallocated buffers (doubling) so every row can hold `needed` slots."""
        if needed > self.capacity:
            self._grow_to(max(needed, 2 * self.capacity))

    def _grow_to(self, new_capacity: int) -> None:
        grow = new_capacity - self.capacity
        pad = (0, 0, 0, grow)  # last dim untouched, capacity dim grown
        self._k = torch.nn.functional.pad(self._k, pad)
        self._v = torch.nn.functional.pad(self._v, pad)
        for name, empty in self._per_slot():
            setattr(self, name, torch.nn.functional.pad(getattr(self, name), (0, grow), value=empty))

    # ---- one forward pass --------------------------------------------------------------------

    def begin(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Claim slots for a chunk of new tokens; return the boolean mask [B, 1, T, width], or None
        when nothing needs masking (attention kernels are much faster without a mask).

        `positions` is [B, T]; a negative position marks right-padding (the row has fewer new
        tokens than the longest row). Padding is written to slots past the row's length and is
        overwritten later, so it is never attended to by real tokens.
        """
        batch, chunk = positions.shape
        steps = torch.arange(chunk, device=positions.device)
        slots = self.lengths[:, None] + steps  # [B, T]
        width = int(self.lengths.max()) + chunk
        self.ensure_capacity(width)
        rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, chunk)
        self.positions[rows, slots] = positions
        self._step = _Step(rows=rows, slots=slots, width=width, real=(positions >= 0).sum(1))
        if chunk == 1 and width == int(self.lengths.min()) + 1:
            return None  # one new token per row and equal lengths: every query sees every slot
        # A query at slot s sees every live slot <= s: its own row's history plus the chunk so far.
        keys = torch.arange(width, device=positions.device)
        return (keys[None, None, :] <= slots[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a layer's new keys/values [B, H, T, D]; return its live keys/values [B, H, width, D]."""
        step = self._step
        self.k[layer][step.rows, :, step.slots] = k.transpose(1, 2)
        self.v[layer][step.rows, :, step.slots] = v.transpose(1, 2)
        return self.k[layer, :, :, : step.width], self.v[layer, :, :, : step.width]

    def observe_attention(self, layer: int, weights: torch.Tensor) -> None:
        """Record one layer's attention weights [B, H, T, width] of the chunk being written."""
        step = self._step
        received = weights.float().mean(dim=1) / self.num_layers  # [B, T, width], mean over heads and layers
        real_queries = torch.arange(received.shape[1], device=received.device)[None, :] < step.real[:, None]
        self.attention_sum[:, : step.width] += (received * real_queries[..., None]).sum(dim=1)
        last = received[torch.arange(received.shape[0], device=received.device), (step.real - 1).clamp(min=0)]
        if layer == 0:
            self.attention_last.zero_()
        self.attention_last[:, : step.width] += last

    def write_target(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(key buffer, value buffer, slots [B, T], width) of the chunk being written: for a native
        decode step that writes its keys and values into the buffers itself instead of `update`."""
        step = self._step
        return self._k, self._v, step.slots, step.width

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
        self.k[:, row, :, :n] = self.k[:, row, :, keep]
        self.v[:, row, :, :n] = self.v[:, row, :, keep]
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

    def extend(self, other: KVCache) -> None:
        """Append another cache's rows to this batch (requests joining a running batch)."""
        capacity = max(self.capacity, other.capacity)
        for cache in (self, other):
            if cache.capacity < capacity:
                cache._grow_to(capacity)
        self.track(other.track_attention, other.track_importance)
        other.track(self.track_attention, self.track_importance)
        rows, joining = self._rows, other.batch_size
        if rows + joining > self._k.shape[1]:  # no spare rows left: double the buffers (amortised)
            spare = max(rows + joining, 2 * self._k.shape[1]) - self._k.shape[1]
            pad = (0, 0, 0, 0, 0, 0, 0, spare)  # the row dimension (dim 1) grows
            self._k = torch.nn.functional.pad(self._k, pad)
            self._v = torch.nn.functional.pad(self._v, pad)
        self._k[:, rows : rows + joining] = other.k
        self._v[:, rows : rows + joining] = other.v
        self._rows = rows + joining
        for name, _ in self._per_slot():
            setattr(self, name, torch.cat((getattr(self, name), getattr(other, name))))
        self.lengths = torch.cat((self.lengths, other.lengths))
        self.last_step = None

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

    def row_hooks(self, tokenizer, vocab_size: int) -> list:
        """The cache's part in the decode loop: learned importance and eviction (memlm.cache.eviction)."""
        return [ImportanceHook(), EvictionHook(tokenizer, vocab_size)]

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these rows of the batch (e.g. drop finished sequences)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        kept = rows.tolist()
        # Rows before the first change stay where they are; only the ones after it move up.
        first = next((i for i, row in enumerate(kept) if row != i), len(kept))
        if first < len(kept):
            moving = rows[first:]
            self._k[:, first : len(kept)] = self._k.index_select(1, moving)
            self._v[:, first : len(kept)] = self._v.index_select(1, moving)
        self._rows = len(kept)
        for name, _ in self._per_slot():
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.lengths = self.lengths.index_select(0, rows)
        self.last_step = None  # its row indices no longer apply
