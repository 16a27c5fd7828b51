"""The running batch and how a step's chunk is fed to the model.

`Batch` is what the engine keeps beside the scheduler's running list: the model's state (one row
per running request, in the same order), the hooks of the memories in use, the token history the
penalties need and the sampler. `feed` runs one forward over every row's pending chunk -- a joining
request's prompt, a running one's last token, the vectors a memory inserts after them, and the
queries a keys-and-values weaver runs before them (with the model's own LoRA on for those alone) --
as one right-padded chunk (the model packs it: padding costs no matmul work).
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
    sizes = [len(r.pending_ids) + r.vectors_pending for r in rows]
    starts = torch.tensor([r.next_position for r in rows], device=device)
    real = torch.tensor(sizes, device=device)
    width = max(sizes)
    vectors = any(r.vectors_pending for r in rows)
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
        elif any(r.pending_queries is not None for r in rows):
            queries = [0 if r.pending_queries is None else r.pending_queries.shape[0] for r in rows]
            own_lora = steps < torch.tensor(queries, device=device)[:, None]  # [B, width]: the queries
            hidden = model(embed_chunk(model, rows, width), positions, state, lora_tokens=own_lora)
        else:
            hidden = model(embed_chunk(model, rows, width), positions, state)
    for r, n in zip(rows, sizes, strict=True):
        r.next_position += n
        r.pending_ids, r.pending_embeds, r.pending_queries = [], None, None
    return hidden, hidden[torch.arange(len(rows), device=device), real - 1]


def embed_chunk(model, rows: list[Request], width: int) -> torch.Tensor:
    """Each row's pending queries, its pending tokens embedded, then its pending vectors:
    [B, width, d], zero padding."""
    embeds = torch.zeros(len(rows), width, model.config.hidden_size, dtype=model.dtype, device=model.device)
    for row, r in enumerate(rows):
        parts = [r.pending_queries] if r.pending_queries is not None else []
        if r.pending_ids:
            parts.append(model.embed(torch.tensor(r.pending_ids, device=model.device)))
        if r.pending_embeds is not None:
            parts.append(r.pending_embeds)
        if parts:
            chunk = torch.cat([p.to(model.dtype) for p in parts])
            embeds[row, : chunk.shape[0]] = chunk
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
