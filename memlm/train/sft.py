"""Supervised fine-tuning on a reasoning task's worked solutions (LoRA or full), through the shared loop.

Each example is the task's chat prompt followed by its worked solution and the end-of-turn token;
the loss is next-token cross-entropy on the solution tokens only, the answer line's tokens (from
the answer marker on) weighted `answer_weight` times the reasoning's if asked: where the reasoning
is long and the answer copies one line of it, plain SFT spends almost all its signal on the
reasoning. The result is saved where
`memlm.load(path)` and every `--model` option take it: a LoRA adapter folder (a few MB, naming its
base model) or, for a full fine-tune, a whole model folder. Held-out accuracy (problems drawn with
the test seed, never trained on) is measured on what was saved, and written to eval.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memlm.adapters.lora import DEFAULT_TARGETS, add_lora, merge_lora, save_adapter
from memlm.atomic import write_json_atomic
from memlm.data.evaluate import evaluate_saved
from memlm.data.tasks import get_task, split_reasoning
from memlm.errors import MemlmError
from memlm.formats.loading import load_model, save_model
from memlm.models.llama import LlamaModel
from memlm.train.loop import TrainConfig, global_batch, is_main_process, split_loop, train

IGNORE = -100


@dataclass(slots=True)
class SFTConfig:
    model: str
    task: str  # a task, or a mix "long_mult:3,chain_sum:1" (training shares by weight)
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    batch_size: int = 8
    lora_rank: int = 16  # 0: full fine-tune
    lora_alpha: float = 32.0
    n_train: int = 4000
    n_eval: int = 64
    n_val_loss: int = 32  # validation problems (first task) whose teacher-forced loss is logged
    answer_weight: float = 1.0  # loss weight of the answer line's tokens against the reasoning's 1

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        """This trainer's loop: 300 steps at lr 1e-3, 20 warmup steps, a checkpoint every 50, unless given."""
        defaults = {"steps": 300, "lr": 1e-3, "warmup_steps": 20, "save_every": 50}
        return TrainConfig(out_dir=out_dir, **(defaults | given))

    @classmethod
    def of(cls, model: str, task: str, out_dir: str, **options) -> SFTConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(model, task, cls.loop(out_dir, **loop), **own)


class TokenLM(nn.Module):
    """ids -> logits at the positions that have a label: one forward for DDP to wrap."""

    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(self.model.embed(ids), positions)
        return self.model.logits(hidden[labels != IGNORE])


