"""Score a model on a reasoning task: batched greedy generation, the task's own scorer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from memlm.cache.policies import KVPolicy
from memlm.data.tasks import Problem, Task, get_task
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.latent.memory import LatentMemory


@dataclass(slots=True)
class TaskResult:
    accuracy: float
    n: int
    generated_tokens: int
    decode_tok_s: float  # generated tokens / generation wall time (prefill included)
    peak_kv_tokens: int  # the most any sequence held at once
    peak_kv_bytes: int
    insertions_per_answer: float
    completions: list[str]
    scores: list[float]

    def summary(self) -> dict:
        keys = ("accuracy", "n", "generated_tokens", "decode_tok_s", "peak_kv_tokens", "peak_kv_bytes")
        keys += ("insertions_per_answer",)
        return {k: getattr(self, k) for k in keys}


def evaluate_task(
    engine,
    task: Task,
    problems: list[Problem],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    policy_factory: Callable[[Problem], KVPolicy | None] | None = None,
    progress: Callable[[int], None] | None = None,
    memory=None,
) -> TaskResult:
    """Greedy completions of every problem; `policy_factory(problem)` gives each request its KV policy;
    `memory` (a LatentMemory) weaves latent memory into every answer. `max_new_tokens`: the task's
    own budget when None."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens or task.max_new_tokens)
    texts, scores, tokens, peak, elapsed, insertions = [], [], 0, 0, 0.0, 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        policies = [policy_factory(p) for p in chunk] if policy_factory else None
        began = time.perf_counter()
        completions = engine.generate([task.messages(p) for p in chunk], params, kv_policy=policies, memory=memory)
        elapsed += time.perf_counter() - began
        for problem, c in zip(chunk, completions, strict=True):
            texts.append(c.text)
            scores.append(task.score(c.text, problem))
            tokens += len(c.token_ids)
            peak = max(peak, c.peak_kv_tokens)
            insertions += len(c.insertions or [])
        if progress is not None:
            progress(len(chunk))
    bytes_per_token = engine.config.kv_bytes_per_token(engine.model.dtype.itemsize)
    return TaskResult(
        accuracy=sum(scores) / max(1, len(scores)),
        n=len(problems),
        generated_tokens=tokens,
        decode_tok_s=tokens / elapsed if elapsed > 0 else 0.0,
        peak_kv_tokens=peak,
        peak_kv_bytes=peak * bytes_per_token,
        insertions_per_answer=insertions / max(1, len(problems)),
        completions=texts,
        scores=scores,
    )


def evaluate_saved(model: str, task_name: str, n: int, memory: str | None = None, batch_size: int = 16) -> dict:
    """Held-out accuracy of what a trainer saved (a model path, and a latent memory folder or not),
    loaded fresh from disk: the test split, greedy decoding."""
    task = get_task(task_name)
    engine = Engine.load(model)
    latent = None
    if memory is not None:
        latent = LatentMemory.load(memory, engine)
    result = evaluate_task(engine, task, task.problems(n, "test"), batch_size=batch_size, memory=latent)
    return {"task": task_name, **result.summary()}
