"""The shared training loop.

A trainer supplies a model, a loss and the data; the loop does the rest, the same way for all:
AdamW on the parameters that require grad, linear warmup then cosine decay, gradient clipping,
gradient accumulation, bf16 autocast where the device supports it, a progress bar with loss
and throughput, metrics as JSONL and a PNG loss curve, atomic checkpoints and resume.

It runs as one process or under `torchrun --nproc-per-node N` unchanged. torchrun's environment
(WORLD_SIZE, RANK, ...) turns on DDP (gloo on CPU, nccl on GPU). `batch_fn(step, micro, rank,
world)` returns this rank's share of the global batch, and DDP averages the gradients. N
processes therefore take the same steps as one process given the whole global batch (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from memlm.atomic import atomic_write, ensure_dir
from memlm.errors import MemlmError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVE = "loss.png"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware: a CUDA GPU that has them, or a CPU with AVX512-BF16 or
    AMX (a SmolLM2 LoRA step there is 3.5x faster under autocast than in fp32; CPUs without
    them only emulate bf16, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


@dataclass(slots=True)
class TrainConfig:
    out_dir: str
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    log_every: int = 10
    save_every: int = 100
    seed: int = 0
    bf16: bool | None = None  # None: use bf16 autocast where the device supports it
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1 or self.lr <= 0:
            raise MemlmError("steps and grad_accum must be >= 1 and lr > 0")

    def inside(self, name: str = "train") -> TrainConfig:
        """The same settings writing into a subfolder of out_dir: a trainer's config names its output
        folder, and the loop's checkpoint, metrics and curve go to out_dir/train."""
        return replace(self, out_dir=str(Path(self.out_dir) / name))


LOOP_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def split_loop(options: dict) -> tuple[dict, dict]:
    """Flat options -> (the shared loop's: steps, lr, seed, ...; the rest: the trainer's own)."""
    loop = {k: v for k, v in options.items() if k in LOOP_FIELDS}
    return loop, {k: v for k, v in options.items() if k not in LOOP_FIELDS}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch_fn: Callable[[int, int, int, int], Any],
    cfg: TrainConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train `model` in place for cfg.steps optimizer steps; return the last logged metrics.

    `evaluate(model)`, if given, runs on the main process at every checkpoint and at the end
    (in eval mode, without gradients); its metrics (held-out loss, say) join that step's log row.

    `loss_fn(model, batch)` must run the model through its `forward` (`model(...)`): under DDP it
    receives the wrapped model, and only a forward through the wrapper sets up the gradient sync.
    `batch_fn(step, micro, rank, world)` returns this rank's micro-batch; examples are split
    evenly, so a rank's mean loss is the global mean's share. `loss_fn` may also return
    `(loss, {name: float})`: those extra metrics are averaged like the loss and logged beside it.
    """
    dist = _Distributed.from_env()
    device = dist.device
    model.to(device)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MemlmError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    wrapped = dist.wrap(model)
    out = Path(cfg.out_dir)
    if dist.is_main:
        ensure_dir(out)
    start = _load_checkpoint(out, model, optimizer, device) if cfg.resume else 0
    if not cfg.resume and dist.is_main:
        (out / METRICS).unlink(missing_ok=True)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else native_bf16(device)

    progress = _progress(cfg, start, enabled=cfg.progress and dist.is_main)
    last: dict[str, Any] = {}
    window_loss, window_items, window_start = 0.0, 0, time.perf_counter()
    window_extras: dict[str, float] = {}
    model.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        for micro in range(cfg.grad_accum):
            batch = _to_device(batch_fn(step, micro, dist.rank, dist.world), device)
            sync = micro == cfg.grad_accum - 1
            with dist.accumulating(wrapped, sync=sync), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(wrapped, batch)
            loss, extras = loss if isinstance(loss, tuple) else (loss, {})
            (loss / cfg.grad_accum).backward()
            window_loss += loss.item() / cfg.grad_accum
            for name, value in extras.items():
                window_extras[name] = window_extras.get(name, 0.0) + float(value) / cfg.grad_accum
            window_items += _batch_items(batch)
        grad_norm = None
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window = (done - 1) % cfg.log_every + 1
            last = {
                "step": done,
                "loss": dist.mean(window_loss / steps_in_window),
                "lr": lr_at(step, cfg),
                "grad_norm": grad_norm,
                "items_per_s": window_items * dist.world / elapsed if elapsed > 0 else None,
            }
            last.update({name: dist.mean(total / steps_in_window) for name, total in sorted(window_extras.items())})
            if evaluate is not None and dist.is_main and (done % cfg.save_every == 0 or done == cfg.steps):
                model.eval()
                with torch.no_grad():
                    last.update(evaluate(model))
                model.train()
            if dist.is_main:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(last) + "\n")
            progress.update(done, last)
            window_loss, window_items, window_start = 0.0, 0, time.perf_counter()
            window_extras = {}
        if dist.is_main and (done % cfg.save_every == 0 or done == cfg.steps):
            _save_checkpoint(out, model, optimizer, done, cfg)
            _plot(out)
        dist.barrier()
    progress.close()
    model.eval()
    dist.close()
    return last


def global_batch(num_examples: int, batch_size: int, seed: int, step: int, micro: int, rank: int, world: int):
    """Indices of this rank's share of a micro-batch drawn from (seed, step, micro): the same
    global batch for any world size, so trainers that share data draw the same examples."""
    rng = random.Random(seed * 1_000_003 + step * 101 + micro)
    return rng.sample(range(num_examples), batch_size)[rank::world]


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (they neither save nor evaluate)."""
    return not (td.is_available() and td.is_initialized() and td.get_rank() != 0)


