"""Paged KV blocks, prefix reuse and quantized KV: each against the plain contiguous fp32 cache."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from conftest import byte_tokenizer, tiny_memlm
from memlm.cache import make_policy
from memlm.cache.blocks import BlockPool, KVCacheConfig, KVMemoryError, parse_kv_memory
from memlm.cache.kv_format import KV_FORMATS, rotate
from memlm.errors import InvalidRequestError
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.kernels import native
from memlm.models.native_decode import NativeDecoder
from memlm.quant.qlinear import quantize_model

needs_native = pytest.mark.skipif(native() is None, reason="native kernels unavailable on this machine")
GREEDY = SamplingParams(max_new_tokens=12, min_new_tokens=12, logprobs=0)


def _engine(kv: KVCacheConfig | None, quantized: str | None = None, **overrides) -> Engine:
    model = tiny_memlm(seed=5, vocab_size=257, eos_token_ids=(256,), **overrides)
    if quantized:
        quantize_model(model, quantized)
        model.native_decoder = NativeDecoder.for_model(model)
    return Engine(model, byte_tokenizer(), name="tiny", kv_cache=kv)


def _run(engine: Engine, prompts, params=GREEDY, **options):
    return [(c.token_ids, c.logprobs) for c in engine.generate(prompts, params, **options)]


CONTIGUOUS = KVCacheConfig(paged=False)
PROMPTS = ["the quick brown fox jumps over", "a", "lazy dogs sleep all day long in the sun", "xyz"]


# ---- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_quantized_kv_blocks_equal_ggml_reference_bytes(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 64)).astype(np.float32)
    x[3, 5] = 40.0  # an outlier, as keys have
    x[4] = 0.0  # an all-zero block: scale 0
    x[5, :32] = -2.5  # ties for the largest magnitude
    fmt = KV_FORMATS[name]
    ours = fmt.encode(torch.from_numpy(x)).numpy()
    kind = GGMLQuantizationType.Q8_0 if name == "q8_0" else GGMLQuantizationType.Q4_0
    reference = quants.quantize(x, kind)
    assert ours.shape == reference.shape and np.array_equal(ours, reference)
    assert np.array_equal(fmt.decode(torch.from_numpy(ours)).numpy(), quants.dequantize(reference, kind))


def test_rotation_is_orthogonal_and_keeps_scores():
    for head_dim in (64, 96, 128):
        basis = rotate(torch.eye(head_dim, dtype=torch.float64))
        assert torch.allclose(basis @ basis.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-12)
    eye = torch.eye(64)
    assert torch.equal(rotate(eye) @ rotate(eye).T, eye)  # entries +-1/8: exact in fp32
    q, k = torch.randn(5, 64), torch.randn(7, 64)
    torch.testing.assert_close(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(rotate(q)), q, atol=1e-6, rtol=1e-6)


def test_kv_memory_parses_bytes_and_tokens():
    assert parse_kv_memory("65536", 100.0) == 65536
    assert parse_kv_memory("1GiB", 1024.0) == 2**20
    assert parse_kv_memory("512MB", 1000.0) == 512_000
    with pytest.raises(InvalidRequestError, match="kv-memory"):
        parse_kv_memory("lots", 4.0)


# ---- paged == contiguous -----------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_cache_equals_contiguous_exactly(block_size):
    paged = KVCacheConfig(block_size=block_size, prefix_caching=False)
    assert _run(_engine(paged), PROMPTS) == _run(_engine(CONTIGUOUS), PROMPTS)


@pytest.mark.parametrize("policy", ["window", "h2o", "sinks"])
def test_paged_cache_equals_contiguous_after_eviction(policy):
    paged = KVCacheConfig(block_size=4)
    params = SamplingParams(max_new_tokens=30, min_new_tokens=30, logprobs=0)
    got = _run(_engine(paged), PROMPTS, params, kv_policy=make_policy(policy, 12))
    assert got == _run(_engine(CONTIGUOUS), PROMPTS, params, kv_policy=make_policy(policy, 12))


@needs_native
@pytest.mark.parametrize("policy", [None, "tova"])
def test_native_step_reads_paged_blocks_exactly(policy, monkeypatch):
    calls, step = [], NativeDecoder.step
    monkeypatch.setattr(NativeDecoder, "step", lambda self, *a: calls.append(1) or step(self, *a))
    options = {"kv_policy": make_policy(policy, 14)} if policy else {}
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24, logprobs=0)
    got = _run(_engine(KVCacheConfig(block_size=5), "q8_0"), PROMPTS, params, **options)
    assert got == _run(_engine(CONTIGUOUS, "q8_0"), PROMPTS, params, **options)
    assert calls


# ---- quantized KV --------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("kv_type", ["bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("rotate_keys", [False, True])
def test_native_and_torch_paths_store_and_read_the_same_quantized_kv(kv_type, rotate_keys, monkeypatch):
    """The native step quantizes as the torch reference does: a model run step by step through the
    kernels and one run layer by layer in torch produce the same tokens, and near-identical
    log-probabilities (only summation order differs)."""
    kv = KVCacheConfig(kv_type=kv_type, rotate=rotate_keys, block_size=8)
    fast = _run(_engine(kv, "q8_0", head_dim=32, num_heads=2, num_kv_heads=1), PROMPTS)
    monkeypatch.setattr(NativeDecoder, "accepts", lambda *a: False)
    slow = _run(_engine(kv, "q8_0", head_dim=32, num_heads=2, num_kv_heads=1), PROMPTS)
    assert [ids for ids, _ in fast] == [ids for ids, _ in slow]
    for (_, a), (_, b) in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)


@needs_native
@pytest.mark.parametrize("kv_type", list(KV_FORMATS))
@pytest.mark.parametrize("head_dim", [64, 128, 96, 32, 48])
@pytest.mark.parametrize("count", [1, 7, 8, 37])
def test_the_decode_steps_attention_equals_the_one_key_at_a_time_loop_bit_for_bit(kv_type, head_dim, count):
    """The step scores 8 keys per pass and keeps the output in registers across values; every float
    operation stays in the reference loop's order, so probabilities and output are identical, and
    both are softmax attention over the stored (dequantized) keys and values."""
    fmt = KV_FORMATS[kv_type]
    if fmt.quantized and head_dim % 32:
        pytest.skip("quantized KV needs a head size divisible by 32")
    gen = torch.Generator().manual_seed(head_dim * 100 + count)
    q = torch.randn(head_dim, generator=gen)
    keys, vals = (
        fmt.encode(torch.randn(count, head_dim, generator=gen)),
        fmt.encode(torch.randn(count, head_dim, generator=gen)),
    )
    rows = torch.stack([keys, vals]).view(torch.uint8).contiguous()
    stride = rows.shape[-1]

    def attend(one_at_a_time: int):
        probs, out = torch.empty(count), torch.empty(head_dim)
        native().mk_attend(
            fmt.code,
            q.data_ptr(),
            rows[0].data_ptr(),
            rows[1].data_ptr(),
            stride,
            count,
            head_dim,
            0.125,
            probs.data_ptr(),
            out.data_ptr(),
            one_at_a_time,
        )
        return probs, out

    (probs, out), (ref_probs, ref_out) = attend(0), attend(1)
    assert torch.equal(probs, ref_probs) and torch.equal(out, ref_out)
    k, v = fmt.decode(keys), fmt.decode(vals)
    expected = torch.softmax(k @ q * 0.125, dim=0)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected @ v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_kv_stays_close_to_fp32(kv_type):
    overrides = dict(head_dim=32, num_heads=2, num_kv_heads=1)
    exact = _run(_engine(CONTIGUOUS, **overrides), PROMPTS)
    for rotate_keys in (False, True):
        got = _run(_engine(KVCacheConfig(kv_type=kv_type, rotate=rotate_keys), **overrides), PROMPTS)
        drift = max(
            abs(a - b) for (_, la), (_, lb) in zip(got, exact, strict=True) for a, b in zip(la, lb, strict=True)
        )
        assert drift < (0.05 if kv_type == "q8_0" else 0.5)


def test_unknown_kv_type_and_bad_head_size_are_clear_errors():
    with pytest.raises(InvalidRequestError, match="unknown KV cache type"):
        _engine(KVCacheConfig(kv_type="q3_k"))
    with pytest.raises(InvalidRequestError, match="divisible by 32"):
        _engine(KVCacheConfig(kv_type="q8_0"))  # the tiny model's head size is 16


# ---- prefix reuse ---------------------------------------------------------------------------------------


def test_reused_prefix_gives_the_logits_of_a_fresh_prefill():
    system = "You are a careful assistant. Answer briefly and well. " * 2
    prompts = [system + "Who are you?", system + "What is two and two?"]
    engine = _engine(KVCacheConfig(block_size=8))
    fresh = _run(_engine(KVCacheConfig(block_size=8, prefix_caching=False)), prompts)
    completions = engine.generate(prompts, GREEDY)  # the second waits a step and reuses the first's blocks
    assert completions[0].cached_tokens == 0
    assert completions[1].cached_tokens == len(system) // 8 * 8
    for c, (ids, logprobs) in zip(completions, fresh, strict=True):
        assert c.token_ids == ids
        np.testing.assert_allclose(c.logprobs, logprobs, atol=1e-5)
    again = engine.generate([prompts[0]], GREEDY)[0]  # the whole prompt but its last token is cached
    assert again.cached_tokens == (len(prompts[0]) - 1) // 8 * 8 and again.token_ids == fresh[0][0]
    pool = engine.kv_pool
    assert pool.hits == completions[1].cached_tokens + again.cached_tokens
    assert pool.queries == 2 * len(prompts[0]) + len(prompts[1])


def test_a_chat_turn_reuses_the_previous_turn_including_its_answer():
    engine = _engine(KVCacheConfig(block_size=4))
    first = engine.generate(["hello there, how are you"], GREEDY)[0]
    history = first.prompt_token_ids + first.token_ids
    request = engine.add_request(history + engine.tokenizer.encode(" and then?", add_special_tokens=False), GREEDY)
    while engine.has_unfinished:
        engine.step()
    # every full block of the first turn but the one its last token was still being written into
    assert request.completion().cached_tokens == (len(history) - 1) // 4 * 4


def test_eviction_never_changes_a_shared_block():
    """A row that evicts from reused prompt blocks copies them first: the cached prefix stays intact."""
    engine = _engine(KVCacheConfig(block_size=4))
    prompt = "one two three four five six seven eight nine"
    before = _run(engine, [prompt])
    params = SamplingParams(max_new_tokens=30, min_new_tokens=30)
    evicting = engine.generate([prompt], params, kv_policy=make_policy("sinks", 12))[0]
    assert evicting.cached_tokens > 0
    assert _run(engine, [prompt]) == before


def test_rows_with_latent_memory_neither_reuse_nor_publish():
    from memlm.cache.prefix import BlockRecord, block_record

    class Memory:
        def extra_slots(self):
            return 0

    class Req:
        prompt_ids, memory, kv_policy, records = list(range(40)), Memory(), None, {}

    pool = BlockPool(1, 1, 16, block_size=4)
    record = block_record(Req(), pool, 50)
    assert record == BlockRecord(reuses=False, publishes=False, limit=13)


# ---- the pool: admission, no leaks ----------------------------------------------------------------------


def test_a_request_that_can_never_fit_is_refused_naming_both_sizes():
    engine = _engine(KVCacheConfig(memory=64, block_size=8))
    with pytest.raises(KVMemoryError, match=r"needs \d+ KV blocks .* holds 8 blocks \(64 tokens\)"):
        engine.add_request("x" * 40, SamplingParams(max_new_tokens=40))


def test_requests_wait_for_blocks_and_all_finish():
    engine = _engine(KVCacheConfig(memory=96, block_size=8, prefix_caching=False))
    params = SamplingParams(max_new_tokens=20, min_new_tokens=20)
    for prompt in ("abcdefghij", "klmnopqrst", "uvwxyz0123", "456789abcd"):
        engine.add_request(prompt, params)
    most = 0
    while engine.has_unfinished:
        engine.step()
        most = max(most, engine.num_running)
        assert engine.kv_pool.blocks_used <= engine.kv_pool.num_blocks
    assert most == 3  # 30-31 slots = 4 blocks of 8 each: three fit the 12 blocks at a time


def test_no_block_leaks_after_many_random_requests():
    rng = random.Random(0)
    engine = _engine(KVCacheConfig(memory=1024, block_size=4))
    pool = engine.kv_pool
    requests = []
    for i in range(1000):
        start = rng.choice(["shared prefix of text ", "other ", ""])
        prompt = start + "".join(rng.choices("abcdefgh", k=rng.randint(1, 12)))
        params = SamplingParams(max_new_tokens=rng.randint(1, 6), temperature=0.8, seed=i)
        policy = make_policy(rng.choice(["window", "h2o"]), 8) if rng.random() < 0.3 else None
        requests.append(engine.add_request(prompt, params, kv_policy=policy))
        if rng.random() < 0.5:
            engine.step()
        if rng.random() < 0.1 and requests:
            engine.abort(rng.choice(requests).id)
    while engine.has_unfinished:
        engine.step()
    assert pool.blocks_used == 0 and all(ref == 0 for ref in pool.refs)
    assert len(pool.free) + len(pool.idle) == pool.num_blocks
    assert pool.hits > 0


# ---- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-cache-type", "q9"], "unknown KV cache type 'q9'"),
        (["--kv-memory", "lots"], "--kv-memory 'lots'"),
        (["--kv-memory", "1GiB", "--no-paged-kv"], "drop --no-paged-kv"),
    ],
)
def test_bad_kv_storage_flags_are_one_line_errors_before_loading(flags, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "memlm", "generate", "hi", *flags], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_rkv_reads_the_same_keys_from_blocks_as_from_the_contiguous_cache():
    params = SamplingParams(max_new_tokens=30, min_new_tokens=30, logprobs=0)
    for kv_type in (None, "q8_0"):
        overrides = dict(head_dim=32, num_heads=2, num_kv_heads=1)
        paged = _run(_engine(KVCacheConfig(kv_type=kv_type, block_size=4), **overrides), PROMPTS, params,
                     kv_policy=make_policy("rkv", 14))  # fmt: skip
        contiguous = KVCacheConfig(kv_type=kv_type, paged=False)
        assert paged == _run(_engine(contiguous, **overrides), PROMPTS, params, kv_policy=make_policy("rkv", 14))


# ---- the float model's decode attention, read where the cache stores it ----------------------------


def _filled_cache(kv_type: str, paged: bool, rotate_keys: bool, lengths: list[int], heads: int, head_dim: int):
    """A one-layer cache whose rows hold `lengths` random keys/values, about to take one more token."""
    from memlm.cache.kv_cache import KVCache

    gen = torch.Generator().manual_seed(len(lengths) * 31 + head_dim)
    pool = BlockPool(1, heads, head_dim, block_size=5, kv_type=kv_type, rotate=rotate_keys) if paged else None
    cache = KVCache(1, len(lengths), heads, head_dim, 64, kv_type=kv_type, rotate_keys=rotate_keys, pool=pool)
    longest = max(lengths)
    positions = torch.tensor([[p if p < n else -1 for p in range(longest)] for n in lengths])
    cache.begin(positions)
    k, v = (torch.randn(len(lengths), heads, longest, head_dim, generator=gen) for _ in range(2))
    cache.update(0, k, v)
    cache.end()
    return cache, gen


@needs_native
@pytest.mark.parametrize("kv_type", ["f32", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("new", [[1, 1, 1, 1], [3, 1, 2, 3]])
def test_attention_read_in_place_equals_gather_then_attention(kv_type, paged, track, new):
    """KVCache.attend_in_place (the kernels over the stored rows) against update + attention in
    torch on the same cache: rows of different lengths (1 to 23 slots, across 5-slot blocks), a
    decode step or a chunk with right-padding (each new token sees the row's earlier new ones),
    grouped queries, keys rotated for q8_0, the weights an eviction policy records."""
    from memlm.models.llama import attention_with_weights

    heads, kv_heads, head_dim, lengths = 4, 2, 32, [7, 1, 22, 12]
    chunk, results = max(new), []
    steps = [[n + t if t < m else -1 for t in range(chunk)] for n, m in zip(lengths, new, strict=True)]
    positions = torch.tensor(steps)
    real = positions >= 0
    for in_place in (True, False):
        cache, gen = _filled_cache(kv_type, paged, kv_type == "q8_0", lengths, kv_heads, head_dim)
        cache.track(attention=track, importance=False)
        q = torch.randn(len(lengths), heads, chunk, head_dim, generator=gen)
        k, v = (torch.randn(len(lengths), kv_heads, chunk, head_dim, generator=gen) for _ in range(2))
        mask = cache.begin(positions)
        q = cache.prepare_queries(q)
        if in_place:
            out, weights = cache.attend_in_place(0, q, k, v, head_dim**-0.5)
        else:
            keys, values = cache.update(0, k, v)
            out, weights = attention_with_weights(q, keys, values, mask, head_dim**-0.5)
        cache.end()
        results.append((out.transpose(1, 2)[real], weights.transpose(1, 2)[real] if track else None))
    (fast, fast_w), (slow, slow_w) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)  # the real tokens' outputs
    if track:
        torch.testing.assert_close(fast_w, slow_w, atol=1e-6, rtol=1e-4)
        assert fast_w.shape[-1] == max(lengths) + chunk
    else:
        assert fast_w is None


def test_decode_attention_in_place_steps_aside_where_it_does_not_apply(monkeypatch):
    cache, gen = _filled_cache("f32", True, False, [3, 5], 1, 32)
    q, k, v = (torch.randn(2, 1, 2, 32, generator=gen) for _ in range(3))
    monkeypatch.setattr("memlm.cache.kv_cache.IN_PLACE_MAX_CHUNK", 1)
    cache.begin(torch.tensor([[3, 4], [5, 6]]))
    assert cache.attend_in_place(0, q, k, v, 1.0) is None  # a longer chunk (a prefill): torch's path
    cache.end()
    monkeypatch.undo()
    monkeypatch.setenv("MEMLM_NATIVE_ATTENTION", "0")
    cache.begin(torch.tensor([[5], [7]]))
    assert cache.attend_in_place(0, q[:, :, :1], k[:, :, :1], v[:, :, :1], 1.0) is None  # switched off
