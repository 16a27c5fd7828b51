"""Working memory: the KV cache and the eviction policies that keep it under a budget."""

from memlm.cache.kv_cache import KVCache
from memlm.cache.policies import POLICIES, KVPolicy, RowView, make_policy

__all__ = ["KVCache", "KVPolicy", "POLICIES", "RowView", "make_policy"]
