"""KV eviction policies: keep-sets on hand-made rows, budgets in real generation, clear errors."""

import math

import pytest
import torch

from conftest import byte_tokenizer, tiny_engine, tiny_memlm
from memlm.cache import KVCache, RowView, make_policy
from memlm.cache.eviction import observed_attention
from memlm.cache.policies import (
    POLICIES,
    H2OPolicy,
    OraclePolicy,
    RKVPolicy,
    SinksPolicy,
    SnapKVPolicy,
    TOVAPolicy,
    WindowPolicy,
    key_redundancy,
    pooled,
)
from memlm.cache.spec import PolicySpec
from memlm.data.tasks import Problem, get_task
from memlm.errors import InvalidRequestError
from memlm.generation.params import SamplingParams


def _row(n=10, prompt=3, attention_sum=None, attention_last=None):
    return RowView(torch.arange(100, 100 + n) - 100, prompt, attention_sum, attention_last)


def test_keep_sets_on_hand_made_rows():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.05, 0.7, 0.2, 0.3, 0.0, 0.6, 0.4])
    row = _row(attention_sum=scores, attention_last=scores.flip(0))
    assert make_policy("full").select(row) is None
    assert make_policy("window", 4).select(row).tolist() == [6, 7, 8, 9]
    assert make_policy("clear", 5).select(row).tolist() == [0, 1, 2]  # the prompt only
    assert make_policy("sinks", 6, sinks=2).select(row).tolist() == [0, 1, 6, 7, 8, 9]
    # h2o: recent window of 2 (slots 8, 9), then the 3 best accumulated scores among slots 0-7.
    assert make_policy("h2o", 5, window=2).select(row).tolist() == [0, 2, 4, 8, 9]
    # tova: the newest token (window 1), then the 3 best last-query scores among slots 0-8
    # (flipped: 0.8 at slot 7, 0.7 at slot 5, 0.6 at slot 1).
    assert make_policy("tova", 4).select(row).tolist() == [1, 5, 7, 9]
    assert make_policy("window", 10).select(row) is None  # at the budget: nothing to do


def test_clear_keeps_surviving_prompt_slots_after_earlier_compactions():
    row = RowView(torch.tensor([0, 1, 2, 7, 8, 9]), prompt_length=3)
    assert make_policy("clear", 4).select(row).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_policy("lru", 8), "unknown KV policy"),
        (lambda: make_policy("window"), "needs a budget"),
        (lambda: make_policy("window", 0), "budget must be >= 1"),
        (lambda: make_policy("sinks", 4, sinks=4), "larger than the 4 sink tokens"),
        (lambda: make_policy("h2o", 8, window=8), "larger than the window"),
        (lambda: make_policy("tova", 1), "larger than the window"),
    ],
)
def test_bad_policies_fail_clearly(call, message):
    with pytest.raises(InvalidRequestError, match=message):
        call()


def test_clear_rejects_a_prompt_that_cannot_fit():
    with pytest.raises(InvalidRequestError, match="must be shorter than the budget"):
        tiny_engine().generate(
            "a long prompt here", SamplingParams(max_new_tokens=4), kv_policy=make_policy("clear", 8)
        )


POLICY_CASES = [("window", {}), ("clear", {}), ("sinks", {"sinks": 2}), ("h2o", {}), ("tova", {})]


@pytest.mark.parametrize("name, options", POLICY_CASES)
def test_budget_is_never_exceeded_and_batches_equal_single_rows(name, options):
    engine = tiny_engine()
    prompts = ["abcdef", "xy", "0123456789"]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    policy = make_policy(name, 12, **options)
    batched = engine.generate(prompts, params, kv_policy=policy)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got.peak_kv_tokens <= 12 + 1  # the budget, plus the token being written
        alone = engine.generate(prompt, params, kv_policy=policy)
        assert alone.token_ids == got.token_ids  # eviction is per row
    # Without a policy the cache holds every token but the last sampled one.
    assert engine.generate(prompts[2], params).peak_kv_tokens == 10 + 30 - 1


