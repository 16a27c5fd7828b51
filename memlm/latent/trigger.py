"""Triggers: at a delimiter, should the weaver insert latent memory?

`always` inserts at every delimiter (the reference implementation's default), `never` turns
inference-time insertion off (prompt latents only). Two triggers are trained (by RL,
train/trigger.py), each a small head giving P(insert); generation inserts when it is above one
half, RL samples from it:

* `learned`: an MLP on the reasoner's final hidden state at the delimiter (what the reasoner
  computed there anyway: no extra pass).
* `sequence`: MemGen's trigger reads the token sequence with the reasoner's weights plus LoRA
  and decides with a two-way head. Here those weights and that LoRA are the weaver's: one probe
  position (the weaver's first inference query, as is) is appended at the delimiter and read
  through the weaver's model over the reasoner's own KV cache, tokens and earlier latents alike
  (Weaver.probe: one position per deciding row, no cache of its own, dropped again), and a
  two-way head on the probe's last hidden state decides. The probe is what the weaver's first
  latent would see, so the trigger decides on the weaver's view of everything so far. Only the
  head is trained: the probe's state does not depend on it, so the states recorded while
  sampling give RL exact log-probabilities, as for `learned`. (The seed gives its trigger a LoRA
  of its own; a model here carries one set of adapters, the weaver's.)
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.errors import InvalidRequestError

TRIGGERS = ("always", "never", "learned", "sequence")
TRAINED = ("learned", "sequence")  # triggers with tensors of their own, saved with the memory


class Trigger(nn.Module):
    kind = "learned"

    def __init__(self, hidden_size: int, outputs: int = 1):
        super().__init__()
        width = hidden_size // 4
        self.head = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, outputs))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states at delimiters -> [...] log-odds of inserting."""
        return self.head(hidden.to(self.head[0].weight.dtype)).squeeze(-1)

    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden states at delimiters -> [...] P(insert)."""
        return torch.sigmoid(self.logits(hidden))

    def decide(self, hidden: torch.Tensor, requests: list | None = None) -> torch.Tensor:
        """[n, d] hidden states at the delimiters of these requests -> [n] bool: insert now."""
        return self.probability(hidden) > 0.5

    def set_initial(self, p: float) -> None:
        """Start at P(insert) ~ p (RL starts near `always`, then learns to skip)."""
        with torch.no_grad():
            self.head[-1].bias.fill_(float(torch.logit(torch.tensor(p))))


class SequenceTrigger(Trigger):
    """A two-way head on the weaver's probe of the sequence (see the module doc); `logits` is the
    log-odds of inserting, the difference of the two classes' logits."""

    kind = "sequence"

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, outputs=2)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        two = self.head(hidden.to(self.head[0].weight.dtype))
        return two[..., 1] - two[..., 0]

    def set_initial(self, p: float) -> None:
        """Start at P(insert) ~ p: the second class's bias at logit(p), the first's at 0."""
        with torch.no_grad():
            self.head[-1].bias.copy_(torch.tensor([0.0, float(torch.logit(torch.tensor(p)))]))

    @staticmethod
    def features(weaver, cache, rows: list[int], starts: list[int]) -> torch.Tensor:
        """[len(rows), d]: the probe's last hidden state for these rows of the reasoner's `cache`,
        each probe at `starts[i]` (the row's next position)."""
        vectors = [None] * cache.lengths.shape[0]
        at = [0] * len(vectors)
        probe = weaver.inference_queries[0].detach()
        for row, start in zip(rows, starts, strict=True):
            vectors[row], at[row] = probe, start
        with torch.no_grad():
            hidden = weaver.probe(cache, at, vectors)
        return torch.stack([hidden[row] for row in rows])


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
    if kind == "sequence":
        return SequenceTrigger(hidden_size)
    if kind in ("always", "never"):
        return FixedTrigger(kind)

    raise InvalidRequestError(f"unknown trigger {kind!r}; choose one of {', '.join(TRIGGERS)}")
