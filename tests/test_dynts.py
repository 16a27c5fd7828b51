"""DynTS: the learned policy's keep-set, the engine's importance bookkeeping, the predictor's
checkpoint, its attention labels (against transformers' eager attention) and rank metrics."""

import json

import pytest
import torch
from torch import nn

from conftest import hf_tiny, memlm_twin, tiny_engine
from memlm.cache import RowView, make_policy
from memlm.cache.importance import ImportancePredictor, load_predictor, save_predictor
from memlm.cache.policies import LearnedPolicy
from memlm.cache.spec import PolicySpec
from memlm.errors import InvalidRequestError, MemlmError, ModelFormatError
from memlm.generation.params import SamplingParams
from memlm.train.predictor import (
    Labelled,
    PredictorConfig,
    Trace,
    fit_predictor,
    kendall,
    label_traces,
    marker_index,
    spearman,
)


class Fixed(nn.Module):
    """A stand-in predictor: the first hidden feature, recorded call by call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden):
        scores = hidden[..., 0].float()
        self.calls.append(scores.clone())
        return scores


class Recording(LearnedPolicy):
    """A learned policy that remembers every row it was asked about and what it kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.joins = [], []

    def select(self, row):
        keep = super().select(row)
        self.seen.append((row.positions.clone(), row.importance.clone(), row.prompt_length, row.protected_from, keep))
        self.joins.append(None if row.joins_previous is None else row.joins_previous.clone())
        return keep


def test_learned_keep_set_on_a_hand_made_row():
    importance = torch.tensor([0, 0, 0, 0.9, 0.1, 0.8, 0.05, 0.7, 0.2, 0.3, 0.6, 0.0])
    row = RowView(torch.arange(12), prompt_length=3, importance=importance)
    # budget 10, window 2 (slots 10, 11); older = slots 0-9: prompt 0-2 protected,
    # ratio 1 -> room for 8 older: the prompt + the 5 best others (3, 5, 7, 9, 8).
    assert LearnedPolicy(10, Fixed(), window=2, ratio=1.0).select(row).tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10, 11]
    # ratio 0.5: half of the 7 unprotected older tokens (3 of them) stay: 3, 5, 7.
    assert LearnedPolicy(10, Fixed(), window=2, ratio=0.5).select(row).tolist() == [0, 1, 2, 3, 5, 7, 10, 11]
    # The answer (from position 8 on) is protected like the prompt, however low it scores.
    row.protected_from = 8
    kept = LearnedPolicy(10, Fixed(), window=2, ratio=1.0).select(row).tolist()
    assert kept == [0, 1, 2, 3, 5, 7, 8, 9, 10, 11]
    row.importance[8] = -5.0
    assert 8 in LearnedPolicy(10, Fixed(), window=2, ratio=1.0).select(row).tolist()


def test_rescore_gives_a_share_of_the_kept_slots_to_the_newest_querys_attention():
    importance = torch.tensor([0, 0, 0, 0.9, 0.1, 0.8, 0.05, 0.7, 0.2, 0.3, 0.6, 0.0])
    attention = torch.tensor([0.3, 0.1, 0.1, 0.01, 0.2, 0.02, 0.3, 0.03, 0.04, 0.1, 0.1, 0.2])
    row = RowView(torch.arange(12), prompt_length=3, importance=importance, attention_last=attention)
    # room for 8 older slots: the prompt (3) + 5 others; rescore 0.4 gives 2 of the 5 to
    # attention (slots 6 and 4, the two the newest query reads most), the rest to the learned
    # score (3, 5, 7): it would have kept 8 and 9 instead of 4 and 6.
    policy = LearnedPolicy(10, Fixed(), window=2, ratio=1.0, rescore=0.4)
    assert policy.needs_attention and not LearnedPolicy(10, Fixed()).needs_attention
    assert policy.select(row).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
    # rescore 1 is TOVA beside the protected prompt (6, 4, 9, 8, 7); 0 is the learned score alone.
    tova = LearnedPolicy(10, Fixed(), window=2, ratio=1.0, rescore=1.0)
    assert tova.select(row).tolist() == [0, 1, 2, 4, 6, 7, 8, 9, 10, 11]
    alone = LearnedPolicy(10, Fixed(), window=2, ratio=1.0, rescore=0.0)
    assert alone.select(row).tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10, 11]


