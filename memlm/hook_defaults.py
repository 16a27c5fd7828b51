"""A row hook's default at each point of the decode loop: nothing to do.

The loop's hook protocol is `memlm.generation.hooks.RowHook` (join, after_forward, after_sample,
after_take, retire). The cache's hooks, the LCM's and the latent memory's implement it structurally
from packages below the engine, and most act at one or two of its points: `QuietHook` gives them
the rest once. `retire` says True ("keep me"): a state's hooks live as long as their batch.
"""

from __future__ import annotations


class QuietHook:
    phase = "memory"  # the PhaseClock key this hook's time is counted under

    def join(self, rows, state) -> None:
        pass

    def after_forward(self, rows, state, hidden, steps) -> None:
        pass

    def after_sample(self, rows, state, tokens, last, steps) -> None:
        pass

    def after_take(self, rows, state, steps) -> None:
        pass

    def retire(self, keep, rows) -> bool:
        return True