def test_policies_do_not_change_anything_under_budget():
    engine = tiny_engine()
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    reference = engine.generate("hello", params).token_ids
    for name, options in POLICY_CASES:  # h2o / tova also switch attention to the weight-returning path
        assert engine.generate("hello", params, kv_policy=make_policy(name, 64, **options)).token_ids == reference


def test_attention_statistics_accumulate():
    model = tiny_memlm()
    cache = KVCache.for_model(model.config, 2, capacity=16, track_attention=True)
    ids = torch.randint(0, 128, (2, 6))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1, -1]])
    model(model.embed(ids), positions, cache)
    # Each real query spreads a total attention of 1 (per head, averaged over heads and layers).
    torch.testing.assert_close(cache.attention_sum.sum(1), torch.tensor([6.0, 4.0]))
    for step in range(3):
        model(model.embed(torch.tensor([[5], [9]])), torch.tensor([[6 + step], [4 + step]]), cache)
    torch.testing.assert_close(cache.attention_sum.sum(1), torch.tensor([9.0, 7.0]))  # accumulated
    torch.testing.assert_close(cache.attention_last.sum(1), torch.tensor([1.0, 1.0]))  # newest query only
    before = cache.attention_sum[1, :7].clone()
    cache.compact(1, torch.tensor([0, 3, 6]))
    assert torch.equal(cache.attention_sum[1, :3], before[[0, 3, 6]])  # scores move with their slots
    assert cache.attention_sum[1, 3:].abs().sum() == 0


def test_policy_classes_are_exported_by_name():
    assert isinstance(make_policy("window", 4), WindowPolicy)
    assert isinstance(make_policy("sinks", 8), SinksPolicy) and make_policy("sinks", 8).sinks == 4
    assert make_policy("h2o", 10).window == 5 and isinstance(make_policy("h2o", 10), H2OPolicy)
    assert isinstance(make_policy("tova", 4), TOVAPolicy)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(name="lru", budget=8), "unknown KV policy 'lru'"),
        (dict(name="window"), "needs a budget"),
        (dict(name="sinks", budget=64, window=4), "--kv-window is an option of --kv-policy learned, snapkv, rkv"),
        (
            dict(name="rkv", budget=64, ratio=0.5),
            "--kv-ratio, --kv-rescore, --kv-evict-prompt and --kv-threshold are options of --kv-policy learned",
        ),
        (dict(name="tova", budget=64, evict_prompt=False), "options of --kv-policy learned"),
        (
            dict(name="window", budget=64, spans=True),
            "--kv-spans is an option of --kv-policy h2o, tova, snapkv, rkv, learned",
        ),
        (dict(name="learned", budget=64), "needs --kv-predictor"),
        (dict(name="tova", budget=64, spans="words"), "spans must be one of numbers, lines"),
        (dict(name="window", budget=64, sinks=2), "--kv-sinks is an option of --kv-policy sinks"),
    ],
)
def test_policy_spec_checks_every_option_once(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        PolicySpec(**options)


def test_policy_spec_builds_the_policy_its_options_name():
    assert PolicySpec().build() is None and PolicySpec.from_options(None, None, None).build() is None
    policy = PolicySpec.from_options("tova", 24, {"spans": True}).build()
    assert isinstance(policy, POLICIES["tova"]) and policy.budget == 24 and policy.spans
    assert not PolicySpec("h2o", 24).build().spans
    # one spelling per unit: True is "numbers", the server's and the command line's alike
    assert PolicySpec("tova", 24, spans=True).spans == "numbers" == PolicySpec("tova", 24, spans="numbers").spans
    assert PolicySpec.from_options("rkv", 24, {"spans": "lines"}).build().spans == "lines"
    assert PolicySpec("tova", 24, spans=None).spans is False
    assert PolicySpec.from_options("sinks", 24, {"sinks": 2}).build().sinks == 2
    assert PolicySpec("sinks", 24).build().sinks == 4  # the policy's own default
    with pytest.raises(InvalidRequestError, match="unknown KV policy option 'depth'"):
        PolicySpec.from_options("tova", 24, {"depth": 3})


def test_engine_takes_a_policy_spec_as_it_takes_the_policy():
    engine = tiny_engine()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    by_spec = engine.generate(["abcdef", "xy"], params, kv_policy=PolicySpec("sinks", 12))
    by_policy = engine.generate(["abcdef", "xy"], params, kv_policy=make_policy("sinks", 12))
    assert [c.token_ids for c in by_spec] == [c.token_ids for c in by_policy]
    assert max(c.peak_kv_tokens for c in by_spec) <= 13


# ---- SnapKV, R-KV and the oracle ---------------------------------------------------------------


def test_rkv_redundancy_on_hand_made_keys():
    """Three copies of one key and one key unlike them, one layer and head. Each copy's similarity
    to its most recent look-alike is dropped (the newest copy survives), so each keeps one 1.0 of
    four: mean 0.25; the odd key has none: mean 0. Softmaxed over the four slots."""
    a, c = [1.0, 0.0], [0.0, 1.0]
    keys = torch.tensor([a, a, a, c])[None, None]  # [layers 1, heads 1, 4, 2]
    e = math.exp(0.25)
    expected = torch.tensor([e, e, e, 1.0]) / (3 * e + 1)
    assert torch.allclose(key_redundancy(keys), expected)
    # A second layer with no look-alikes: each slot's similarities are 0 but one -1 (its opposite),
    # mean -0.25; except that a slot with no look-alike has its similarity to slot 0 dropped (as
    # R-KV's own code does), which for slot 2 is its -1: mean 0. Layers average their softmaxes.
    flat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])[None, None]
    f = math.exp(-0.25)
    second = torch.tensor([f, f, 1.0, f]) / (3 * f + 1)
    assert torch.allclose(key_redundancy(torch.cat((keys, flat))), (expected + second) / 2)


