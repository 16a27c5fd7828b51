"""KV eviction policies: keep-sets on hand-made rows, budgets in real generation, clear errors."""

import pytest
import torch

from conftest import tiny_engine, tiny_memlm
from memlm.cache import KVCache, RowView, make_policy
from memlm.cache.policies import POLICIES, H2OPolicy, SinksPolicy, TOVAPolicy, WindowPolicy
from memlm.cache.spec import PolicySpec
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
        (dict(name="sinks", budget=64, window=4), "--kv-window, --kv-ratio, --kv-rescore and --kv-evict-prompt are"),
        (dict(name="tova", budget=64, evict_prompt=False), "options of --kv-policy learned"),
        (dict(name="window", budget=64, spans=True), "--kv-spans is an option of --kv-policy h2o, tova, learned"),
        (dict(name="learned", budget=64), "needs --kv-predictor"),
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