def test_evict_prompt_lets_prompt_tokens_compete_on_their_score():
    importance = torch.tensor([5.0, 0.01, 0.02, 0.9, 0.1, 0.8, 0.05, 0.7, 0.2, 0.3, 0.6, 0.0])
    row = RowView(torch.arange(12), prompt_length=3, importance=importance)
    # By default the prompt (0-2) stays whatever it scores: 0, 1, 2 + the 5 best others.
    assert LearnedPolicy(10, Fixed(), window=2, ratio=1.0).select(row).tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10, 11]
    # With evict_prompt the prompt competes: the best 8 of slots 0-9 are 0 (a sink-like 5.0),
    # 3, 5, 7, 9, 8, 4, 6; the dead prompt tokens 1 and 2 give up their slots.
    evicting = LearnedPolicy(10, Fixed(), window=2, ratio=1.0, evict_prompt=True)
    assert evicting.select(row).tolist() == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    # The answer stays protected: slot 9 scoring -1 would go before prompt token 2 (0.02), but
    # from position 9 on it is the answer.
    row.importance[9] = -1.0
    assert evicting.select(row).tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 10, 11]
    row.protected_from = 9
    assert evicting.select(row).tolist() == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    # A prompt longer than the budget is no longer refused: it can be evicted.
    evicting.check_prompt(40)


def test_the_default_keeps_the_prompt_even_with_a_prompt_trained_predictor(tmp_path):
    for prompt in (False, True):
        save_predictor(tmp_path / str(prompt), ImportancePredictor(8), {"base_model": "m", "prompt": prompt})
        predictor, _ = load_predictor(tmp_path / str(prompt))
        assert predictor.scores_prompt is prompt
        assert LearnedPolicy(64, predictor).evict_prompt is False  # never inherited from training
        assert LearnedPolicy(64, predictor, evict_prompt=True).evict_prompt is True  # only when asked
        assert PolicySpec("learned", 64, predictor="x").build(predictor).evict_prompt is False
    save_predictor(tmp_path / "old", ImportancePredictor(8), {"base_model": "m"})  # from before the flag
    older, _ = load_predictor(tmp_path / "old")
    assert not older.scores_prompt


def test_the_default_keeps_every_prompt_token_in_generation_with_a_prompt_trained_predictor():
    engine = tiny_engine()
    predictor = Fixed()
    predictor.scores_prompt = True  # as `memlm train predictor --prompt` marks one
    policy = Recording(24, predictor, window=4, ratio=1.0, end_of_thinking=None)
    prompt = engine.tokenizer.encode("hello there")
    out = engine.generate_tokens([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True), kv_policy=policy)[0]
    assert len(out.token_ids) == 30 and policy.seen  # it evicted
    for positions, _, prompt_length, _, keep in policy.seen:
        assert set(range(prompt_length)) <= set(positions[keep].tolist())


