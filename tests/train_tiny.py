"""A tiny regression trained with memlm's loop: run directly, or under torchrun (tests/test_train.py)."""

import sys

import torch
from torch import nn

from memlm.train import TrainConfig, train

GLOBAL_BATCH = 8


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def main(out_dir: str, steps: int, grad_accum: int, mode: str) -> None:
    """mode: "fresh", "resume", or "crash-at-N" (die when step N starts, as a killed job would)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def batch_fn(step, micro, rank, world):
        if mode.startswith("crash-at-") and step == int(mode.rsplit("-", 1)[1]):
            raise SystemExit(3)
        x, y = data(step)
        shards = world * grad_accum  # this rank's share of this micro-step
        index = torch.arange(GLOBAL_BATCH).chunk(shards)[micro * world + rank]
        return {"x": x[index], "y": y[index]}

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch["x"]), batch["y"])

    cfg = TrainConfig(
        out_dir=out_dir,
        steps=steps,
        lr=0.05,
        warmup_steps=2,
        grad_accum=grad_accum,
        log_every=2,
        save_every=3,
        resume=mode == "resume",
        progress=False,
        bf16=False,  # the exactness the tests check (accumulation, ranks, resume) is fp32's
    )
    train(model, loss_fn, batch_fn, cfg)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
