"""Presses: keep-sets on hand-made tensors, pressing == the kept keys/values alone at their positions,
the engine's press == a press by hand, one compressed cache serving many questions, learned-press
labels against a direct computation, one-line spec errors."""

import math

import pytest
import torch

from conftest import byte_tokenizer, tiny_engine, tiny_memlm
from memlm.cache.context_cache import ask, ask_each, copy_cache, prefill_context, press_copy
from memlm.cache.kv_cache import KVCache
from memlm.cache.press_hook import press_row
from memlm.cache.presses import (
    ExpectedAttentionPress,
    PromptView,
    kept_count,
    make_press,
    pyramid_weights,
)
from memlm.cache.spec import PolicySpec
from memlm.errors import InvalidRequestError
from memlm.generation.params import SamplingParams


def _view(n=12, layers=1, kv_heads=1, heads=1, d=8, **given):
    torch.manual_seed(0)
    keys = torch.randn(layers, kv_heads, n, d) * 0.01
    values = torch.ones(layers, kv_heads, n, d)
    return PromptView(keys=given.pop("keys", keys), values=given.pop("values", values), **given)


def _one_hot_keys(n, d, hot: dict[int, int], scale=10.0):
    """[1, 1, n, d] keys, near zero except slot s = scale * e_hot[s]."""
    keys = torch.zeros(1, 1, n, d)
    for slot, axis in hot.items():
        keys[0, 0, slot, axis] = scale
    return keys


def test_kept_count_is_kvpress_rounding():
    assert [kept_count(100, r) for r in (0.25, 0.5, 0.75, 0.9)] == [75, 50, 25, 10]
    assert kept_count(3, 0.9) == 1  # never an empty prompt


def test_streaming_llm_keeps_sinks_and_the_most_recent():
    keep = make_press("streaming_llm", 0.5).keep(_view(n=20))
    assert keep.tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]


def test_random_is_seeded_and_keeps_the_share():
    a, b = make_press("random", 0.75).keep(_view(n=40)), make_press("random", 0.75).keep(_view(n=40))
    assert a.tolist() == b.tolist() and len(a) == 10 and a.tolist() == sorted(set(a.tolist()))


def test_knorm_keeps_the_smallest_keys_per_layer_and_head_averaged():
    keys = torch.ones(2, 2, 6, 4) * (1 + 0.1 * torch.arange(6))[:, None]  # norms grow with the slot
    keys[:, :, 4] *= 0.1  # small everywhere
    keys[0, 0, 1] *= 0.01  # tiny in one head of one layer: the mean ranks it below slot 0
    keys[1, 1, 0] *= 1.5  # larger in one head: still below slot 2's mean
    assert make_press("knorm", 0.5).keep(_view(keys=keys)).tolist() == [0, 1, 4]


def test_snapkv_keeps_what_the_window_attends_pooled_and_the_window():
    n, d = 16, 8
    keys = _one_hot_keys(n, d, {5: 1})
    window = torch.zeros(1, 1, 2, d)
    window[..., 1] = 1.0  # both window queries look at slot 5
    view = _view(keys=keys, window=window, window_slots=torch.tensor([14, 15]))
    keep = make_press("snapkv", 0.75).keep(view)  # keep 4: the two window slots, two of slot 5's
    assert {14, 15} <= set(keep.tolist()) and len(keep) == 4
    assert set(keep.tolist()) - {14, 15} <= {3, 4, 5, 6, 7}  # the average pooling (kernel 5) spreads slot 5's vote


def test_snapkv_question_window_sees_every_slot_and_keeps_no_window():
    n, d = 10, 8
    keys = _one_hot_keys(n, d, {2: 0, 8: 3})
    window = torch.zeros(1, 1, 1, d)
    window[..., 3] = 1.0  # the question asks about slot 8
    view = _view(keys=keys, window=window, window_slots=torch.tensor([n + 4]))
    keep = make_press("snapkv_question", 0.6).keep(view)
    assert keep.tolist() == [6, 7, 8, 9]  # slot 8 and its pooling neighbours; no window slot in the prompt