def test_threshold_mode_keeps_what_clears_tau_and_never_exceeds_the_budget():
    importance = torch.tensor([0, 0, 0, 0.9, 0.1, 0.8, 0.05, 0.7, 0.2, 0.3, 0.6, 0.0])
    row = RowView(torch.arange(12), prompt_length=3, importance=importance)
    # tau 0.5: of slots 3-9, the ones scoring >= 0.5 are 3, 5, 7; the prompt and the window stay.
    assert LearnedPolicy(10, Fixed(), window=2, threshold=0.5).select(row).tolist() == [0, 1, 2, 3, 5, 7, 10, 11]
    # tau 0: all 7 pass, room for 5 (budget 10 - window 2 - prompt 3): the best 5, as rank mode's ratio 1.
    assert LearnedPolicy(10, Fixed(), window=2, threshold=0.0).select(row).tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10, 11]
    # Whatever tau and whatever the scores, a row never holds more than the budget.
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, budget = 40, int(torch.randint(6, 39, (1,), generator=generator))
        row = RowView(torch.arange(n), prompt_length=int(torch.randint(0, 4, (1,), generator=generator)))
        row.importance = torch.rand(n, generator=generator)
        tau = float(torch.rand(1, generator=generator))
        for spans in (False, True):
            row.joins_previous = torch.rand(n, generator=generator) < 0.5 if spans else None
            policy = LearnedPolicy(budget, Fixed(), window=2, threshold=tau, spans=spans)
            keep = policy.select(row)
            assert keep.numel() <= budget and keep.unique().numel() == keep.numel()
            assert {n - 2, n - 1} <= set(keep.tolist())
            if not spans:  # (with spans a protected digit goes with its number, which may not fit whole)
                assert set(range(row.prompt_length)) <= set(keep.tolist())


def test_threshold_mode_in_generation_stays_under_budget():
    engine = tiny_engine()
    for tau in (-1.0, 0.0, 1.0):  # everything passes, about half, almost nothing
        policy = Recording(16, Fixed(), window=4, end_of_thinking=None, threshold=tau)
        out = engine.generate("hi", SamplingParams(max_new_tokens=40, ignore_eos=True), kv_policy=policy)
        assert out.peak_kv_tokens <= 16 + 1 and policy.seen
        assert all(keep is None or keep.numel() <= 16 for *_, keep in policy.seen)


def test_engine_evicts_prompt_tokens_with_evict_prompt():
    engine = tiny_engine()
    predictor = Fixed()
    policy = Recording(16, predictor, window=4, ratio=1.0, end_of_thinking=None, evict_prompt=True)
    prompt = engine.tokenizer.encode("hello there, friend")  # 19 tokens: longer than the budget
    out = engine.generate_tokens([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True), kv_policy=policy)[0]
    assert len(out.token_ids) == 24
    assert out.peak_kv_tokens <= len(prompt)  # the prompt is written whole, then trimmed to the budget
    assert all(len(positions[keep]) <= 16 for positions, *_, keep in policy.seen)
    by_position = torch.cat([c.flatten() for c in predictor.calls])
    positions, importance, prompt_length, _, keep = policy.seen[-1]
    assert torch.equal(importance, by_position[positions])
    kept = set(positions[keep].tolist())
    assert not set(range(prompt_length)) <= kept  # some prompt tokens went
    older = positions[: len(positions) - 4]  # what competed: everything but the window
    lost = sorted(set(older.tolist()) - kept)
    assert by_position[lost].max() <= by_position[sorted(kept & set(older.tolist()))].min()  # the lowest went


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_policy("learned", 64, predictor=Fixed(), rescore=1.5), "rescore"),
        (lambda: make_policy("learned", 64), "needs an importance predictor"),
        (lambda: make_policy("learned", 8, predictor=Fixed(), window=8), "larger than the window"),
        (lambda: make_policy("learned", 64, predictor=Fixed(), ratio=0), "ratio"),
        (lambda: make_policy("learned", 20, predictor=Fixed()).check_prompt(12), "never evicted"),
    ],
)
def test_learned_policy_errors(call, message):
    with pytest.raises(InvalidRequestError, match=message):
        call()


