"""The KV block pool: fixed-size blocks of every layer's keys and values, shared by all rows.

One pool per engine (it outlives batches, so a shared prefix stays cached while the engine idles).
Storage is two tensors `[layers, blocks, kv_heads, block_size, width]` (width: head_dim floats, or
the bytes of its quantized blocks, kv_format.py); a row of a batch holds a list of block ids, its
block table, and its slot s lives in block `table[s // block_size]` at offset `s % block_size`.
Block 0 is a scratch block no row owns: padding tokens are written there and masked slots read it.

Blocks are reference counted. A full block of token keys can be published under the hash of its
tokens and every token before it (a hash chain, as vLLM and SGLang key theirs); a later request
whose prompt starts with the same tokens takes the same blocks read-only instead of computing them.
A published block nobody references stays cached, least recently used first out, until the pool
needs the room. Published blocks never change: a row that rewrites one (eviction compacting
through it) writes into a fresh block instead (copy on write, kv_cache.PagedStore.compact).

Sizing: a budget in blocks (`--kv-memory`), or none: then the pool grows by doubling like the
contiguous cache did. Admission (`can_admit`) counts the blocks every running row may still claim,
so a running row never meets a full pool.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memlm.cache.kv_format import KVFormat, kv_format, stored_as
from memlm.errors import InvalidRequestError

DEFAULT_BLOCK_SIZE = 16
SCRATCH = 0  # the block padding writes to; never allocated


class KVMemoryError(InvalidRequestError):
    """A request whose KV cache can never fit the pool."""


class BlockPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_type: str = "f32",
        rotate: bool = False,
        max_blocks: int | None = None,
        device: torch.device | str = "cpu",
        initial_blocks: int = 64,
        prefix_caching: bool = True,
        namespace: str = "",
    ):
        if block_size < 1:
            raise InvalidRequestError("the KV block size must be >= 1")
        self.format: KVFormat = kv_format(kv_type, head_dim)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.rotate, self.device = block_size, rotate, torch.device(device)
        self.max_blocks = max_blocks  # None: unbounded (grows by doubling)
        # Reuse of published blocks across requests; the namespace keys them to the weights that
        # made them (a model whose weights or adapters change must use a new one, or clear_prefixes).
        self.prefix_caching, self.namespace = prefix_caching, namespace
        if max_blocks is not None and max_blocks < 2:
            raise InvalidRequestError("the KV memory budget holds less than one block")
        blocks = max_blocks if max_blocks is not None else max(2, initial_blocks)
        shape = (num_layers, blocks, num_kv_heads, block_size, self.format.row_width(head_dim))
        self.k = torch.zeros(shape, dtype=self.format.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.format.dtype, device=self.device)
        self.refs = [0] * blocks
        self.free = list(range(blocks - 1, SCRATCH, -1))  # a stack: low ids first
        self.hash_of: dict[int, bytes] = {}  # published block -> its chain hash
        self.by_hash: dict[bytes, int] = {}  # chain hash -> published block
        self.idle: OrderedDict[int, None] = OrderedDict()  # published, unreferenced: LRU order
        self.stores: weakref.WeakSet = weakref.WeakSet()  # the paged stores holding rows of this pool
        self.queries = self.hits = 0  # prompt tokens looked up / found cached (vLLM's counters)

    @classmethod
    def for_model(cls, config, **options) -> BlockPool:
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, **options)

    # ---- sizes -------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Blocks rows can hold (the scratch block excluded)."""
        return self.k.shape[1] - 1

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.block_size

    @property
    def blocks_used(self) -> int:
        """Blocks some row references (cached idle blocks are free to reuse, so not counted)."""
        return self.num_blocks - len(self.free) - len(self.idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- allocation ----------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference count 1): free ones, then the least recently used cached ones,
        then new ones if the pool may grow."""
        out = []
        for _ in range(n):
            if not self.free and not self.idle:
                self._grow()
            if self.free:
                block = self.free.pop()
            else:
                block, _ = self.idle.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def _grow(self) -> None:
        if self.max_blocks is not None:
            raise KVMemoryError(f"the KV pool is full ({self.num_blocks} blocks of {self.block_size} tokens)")
        old = self.k.shape[1]
        pad = (0, 0, 0, 0, 0, 0, 0, old)  # the block dimension (dim 1) doubles
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)
        self.refs += [0] * old
        self.free += list(range(2 * old - 1, old - 1, -1))

    def retain(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                self.idle.pop(block, None)
            self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None  # cached: reusable until the pool needs the room
                else:
                    self.free.append(block)

    def is_shared(self, block: int) -> bool:
        """Published or referenced twice: must not be written in place."""
        return self.refs[block] > 1 or block in self.hash_of

    # ---- admission -------------------------------------------------------------------------------------

    def pending_blocks(self) -> int:
        """Blocks running rows may still allocate (each store's rows up to their limits)."""
        return sum(store.pending_blocks() for store in list(self.stores))

    def can_admit(self, blocks: int) -> bool:
        """Whether a new row that may allocate `blocks` more fits beside every running row's claims."""
        return self.max_blocks is None or self.blocks_used + self.pending_blocks() + blocks <= self.num_blocks

    def check_fits(self, tokens: int) -> None:
        """KVMemoryError when a request of `tokens` slots could not fit even in an empty pool."""
        if self.max_blocks is not None and self.blocks_for(tokens) > self.num_blocks:
            raise KVMemoryError(
                f"the request needs {self.blocks_for(tokens)} KV blocks ({tokens} tokens) but the whole KV "
                f"pool holds {self.num_blocks} blocks ({self.num_blocks * self.block_size} tokens)"
            )

    # ---- prefixes ---------------------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The published blocks of the longest prefix of this hash chain (not yet retained)."""
        blocks = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def publish(self, block: int, chain_hash: bytes) -> int:
        """Publish a full block under its chain hash. -> the block the row should hold: this one, or
        an identical one published before (then this one is released: one copy is kept)."""
        existing = self.by_hash.get(chain_hash)
        if existing is not None and existing != block:
            self.retain([existing])
            self.release([block])
            return existing
        self.by_hash[chain_hash] = block
        self.hash_of[block] = chain_hash
        return block

    def clear_prefixes(self) -> None:
        """Forget every published block (e.g. after the model's weights change)."""
        for block in list(self.idle):
            self.free.append(block)
        self.idle.clear()
        self.by_hash.clear()
        self.hash_of.clear()


def chain_hashes(tokens: Sequence[int], block_size: int, namespace: str = "", start: int = 0,
                 previous: bytes | None = None) -> list[bytes]:
    """The chain hash of each full block of `tokens` from block `start` on: each covers its block's
    tokens and every block before it (`previous`: the hash of block start - 1) and the namespace
    (whatever else shaped the keys: an adapter, a memory), so different ones never share blocks.
    A cryptographic hash, as vLLM's: a crafted prompt must not collide into another's keys."""
    h = previous if previous is not None else hashlib.blake2b(f"memlm-kv:{namespace}".encode(), digest_size=16).digest()
    out = []
    for b in range(start, len(tokens) // block_size):
        block = array("q", tokens[b * block_size : (b + 1) * block_size]).tobytes()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        out.append(h)
    return out


_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_kv_memory(text: str | int, bytes_per_token: float) -> int:
    """`--kv-memory` -> a token count: bytes with a unit ('2GiB', '512MB') or tokens ('65536')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match and unit in ("", "token", "tokens") and "." not in match.group(1):
        return int(match.group(1))
    if match and unit in _BYTES:
        return int(float(match.group(1)) * _BYTES[unit] // bytes_per_token)
    raise InvalidRequestError(f"--kv-memory {text!r}: give bytes with a unit (2GiB, 512MB) or a token count (65536)")


@dataclass(frozen=True)
class KVCacheConfig:
    """How an engine stores its KV cache: `--kv-cache-type`, `--kv-memory`, `--kv-block-size`,
    `--kv-rotate`, `--no-prefix-caching`, `--no-paged-kv` (the contiguous cache, for comparison)."""

    kv_type: str | None = None  # f32 | bf16 | q8_0 | q4_0; None: the model's own dtype
    memory: str | int | None = None  # the pool's budget: bytes with a unit ('2GiB') or tokens; None: grows
    block_size: int = DEFAULT_BLOCK_SIZE
    rotate: bool = False  # Hadamard-rotate keys (and queries) before storing: for q4_0
    prefix_caching: bool = True
    paged: bool = True

    def pool_for(self, model) -> BlockPool | None:
        """The engine's block pool, or None where the cache is contiguous (paged off, or a model
        whose state is not a KV cache)."""
        if not self.paged or not hasattr(model, "new_pool"):
            return None
        kv_type = self.kv_type or stored_as(model.dtype).name
        max_blocks = None
        if self.memory is not None:
            per_token = kv_format(kv_type, model.config.head_dim).token_bytes(model.config)
            max_blocks = parse_kv_memory(self.memory, per_token) // self.block_size + 1  # + the scratch block
        return model.new_pool(
            block_size=self.block_size, kv_type=kv_type, rotate=self.rotate, prefix_caching=self.prefix_caching,
            max_blocks=max_blocks,
        )  # fmt: skip
