"""Triggers: at a delimiter, should the weaver insert latent memory?

`always` inserts at every delimiter (the reference implementation's default), `never` turns
inference-time insertion off (prompt latents only). The learned trigger is a small head on the
reasoner's final hidden state at the delimiter, giving P(insert); generation inserts when it is
above one half, RL training samples from it.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.errors import InvalidRequestError

TRIGGERS = ("always", "never", "learned")


class Trigger(nn.Module):
    kind = "learned"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size // 4), nn.GELU(), nn.Linear(hidden_size // 4, 1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states at delimiters -> [...] log-odds of inserting."""
        return self.head(hidden.to(self.head[0].weight.dtype)).squeeze(-1)

    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states at delimiters -> [...] P(insert)."""
        return torch.sigmoid(self.logits(hidden))

    def decide(self, hidden: torch.Tensor, requests: list | None = None) -> torch.Tensor:
        """[n, d] hidden states at the delimiters of these requests -> [n] bool: insert now."""
        return self.probability(hidden) > 0.5


class FixedTrigger(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """1 or 0 everywhere: sampling from a fixed trigger (while screening) decides as it does."""
        return self.decide(hidden).float()

    def decide(self, hidden: torch.Tensor, requests: list | None = None) -> torch.Tensor:
        return torch.full(hidden.shape[:-1], self.kind == "always", dtype=torch.bool, device=hidden.device)


def make_trigger(kind: str, hidden_size: int) -> nn.Module:
    if kind == "learned":
        return Trigger(hidden_size)
    if kind in ("always", "never"):
        return FixedTrigger(kind)

    raise InvalidRequestError(f"unknown trigger {kind!r}; choose one of {', '.join(TRIGGERS)}")