def test_engine_keeps_importance_aligned_with_slots_and_never_evicts_the_prompt():
    engine = tiny_engine()
    predictor = Fixed()
    policy = Recording(24, predictor, window=4, ratio=0.5, end_of_thinking=None)
    prompt = engine.tokenizer.encode("hello there, friend")  # 19 tokens
    out = engine.generate_tokens([prompt], SamplingParams(max_new_tokens=40, ignore_eos=True), kv_policy=policy)[0]
    assert out.peak_kv_tokens <= 24 + 1
    assert len(policy.seen) >= 3  # it had to evict several times
    # One score per position, in writing order (prefill, then one per step).
    by_position = torch.cat([c.flatten() for c in predictor.calls])
    for positions, importance, prompt_length, _, keep in policy.seen:
        assert torch.equal(importance, by_position[positions])  # scores moved with their slots
        assert set(range(prompt_length)) <= set(positions[keep].tolist())  # the prompt always stays
        n = len(positions)
        assert set(range(n - 4, n)) <= set(keep.tolist())  # and the window


def test_batched_learned_equals_one_by_one():
    engine = tiny_engine()
    prompts = [engine.tokenizer.encode(t) for t in ("abc", "a longer prompt here", "xy")]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)

    def policy():
        return make_policy("learned", 28, predictor=Fixed(), window=4)

    batched = engine.generate_tokens(prompts, params, kv_policy=[policy() for _ in prompts])
    for p, b in zip(prompts, batched, strict=True):
        alone = engine.generate_tokens([p], params, kv_policy=policy())[0]
        assert alone.token_ids == b.token_ids


def test_end_of_thinking_marker_protects_the_answer():
    engine = tiny_engine()
    prompt = engine.tokenizer.encode("q")
    text = "thinking thinking thinking\nAnswer: 42, done"  # the answer fits in the budget
    continuation = engine.tokenizer.encode(text)
    policy = Recording(24, Fixed(), window=4, ratio=1.0, end_of_thinking="Answer:")
    engine.score([prompt], [continuation], kv_policy=policy)
    marker_position = len(prompt) + text.index("Answer:")  # the byte tokenizer: one token per character
    after = [(positions, keep, protected) for positions, _, _, protected, keep in policy.seen if protected is not None]
    assert after and all(p == marker_position for _, _, p in after)
    positions, keep, _ = after[-1]
    answer = positions >= marker_position
    assert set(torch.nonzero(answer).flatten().tolist()) <= set(keep.tolist())


def test_score_equals_a_full_forward():
    engine = tiny_engine()
    prompt, continuation = engine.tokenizer.encode("the cat"), engine.tokenizer.encode(" sat on the mat")
    result = engine.score([prompt], [continuation])[0]
    ids = torch.tensor([prompt + continuation])
    model = engine.model
    logits = model.logits(model(model.embed(ids), torch.arange(ids.shape[1])[None]))[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)[torch.arange(len(continuation)), continuation]
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert result.greedy_hits == (logits[len(prompt) - 1 : -1].argmax(-1) == torch.tensor(continuation)).tolist()
    assert result.token_ids == continuation


