"""KV cache: incremental decoding equals full recomputation; compaction really evicts."""

import torch

from conftest import tiny_memlm
from memlm.cache.kv_cache import KVCache


def _full_logits(model, ids, positions=None):
    if positions is None:
        positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model.logits(model(model.embed(ids), positions))


def test_cache_matches_no_cache_token_by_token():
    model = tiny_memlm()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    expected = _full_logits(model, ids)
    cache = KVCache.for_model(model.config, 1, capacity=30)
    got = [model.logits(model(model.embed(ids[:, :10]), torch.arange(10)[None], cache))]
    for t in range(10, 30):
        got.append(model.logits(model(model.embed(ids[:, t : t + 1]), torch.tensor([[t]]), cache)))
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [30]
    assert cache.positions[0].tolist() == list(range(30))


def test_padded_batch_rows_equal_single_rows():
    model = tiny_memlm()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=gen) for n in (7, 3, 12)]
    cache = KVCache.for_model(model.config, 3, capacity=16)
    ids = torch.zeros(3, 12, dtype=torch.long)
    positions = torch.full((3, 12), -1)
    for row, p in enumerate(prompts):
        ids[row, : len(p)], positions[row, : len(p)] = p, torch.arange(len(p))
    batched = model.logits(model(model.embed(ids), positions, cache))
    assert cache.lengths.tolist() == [7, 3, 12]
    step = torch.randint(0, 128, (3, 1), generator=gen)
    next_batched = model.logits(model(model.embed(step), torch.tensor([[7], [3], [12]]), cache))
    for row, p in enumerate(prompts):
        alone = _full_logits(model, torch.cat([p, step[row]])[None])
        torch.testing.assert_close(batched[row, : len(p)], alone[0, : len(p)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(next_batched[row, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_packed_chunk_equals_padded_chunk(monkeypatch):
    """One row feeds 8 vectors, one feeds a token, one feeds nothing (the shape of a latent
    insertion step): running only the real tokens through the matmuls changes no real output."""
    from memlm.models.llama import Packing

    model = tiny_memlm()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 128, (3, 5), generator=gen)
    chunk = torch.randn(3, 8, model.config.hidden_size, generator=gen)
    positions = torch.full((3, 8), -1)
    positions[0], positions[1, 0] = torch.arange(5, 13), 5
    assert Packing.worthwhile(positions) and not Packing.worthwhile(torch.zeros(3, 1, dtype=torch.long))

    def run(pack: bool):
        monkeypatch.setattr(Packing, "worthwhile", staticmethod(lambda positions: pack and bool((positions < 0).any())))
        cache = KVCache.for_model(model.config, 3, capacity=16)
        model(model.embed(prompt), torch.arange(5)[None].expand(3, 5), cache)
        hidden = model(chunk, positions, cache)
        after = model(model.embed(prompt[:, :1]), cache.lengths[:, None].clone(), cache)
        return hidden, after, cache.lengths.tolist()

    (packed, packed_after, packed_lengths), (padded, padded_after, padded_lengths) = run(True), run(False)
    real = positions >= 0
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    assert packed[~real].abs().max() == 0  # padding is never computed
    torch.testing.assert_close(packed_after, padded_after, atol=1e-5, rtol=1e-5)
    assert packed_lengths == padded_lengths == [14, 7, 6]


class _MaskedCache(KVCache):
    """Reference for eviction: keep every slot but hide evicted ones from attention."""

    attends_in_place = False  # its mask hides slots, which attention read in place would not know

    def __init__(self, *args, hidden: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden = hidden

    def begin(self, positions):
        mask = super().begin(positions)
        if mask is None:  # "attend to everything" made explicit, so slots can be hidden
            mask = torch.ones(positions.shape[0], 1, positions.shape[1], self._step.width, dtype=torch.bool)
        for slot in self.hidden:
            mask[..., slot] = False
        return mask


def test_compaction_equals_attention_over_kept_tokens():
    model = tiny_memlm()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([0, 1, 2, 5, 8, 13, 17, 18, 19])
    evicted = set(range(20)) - set(keep.tolist())
    compacted = KVCache.for_model(model.config, 1, capacity=24)
    reference = _MaskedCache(2, 1, 2, 16, 24, hidden=set())
    for cache in (compacted, reference):
        model(model.embed(ids), torch.arange(20)[None], cache)
    compacted.compact(0, keep)
    reference.hidden = evicted
    assert compacted.lengths.tolist() == [9]
    assert compacted.positions[0, :9].tolist() == keep.tolist()
    assert compacted.bytes_in_use() == 9 * compacted.bytes_per_token
    for t, token in enumerate([5, 77, 31]):  # decode goes on at the true positions
        step = torch.tensor([[token]])
        pos = torch.tensor([[20 + t]])
        got = model.logits(model(model.embed(step), pos, compacted))
        want = model.logits(model(model.embed(step), pos, reference))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # And eviction changed the answer: the evicted tokens really are gone.
    full = _full_logits(model, torch.cat([ids, torch.tensor([[5, 77, 31]])], dim=1))[:, -1]
    assert not torch.allclose(got[:, -1], full, atol=1e-3)


def test_mask_is_skipped_only_when_every_query_sees_every_slot():
    cache = KVCache(num_layers=1, batch_size=2, num_kv_heads=1, head_dim=2, capacity=8)
    assert cache.begin(torch.tensor([[0, 1], [0, 1]])) is not None  # causal within the chunk
    cache.end()
    assert cache.begin(torch.tensor([[2], [2]])) is None  # equal lengths, one token each
    cache.end()
    cache.compact(1, torch.tensor([0, 2]))  # rows now differ in length
    mask = cache.begin(torch.tensor([[3], [3]]))
    assert mask.tolist() == [[[[True, True, True, True]]], [[[True, True, True, False]]]]


def test_select_rows_and_growth():
    cache = KVCache(num_layers=1, batch_size=3, num_kv_heads=1, head_dim=2, capacity=2)
    cache.begin(torch.tensor([[0, 1, 2], [0, -1, -1], [0, 1, -1]]))  # needs 3 slots: grows
    cache.update(0, torch.arange(9.0).view(3, 1, 3, 1).expand(3, 1, 3, 2), torch.zeros(3, 1, 3, 2))
    cache.end()
    assert cache.capacity >= 3 and cache.lengths.tolist() == [3, 1, 2]
    cache.select_rows([2, 0])
    assert cache.lengths.tolist() == [2, 3]
    assert cache.k[0, :, 0, :3, 0].tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    assert cache.bytes_in_use() == 5 * cache.bytes_per_token
