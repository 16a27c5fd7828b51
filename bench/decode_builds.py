"""Decode and prefill of whichever memlm checkout PYTHONPATH names, timed inside the run the same
way for any checkout (also those before `bench decode` read Completion.ttft_s / decode_s), so two
builds can be compared on one machine:

    for side in /tmp/before /work/main; do   # e.g. `git worktree add /tmp/before b4a90cc`
      PYTHONPATH=$side python bench/decode_builds.py smollm2-135m-instruct q4_1:q8_0 2048 1 32 2
    done

Arguments: model, dtype, prompt tokens, batch, new tokens, timed runs (after a 4-token warm-up).
One torch thread. Prints one JSON line: prefill tok/s (to every row's first token) and decode
tok/s (from there to the last token), each the best of the runs.
"""

import json
import sys
import time

import torch

import memlm
from memlm.bench.decode import bench_prompts, load_args
from memlm.cache.blocks import KVCacheConfig

model, dtype = sys.argv[1], sys.argv[2]
prompt_tokens, batch, new, repeats = map(int, sys.argv[3:7])
torch.set_num_threads(1)
engine = memlm.load(*load_args(model, dtype), kv_cache=KVCacheConfig(prefix_caching=False))
ids = bench_prompts(engine.tokenizer, batch, prompt_tokens)
best_prefill = best_decode = float("inf")
for run in range(repeats + 1):
    n = new if run else 4
    start, first = time.perf_counter(), None
    requests = engine._submit(ids, memlm.SamplingParams(max_new_tokens=n, min_new_tokens=n), None, None, None)
    for _ in engine._drive(requests):
        if first is None and all(r.output_ids for r in requests):
            first = time.perf_counter()
    if run:
        best_prefill, best_decode = min(best_prefill, first - start), min(best_decode, time.perf_counter() - first)
row = {"dtype": dtype, "prompt": prompt_tokens, "batch": batch}
row |= {
    "prefill_tok_s": round(sum(map(len, ids)) / best_prefill, 1),
    "decode_tok_s": round(batch * (new - 1) / best_decode, 1),
}
print(json.dumps(row))