def test_window_query_inside_the_prompt_sees_only_earlier_slots():
    n, d = 10, 8
    keys = _one_hot_keys(n, d, {9: 0, 1: 1})
    window = torch.zeros(1, 1, 1, d)
    window[..., 0] = 1.0
    window[..., 1] = 0.5  # prefers slot 9, which comes after it (slot 6): it cannot see it
    view = _view(keys=keys, window=window, window_slots=torch.tensor([6]))
    assert make_press("tova", 0.8).keep(view).tolist() == [1, 6]  # its best visible slot, and itself


def test_tova_scores_the_last_query_mean_over_heads_per_layer():
    n, d = 8, 4
    keys = _one_hot_keys(n, d, {2: 0, 3: 1})
    window = torch.zeros(1, 2, 3, d)  # two query heads, three window queries; only the last one counts
    window[0, 0, -1, 0] = 1.0  # head 0 -> slot 2
    window[0, 1, -1, 1] = 0.2  # head 1 -> slot 3, weakly
    window[0, :, 0, 1] = 5.0  # an earlier query: ignored
    view = _view(keys=keys, heads=2, window=window, window_slots=torch.tensor([5, 6, 7]))
    assert make_press("tova", 0.75).keep(view).tolist() == [2, 7]


def test_observed_attention_divides_by_the_queries_that_saw_each_slot():
    n = 5
    received = torch.tensor([2.0, 1.0, 1.2, 0.5, 0.3])  # summed over prompt queries; slot s seen by n - s
    view = _view(n=n, attention_sum=received)
    # means: 0.4, 0.25, 0.4, 0.25, 0.3 -> the top two are slots 0 and 2, then 4
    assert make_press("observed_attention", 0.6).keep(view).tolist() == [0, 2]
    assert make_press("observed_attention", 0.4).keep(view).tolist() == [0, 2, 4]


def test_expected_attention_follows_the_mean_query_and_value_norms_and_keeps_sinks():
    n, d = 12, 8
    keys = _one_hot_keys(n, d, {6: 2, 9: 2, 10: 5}, scale=3.0)
    values = torch.ones(1, 1, n, d)
    values[0, 0, 9] = 0.0  # as attended as slot 6, but it carries nothing
    mean = torch.zeros(1, 1, d)
    mean[0, 0, 2] = 4.0
    cov = torch.zeros(1, 1, d, d)
    view = _view(keys=keys, values=values, query_mean=mean, query_cov=cov, future_rotation=torch.eye(d))
    keep = ExpectedAttentionPress(1 - 5 / 12).keep(view)
    assert keep.tolist() == [0, 1, 2, 3, 6]
    # the covariance term: variance along axis 5 makes slot 10's expected attention large
    cov[0, 0, 5, 5] = 50.0
    assert 10 in ExpectedAttentionPress(1 - 5 / 12).keep(view).tolist()


def test_expected_attention_mean_rotation_is_the_average_of_rope():
    model = tiny_memlm()
    from memlm.cache.presses import mean_rotation

    d = model.config.head_dim
    m = mean_rotation(model.rope_at, 10, 4, d)
    x = torch.randn(d)
    expected = torch.stack([model.rope_at(x[None], torch.tensor([p]))[0] for p in range(10, 14)]).mean(0)
    torch.testing.assert_close(x @ m, expected)


def test_learned_press_keeps_the_highest_importance():
    importance = torch.tensor([0.1, 3.0, 0.2, 2.0, 0.0, 1.0])
    keep = make_press("learned", 0.5, predictor=object()).keep(_view(n=6, importance=importance))
    assert keep.tolist() == [1, 3, 5]


def test_pyramid_weights_lower_layers_more():
    w = pyramid_weights(4)
    assert w[0] > w[1] > w[2] > w[3] > 0 and math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)
    keys = torch.ones(4, 1, 3, 4)
    keys[0, 0, 0] *= 0.5  # the bottom layer prefers slot 0
    keys[1:, 0, 1] *= 0.75  # the upper three prefer slot 1, a little less strongly each
    view = _view(keys=keys)
    assert make_press("knorm", 0.6).keep(view).tolist() == [1]  # a plain mean: three layers outvote one
    assert make_press("pyramid:knorm", 0.6).keep(view).tolist() == [0]


