"""`memlm train weaver --objective grpo`: the MemGen weaver trained on whole answers by GRPO.

SFT (train/weaver.py) lowers the frozen reasoner's loss on worked solutions, token by token; the
last run showed why that is not enough: the loss on the digits each line computes fell 3.7x and
whole solutions right did not move, because token loss cannot see which errors decide an answer.
GRPO optimises the answer itself. Each step:

1. draws `problems_per_step` training problems (from the screened ones: see `screen`) and samples
   a group of `group_size` answers per problem with the engine, the memory woven in as at
   inference (its own trigger decides where; the reasoner frozen, temperature `temperature`);
2. scores each answer with the task's scorer (+ `format_reward` when it has an answer line) and
   standardises the rewards within each group (train/grpo.py): these are the advantages;
3. recomputes every sampled token's log-probability with the training twin of generation
   (latent/training.py: the same insertions, at the same places, differentiable in the weaver) and
   takes one step on GRPO's clipped surrogate, with `beta` x KL to the reference weaver (the
   starting one: the SFT weaver given by `start_from`, or the untrained start).

One update per sampled batch (on-policy): the ratio pi / pi_old is exactly 1, so clipping never
acts and the surrogate's gradient is REINFORCE's with the group-normalised baseline. Answers whose
group scored all alike (advantage 0) are left out of the twin's forward: their only term would be
the KL, and on 2 cores the forward is the step's cost (the KL is measured on the rest).

The twin's log-probabilities are of the tokens the engine *sampled*, at the sampling temperature
(logits / T), so the policy trained is the one that generated them. The engine decodes in the
model's dtype and the twin runs under the loop's autocast: their log-probabilities differ by
rounding, which on-policy GRPO with one update ignores (the ratio is taken from the twin alone).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from memlm.data.tasks import extract_answer, get_task
from memlm.generation.engine import Engine
from memlm.latent.memory import LatentMemory
from memlm.latent.spec import WeaverSpec
from memlm.latent.training import LatentExample, LatentLM
from memlm.train.grpo import group_advantages, grpo_loss
from memlm.train.loop import TrainConfig, split_loop, train
from memlm.train.rollouts import (
    is_mixed,
    loop_config,
    mixed_problems,
    sample_answers,
    save_rl_result,
    screened,
)


@dataclass(slots=True)
class WeaverGRPOConfig:
    model: str
    task: str
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    spec: WeaverSpec = field(default_factory=WeaverSpec)  # the memory's shape when starting from scratch
    start_from: str | None = None  # an SFT weaver (memory folder) to start from; it is also the KL reference
    start_trigger: str | None = None  # override start_from's saved trigger (always / never / learned)
    problems_per_step: int = 4
    group_size: int = 8
    temperature: float = 0.7
    clip: float = 0.2
    beta: float = 0.04  # weight of the KL to the reference weaver (0: none, and no reference pass)
    format_reward: float = 0.0  # added to the task's score when the answer has an answer line
    screen: int = 0  # training problems screened for mixed groups before RL (0: draw from all)
    n_train: int = 4000
    n_eval: int = 64
    max_new_tokens: int | None = None  # None: the task's own budget

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        """This trainer's loop: 40 steps at lr 1e-4, no warmup, a checkpoint every 10, a log row every
        step, unless given (each step samples problems_per_step x group_size answers: the cost)."""
        defaults = {"steps": 40, "lr": 1e-4, "save_every": 10, "log_every": 1}
        return TrainConfig(out_dir=out_dir, **(defaults | given))

    @classmethod
    def of(cls, model: str, task: str, out_dir: str, spec: WeaverSpec | None = None, **options) -> WeaverGRPOConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(model, task, cls.loop(out_dir, **loop), spec or WeaverSpec(), **own)


@dataclass(slots=True)
class Rollout:
    """One sampled answer, as the twin replays it."""

    example: LatentExample  # prompt, sampled tokens, where latents went in
    advantage: float
    reward: float
    score: float
    mixed: float  # 1.0 when its group held right and wrong answers


class WeaverPolicy(LatentLM):
    """The weaver as a policy: log pi of given tokens with latents woven in (the twin of generation)."""

    def forward(self, examples: list[LatentExample], temperature: float = 1.0) -> torch.Tensor:
        """-> [sum of len(target)] log-probabilities of each example's target tokens, in order."""
        hidden, targets = self.scored_states(examples)
        logits = self.memory.weaver.reasoner.logits(hidden).float() / temperature
        return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def replayed(completion) -> LatentExample:
    """The twin's example for a sampled answer: its prompt, its tokens, and the places latents went
    in during sampling (the trigger's decisions; `insertions` counts output tokens, 0 = the prompt),
    so the twin weaves exactly where generation did."""
    prompt, tokens = list(completion.prompt_token_ids), list(completion.token_ids)
    return LatentExample(prompt, tokens, list(completion.insertions or []))


