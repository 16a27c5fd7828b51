"""The running batch and how a step's chunk is fed to the model.

`Batch` is what the engine keeps beside the scheduler's running list: the model's state (one row
per running request, in the same order), the hooks of the memories in use, the token history the
penalties need and the sampler. `feed` runs one forward over every row's pending chunk -- a joining
request's prompt, a running one's last token, and the vectors a memory inserts after them -- as one
right-padded chunk (the model packs it: padding costs no matmul work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from memlm.generation.hooks import ModelState, RowHook
from memlm.generation.request import Request
from memlm.generation.sampling import BatchSampler, TokenHistory


@dataclass
class Batch:
    state: ModelState
    hooks: dict[object, RowHook] = field(default_factory=dict)  # the state's, then one per memory in use
    history: TokenHistory | None = None  # only while some request uses penalties
    sampler: BatchSampler | None = None  # rebuilt when the membership changes


def feed(model, rows: list[Request], state: ModelState) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over every row's pending chunk. -> (hidden [B, T, d], each row's last real hidden [B, d])."""
    device = model.device
    sizes = [len(r.pending_ids) + (0 if r.pending_embeds is None else r.pending_embeds.shape[0]) for r in rows]
    starts = torch.tensor([r.next_position for r in rows], device=device)
    real = torch.tensor(sizes, device=device)
    width = max(sizes)
    vectors = any(r.pending_embeds is not None for r in rows)
    if width == 1 and not vectors:  # plain decode: one token per row
        ids = torch.tensor([r.pending_ids for r in rows], device=device)
        hidden = model.forward_tokens(ids, starts[:, None], state)
    else:
        steps = torch.arange(width, device=device)[None, :]
        positions = torch.where(steps < real[:, None], starts[:, None] + steps, -1)
        if not vectors:
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            for row, r in enumerate(rows):
                ids[row, : len(r.pending_ids)] = torch.tensor(r.pending_ids, device=device)
            hidden = model.forward_tokens(ids, positions, state)
        else:
            hidden = model(embed_chunk(model, rows, width), positions, state)
    for r, n in zip(rows, sizes, strict=True):
        r.next_position += n
        r.pending_ids, r.pending_embeds = [], None
    return hidden, hidden[torch.arange(len(rows), device=device), real - 1]


def embed_chunk(model, rows: list[Request], width: int) -> torch.Tensor:
    """Each row's pending tokens embedded, then its pending vectors: [B, width, d], zero padding."""
    embeds = torch.zeros(len(rows), width, model.config.hidden_size, dtype=model.dtype, device=model.device)
    for row, r in enumerate(rows):
        n = len(r.pending_ids)
        if n:
            embeds[row, :n] = model.embed(torch.tensor(r.pending_ids, device=model.device))
        if r.pending_embeds is not None:
            embeds[row, n : n + r.pending_embeds.shape[0]] = r.pending_embeds.to(model.dtype)
    return embeds


class PhaseClock:
    """Adds the time since the previous mark to `totals[phase]` (nothing when totals is None)."""

    def __init__(self, totals: dict[str, float] | None):
        self.totals, self.last = totals, time.perf_counter() if totals is not None else 0.0

    def __call__(self, phase: str) -> None:
        if self.totals is not None:
            now = time.perf_counter()
            self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
            self.last = now

    def count_step(self) -> None:
        if self.totals is not None:
            self.totals["steps"] = self.totals.get("steps", 0) + 1