# ---- on a model ---------------------------------------------------------------------------------------


def _kept_only_cache(model, full: KVCache, keep: torch.Tensor) -> KVCache:
    """A fresh cache holding only the kept slots' keys and values, at their original positions."""
    cache = model.new_state(1, 64)
    keys, values = full.store.row(0, int(full.lengths[0]))
    cache.begin(full.positions[0, keep][None])
    for layer in range(model.config.num_layers):
        cache.update(layer, keys[layer][:, keep][None], values[layer][:, keep][None])
    cache.end()
    return cache


@pytest.mark.parametrize(
    "name", ["knorm", "snapkv", "expected_attention", "tova", "observed_attention", "pyramid:snapkv"]
)
def test_pressing_equals_the_kept_keys_and_values_alone_at_their_positions(name):
    model = tiny_memlm()
    torch.manual_seed(1)
    context = torch.randint(0, 128, (40,)).tolist()
    question = torch.randint(0, 128, (6,)).tolist()
    press = make_press(name, 0.5)
    ctx = prefill_context(model, context, 64, 8, True, press.needs_attention)
    pressed = copy_cache(ctx.cache)
    keep = press_row(pressed, 0, ctx.length, press, ctx.queries)
    assert len(keep) == 20 and int(pressed.lengths[0]) == 20
    assert pressed.positions[0, :20].tolist() == keep.tolist()  # positions stay the original ones
    alone = _kept_only_cache(model, ctx.cache, keep)
    positions = torch.arange(40, 46)[None]
    with torch.inference_mode():
        a = model.logits(model.forward_tokens(torch.tensor([question]), positions, pressed))
        b = model.logits(model.forward_tokens(torch.tensor([question]), positions, alone))
        full = model.logits(model.forward_tokens(torch.tensor([question]), positions, copy_cache(ctx.cache)))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, full)  # the press changed what the question reads


def test_engine_press_equals_pressing_by_hand_after_the_prefill():
    from memlm.cache.blocks import KVCacheConfig
    from memlm.generation.engine import Engine

    prompt = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
    params = SamplingParams(max_new_tokens=6)
    for paged in (True, False):
        model = tiny_memlm(vocab_size=257, eos_token_ids=(256,))
        engine = Engine(model, byte_tokenizer(), name="tiny", kv_cache=KVCacheConfig(paged=paged))
        ids = engine.encode_prompt(prompt)
        out = engine.generate(prompt, params, kv_policy=PolicySpec(press="snapkv", press_ratio=0.5))
        # by hand: prefill, first token from the full prompt, press, then greedy decoding
        ctx = prefill_context(model, ids, 128, 64, True)
        with torch.inference_mode():
            first = int(model.logits(ctx.hidden[-1:]).argmax())
            press_row(ctx.cache, 0, len(ids), make_press("snapkv", 0.5), ctx.queries)
            tokens = [first] + ask(model, ctx.cache, len(ids), [first], 5, set())
        assert out.token_ids == tokens[:6]
        assert out.peak_kv_tokens == len(ids)  # the prefill held the whole prompt


def test_press_and_policy_combine_press_first_then_the_budget():
    engine = tiny_engine()
    prompt = "x" * 60
    r = engine.add_request(
        prompt, SamplingParams(max_new_tokens=12), kv_policy=PolicySpec("window", 40, press="knorm", press_ratio=0.5)
    )
    held = []
    while engine.has_unfinished:
        held += [d.kv_tokens for d in engine.step()]
    n = len(r.prompt_ids)
    assert r.records["press"].prompt_tokens == n and len(r.records["press"].kept) == kept_count(n, 0.5)
    assert max(held) <= 40 and held[0] == kept_count(n, 0.5) + 0  # after the prompt's step: the pressed prompt


