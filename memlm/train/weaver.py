"""`memlm train weaver`: SFT of the MemGen weaver on a task's worked solutions, reasoner frozen.

The data are the same as `memlm train sft` (training split, worked solutions, same sampling of
batches), so the two are comparable at the same step budget. The loss is the frozen reasoner's
next-token loss on the real target tokens with latent memory woven in at the prompt and at the
target's delimiters (see memlm/latent/training.py); only the weaver trains: LoRA on the shared
weights, the latent queries and the two projections. The result is a LatentMemory folder (a few
MB) that `--memory DIR` takes; held-out accuracy is measured on what was saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memlm.atomic import write_json_atomic
from memlm.data.evaluate import evaluate_saved
from memlm.data.tasks import get_task
from memlm.generation.engine import Engine
from memlm.latent.delimiters import DEFAULT_DELIMITERS
from memlm.latent.memory import LatentMemory
from memlm.latent.training import LatentLM, make_example
from memlm.train.loop import TrainConfig, global_batch, is_main_process, train
from memlm.train.sft import prompt_and_target


@dataclass(slots=True)
class WeaverConfig:
    model: str
    task: str
    out_dir: str
    steps: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    prompt_latents: int = 8
    inference_latents: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    max_prompt_aug: int = 1
    max_inference_aug: int = 8
    weaver_layers: int | None = None  # None: all of the reasoner's layers
    init: str = "random"  # or "delimiter": latents start as copies of the delimiter's embedding
    weaver_input: str = "embeddings"  # or "states": the queries read the reasoner's own KV cache
    weaver_output: str = "embeddings"  # or "kv": the queries' keys and values stay in that cache
    delimiters: tuple[str, ...] = DEFAULT_DELIMITERS  # insertion points: after a token ending in one of these
    n_train: int = 4000
    n_eval: int = 64
    n_val_loss: int = 32  # validation problems whose teacher-forced loss is logged at checkpoints
    warmup_steps: int = 20
    save_every: int = 25
    seed: int = 0
    resume: bool = False
    progress: bool = True


def run_weaver_training(cfg: WeaverConfig) -> dict:
    task = get_task(cfg.task)
    engine = Engine.load(cfg.model)
    memory = LatentMemory.create(
        engine,
        prompt_latents=cfg.prompt_latents,
        inference_latents=cfg.inference_latents,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        trigger="always",
        max_prompt_aug=cfg.max_prompt_aug,
        max_inference_aug=cfg.max_inference_aug,
        weaver_layers=cfg.weaver_layers,
        init=cfg.init,
        delimiters=cfg.delimiters,
        weaver_input=cfg.weaver_input,
        weaver_output=cfg.weaver_output,
    )
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
    start_loss = lm.heldout_loss(val) if val and not cfg.resume else None

    def batch_fn(step: int, micro: int, rank: int, world: int):  # the same draws as `memlm train sft`
        return [examples[i] for i in global_batch(len(examples), cfg.batch_size, cfg.seed, step, micro, rank, world)]

    def loss_fn(model, batch):
        total, count = model(batch)
        return total / count

    out = Path(cfg.out_dir)
    train_cfg = TrainConfig(
        out_dir=str(out / "train"),
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        save_every=cfg.save_every,
        seed=cfg.seed,
        resume=cfg.resume,
        progress=cfg.progress,
    )
    last = train(lm, loss_fn, batch_fn, train_cfg, evaluate)

    if not is_main_process():
        return last
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    memory.config.update(
        {"task": cfg.task, "steps": cfg.steps, "batch_size": cfg.batch_size, "trainable_parameters": trainable}
    )
    folder = memory.save(out / "memory")
    report = {"memory": str(folder), "final_loss": last.get("loss"), "trainable_parameters": trainable}
    if val:
        report.update(val_loss_start=start_loss, val_loss=last.get("val_loss"))
    if cfg.n_eval:
        report["eval"] = evaluate_saved(cfg.model, cfg.task, cfg.n_eval, memory=str(folder))
    write_json_atomic(out / "eval.json", report)
    return report
