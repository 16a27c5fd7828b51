"""The loop's two contracts: what it asks of a model's state, and what a memory may do in a step.

A step is: admit -> join -> feed -> forward -> logits + sample -> take -> retire (engine.py). A memory
takes part through a `RowHook`, called at fixed points of that step with the running rows (the
requests, in the order of the state's rows) and the state itself, never the engine's batch:

    join(rows, state)                          rows joining now (only those this hook serves)
    after_forward(rows, state, hidden, steps)  the chunk is in the state: score, evict, ...
    after_sample(rows, state, tokens, last, steps)
                                               tokens are sampled, not yet taken: insert, halt, ...
    after_take(rows, state, steps)             taken tokens are appended: prepare the next chunk
    retire(keep, rows) -> bool                 finished rows left (keep: the surviving row indices);
                                               False: the hook serves no row any more

Hooks come from where the memory lives: a state brings its own (`ModelState.row_hooks`: a KV cache
its eviction, the LCM's state its halts and traces) and a request's `memory` option brings one
(`RowMemory.row_hook`: latent memory), shared by every request using that memory. What a hook
keeps about a request is its own record in `request.records` (under its module's KEY); a record may add fields to
the request's Completion (`completion_fields`). The engine names no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from memlm.tokenizer import Tokenizer

# The running requests (memlm.generation.request.Request), in the order of the state's rows. Named
# here rather than imported: a request holds its memory option (RowMemory), so request.py imports this.
Rows = list


@dataclass(slots=True)
class RowStep:
    """What the memories did to one row in one step, besides its token (its StreamDelta's fields)."""

    evicted: list[int] = field(default_factory=list)  # positions dropped from the cache this step
    inserted: int = 0  # vectors or cache slots a memory inserted this step
    kv_tokens: int | None = None  # tokens the row holds in the cache after the step
    take: bool = True  # False: the sampled token is not taken (a memory inserts before the next one)
    halted: bool = False  # the model stopped this row (LCM's danger grid): no token, finish "halted"


class ModelState(Protocol):
    """A batch's generation state (`model.new_state`): one row per running request."""

    lengths: torch.Tensor  # [B] tokens (or slots) each row holds
    supports_eviction: bool  # holds tokens a KV policy may drop

    def select_rows(self, rows: torch.Tensor | list[int]) -> None: ...

    def extend(self, other: Any) -> None: ...

    def row_hooks(self, tokenizer: Tokenizer) -> list[RowHook]: ...


class RowHook(Protocol):
    """One memory's part in the step. A structural protocol: the cache and the LCM, which sit below
    this package, implement it without importing it (memlm.hook_defaults.QuietHook gives the points
    a hook does not act at)."""

    phase: str  # the timing phase its after_forward counts in (Engine.timings)

    def join(self, rows: Rows, state: ModelState) -> None: ...

    def after_forward(self, rows: Rows, state: ModelState, hidden: torch.Tensor, steps: list[RowStep]) -> None:
        ...

    def after_sample(
        self, rows: Rows, state: ModelState, tokens: list[int], last: torch.Tensor, steps: list[RowStep]
    ) -> None: ...

    def after_take(self, rows: Rows, state: ModelState, steps: list[RowStep]) -> None: ...

    def retire(self, keep: list[int], rows: Rows) -> bool: ...


class RowMemory(Protocol):
    """A per-request memory option (`Engine.generate(..., memory=...)`): it brings the hook that runs it."""

    def row_hook(self) -> RowHook: ...

    def extra_slots(self) -> int: ...  # cache slots a row needs beyond its tokens (latent slots)


class Record(Protocol):
    def completion_fields(self) -> dict[str, Any]: ...
