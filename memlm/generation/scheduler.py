"""Which requests run: a bounded waiting queue in arrival order and a bounded running batch.

Each engine step first admits waiting requests into free rows of the running batch, as many as
`max_batch` allows and with at most `max_prefill_tokens` prompt tokens between them (one long
prompt is always admitted alone, so nothing waits forever), and as the KV cache's admission rule
allows (a paged cache: the blocks fit), then decodes every running row once.
Finished and aborted requests leave at once, so their rows are free for the next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from memlm.errors import InvalidRequestError, QueueFullError
from memlm.generation.request import Request


class Scheduler:
    def __init__(self, max_batch: int = 256, max_queue: int | None = None, max_prefill_tokens: int = 2048):
        if max_batch < 1 or (max_queue is not None and max_queue < 0) or max_prefill_tokens < 1:
            raise InvalidRequestError("max_batch and max_prefill_tokens must be >= 1, max_queue >= 0")
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order of the rows of the engine's batch state

    def add(self, request: Request, bounded: bool = True) -> None:
        """Queue a request; a full queue refuses it (unless `bounded` is False: the library's own batches)."""
        if bounded and self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests); try again shortly")
        self.waiting.append(request)

    def admit(self, admissible: Callable[[Request, list[Request]], bool] | None = None) -> list[Request]:
        """Move the requests that join the batch at this step from waiting to running, in arrival
        order; `admissible(request, joining)` may hold the next one back (e.g. its KV cache does not
        fit yet), and then every later one waits too, so none is overtaken forever."""
        joining, tokens = [], 0
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            n = len(self.waiting[0].prompt_ids)
            if joining and tokens + n > self.max_prefill_tokens:
                break
            if admissible is not None and not admissible(self.waiting[0], joining):
                break
            joining.append(self.waiting.popleft())
            tokens += n
        self.running += joining
        return joining

    def find(self, request_id: str) -> Request | None:
        return next((r for r in (*self.running, *self.waiting) if r.id == request_id), None)

    def drop_waiting(self, request: Request) -> bool:
        try:
            self.waiting.remove(request)
            return True
        except ValueError:
            return False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