def test_one_compressed_cache_serves_many_questions_unchanged():
    model = tiny_memlm()
    torch.manual_seed(2)
    context = torch.randint(0, 128, (30,)).tolist()
    ctx = prefill_context(model, context, 40, 8)
    pressed = press_copy(ctx, make_press("knorm", 0.5).keep(PromptView(*ctx.cache.store.row(0, 30))))
    before = [t.clone() for t in pressed.store.row(0, 15)]
    q1, q2 = [5, 6, 7], [9, 10]
    a1 = ask(model, pressed, 30, q1, 4, set())
    a2 = ask(model, pressed, 30, q2, 4, set())
    assert int(pressed.lengths[0]) == 15 and all(
        torch.equal(x, y) for x, y in zip(before, pressed.store.row(0, 15), strict=True)
    )
    assert ask(model, pressed, 30, q1, 4, set()) == a1 and ask(model, copy_cache(pressed), 30, q2, 4, set()) == a2


def test_asking_many_pressed_caches_in_one_batch_equals_asking_each_alone():
    model = tiny_memlm()
    torch.manual_seed(3)
    context = torch.randint(0, 128, (40,)).tolist()
    ctx = prefill_context(model, context, 48, 8, stats=True, track_attention=True)
    view = PromptView(*ctx.cache.store.row(0, 40))
    # different presses and ratios: rows of different lengths, and a row that stops early
    pressed = (("knorm", 0.5), ("random", 0.25), ("streaming_llm", 0.75))
    caches = [ctx.cache] + [press_copy(ctx, make_press(p, r).keep(view)) for p, r in pressed]
    alone = [ask(model, c, 40, [5, 6, 7], 6, set()) for c in caches]
    stop = lambda out: out == alone[2][:2]  # noqa: E731  (row 2, and any row that starts alike, stops at 2 tokens)
    batched = ask_each(model, caches, 40, [5, 6, 7], 6, set(), stop)
    assert batched == [a[:2] if a[:2] == alone[2][:2] else a for a in alone]
    assert any(a[:2] != alone[2][:2] for a in alone)  # some row went on after row 2 left the batch
    assert len({int(c.lengths[0]) for c in caches}) == 4 and int(ctx.cache.lengths[0]) == 40  # caches unchanged


def test_bench_prefills_each_problem_once(monkeypatch):
    import memlm.bench.press as bench
    from memlm.generation.engine import Engine

    calls = []
    real = bench.prefill_context

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "prefill_context", counting)
    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=1024)
    engine = Engine(model, byte_tokenizer(), name="tiny")
    presses = ("knorm", "snapkv_question")
    report = bench.run_press_bench(
        engine, presses, (0.5, 0.75), ("multi_query",), (400,), 2, skip_unusable=False, log=lambda m: None
    )
    assert len(calls) == 2 + 2 + len(presses)  # one per problem, then the cost pass: plain twice + one per press
    assert report["questions"]["multi_query"]["400"] == 4  # two questions of each context
    assert set(report["scores"]["snapkv_question"]) == {"0.5", "0.75"}
    split = report["by_question"]["multi_query@400"]["snapkv_question@0.5"]  # first and second question
    assert len(split) == 2 and sum(split) / 2 == pytest.approx(
        report["scores"]["snapkv_question"]["0.5"]["multi_query"]["400"]
    )


@pytest.mark.parametrize("peak", [False, True])
def test_learned_press_labels_match_a_direct_computation(peak):
    """Mean attention of the question's queries (the tasks' labels), or the peak of any one query
    scaled by the keys it saw (the repeated text's labels), against one forward keeping it all."""
    from memlm.train.predictor import _AttentionRecorder
    from memlm.train.press import peak_attention, question_attention

    model = tiny_memlm()
    torch.manual_seed(3)
    context = torch.randint(0, 128, (24,)).tolist()
    tail = torch.randint(0, 128, (7,)).tolist()
    ctx = prefill_context(model, context, 40)
    got = (peak_attention if peak else question_attention)(model, ctx, tail)
    # directly: one forward over context + question, every query's attention kept; the question's rows
    recorder = _AttentionRecorder.for_model(model.config, 1, 40, track_attention=True)
    with torch.inference_mode():
        model.forward_tokens(torch.tensor([context + tail]), torch.arange(31)[None], recorder)
    rows = recorder.received[0, 24:, :24]
    seen = torch.arange(25, 32, dtype=torch.float)[:, None]  # the query at position p saw p + 1 keys
    direct = (rows * seen).amax(dim=0) if peak else rows.mean(dim=0)
    torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-6)


