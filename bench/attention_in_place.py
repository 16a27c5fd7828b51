"""Decode with the float model's attention read where the KV cache stores it (KVCache.attend_in_place,
the native kernels over the paged blocks) against torch's path (every row's blocks gathered into
one tensor per layer and step, then SDPA), in one process, alternating, best of 3 each: the
embedded model in float32, one thread, rows with 200-300-token prompts, 64 greedy tokens.
    python bench/attention_in_place.py [--rows 8,32] [--policy h2o]"""

import argparse
import os

import torch

import memlm
from memlm.cache import make_policy
from memlm.generation.params import SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--rows", default="8,32")
parser.add_argument("--policy", default=None, help="an eviction policy (its attention statistics recorded)")
args = parser.parse_args()
torch.set_num_threads(1)
engine = memlm.load("smollm2-135m-instruct", dtype="float32")
text = "The history of the printing press begins in the fifteenth century with Gutenberg. " * 40
ids = engine.tokenizer.encode(text)
params = SamplingParams(max_new_tokens=64, min_new_tokens=64, temperature=0)
options = {"kv_policy": make_policy(args.policy, 128)} if args.policy else {}
for rows in map(int, args.rows.split(",")):
    prompts = [ids[i : i + 200 + 4 * i] for i in range(rows)]
    best, tokens = {}, {}
    for _ in range(3):
        for in_place in ("1", "0"):
            os.environ["MEMLM_NATIVE_ATTENTION"] = in_place
            done = engine.generate_tokens(prompts, params, **options)
            decode = max(c.ttft_s + c.decode_s for c in done) - min(c.ttft_s for c in done)
            best[in_place] = min(best.get(in_place, float("inf")), decode)
            tokens[in_place] = [c.token_ids for c in done]
    same = sum(a == b for a, b in zip(tokens["1"], tokens["0"], strict=True))
    print(f"rows {rows}{' ' + args.policy if args.policy else ''}: decode {best['0']:.2f} s gathered, "
          f"{best['1']:.2f} s in place ({best['0'] / best['1']:.2f}x); {same}/{rows} rows' tokens identical")
