"""`memlm train weaver`: SFT of the MemGen weaver on a task's worked solutions, reasoner frozen.

The data are the same as `memlm train sft` (training split, worked solutions, same sampling of
batches), so the two are comparable at the same step budget. The loss is the frozen reasoner's
next-token loss on the real target tokens with latent memory woven in at the prompt and at the
target's delimiters (see memlm/latent/training.py); only the weaver trains: LoRA on the shared
weights, the latent queries and the two projections. The result is a LatentMemory folder (a few
MB) that `--memory DIR` takes; held-out accuracy is measured on what was saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memlm.atomic import write_json_atomic
from memlm.data.evaluate import evaluate_saved
from memlm.data.tasks import get_task
from memlm.generation.engine import Engine
from memlm.latent.memory import LatentMemory
from memlm.latent.spec import WeaverSpec
from memlm.latent.training import LatentLM, make_example
from memlm.train.loop import TrainConfig, global_batch, is_main_process, split_loop, train
from memlm.train.sft import prompt_and_target


@dataclass(slots=True)
class WeaverConfig:
    model: str
    task: str
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    spec: WeaverSpec = field(default_factory=WeaverSpec)  # the memory's shape, written whole into its folder
    batch_size: int = 8
    n_train: int = 4000
    n_eval: int = 64
    n_val_loss: int = 32  # validation problems whose teacher-forced loss is logged at checkpoints

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        """This trainer's loop: 250 steps at lr 1e-3, 20 warmup steps, a checkpoint every 25, unless given."""
        defaults = {"steps": 250, "lr": 1e-3, "warmup_steps": 20, "save_every": 25}
        return TrainConfig(out_dir=out_dir, **(defaults | given))

    @classmethod
    def of(cls, model: str, task: str, out_dir: str, spec: WeaverSpec | None = None, **options) -> WeaverConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(model, task, cls.loop(out_dir, **loop), spec or WeaverSpec(), **own)


def run_weaver_training(cfg: WeaverConfig) -> dict:
    task = get_task(cfg.task)
    engine = Engine.load(cfg.model)
    memory = LatentMemory.create(engine, cfg.spec)
    examples = [
        make_example(memory, *prompt_and_target(engine.tokenizer, task, p)) for p in task.problems(cfg.n_train, "train")
    ]
    lm = LatentLM(memory)
    val = [
        make_example(memory, *prompt_and_target(engine.tokenizer, task, p))
        for p in task.problems(cfg.n_val_loss, "val")
    ]
    evaluate = (lambda model: {"val_loss": model.heldout_loss(val)}) if val else None
    # The loss before any step: how much the untrained memory costs the reasoner.
    start_loss = lm.heldout_loss(val) if val and not cfg.train.resume else None

    def batch_fn(step: int, micro: int, rank: int, world: int):  # the same draws as `memlm train sft`
        chosen = global_batch(len(examples), cfg.batch_size, cfg.train.seed, step, micro, rank, world)
        return [examples[i] for i in chosen]

    def loss_fn(model, batch):
        total, count = model(batch)
        return total / count

    out = Path(cfg.train.out_dir)
    last = train(lm, loss_fn, batch_fn, cfg.train.inside("train"), evaluate)

    if not is_main_process():
        return last
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    memory.config.update(
        {"task": cfg.task, "steps": cfg.train.steps, "batch_size": cfg.batch_size, "trainable_parameters": trainable}
    )
    folder = memory.save(out / "memory")
    report = {"memory": str(folder), "final_loss": last.get("loss"), "trainable_parameters": trainable}
    if val:
        report.update(val_loss_start=start_loss, val_loss=last.get("val_loss"))
    if cfg.n_eval:
        report["eval"] = evaluate_saved(cfg.model, cfg.task, cfg.n_eval, memory=str(folder))
    write_json_atomic(out / "eval.json", report)
    return report