def test_rkv_scores_are_importance_minus_redundancy():
    a, c = [1.0, 0.0], [0.0, 1.0]
    keys = torch.tensor([a, a, a, c, a, c])[None, None]
    attention = torch.tensor([0.06, 0.3, 0.05, 0.04, 0.25, 0.3])
    row = RowView(torch.arange(6), 0, attention_last=attention, attention_window=attention, keys=keys)
    rkv = RKVPolicy(4, window=1, mix=0.25)
    rkv.kernel = 1  # no pooling: the hand-made attention as it is
    expected = 0.25 * attention - 0.75 * key_redundancy(keys)
    assert torch.allclose(rkv.scores(row), expected)
    # R-KV drops a copy of the repeated key that SnapKV keeps for its attention: budget 4, window 1
    # (slot 5), three older slots of 0-4. SnapKV (no pooling) keeps the best attended, 1, 4 and 0.
    # R-KV: the copies of a (0, 1, 2, 4) each keep two look-alikes, mean 2/6; the c's none, 0; so
    # redundancy is e^(1/3) / (4 e^(1/3) + 2) = 0.184 for an a and 0.132 for a c, and at mix 0.25
    # the odd key 3 (0.25 * 0.04 - 0.75 * 0.132 = -0.089) beats copy 0 (0.015 - 0.138 = -0.123).
    snap = SnapKVPolicy(4, window=1)
    snap.kernel = 1
    assert snap.select(row).tolist() == [0, 1, 4, 5]
    assert rkv.select(row).tolist() == [1, 3, 4, 5]
    # mix 1 is SnapKV with R-KV's pooling.
    assert torch.allclose(RKVPolicy(4, window=1, mix=1.0).scores(row), pooled(attention, 7, "max"))


def test_snapkv_votes_with_the_observation_window_and_pools_neighbours():
    impulse = torch.zeros(8)
    impulse[3] = 1.0
    assert pooled(impulse, 5, "avg").tolist() == pytest.approx([0, 0.2, 0.2, 0.2, 0.2, 0.2, 0, 0])
    assert pooled(impulse, 7, "max").tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    last = torch.zeros(8)
    last[5] = 1.0
    window = torch.zeros(8)
    window[2] = 0.9
    row = RowView(torch.arange(8), 0, attention_last=last, attention_window=window)
    # the observation window's vote for slot 2 spreads to 0-4 (kernel 5): the five older slots kept
    assert SnapKVPolicy(6, window=1).select(row).tolist() == [0, 1, 2, 3, 4, 7]
    # with no observed queries it falls back on the newest query's attention, pooled the same way
    row.attention_window = None
    assert SnapKVPolicy(5, window=1).select(row).tolist() == [3, 4, 5, 6, 7]


