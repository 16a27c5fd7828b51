"""`memlm train trigger`: teach the MemGen trigger when to insert, by RL, with the weaver frozen.

Each step draws problems from the training split and generates a group of G answers per problem
(sampled tokens, and insertion decisions sampled from the trigger's P(insert) at every delimiter).
The reward is the task's score minus an insertion penalty that adapts to the group: insertions
beyond the mean count of the group's correct answers cost `penalty / max_inference_aug` each, so
the trigger is pushed toward the sparsest insertion pattern that still solves the problem (the
paper's reward-adaptive penalty). The advantage is the reward minus the group mean (GRPO without
the std normalisation, i.e. REINFORCE with a group baseline), and the loss is
-advantage * sum(log pi(decision)) over the answer's decisions. The reasoner's hidden states at
the delimiters do not depend on the trigger, so the recorded states give exact log-probabilities.

RL only has signal in a *mixed* group, one that holds right and wrong answers: where all score the
same, every advantage is 0. Each logged step reports `mixed`, the share of its groups that were, so
a run shows whether its reasoner, temperature and group size give the trigger anything to learn.
A reasoner that half-solves a task on average does not half-solve each problem: some are always
right, others always wrong. `screen` > 0 first generates one group for each of that many training
problems (with the starting trigger, as RL would) and draws RL's problems only from the mixed ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memlm.data.tasks import get_task
from memlm.errors import MemlmError
from memlm.generation.engine import Engine
from memlm.latent.memory import LatentMemory
from memlm.latent.trigger import TRAINED, make_trigger
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
class TriggerConfig:
    model: str
    memory: str  # a trained weaver (`memlm train weaver`)
    task: str
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    problems_per_step: int = 4
    group_size: int = 4
    temperature: float = 0.7
    penalty: float = 0.5
    initial_p: float = 0.9  # start close to `always`, then learn to skip
    kind: str = "learned"  # or "sequence": the head reads the weaver's probe of the sequence (latent/trigger.py)
    n_train: int = 4000
    n_eval: int = 64
    max_new_tokens: int = 256
    screen: int = 0  # training problems screened for mixed groups before RL (0: draw from all)

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        """This trainer's loop: 60 steps at lr 3e-3, no warmup, a checkpoint every 10, a log row every
        min(5, steps), unless given."""
        steps = given.get("steps", 60)
        defaults = {"steps": 60, "lr": 3e-3, "save_every": 10, "log_every": min(5, steps)}
        return TrainConfig(out_dir=out_dir, **(defaults | given))

    @classmethod
    def of(cls, model: str, memory: str, task: str, out_dir: str, **options) -> TriggerConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(model, memory, task, cls.loop(out_dir, **loop), **own)


def group_rewards(scores: list[float], insertions: list[int], penalty: float, max_aug: int) -> list[float]:
    """Task score minus the penalty on insertions above the group's correct answers' mean count."""
    good = [n for s, n in zip(scores, insertions, strict=True) if s >= 0.5]
    if not good:
        return list(scores)
    allowed = sum(good) / len(good)
    return [s - penalty * max(0.0, n - allowed) / max(1, max_aug) for s, n in zip(scores, insertions, strict=True)]


def trigger_loss(trigger, rollouts: list[dict]) -> tuple[torch.Tensor, dict]:
    """REINFORCE with the group baseline: -advantage x log pi(decisions), mean over rollouts.

    Log-probabilities come from the logits in float32 (logsigmoid), outside autocast: in bf16 a
    confident trigger's P rounds to exactly 1, log(1 - P) is -inf, and a group whose advantage is
    0 then multiplies 0 by -inf, which turned every weight into NaN (a NaN trigger never inserts,
    which looked like learning to skip)."""
    total = None
    for r in rollouts:
        if r["states"].shape[0] == 0 or r["advantage"] == 0:
            continue  # no decision, or no signal (every answer of its group scored the same)
        with torch.autocast(r["states"].device.type, enabled=False):
            logits = trigger.logits(r["states"].float())
        logp = torch.where(r["decisions"] > 0, F.logsigmoid(logits), F.logsigmoid(-logits)).sum()
        total = -r["advantage"] * logp if total is None else total - r["advantage"] * logp
    if total is None:  # nothing to learn from in the batch: a zero loss that still has a graph
        total = sum(p.sum() for p in trigger.parameters()) * 0.0
    n = len(rollouts)
    stats = {key: sum(r[key] for r in rollouts) / n for key in ("reward", "score", "insertions", "mixed")}
    return total / n, stats


class ExploringTrigger:
    """The trigger as RL samples it: each decision drawn from P(insert) with its own generator, and
    remembered per request (by its index in the batch) with the hidden state it was made on. The
    trainer puts it in the memory's place while it samples; generation knows nothing of it."""

    def __init__(self, trigger, generator: torch.Generator):
        self.trigger, self.generator = trigger, generator
        self.decisions: dict[int, list[tuple[torch.Tensor, bool]]] = {}
        # a `sequence` trigger decides on its probe of the reasoner's cache: the hook computes it
        self.features = getattr(trigger, "features", None)

    def decide(self, hidden: torch.Tensor, requests: list) -> torch.Tensor:
        p = self.trigger.probability(hidden).float()
        fire = torch.rand(p.shape, generator=self.generator).to(p.device) < p  # a CPU generator
        for r, state, yes in zip(requests, hidden, fire.tolist(), strict=True):
            self.decisions.setdefault(r.index, []).append((state.detach().float().cpu(), yes))
        return fire