def test_predictor_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    predictor = ImportancePredictor(64)
    save_predictor(tmp_path / "p", predictor, {"base_model": "tiny-base", "task": "chain_sum"})
    engine = tiny_engine()
    loaded, config = load_predictor(tmp_path / "p", engine.config, "tiny-base")
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), predictor(x))
    assert (predictor(x) >= 0).all()  # Softplus
    assert config["task"] == "chain_sum" and config["hidden_size"] == 64
    with pytest.raises(ModelFormatError, match="trained on 'tiny-base', not 'other'"):
        load_predictor(tmp_path / "p", engine.config, "other")
    save_predictor(tmp_path / "q", ImportancePredictor(32), {"base_model": "tiny-base"})
    with pytest.raises(ModelFormatError, match="hidden size 32.*hidden size is 64"):
        load_predictor(tmp_path / "q", engine.config)
    with pytest.raises(ModelFormatError, match="not an importance predictor"):
        load_predictor(tmp_path / "missing")
    (tmp_path / "p" / "predictor.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelFormatError, match="not a valid predictor config"):
        load_predictor(tmp_path / "p")


def test_labels_are_the_answers_attention_as_transformers_computes_it():
    hf = hf_tiny(attn_implementation="eager")
    model = memlm_twin(hf)
    torch.manual_seed(1)
    traces = [
        Trace(torch.randint(0, 128, (n,)).tolist(), prompt, think) for n, prompt, think in ((20, 4, 15), (13, 3, 9))
    ]
    labelled = label_traces(model, traces, batch_size=2)
    for trace, got in zip(traces, labelled, strict=True):
        with torch.no_grad():
            out = hf(torch.tensor([trace.ids]), output_attentions=True, output_hidden_states=True)
        attention = torch.stack(out.attentions)[:, 0].mean(dim=(0, 1))  # [T, T]: mean over layers and heads
        answer_rows = attention[trace.think_end :]
        expected = answer_rows[:, trace.prompt_length : trace.think_end].mean(0) * trace.think_end
        torch.testing.assert_close(got.labels, expected, atol=1e-5, rtol=1e-4)
        hidden = out.hidden_states[-1][0, trace.prompt_length : trace.think_end]
        torch.testing.assert_close(got.hidden, hidden, atol=1e-4, rtol=1e-4)


def test_prompt_labels_cover_the_prompt_with_the_same_values():
    """--prompt: the prompt's tokens get labels from the same queries, and the thinking tokens'
    labels and features are unchanged."""
    from memlm.train.predictor import label_traces_future

    model = memlm_twin(hf_tiny())
    torch.manual_seed(2)
    traces = [
        Trace(torch.randint(0, 128, (n,)).tolist(), prompt, think) for n, prompt, think in ((20, 4, 15), (13, 3, 9))
    ]
    for label in ("answer", "future_far"):
        if label == "answer":
            plain, with_prompt = label_traces(model, traces, 2), label_traces(model, traces, 2, prompt=True)
        else:
            plain = label_traces_future(model, traces, label, 0.95, 2, horizon=2)
            with_prompt = label_traces_future(model, traces, label, 0.95, 2, horizon=2, prompt=True)
        for t, p, w in zip(traces, plain, with_prompt, strict=True):
            assert len(w.labels) == t.think_end and len(p.labels) == t.think_end - t.prompt_length
            torch.testing.assert_close(w.labels[t.prompt_length :], p.labels)
            torch.testing.assert_close(w.hidden[t.prompt_length :], p.hidden)
            assert w.labels[: t.prompt_length].abs().sum() > 0  # the prompt did receive attention


def test_future_labels_on_a_hand_made_attention_matrix():
    from memlm.train.predictor import future_importance

    received = torch.tensor(  # rows: queries 0..3, columns: keys 0..3
        [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.6, 0.2, 0.0], [0.1, 0.1, 0.7, 0.1]]
    )
    # Keys 1 and 2. Query q saw q + 1 keys: key 1 got 0.6 x 3 = 1.8 from query 2 and 0.1 x 4 = 0.4
    # from query 3; key 2 got 0.7 x 4 = 2.8 from query 3. A query never counts for itself or earlier keys.
    torch.testing.assert_close(future_importance(received, 1, 3, "future_max"), torch.tensor([1.8, 2.8]))
    decayed = future_importance(received, 1, 3, "future_decay", decay=0.5)  # weights 1 (next query), 0.5, ...
    torch.testing.assert_close(decayed, torch.tensor([(1.8 + 0.5 * 0.4) / 1.5, 2.8]))
    assert future_importance(received, 3, 4, "future_max").tolist() == [0.0]  # no later query
    # future_far, horizon 1: only queries two or more tokens later count. Key 1: query 3 (0.4),
    # not query 2 (distance 1, inside the window); key 2 has no such query.
    torch.testing.assert_close(future_importance(received, 1, 3, "future_far", horizon=1), torch.tensor([0.4, 0.0]))
    far = future_importance(received, 0, 3, "future_far", horizon=0)  # horizon 0 is future_max
    torch.testing.assert_close(far, future_importance(received, 0, 3, "future_max"))
    with pytest.raises(MemlmError, match="unknown importance label"):
        future_importance(received, 1, 3, "future_mean")


