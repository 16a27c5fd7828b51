"""GRPO for the MemGen weaver: the loss on hand-made groups (advantages, clipping, KL), the twin's
log-probabilities of sampled answers against the engine's, and a short end-to-end run."""

import json
import math

import pytest
import torch
from test_latent import _memory

from conftest import byte_tokenizer, tiny_engine, tiny_memlm
from memlm.generation.params import SamplingParams
from memlm.latent.memory import LatentMemory
from memlm.train.grpo import group_advantages, grpo_loss


def test_group_advantages_standardise_within_the_group():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    one_right = group_advantages([1.0, 0.0, 0.0, 0.0])  # mean 0.25, population std sqrt(3) / 4
    std = 3**0.5 / 4
    assert one_right == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], abs=1e-4)
    assert sum(one_right) == pytest.approx(0.0, abs=1e-9)
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]  # all alike: no signal
    assert group_advantages([0.0, 0.0]) == [0.0, 0.0]


def test_on_policy_loss_is_reinforce_with_the_group_advantage_per_answer_mean():
    # Two answers: 2 tokens with advantage +1, 3 tokens with advantage -2; ratio 1 (old = new).
    logp = torch.tensor([-0.5, -1.0, -0.2, -0.3, -2.0], requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -2.0]), [2, 3])
    # -(mean over answers of (mean over its tokens of ratio * A)) = -((1 + -2) / 2)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d loss / d logp_t = -A_i / (len_i * answers)
    expected = torch.tensor([-1 / 4, -1 / 4, 2 / 6, 2 / 6, 2 / 6])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["kl"] == 0.0 and stats["clipped"] == 0.0


def test_clipping_stops_the_gradient_where_the_ratio_left_the_trust_region_in_the_advantage_direction():
    # One answer per case, one token each: ratios 1.5 and 0.5, advantages +1 and -1.
    old = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5])
    logp = torch.log(ratios).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = grpo_loss(logp, old, None, advantages, [1, 1, 1, 1], clip=0.2)
    loss.backward()
    # A > 0: above 1 + eps the clipped term (1.2 A) is the minimum -> no gradient; below, ratio * A is.
    # A < 0: below 1 - eps the clipped term (0.8 * -1) is the minimum -> no gradient; above, ratio * A is.
    surrogate = torch.tensor([1.2, 0.5, -1.5, -0.8])
    assert loss.item() == pytest.approx(float(-surrogate.mean()))
    grad = logp.grad
    assert grad[0] == 0 and grad[3] == 0
    assert grad[1] == pytest.approx(-0.5 / 4) and grad[2] == pytest.approx(1.5 / 4)  # -A * ratio / answers
    assert stats["clipped"] == pytest.approx(0.5)


def test_kl_term_is_the_non_negative_estimator_against_the_reference():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0])
    loss, stats = grpo_loss(logp, logp.detach(), ref, torch.tensor([0.0]), [2], beta=0.1)
    r = -0.5  # log pi_ref - log pi on the first token; 0 on the second
    kl_first = math.exp(r) - r - 1
    assert stats["kl"] == pytest.approx(kl_first / 2)
    assert loss.item() == pytest.approx(0.1 * kl_first / 2)  # no advantage: only the KL remains
    loss.backward()
    # d/dlogp of beta * mean(exp(ref - logp) - (ref - logp) - 1) = beta / 2 * (1 - exp(ref - logp))
    assert logp.grad[0] == pytest.approx(0.1 / 2 * (1 - math.exp(r)))
    assert logp.grad[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lengths sum to 3"):
        grpo_loss(logp, logp.detach(), None, torch.tensor([1.0]), [3])


@pytest.mark.parametrize("output", ["embeddings", "kv"])
def test_the_twin_replays_a_sampled_answer_with_the_engines_log_probabilities(output):
    """The log-probabilities GRPO trains on are those of the tokens the engine sampled, with latents
    where the (learned, sometimes skipping) trigger put them during sampling."""
    from memlm.train.weaver_grpo import WeaverPolicy, replayed

    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=3, weaver_input="states", weaver_output=output, trigger="learned")
    with torch.no_grad():
        memory.trigger.head[-1].bias.fill_(0.0)  # P(insert) near 1/2: some delimiters skipped
    letters = tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")  # a random model samples some
    memory.delimiters = type(memory.delimiters).for_tokenizer(engine.tokenizer, letters)
    prompts = [engine.tokenizer.encode("abc, a b"), engine.tokenizer.encode("a b c")]
    params = [SamplingParams(temperature=1.0, max_new_tokens=24, seed=s, logprobs=0, ignore_eos=True) for s in (1, 2)]
    completions = engine.generate_tokens(prompts, params, memory=memory)
    assert any(len(c.insertions) >= 2 for c in completions)
    policy = WeaverPolicy(memory)
    with torch.no_grad():
        logp = policy([replayed(c) for c in completions], temperature=1.0)
    expected = torch.tensor([lp for c in completions for lp in c.logprobs])
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=1e-4)


def _tiny_model(tmp_path):
    from memlm.formats.loading import save_model

    return save_model(tmp_path / "tiny", tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer())


def test_grpo_run_updates_the_weaver_and_measures_kl_to_its_start(tmp_path, monkeypatch):
    from itertools import count

    from memlm.data.tasks import Task
    from memlm.generation.engine import Engine
    from memlm.latent.spec import WeaverSpec
    from memlm.train.weaver_grpo import WeaverGRPOConfig, run_weaver_grpo

    folder = _tiny_model(tmp_path)
    spec = WeaverSpec(prompt_latents=2, inference_latents=2, lora_rank=4, max_inference_aug=2, delimiters=("=",))
    start = LatentMemory.create(Engine.load(str(folder)), spec)
    start.save(tmp_path / "start", dtype=None)
    before = {k: v.to(torch.bfloat16).float() for k, v in start.state_dict().items()}  # saved in bf16
    calls = count()
    monkeypatch.setattr(Task, "score", lambda self, text, problem: float(next(calls) % 2))  # every group mixed

    cfg = WeaverGRPOConfig.of(
        str(folder),
        "chain_sum_short",
        str(tmp_path / "g"),
        start_from=str(tmp_path / "start"),
        problems_per_step=2,
        group_size=2,
        temperature=1.0,
        beta=0.5,
        n_train=8,
        n_eval=0,
        max_new_tokens=10,
        steps=2,
        lr=1e-2,
        progress=False,
    )
    report = run_weaver_grpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "g" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["mixed"] == 1.0 and r["score"] == 0.5 for r in rows)
    assert rows[0]["kl"] == 0.0  # the first step's policy is its reference
    assert rows[1]["kl"] > 0.0  # after one update it has moved away
    after = LatentMemory.load(report["memory"], Engine.load(str(folder)))
    assert after.config["objective"] == "grpo" and after.config["grpo_start_from"] == str(tmp_path / "start")
    moved = [k for k, v in after.state_dict().items() if not torch.equal(v.float(), before[k])]
    assert moved  # the weaver trained
