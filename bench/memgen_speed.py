"""Decode speed with and without latent memory, per weight format (`python bench/memgen_speed.py`).

The committed chain-sum memory (bench/models/chain-sum-memgen, trigger `always`: 9 insertions per
answer) on the embedded model, 128 tokens per answer (end tokens ignored), batch 1 and 8, each
configuration twice (the first run of each pair warms up nothing in particular: both are shown so
the spread is visible). Prints tok/s per (dtype, variant, batch).
"""

import time

import torch

import memlm
from memlm.data.tasks import get_task
from memlm.latent.memory import LatentMemory

torch.set_num_threads(2)
task = get_task("chain_sum")
problems = task.problems(4, "test")
params = memlm.SamplingParams(temperature=0.0, max_new_tokens=128, ignore_eos=True)
for dtype in ("float32", "q4_1", "q4_1:q8_0"):
    engine = memlm.load(dtype=dtype)
    memory = LatentMemory.load("bench/models/chain-sum-memgen", engine, trigger="always")
    for name, mem in (("vanilla", None), ("memory", memory)) * 2:
        engine.generate([task.messages(problems[0])], memlm.SamplingParams(max_new_tokens=8), memory=mem)
        for batch in (1, 8):
            chosen = [problems[i % len(problems)] for i in range(batch)]
            began = time.perf_counter()
            out = engine.generate([task.messages(p) for p in chosen], params, memory=mem)
            elapsed = time.perf_counter() - began
            insertions = sum(len(c.insertions or []) for c in out) / batch
            tok_s = sum(len(c.token_ids) for c in out) / elapsed
            print(f"{dtype:10s} {name:8s} batch {batch}: {tok_s:6.1f} tok/s, {insertions:.1f} insertions per answer")