def test_the_recorded_attention_gives_the_published_label_too():
    """One pass recording every query's attention reproduces label_traces' answer label, and its
    future labels are built from those same rows."""
    from memlm.train.predictor import _AttentionRecorder, _padded, label_traces_future

    model = memlm_twin(hf_tiny())
    torch.manual_seed(1)
    traces = [
        Trace(torch.randint(0, 128, (n,)).tolist(), prompt, think) for n, prompt, think in ((20, 4, 15), (13, 3, 9))
    ]
    published = label_traces(model, traces, batch_size=2)
    cache = _AttentionRecorder.for_model(model.config, 2, 20, track_attention=True)
    with torch.no_grad():
        model(*_padded(model, [t.ids for t in traces], [0, 0]), cache)
    for row, (t, got) in enumerate(zip(traces, published, strict=True)):
        received = cache.received[row, : len(t.ids), : len(t.ids)]
        torch.testing.assert_close(received.sum(-1), torch.ones(len(t.ids)))  # each query's attention sums to 1
        assert received.triu(1).abs().max() == 0  # causal
        answer = received[t.think_end :, t.prompt_length : t.think_end].mean(0) * t.think_end
        torch.testing.assert_close(answer, got.labels, atol=1e-5, rtol=1e-4)
    future = label_traces_future(model, traces, "future_max", 0.95, batch_size=2)
    assert [len(f.labels) for f in future] == [len(p.labels) for p in published]
    for f, p in zip(future, published, strict=True):
        torch.testing.assert_close(f.hidden, p.hidden, atol=1e-5, rtol=1e-4)  # the same features


def test_marker_index_finds_the_token_where_the_marker_starts():
    engine = tiny_engine()
    ids = engine.tokenizer.encode("1 + 2 = 3\nAnswer: 3")
    assert marker_index(engine.tokenizer, ids, "Answer:") == len("1 + 2 = 3\n")
    assert marker_index(engine.tokenizer, ids, "Result:") is None


def test_rank_correlations():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert kendall(a, a**3) == pytest.approx(1.0)
    assert kendall(a, a.flip(0)) == pytest.approx(-1.0)
    # One swapped pair among 10: tau = (9 - 1) / 10; rho = 1 - 6 * 2 / (5 * 24).
    b = torch.tensor([1.0, 2.0, 4.0, 3.0, 5.0])
    assert kendall(a, b) == pytest.approx(0.8)
    assert spearman(a, b) == pytest.approx(0.9)
    # Ties share their mean rank (tau-b): x = [1, 1, 2], y = [1, 2, 3].
    assert kendall(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 6**0.5)


def test_fit_predictor_learns_labels_and_saves_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(2)

    def trace(n=30):  # importance a hidden function of the features, as attention is of the states
        hidden = torch.randn(n, 64)
        return Labelled(hidden, torch.nn.functional.softplus(2 * hidden[:, 0] - hidden[:, 1]))

    cfg = PredictorConfig.of("tiny", "chain_sum", str(tmp_path / "pred"), steps=300, batch_tokens=128, progress=False)
    metrics = fit_predictor(64, [trace() for _ in range(20)], [trace() for _ in range(4)], cfg)
    assert metrics["val_mse"] < 0.2 * metrics["val_mse_constant"]
    assert metrics["spearman"] > 0.8 and metrics["kendall"] > 0.6
    assert abs(metrics["spearman_recency"]) < 0.5  # the order of tokens says nothing here
    predictor, config = load_predictor(tmp_path / "pred", tiny_engine().config, "tiny")
    assert config["metrics"] == metrics and config["train_traces"] == 20


