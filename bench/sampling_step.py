"""One sampling step of BatchSampler at temperature 0.7 over SmolLM2's 49,152 logits, 8 and 64 rows,
one thread, best of 5 (issue 31: RL's sampling). Compare two trees by running it under each:
    PYTHONPATH=<old tree> python bench/sampling_step.py before; python bench/sampling_step.py after"""

import sys
import time

import torch

from memlm.generation.params import SamplingParams
from memlm.generation.sampling import BatchSampler

torch.set_num_threads(1)
label = sys.argv[1] if len(sys.argv) > 1 else ""
for n in (8, 64):
    params = [SamplingParams(temperature=0.7, seed=i) for i in range(n)]
    sampler = BatchSampler(params, [torch.Generator().manual_seed(i) for i in range(n)])
    logits = torch.randn(n, 49152) * 3
    sampler(logits)
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        sampler(logits)
        best = min(best, time.perf_counter() - began)
    print(f"{label} rows {n}: {best * 1e3:.1f} ms per step")