def sft_loss(lm: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, weighted by `batch["weights"]` when it has them."""
    labels = batch["labels"]
    logits = lm(batch["ids"], batch["positions"], labels)
    labelled = labels != IGNORE
    if "weights" not in batch:
        return F.cross_entropy(logits.float(), labels[labelled])
    weights = batch["weights"][labelled]
    return (F.cross_entropy(logits.float(), labels[labelled], reduction="none") * weights).sum() / weights.sum()


@torch.no_grad()
def heldout_loss(lm: TokenLM, examples: list[tuple[list[int], list[int]]], batch: int = 8) -> float:
    """Mean next-token loss (nats) over the solution tokens of `examples`."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        b = collate(examples[start : start + batch])
        labels = b["labels"].to(lm.model.device)
        logits = lm(b["ids"].to(lm.model.device), b["positions"].to(lm.model.device), labels)
        total += float(F.cross_entropy(logits.float(), labels[labels != IGNORE], reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


def prompt_and_target(tokenizer, task, problem) -> tuple[list[int], list[int]]:
    """The chat prompt's ids, and the worked solution's ids ending with the end-of-turn token."""
    end = tokenizer.eos_token_id
    prompt = tokenizer.encode(tokenizer.apply_chat_template(task.messages(problem), add_generation_prompt=True))
    answer = tokenizer.encode(task.solution(problem), add_special_tokens=False) + ([end] if end is not None else [])
    return prompt, answer


def encode_examples(tokenizer, task, problems, answer_weight: float = 1.0) -> list[tuple]:
    """(input ids, labels) per problem: labels are the next token on the solution, IGNORE on the prompt;
    with an `answer_weight` other than 1, (ids, labels, weights): that weight on the labels from the
    answer marker on, 1 on the reasoning's (and on the prompt's, which have no label)."""
    examples = []
    for p in problems:
        prompt, answer = prompt_and_target(tokenizer, task, p)
        ids = prompt + answer
        labels = [IGNORE] * (len(prompt) - 1) + answer + [IGNORE]
        if answer_weight == 1.0:
            examples.append((ids, labels))
            continue
        reasoning = tokenizer.encode(split_reasoning(task.solution(p))[0], add_special_tokens=False)
        shared = zip(answer, reasoning, strict=False)  # the solution's tokens start as the reasoning's
        start = next((k for k, (a, b) in enumerate(shared) if a != b), min(len(answer), len(reasoning)))
        weights = [1.0] * (len(prompt) - 1 + start) + [answer_weight] * (len(answer) - start) + [1.0]
        examples.append((ids, labels, weights))
    return examples


def collate(examples: list[tuple]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest; padding has position -1 (masked) and no label. Examples with
    per-token loss weights (a third element) give `weights` too."""
    width = max(len(example[0]) for example in examples)
    batch = len(examples)
    ids = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.full((batch, width), -1, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    weighted = any(len(example) > 2 for example in examples)
    weights = torch.ones(batch, width) if weighted else None
    for row, (x, y, *w) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        positions[row, : len(x)] = torch.arange(len(x))
        labels[row, : len(y)] = torch.tensor(y)
        if w:
            weights[row, : len(w[0])] = torch.tensor(w[0])
    out = {"ids": ids, "positions": positions, "labels": labels}
    return out | ({"weights": weights} if weighted else {})


def parse_task_mix(spec: str) -> list[tuple[str, float]]:
    """"long_mult:3,chain_sum:1" -> [(name, share)] with shares summing to 1 (weights default to 1)."""
    mix = []
    for part in (p.strip() for p in spec.split(",")):
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not name or value <= 0:
            raise MemlmError(f"bad task {part!r} in --task: expected NAME or NAME:WEIGHT with a weight > 0")
        get_task(name)
        mix.append((name, value))
    if len({name for name, _ in mix}) != len(mix):
        raise MemlmError(f"a task appears twice in --task {spec!r}")
    total = sum(w for _, w in mix)
    return [(name, w / total) for name, w in mix]


def run_sft(cfg: SFTConfig) -> dict:
    mix = parse_task_mix(cfg.task)
    if cfg.lora_rank < 0:
        raise MemlmError("--lora-rank must be >= 0 (0 = full fine-tune)")
    if not cfg.answer_weight > 0:
        raise MemlmError("--answer-weight must be > 0 (1 = plain SFT)")
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    else:
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # A mix draws each task's share of the training problems; batches sample the pool uniformly.
    examples = []
    for name, share in mix:
        task = get_task(name)
        problems = task.problems(max(1, round(share * cfg.n_train)), "train")
        examples += encode_examples(tokenizer, task, problems, cfg.answer_weight)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        chosen = global_batch(len(examples), cfg.batch_size, cfg.train.seed, step, micro, rank, world)
        return collate([examples[i] for i in chosen])

    out = Path(cfg.train.out_dir)
    first = get_task(mix[0][0])
    val = encode_examples(tokenizer, first, first.problems(cfg.n_val_loss, "val")) if cfg.n_val_loss else []
    evaluate = (lambda lm: {"val_loss": heldout_loss(lm, val)}) if val else None
    start_loss = heldout_loss(TokenLM(model), val) if val and not cfg.train.resume else None
    last = train(TokenLM(model), sft_loss, batch_fn, cfg.train.inside("train"), evaluate)

    if not is_main_process():
        return last
    recipe = {
        "task": cfg.task,
        "steps": cfg.train.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.train.lr,
        "n_train": cfg.n_train,
        "answer_weight": cfg.answer_weight,
        "trainable_parameters": trainable,
        "final_loss": last.get("loss"),
    }
    if val:
        recipe.update(val_loss_start=start_loss, val_loss=last.get("val_loss"))
    if cfg.lora_rank:
        artifact = save_adapter(
            out / "adapter",
            model,
            {
                "base_model": cfg.model,
                "rank": cfg.lora_rank,
                "alpha": cfg.lora_alpha,
                "targets": list(DEFAULT_TARGETS),
                **recipe,
            },
        )
    else:
        merge_lora(model)
        artifact = save_model(out / "model", model, tokenizer, {"description": f"full SFT of {cfg.model}", **recipe})
    report = {"artifact": str(artifact), **recipe}
    if cfg.n_eval:  # every task of the mix; "eval" is the first's
        report["evals"] = [evaluate_saved(str(artifact), name, cfg.n_eval) for name, _ in mix]
        report["eval"] = report["evals"][0]
    write_json_atomic(out / "eval.json", report)
    return report