class ReferenceWeaver:
    """The KL reference: a frozen copy of the starting weaver's tensors, swapped into the memory for
    a no-grad pass (the weaver shares the reasoner's LoRA layers, so a second memory on the same
    model would share its adapters: the tensors are swapped instead)."""

    def __init__(self, memory: LatentMemory):
        self.memory = memory
        self.tensors = {k: v.clone() for k, v in memory.state_dict().items()}

    @torch.no_grad()
    def logprobs(self, policy: WeaverPolicy, examples: list[LatentExample], temperature: float) -> torch.Tensor:
        current = {k: v.clone() for k, v in self.memory.state_dict().items()}
        self.memory.load_state_dict(self.tensors, "the reference weaver")
        try:
            return policy(examples, temperature).detach()
        finally:
            self.memory.load_state_dict(current, "the trained weaver")


def screen_problems(engine, memory, task, problems, cfg: WeaverGRPOConfig) -> tuple[list[int], dict]:
    """Indices of the problems whose group (sampled as RL samples it) is mixed, and a summary."""
    rng = random.Random(cfg.train.seed * 7_919 + 1)
    limit = cfg.max_new_tokens or task.max_new_tokens
    completions = sample_answers(engine, memory, task, problems, cfg.group_size, cfg.temperature, limit, rng)
    return mixed_problems(task, problems, completions, cfg.group_size)


def run_weaver_grpo(cfg: WeaverGRPOConfig) -> dict:
    task = get_task(cfg.task)
    engine = Engine.load(cfg.model)
    if cfg.start_from:
        memory = LatentMemory.load(cfg.start_from, engine, trigger=cfg.start_trigger)
    else:
        memory = LatentMemory.create(engine, cfg.spec)
    policy = WeaverPolicy(memory)
    reference = ReferenceWeaver(memory) if cfg.beta > 0 else None
    limit = cfg.max_new_tokens or task.max_new_tokens
    problems = task.problems(cfg.screen or cfg.n_train, "train")
    screen = (lambda some: screen_problems(engine, memory, task, some, cfg)) if cfg.screen else None
    problems, screening = screened(problems, screen, cfg.problems_per_step, cfg.train.out_dir, cfg.train.resume)

    def batch_fn(step: int, micro: int, rank: int, world: int) -> list[Rollout]:
        rng = random.Random(cfg.train.seed * 1_000_003 + step * 101 + micro)
        chosen = rng.sample(range(len(problems)), cfg.problems_per_step)[rank::world]
        policy.eval()
        completions = sample_answers(
            engine, memory, task, [problems[i] for i in chosen], cfg.group_size, cfg.temperature, limit, rng
        )
        policy.train()
        rollouts = []
        for g, index in enumerate(chosen):
            group = completions[g * cfg.group_size : (g + 1) * cfg.group_size]
            scores = [task.score(c.text, problems[index]) for c in group]
            rewards = [
                s + (cfg.format_reward if extract_answer(c.text) is not None else 0.0)
                for s, c in zip(scores, group, strict=True)
            ]
            mixed = float(is_mixed(scores))
            for c, advantage, reward, score in zip(group, group_advantages(rewards), rewards, scores, strict=True):
                rollouts.append(Rollout(replayed(c), advantage, reward, score, mixed))
        return rollouts

    def loss_fn(model, rollouts: list[Rollout]):
        stats = {key: sum(getattr(r, key) for r in rollouts) / len(rollouts) for key in ("reward", "score", "mixed")}
        learning = [r for r in rollouts if r.advantage != 0.0 and r.example.target]
        if not learning:  # every group scored alike: nothing to learn, a zero loss that keeps a graph
            zero = sum(p.sum() for p in policy.parameters() if p.requires_grad) * 0.0
            return zero, {**stats, "surrogate": 0.0, "kl": 0.0, "clipped": 0.0}
        examples = [r.example for r in learning]
        # The reference first: its pass swaps tensors into the weaver in place, which must not
        # happen between the policy's forward and its backward.
        ref = reference.logprobs(policy, examples, cfg.temperature) if reference is not None else None
        logp = model(examples, cfg.temperature)
        advantages = torch.tensor([r.advantage for r in learning], device=logp.device)
        lengths = [len(e.target) for e in examples]
        loss, parts = grpo_loss(logp, logp.detach(), ref, advantages, lengths, cfg.clip, cfg.beta)
        return loss, {**stats, **parts}

    last = train(policy, loss_fn, batch_fn, loop_config(cfg.train))
    memory.config.update(
        {"task": cfg.task, "objective": "grpo", "grpo_steps": cfg.train.steps, "grpo_start_from": cfg.start_from}
    )
    return save_rl_result(memory, cfg, {"final_loss": last.get("loss"), "final_score": last.get("score")}, screening)
