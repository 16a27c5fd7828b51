"""Working memory: the KV cache (and, later, the eviction policies that keep it under a budget)."""

from memlm.cache.kv_cache import KVCache

__all__ = ["KVCache"]