def test_observed_attention_averages_the_last_queries_by_position():
    # two queries: the first saw positions 0-3, the second came after position 1 was evicted
    observed = [
        (torch.tensor([0, 1, 2, 3]), torch.tensor([0.4, 0.3, 0.2, 0.1])),
        (torch.tensor([0, 2, 3, 4]), torch.tensor([0.1, 0.1, 0.2, 0.6])),
    ]
    now = torch.tensor([0, 2, 3, 4])
    assert torch.allclose(observed_attention(observed, now), torch.tensor([0.25, 0.15, 0.15, 0.3]))


def test_oracle_keeps_the_answers_lines_prompt_and_newest_on_a_hand_made_trace():
    """A pair search whose fourth line finds the pair: its tokens are what the oracle keeps."""
    tokenizer = byte_tokenizer()
    task = get_task("pair_search")
    numbers, target = [10, 20, 31, 45], 51
    entry = {"question": "q", "answer": "20 31", "metadata": {"numbers": numbers, "target": target, "pair": [1, 2]}}
    problem = Problem("q", "20 31", entry)
    lines = task.worked(entry)
    assert lines[:4] == ["10+20=30 no", "10+31=41 no", "10+45=55 no", "20+31=51 yes"]
    assert task.key_lines(entry) == [3]
    solution = task.solution(problem)
    key = task.key_tokens(tokenizer, problem)
    ids = tokenizer.encode(solution, add_special_tokens=False)
    assert tokenizer.decode([ids[t] for t in key]) == "20+31=51 yes\n"  # the line and its newline
    # The trace: a 5-token prompt, then the solution; the row has reached the answer line.
    prompt = 5
    keep = [prompt + t for t in key]
    n = prompt + len(ids)
    row = RowView(torch.arange(n), prompt)
    budget = prompt + len(key) + 6
    kept = OraclePolicy(budget, keep).select(row).tolist()
    assert kept == list(range(prompt)) + keep + list(range(n - 6, n))
    # The answer, once it starts, is protected like the prompt; the newest token always stays.
    row.protected_from = n - 3
    assert set(range(n - 3, n)) <= set(OraclePolicy(budget, keep).select(row).tolist())
    assert n - 1 in OraclePolicy(prompt + 1, keep, evict_prompt=True).select(row).tolist()
    with pytest.raises(InvalidRequestError, match="prompt tokens are never evicted"):
        OraclePolicy(prompt + 1, keep).check_prompt(prompt)


@pytest.mark.parametrize("name", ["snapkv", "rkv"])
def test_observed_policies_hold_the_budget_and_batch_like_single_rows(name):
    engine = tiny_engine()
    prompts = ["abcdef", "xy", "0123456789"]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    spec = PolicySpec(name, 14, window=4)
    batched = engine.generate(prompts, params, kv_policy=spec)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got.peak_kv_tokens <= 14 + 1
        assert engine.generate(prompt, params, kv_policy=spec).token_ids == got.token_ids  # no state shared


def test_policy_spec_takes_threshold_for_learned_only_and_window_for_observed_policies():
    assert PolicySpec("learned", 64, predictor="p", threshold=0.2).threshold == 0.2
    assert PolicySpec("rkv", 64, window=8).window == 8
    with pytest.raises(InvalidRequestError, match="--kv-threshold are options of --kv-policy learned"):
        PolicySpec("tova", 64, threshold=0.2)
    with pytest.raises(InvalidRequestError, match="--kv-window is an option of --kv-policy learned, snapkv, rkv"):
        PolicySpec("h2o", 64, window=4)