def test_spans_keep_numbers_whole_on_a_hand_made_row():
    from memlm.cache.policies import best_whole_spans, span_ids

    # Slots 3-5 are one number (joins at 4 and 5), 7-8 another, 10-11 a third that runs into the window.
    joins = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert span_ids(joins).tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7, 7]
    importance = torch.tensor([0, 0, 0, 0.9, 0.1, 0.1, 0.8, 0.05, 0.7, 0.2, 0.0, 0.3])
    row = RowView(torch.arange(12), prompt_length=3, importance=importance, joins_previous=joins)
    # Token by token (window 1, room for 7 older): the prompt, then 3, 6, 8, 9: half of each number.
    assert LearnedPolicy(8, Fixed(), window=1, ratio=1.0).select(row).tolist() == [0, 1, 2, 3, 6, 8, 9, 11]
    # Whole numbers (room for 8 older): slot 10 joins the kept window slot 11, so it stays whatever it
    # scores; then 3-5 as one span scoring 0.9 and 6 (0.8). 7-8 (0.7) goes whole.
    spans = LearnedPolicy(9, Fixed(), window=1, ratio=1.0, spans=True)
    assert spans.select(row).tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11]
    # A span that does not fit whole is left out, freeing more than asked: after 3-5 and 6, the 5th
    # slot would split 7-8 (0.7), so only 4 come back.
    assert best_whole_spans(importance[:10], span_ids(joins)[:10], 5).tolist() == [3, 4, 5, 6]
    # tova takes the same rule from its last-query attention (room for 5, the prompt unprotected).
    row.attention_last = importance
    assert make_policy("tova", 6, spans=True).select(row).tolist() == [3, 4, 5, 6, 10, 11]
    with pytest.raises(InvalidRequestError, match="larger than the window"):
        make_policy("h2o", 4, window=4, spans=True)


@pytest.mark.parametrize("spans", [True, "lines", False])
def test_engine_marks_spans_and_the_policy_keeps_them_whole(spans):
    engine = tiny_engine()
    prompt = engine.tokenizer.encode("q")
    text = "3140 * 7:\n0*7=0 c0\n4*7=28 c2\n1*7=7+2=9 c0\n-> 21980\nshifted 219800 + 62800 = 282600\n" * 3
    continuation = engine.tokenizer.encode(text)
    # room for two lines besides the window: a line longer than the room cannot be kept whole
    policy = Recording(64, Fixed(), window=4, ratio=0.7, end_of_thinking=None, spans=spans)
    engine.score([prompt], [continuation], kv_policy=policy)
    assert len(policy.seen) >= 5
    tokens = prompt + continuation
    # the byte tokenizer: one byte per token
    digit = [chr(t).isdigit() if t < 128 else False for t in tokens]
    newline = [t == ord("\n") for t in tokens]

    def continues(p: int, before: int) -> bool:  # the unit's rule, from the text alone
        if p != before + 1:
            return False
        return not newline[before] if spans == "lines" else digit[p] and digit[before]

    split = {"numbers": False, "lines": False}
    for (positions, _, _, _, keep), joins in zip(policy.seen, policy.joins, strict=True):
        positions = positions.tolist()
        kept = torch.zeros(len(positions), dtype=torch.bool)
        kept[keep] = True
        for unit in split:  # was any number / line kept in part?
            run = [i > 0 and p == positions[i - 1] + 1 and (
                not newline[positions[i - 1]] if unit == "lines" else digit[p] and digit[positions[i - 1]]
            ) for i, p in enumerate(positions)]
            starts = (~torch.tensor(run)).long().cumsum(0)
            for r in starts.unique():
                members = kept[starts == r]
                split[unit] |= bool(members.any() and not members.all())
        if spans:
            expected = [i > 0 and continues(p, positions[i - 1]) for i, p in enumerate(positions)]
            assert joins.tolist() == expected  # the engine's marks follow the unit's rule
        else:
            assert joins is None
    # each unit kept whole under its own spans, and lines whole keep their numbers whole; without
    # spans some number (and some line) lost part of its tokens
    assert split["lines"] == (spans != "lines")
    assert split["numbers"] == (not spans)