def sample_groups(engine, memory, task, problems, group_size: int, temperature: float, max_new_tokens: int, rng):
    """One group of sampled answers per problem, insertion decisions sampled from the trigger.
    -> (completions, problem by problem, group by group; each one's decisions: (hidden, inserted?))."""
    trigger = memory.trigger
    explorer = memory.trigger = ExploringTrigger(trigger, torch.Generator().manual_seed(rng.randrange(2**31)))
    try:
        completions = sample_answers(engine, memory, task, problems, group_size, temperature, max_new_tokens, rng)
    finally:
        memory.trigger = trigger
    return completions, [explorer.decisions.get(i, []) for i in range(len(completions))]


def screen_problems(engine, memory, task, problems, cfg: TriggerConfig) -> tuple[list[int], dict]:
    """Indices of the problems whose group (sampled as RL samples it) is mixed, and a summary."""
    rng = random.Random(cfg.train.seed * 7_919 + 1)
    completions, _ = sample_groups(
        engine, memory, task, problems, cfg.group_size, cfg.temperature, cfg.max_new_tokens, rng
    )
    return mixed_problems(task, problems, completions, cfg.group_size)


def run_trigger_training(cfg: TriggerConfig) -> dict:
    if cfg.kind not in TRAINED:  # before any model is loaded
        raise MemlmError(f"--kind is one of {', '.join(TRAINED)}, not {cfg.kind!r}")
    task = get_task(cfg.task)
    engine = Engine.load(cfg.model)
    memory = LatentMemory.load(cfg.memory, engine)
    memory.weaver.requires_grad_(False)
    for p in memory.weaver.lora_parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.train.seed)
    trigger = make_trigger(cfg.kind, engine.config.hidden_size)
    trigger.set_initial(cfg.initial_p)
    memory.trigger = trigger
    memory.config["trigger"] = cfg.kind
    problems = task.problems(cfg.screen or cfg.n_train, "train")
    trigger.eval()  # screening samples with the starting trigger, as RL would
    screen = (lambda some: screen_problems(engine, memory, task, some, cfg)) if cfg.screen else None
    problems, screening = screened(problems, screen, cfg.problems_per_step, cfg.train.out_dir, cfg.train.resume)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        rng = random.Random(cfg.train.seed * 1_000_003 + step)
        chosen = rng.sample(range(len(problems)), cfg.problems_per_step)[rank::world]
        trigger.eval()
        completions, decisions_of = sample_groups(
            engine,
            memory,
            task,
            [problems[i] for i in chosen],
            cfg.group_size,
            cfg.temperature,
            cfg.max_new_tokens,
            rng,
        )
        trigger.train()
        rollouts = []
        for g, index in enumerate(chosen):
            group = range(g * cfg.group_size, (g + 1) * cfg.group_size)
            scores = [task.score(completions[i].text, problems[index]) for i in group]
            counts = [len(completions[i].insertions) - 1 for i in group]  # the prompt insertion is not the trigger's
            rewards = group_rewards(scores, counts, cfg.penalty, memory.max_inference_aug)
            baseline = sum(rewards) / len(rewards)
            mixed = float(is_mixed(scores))
            for i, reward, score, count in zip(group, rewards, scores, counts, strict=True):
                decisions = decisions_of[i]
                states = [h.clone() for h, _ in decisions]  # leave inference mode: these feed autograd
                rollouts.append(
                    {
                        "states": torch.stack(states) if states else torch.zeros(0, engine.config.hidden_size),
                        "decisions": torch.tensor([float(d) for _, d in decisions]),
                        "advantage": reward - baseline,
                        "reward": reward,
                        "score": score,
                        "insertions": float(count),
                        "mixed": mixed,  # groups are equal in size: the mean over rollouts is the share of groups
                    }
                )
        return rollouts

    last = train(trigger, trigger_loss, batch_fn, loop_config(cfg.train))
    memory.config.update({"trigger_steps": cfg.train.steps, "trigger_penalty": cfg.penalty})
    return save_rl_result(memory, cfg, {"final_loss": last.get("loss")}, screening)
