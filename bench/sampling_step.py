"""One sampling step of BatchSampler over SmolLM2's 49,152 logits, 8 and 64 rows, one thread, best of
5: temperature 0.7 alone (issue 31: RL's sampling) and temperature 0.8 with top-p 0.95 (the serve
benchmark's sampled requests), the rows the embedded model's own next-token logits along a text (a
real model's peaked distributions, which top-p's cost depends on). Compare two trees by running it
under each:
    PYTHONPATH=<old tree> python bench/sampling_step.py before; python bench/sampling_step.py after"""

import sys
import time

import torch

from memlm.formats.loading import load_model
from memlm.generation.params import SamplingParams
from memlm.generation.sampling import BatchSampler

torch.set_num_threads(1)
label = sys.argv[1] if len(sys.argv) > 1 else ""
loaded = load_model()
text = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg " * 8
ids = torch.tensor([loaded.tokenizer.encode(text)[:64]])
with torch.no_grad():
    model_logits = loaded.model.lm_head(loaded.model.forward_tokens(ids, torch.arange(64)[None]))[0].float()
settings = {"temperature 0.7": {"temperature": 0.7}, "top-p 0.95": {"temperature": 0.8, "top_p": 0.95}}
for name, options in settings.items():
    for n in (8, 64):
        params = [SamplingParams(seed=i, **options) for i in range(n)]
        sampler = BatchSampler(params, [torch.Generator().manual_seed(i) for i in range(n)])
        logits = model_logits[:n].contiguous()
        sampler(logits)
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            sampler(logits)
            best = min(best, time.perf_counter() - began)
        print(f"{label} {name}, rows {n}: {best * 1e3:.1f} ms per step")
