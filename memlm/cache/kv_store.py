"""Where a KV cache's keys and values live: one tensor per batch, or blocks of a shared pool.

Both stores hold every layer's keys and values in the stored form of their format (kv_format.py)
and answer the same questions for `KVCache`, which keeps everything else (lengths, positions,
attention statistics) and calls them with logical slots:

    reserve(needed)          every row can hold needed[row] slots
    write(layer, rows, slots, real, k, v)
                             store a chunk's (already encoded) keys/values [B, T, H, width]
    read(layer, width)       the stored keys/values of slots 0..width-1 [B, H, width, w]
    compact(row, keep)       keep only these slots of a row, packed to the front
    select_rows / extend     the batch loses or gains rows
    native()                 what the native decode step needs to read and write it in place

`ContiguousStore` is the fastest to read from torch (a slice, no copy) and what short-lived caches
use (the latent weaver's, training's, benchmarks'). `PagedStore` is the engine's: memory follows
each row's real length, rows share prefix blocks, and a pool budget bounds the whole cache.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from memlm.cache.blocks import SCRATCH, BlockPool
from memlm.cache.kv_format import KVFormat
from memlm.kernels import AttendArgs


@dataclass(slots=True)
class NativeKV:
    """The native decode step's view of a store (quant_kernels.cpp, DecodeArgs)."""

    k: torch.Tensor  # storage: [layers, blocks, heads, block_size, width]
    v: torch.Tensor
    table: torch.Tensor  # [rows, table_width] int64: block id of each row's i-th block
    block_size: int
    format: KVFormat

    def strides(self, t: torch.Tensor) -> ctypes.Array:
        """Byte strides over (layer, block, head, slot-in-block)."""
        size = t.element_size()
        return (ctypes.c_int64 * 4)(*(s * size for s in t.stride()[:4]))

    def attend(
        self,
        lib,
        layer: int,
        q: torch.Tensor,
        row: torch.Tensor,
        count: torch.Tensor,
        scale: float,
        width: int,
        weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries q [N, H, D] float32 (in the keys' basis), query i attending slots 0..count[i]-1 of
        row row[i] of `layer`, read where they are stored (mk_attend_store) -> (out [N, H, D], the
        weights [N, H, width] when asked, zeros past each count)."""
        queries, heads, hd = q.shape
        q = q.contiguous()
        row, count = row.to(torch.int64).contiguous(), count.to(torch.int64).contiguous()
        out = torch.empty_like(q)
        probs = torch.empty(queries, heads, width) if weights else None
        k, v, table = self.k[layer], self.v[layer], self.table.contiguous()
        k_stride, v_stride = self.strides(self.k), self.strides(self.v)
        args = AttendArgs(
            q.data_ptr(), out.data_ptr(), probs.data_ptr() if probs is not None else None, width,
            queries, heads, k.shape[1], hd, k.data_ptr(), v.data_ptr(),
            (ctypes.c_int64 * 3)(*k_stride[1:]), (ctypes.c_int64 * 3)(*v_stride[1:]),
            table.data_ptr(), table.shape[1], self.block_size, self.format.code,
            row.data_ptr(), count.data_ptr(), scale,
        )  # fmt: skip
        lib.mk_attend_store(ctypes.byref(args))
        return out, probs


class ContiguousStore:
    """[layers, rows, heads, capacity, width] tensors; row r's slot s at [:, r, :, s]. The buffers
    may hold more rows than the batch uses: joining rows fill spare ones, and leaving rows are
    closed up by moving only the rows after them."""

    paged = False

    def __init__(self, num_layers, rows, heads, head_dim, capacity, fmt: KVFormat, device):
        shape = (num_layers, rows, heads, capacity, fmt.row_width(head_dim))
        self.format = fmt
        self._k = torch.zeros(shape, dtype=fmt.dtype, device=device)
        self._v = torch.zeros(shape, dtype=fmt.dtype, device=device)
        self._rows = rows

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, : self._rows]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, : self._rows]

    @property
    def capacity(self) -> int:
        return self._k.shape[3]

    def bytes_allocated(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()

    def reserve(self, needed: torch.Tensor) -> None:
        width = int(needed.max()) if needed.numel() else 0
        if width > self.capacity:  # grow by doubling (amortised)
            self._grow_to(max(width, 2 * self.capacity))

    def _grow_to(self, capacity: int) -> None:
        if capacity > self.capacity:
            pad = (0, 0, 0, capacity - self.capacity)
            self._k = torch.nn.functional.pad(self._k, pad)
            self._v = torch.nn.functional.pad(self._v, pad)

    def write(self, layer, rows, slots, real, k, v) -> None:
        self.k[layer][rows, :, slots] = k
        self.v[layer][rows, :, slots] = v

    def read(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, :, :width], self.v[layer, :, :, :width]

    def row(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys/values of one row's first `length` slots, every layer: [layers, heads, length, w]."""
        return self.k[:, row, :, :length], self.v[:, row, :, :length]

    def compact(self, row: int, keep: torch.Tensor) -> None:
        n = keep.numel()
        self.k[:, row, :, :n] = self.k[:, row, :, keep]
        self.v[:, row, :, :n] = self.v[:, row, :, keep]

    def select_rows(self, kept: list[int], rows: torch.Tensor) -> None:
        first = next((i for i, row in enumerate(kept) if row != i), len(kept))
        if first < len(kept):
            moving = rows[first:]
            self._k[:, first : len(kept)] = self._k.index_select(1, moving)
            self._v[:, first : len(kept)] = self._v.index_select(1, moving)
        self._rows = len(kept)

    def reserve_rows(self, rows: int) -> None:
        if rows > self._k.shape[1]:
            pad = (0, 0, 0, 0, 0, 0, 0, rows - self._k.shape[1])  # the row dimension (dim 1)
            self._k = torch.nn.functional.pad(self._k, pad)
            self._v = torch.nn.functional.pad(self._v, pad)

    def extend(self, other: ContiguousStore) -> None:
        capacity = max(self.capacity, other.capacity)
        for store in (self, other):
            store._grow_to(capacity)
        rows, joining = self._rows, other._rows
        if rows + joining > self._k.shape[1]:  # no spare rows left: double the buffers (amortised)
            self.reserve_rows(max(rows + joining, 2 * self._k.shape[1]))
        self._k[:, rows : rows + joining] = other.k
        self._v[:, rows : rows + joining] = other.v
        self._rows = rows + joining

    def truncate(self, lengths: torch.Tensor) -> None:
        pass  # slots past a row's length are simply overwritten later

    def native(self) -> NativeKV:
        # A contiguous cache is a paged one whose row r is the single block r of capacity slots.
        table = torch.arange(self._rows, dtype=torch.long)[:, None]
        return NativeKV(self._k, self._v, table, self.capacity, self.format)


class PagedStore:
    """Rows of blocks from a shared `BlockPool`: row r's slot s is in block tables[r][s // block_size].

    `limits[r]` is the most blocks row r may ever hold (its request's slots); what it may still
    claim is reserved in the pool (`pending_blocks`), so admission never overcommits. Shared blocks
    (another row's, or published for reuse) are never written: a row about to rewrite one gets a
    fresh copy first."""

    paged = True

    def __init__(self, pool: BlockPool, rows: int):
        self.pool, self.format = pool, pool.format
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.limits: list[int | None] = [None] * rows  # None: no limit known (unbounded pools only)
        self.copies_allowed: list[bool] = [False] * rows  # reserve room to copy shared blocks (evicting rows)
        self._table: torch.Tensor | None = None  # the tables as one tensor, rebuilt after changes
        pool.stores.add(self)

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            for table in self.tables:
                pool.release(table)
            self.tables = []

    @property
    def capacity(self) -> int:
        return max((len(t) for t in self.tables), default=0) * self.pool.block_size

    def bytes_allocated(self) -> int:
        return sum(len(t) for t in self.tables) * self.pool.bytes_per_block

    def pending_blocks(self) -> int:
        """Blocks these rows may still allocate: up to their limits, plus a copy of each shared block
        an evicting row holds."""
        total = 0
        for table, limit, copies in zip(self.tables, self.limits, self.copies_allowed, strict=True):
            if limit is not None:
                total += max(0, limit - len(table))
                if copies:
                    total += sum(self.pool.is_shared(b) for b in table)
        return total

    def invalidate(self) -> None:
        """The tables changed outside this class (prefix reuse): rebuild the tensor on next use."""
        self._table = None

    def table_tensor(self, blocks: int | None = None) -> torch.Tensor:
        if self._table is None:
            width = max(1, max((len(t) for t in self.tables), default=1))
            table = torch.full((len(self.tables), width), SCRATCH, dtype=torch.long)
            for row, blocks_of_row in enumerate(self.tables):
                table[row, : len(blocks_of_row)] = torch.tensor(blocks_of_row, dtype=torch.long)
            self._table = table.to(self.pool.device)
        if blocks is not None and blocks > self._table.shape[1]:  # read past every row's blocks: scratch
            pad = (0, blocks - self._table.shape[1])
            return torch.nn.functional.pad(self._table, pad, value=SCRATCH)
        return self._table

    def reserve(self, needed: torch.Tensor) -> None:
        size = self.pool.block_size
        for row, n in enumerate(needed.tolist()):
            missing = -(-n // size) - len(self.tables[row])
            if missing > 0:
                self.tables[row] += self.pool.allocate(missing)
                self._table = None

    def write(self, layer, rows, slots, real, k, v) -> None:
        size = self.pool.block_size
        table = self.table_tensor()
        index = (slots // size).clamp(max=table.shape[1] - 1)
        blocks = torch.where(real, table[rows, index], SCRATCH)
        offsets = slots % size
        self.pool.k[layer][blocks, :, offsets] = k
        self.pool.v[layer][blocks, :, offsets] = v

    def read(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.pool.block_size
        n = -(-width // size)
        table = self.table_tensor(n)[:, :n]
        rows, heads = table.shape[0], self.pool.num_kv_heads

        def gather(storage):  # [H, B, n, size, w] -> [B, H, n * size, w] -> the first `width` slots
            # Gathered with heads first, a row's blocks lie one after another for each head, so the
            # [B, H, n * size, w] view needs no second copy (gathering [B, n, H, ...] did: 25% slower).
            blocks = storage[layer].transpose(0, 1)[:, table]
            return blocks.permute(1, 0, 2, 3, 4).reshape(rows, heads, n * size, -1)[:, :, :width]

        return gather(self.pool.k), gather(self.pool.v)

    def _slot_index(self, row: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.pool.block_size
        table = torch.tensor(self.tables[row], dtype=torch.long, device=self.pool.device)
        return table[slots // size], slots % size

    def row(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys/values of one row's first `length` slots, every layer: [layers, heads, length, w]."""
        blocks, offsets = self._slot_index(row, torch.arange(length, device=self.pool.device))
        # advanced indices on dims 1 and 3 go first: [length, layers, heads, w]
        keys, values = self.pool.k[:, blocks, :, offsets], self.pool.v[:, blocks, :, offsets]
        return keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)

    def compact(self, row: int, keep: torch.Tensor) -> None:
        """Pack the kept slots to the front, rewriting only the blocks from the first change on;
        shared blocks among those are replaced by fresh ones, and blocks past the end are released."""
        pool, size, table = self.pool, self.pool.block_size, self.tables[row]
        keep = keep.to(pool.device)
        n = keep.numel()
        moved = torch.nonzero(keep != torch.arange(n, device=keep.device)).flatten()
        first = int(moved[0]) if moved.numel() else n
        start = first // size * size  # the first block that changes
        blocks_needed = -(-n // size)
        if start < n:
            sources = keep[start:]
            src_blocks, src_offsets = self._slot_index(row, sources)
            k = pool.k[:, src_blocks, :, src_offsets]  # [m, layers, heads, w]: copies, read before writing
            v = pool.v[:, src_blocks, :, src_offsets]
            for b in range(start // size, blocks_needed):
                if pool.is_shared(table[b]):  # copy on write
                    fresh = pool.allocate(1)[0]
                    pool.release([table[b]])
                    table[b] = fresh
            dst = torch.arange(start, n, device=pool.device)
            dst_blocks, dst_offsets = self._slot_index(row, dst)
            pool.k[:, dst_blocks, :, dst_offsets] = k
            pool.v[:, dst_blocks, :, dst_offsets] = v
        pool.release(table[blocks_needed:])
        del table[blocks_needed:]
        self._table = None

    def truncate(self, lengths: torch.Tensor) -> None:
        size = self.pool.block_size
        for row, n in enumerate(lengths.tolist()):
            blocks = -(-n // size)
            self.pool.release(self.tables[row][blocks:])
            del self.tables[row][blocks:]
        self._table = None

    def select_rows(self, kept: list[int], rows: torch.Tensor) -> None:
        for row in set(range(len(self.tables))) - set(kept):
            self.pool.release(self.tables[row])
        self.tables = [self.tables[row] for row in kept]
        self.limits = [self.limits[row] for row in kept]
        self.copies_allowed = [self.copies_allowed[row] for row in kept]
        self._table = None

    def reserve_rows(self, rows: int) -> None:
        pass  # rows are block tables: nothing to preallocate

    def extend(self, other: PagedStore) -> None:
        if other.pool is not self.pool:
            raise ValueError("paged caches of different pools cannot be joined")
        self.tables += other.tables
        self.limits += other.limits
        self.copies_allowed += other.copies_allowed
        other.tables, other.limits, other.copies_allowed = [], [], []  # the blocks moved here
        self._table = None

    def native(self) -> NativeKV:
        return NativeKV(self.pool.k, self.pool.v, self.table_tensor(), self.pool.block_size, self.format)
