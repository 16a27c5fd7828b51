"""Held-out bits per byte: the tokenizer-independent language-modelling score.

bits/byte = (sum of -log2 p(token) over the scored tokens) / (UTF-8 bytes those tokens spell),
where bytes are counted with the split's own bytes-per-token ratio from its header, so two models
with different tokenizers would still be compared on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memlm.data.packed import TokenData

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] -> logits [B, T, V]


@torch.no_grad()
def bits_per_byte(logits_fn: LogitsFn, data: TokenData, seq_len: int, max_windows: int = 64, batch: int = 8) -> float:
    windows = data.eval_windows(seq_len, max_windows)
    nats, tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch]
        logits = logits_fn(ids[:, :-1])
        nats += float(F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
        tokens += ids[:, 1:].numel()
    return nats / math.log(2) / (tokens * data.bytes_per_token)


def llama_logits(model) -> LogitsFn:
    def run(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(model.device)
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return model.logits(model(model.embed(ids), positions))

    return run


def lcm_logits(model, use_memory: bool = True) -> LogitsFn:
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(model.device), use_memory=use_memory)[0]

    return run