def test_learned_press_text_contexts_are_consecutive_windows_labelled_by_repeating_them(tmp_path):
    from memlm.errors import MemlmError
    from memlm.train.press import REPEAT, TextContext, context_labels, label_text

    engine = tiny_engine()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over dog {i * 7}." for i in range(40)))
    tok = engine.tokenizer
    stream = tok.encode(corpus.read_text() + "\n\n", add_special_tokens=False)
    labelled = label_text(engine.model, tok, str(corpus), 2, (60, 90), log=lambda m: None)
    assert len(labelled) == 4
    # the third context is the window after the first two 60-token ones, labelled as repeating it
    text = tok.decode(stream[120:210])
    context, hidden, label = context_labels(engine.model, tok, TextContext(text), pairs=[(REPEAT, text)], peak=True)
    torch.testing.assert_close(labelled[2].labels, torch.log1p(label))
    assert labelled[2].hidden.shape == (len(context), engine.config.hidden_size) and bool(label.isfinite().all())
    with pytest.raises(MemlmError, match="too short for 50 windows per length"):
        label_text(engine.model, tok, str(corpus), 50, (90,), log=lambda m: None)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(press="zip"), "unknown KV press 'zip'; choose one of random, streaming_llm"),
        (dict(press_ratio=0.5), "--kv-press-ratio is an option of --kv-press"),
        (dict(press="knorm", press_ratio=1.0), "--kv-press-ratio is the share removed, in [0, 1)"),
        (dict(press="learned"), "--kv-press learned needs --kv-predictor DIR"),
        (dict(press="pyramid:random"), "pyramid: wraps a press that scores per layer"),
    ],
)
def test_press_spec_errors_are_one_line(options, message):
    with pytest.raises(InvalidRequestError) as e:
        PolicySpec(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_press_spec_builds_a_policy_carrying_the_press():
    policy = PolicySpec(press="observed_attention", press_ratio=0.25).build()
    assert policy.name == "full" and policy.press.ratio == 0.25 and policy.needs_attention
    policy = PolicySpec("sinks", 64, press="pyramid:snapkv").build()
    assert policy.name == "sinks" and policy.press.name == "pyramid:snapkv" and policy.press.ratio == 0.5
    assert PolicySpec().build() is None


@pytest.mark.parametrize("name", ["snapkv", "expected_attention", "knorm"])
def test_rotated_keys_press_the_same_slots(name):
    from memlm.cache.blocks import KVCacheConfig
    from memlm.generation.engine import Engine

    kept = []
    for rotate in (False, True):
        model = tiny_memlm(vocab_size=257, eos_token_ids=(256,))
        engine = Engine(model, byte_tokenizer(), name="tiny", kv_cache=KVCacheConfig(rotate=rotate))
        r = engine.add_request("Pack my box with five dozen liquor jugs. " * 3, SamplingParams(max_new_tokens=2),
                               kv_policy=PolicySpec(press=name, press_ratio=0.5))  # fmt: skip
        while engine.has_unfinished:
            engine.step()
        kept.append(r.records["press"].kept)
    assert kept[0] == kept[1]


def test_pressed_rows_batched_equal_each_alone():
    engine = tiny_engine()
    prompts = ["Pack my box with five dozen liquor jugs. " * 2, "How vexingly quick daft zebras jump!", "ab"]
    params = SamplingParams(max_new_tokens=5)
    for name in ("snapkv", "expected_attention", "tova", "observed_attention"):
        spec = PolicySpec(press=name, press_ratio=0.5)
        batched = [c.token_ids for c in engine.generate(prompts, params, kv_policy=spec)]
        alone = [engine.generate(p, params, kv_policy=spec).token_ids for p in prompts]
        assert batched == alone, name
