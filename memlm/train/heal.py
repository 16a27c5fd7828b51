"""Healing a pruned model: a short LoRA fine-tune on general text through the shared training loop,
merged back into its weights (the surgery itself is memlm/surgery/prune.py)."""

from __future__ import annotations

import torch

from memlm.adapters.lora import add_lora, merge_lora
from memlm.errors import MemlmError
from memlm.models.llama import LlamaModel
from memlm.train.loop import TrainConfig, global_batch, train
from memlm.train.sft import TokenLM, sft_loss


def heal(model: LlamaModel, windows: list[list[int]], steps: int, out_dir: str, lr: float = 1e-3,
         lora_rank: int = 16, batch_size: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """A short LoRA fine-tune of the pruned model on general text (next-token loss over the given
    windows, through the shared training loop), merged back into its weights. -> the last log row."""
    if steps < 1 or not windows:
        raise MemlmError("healing needs --heal-steps >= 1 and some text")
    data = torch.tensor(windows)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        rows = data[global_batch(len(windows), batch_size, seed, step, micro, rank, world)]
        positions = torch.arange(rows.shape[1] - 1)[None].expand(rows.shape[0], -1)
        return {"ids": rows[:, :-1], "positions": positions, "labels": rows[:, 1:]}

    add_lora(model, lora_rank, 2.0 * lora_rank)
    cfg = TrainConfig(out_dir=out_dir, steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
                      save_every=steps, log_every=max(1, steps // 10), seed=seed, progress=progress)
    last = train(TokenLM(model), sft_loss, batch_fn, cfg)
    merge_lora(model)
    model.eval().requires_grad_(False)
    return last