# ---- checkpoints, metrics, plot ----------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: small checkpoints for adapters and heads on a frozen base."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu() for n, t in model.state_dict().items() if n in names}


def _save_checkpoint(out: Path, model, optimizer, step: int, cfg: TrainConfig) -> None:
    state = {
        "step": step,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "config": asdict(cfg),
        "rng": torch.get_rng_state(),
    }
    atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


def _load_checkpoint(out: Path, model, optimizer, device) -> int:
    path = out / CHECKPOINT
    if not path.is_file():
        raise MemlmError(f"--resume: no checkpoint at {path}")
    try:
        # weights_only: a checkpoint is tensors and plain values; a pickle that wants to run code is refused.
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise MemlmError(f"--resume: cannot read {path}: {e}") from None
    missing = set(trainable_state(model)) - set(state["model"])
    if missing:
        raise MemlmError(f"--resume: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _plot(out: Path) -> None:
    # in-function: matplotlib is slow to import, and choosing its backend is a process-wide side effect
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (out / METRICS).is_file():  # a checkpoint before the first logged step
        return
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / CURVE, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ---- helpers -----------------------------------------------------------------------------------


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_items(batch) -> int:
    """Examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), None)
    if isinstance(batch, (list, tuple)):
        if batch and not isinstance(batch[0], torch.Tensor):
            return len(batch)  # a list of examples
        batch = batch[0] if batch else None
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 1


class _Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, done: int, metrics: dict) -> None:
        if self.bar is not None:
            rate = metrics.get("items_per_s")
            info = f"loss {metrics['loss']:.4f}" + (f"  {rate:.1f} items/s" if rate else "")
            self.bar.update(self.task, completed=done, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _progress(cfg: TrainConfig, start: int, enabled: bool) -> _Progress:
    return _Progress(cfg.steps, start, enabled)


class _Distributed:
    """Single process, or DDP when launched by torchrun (WORLD_SIZE > 1)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_env(cls) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(0, 1, torch.device("cuda" if cuda else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not td.is_initialized():
            td.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return cls(td.get_rank(), world, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def accumulating(self, wrapped: nn.Module, sync: bool):
        """All-reduce gradients only on the last micro-batch of an accumulation (`sync`)."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        td.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            td.destroy_process_group()
