"""Sampler properties: filters keep exactly what they should, seeds repeat, penalties match HF."""

import pytest
import torch

from memlm.errors import InvalidRequestError
from memlm.generation.params import SamplingParams
from memlm.generation.sampling import BatchSampler, TokenHistory


def _sampler(*params: SamplingParams, seeds=None):
    gens = []
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(seeds[i] if seeds else i)
        gens.append(None if p.greedy else g)
    return BatchSampler(list(params), gens)


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(_sampler(*[SamplingParams()] * 4)(logits), logits.argmax(-1))


def test_top_k_never_leaves_the_k_best():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    best = set(logits[0].topk(5).indices.tolist())
    sampler = _sampler(SamplingParams(temperature=5.0, top_k=5))  # high temperature: flat inside the k
    drawn = {int(sampler(logits)[0]) for _ in range(300)}
    assert drawn <= best and len(drawn) == 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    sampler = _sampler(SamplingParams(temperature=1.0, top_p=0.8))
    kept, order = sampler.filtered_probs(probs.log())
    support = order[0][kept[0] > 0].tolist()
    assert support == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    torch.testing.assert_close(kept[0, :3], torch.tensor([0.5, 0.2, 0.15]) / 0.85)


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    kept, order = _sampler(SamplingParams(temperature=1.0, min_p=0.2)).filtered_probs(probs.log())
    assert order[0][kept[0] > 0].tolist() == [0, 1, 2]  # 0.08 < 0.2 * 0.5


def _token_probs(sampler, logits):
    """filtered_probs as a distribution over the vocabulary [n, V], whatever order it came in."""
    kept, order = sampler.filtered_probs(logits)
    return torch.zeros_like(logits).scatter_(1, order, kept)


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.8, top_p=0.95)],  # peaked rows: decided inside the candidates
        [SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=0.7, top_k=40, top_p=0.9)],
        [SamplingParams(temperature=1.0, top_k=3000)],  # top-k past the candidates: sorted
        [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0)],  # an unfiltered row
        [SamplingParams(temperature=50.0, top_p=0.99)],  # nearly flat: the kept prefix runs past them
    ],
)
def test_filters_over_the_best_candidates_equal_the_whole_sorted_vocabulary(params, monkeypatch):
    import memlm.generation.sampling as sampling

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(params), 5000, generator=gen) * 4
    logits[:, :7] = logits[:, :7].max() + torch.arange(7.0)  # a few clear favourites
    fast = _token_probs(_sampler(*params), logits)
    monkeypatch.setattr(sampling, "CANDIDATES", 10**6)  # every row through the full sort
    slow = _token_probs(_sampler(*params), logits)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    assert torch.equal(fast > 0, slow > 0)
    assert ((fast > 0).sum(-1) < 5000).all()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    sampler = _sampler(SamplingParams(temperature=1.0))
    counts = torch.bincount(torch.stack([sampler(probs.log()) for _ in range(3000)]).flatten(), minlength=3)
    torch.testing.assert_close(counts.float() / 3000, probs[0], atol=0.04, rtol=0)


def test_filtered_sampling_follows_the_kept_mass_and_never_picks_a_dropped_token():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    sampler = _sampler(SamplingParams(temperature=1.0, top_k=2))
    counts = torch.bincount(torch.stack([sampler(probs.log()) for _ in range(3000)]).flatten(), minlength=4)
    assert counts[2:].tolist() == [0, 0]
    torch.testing.assert_close(counts[:2].float() / 3000, torch.tensor([0.625, 0.375]), atol=0.04, rtol=0)


def test_a_uniform_draw_at_the_top_of_its_range_stays_on_a_kept_token(monkeypatch):
    """Inverse transform sampling: a draw of u * total == total would pass the last kept token's
    cumulative sum into the zero-probability tail; the draw is held just below it."""
    import memlm.generation.sampling as sampling

    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.tensor([1.0]))
    sampler = _sampler(SamplingParams(temperature=1.0))
    probs = torch.tensor([[0.1, 0.2, 0.3000001, 0.0, 0.0]])
    assert sampler.draw(probs).tolist() == [2]


def test_seeded_rows_repeat_and_do_not_depend_on_batch_neighbours():
    logits = torch.randn(1, 200).expand(3, 200)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [int(_sampler(p, seeds=[7])(logits[:1])[0]) for _ in range(1)]
    batch = _sampler(SamplingParams(), p, SamplingParams(temperature=1.3), seeds=[0, 7, 9])(logits)
    assert batch[1].item() == alone[0]
    runs = [[int(_sampler(p, seeds=[7])(logits[:1])[0])] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    history = torch.tensor([[1, 5, 5, 7], [2, 3, 29, 0]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, history, True)
    sampler = _sampler(SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=1.3))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    tracked = TokenHistory(30)
    tracked.extend([[1, 5, 5, 7], [2, 3, 29, 0]])
    assert torch.equal(sampler(logits, tracked), expected.argmax(-1))
    from memlm.generation.sampling import apply_repetition_penalty

    torch.testing.assert_close(apply_repetition_penalty(logits, seen, torch.tensor([[1.3], [1.3]])), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
        dict(stop=[""]),
    ],
)
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)
