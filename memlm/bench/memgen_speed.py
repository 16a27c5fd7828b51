"""Decode speed with and without latent memory, per weight format (`python -m memlm.bench.memgen_speed`).

By default the committed chain-sum memory (bench/models/chain-sum-memgen) on the embedded model;
`--model M --memory DIR [--memory DIR2 ...]` compares several memories of one reasoner (a full and
a truncated weaver, say). Trigger `always`; 128 tokens per answer (end tokens ignored); batch 1
and 8; each configuration twice, both shown so the spread is visible. Prints tok/s and the
memory's decode time as a multiple of vanilla's (the issue's 1.3x bar is at batch 1); `--json`
writes the rows, each with its CPU seconds too (`time.process_time`: on a machine shared with
other work, at one thread, CPU time is the steadier measure).
"""

import argparse
import time

import torch
from rich.console import Console

import memlm
from memlm.bench.report import write_json
from memlm.data.tasks import get_task
from memlm.latent.memory import LatentMemory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="the reasoner (default: the embedded model)")
    parser.add_argument("--memory", action="append", help="latent memory folder(s)")
    parser.add_argument("--dtype", default="float32,q4_1", help="comma-separated weight formats")
    parser.add_argument("--task", default="chain_sum")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    memories = args.memory or ["bench/models/chain-sum-memgen"]

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    problems = task.problems(8, "test")
    params = memlm.SamplingParams(temperature=0.0, max_new_tokens=args.tokens, ignore_eos=True)
    rows = []
    for dtype in args.dtype.split(","):

        def load(dtype=dtype):
            return memlm.load(args.model, dtype=dtype) if args.model else memlm.load(dtype=dtype)

        # One engine per memory: a memory's LoRA lives inside its engine's model.
        variants = [("vanilla", load(), None)]
        for folder in memories:
            engine = load()
            variants.append((folder, engine, LatentMemory.load(folder, engine, trigger="always")))
        for _ in range(2):
            for name, engine, memory in variants:
                engine.generate([task.messages(problems[0])], memlm.SamplingParams(max_new_tokens=8), memory=memory)
                for batch in (1, 8):
                    chosen = problems[:batch]
                    began, cpu = time.perf_counter(), time.process_time()
                    out = engine.generate([task.messages(p) for p in chosen], params, memory=memory)
                    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
                    insertions = sum(len(c.insertions or []) for c in out) / batch
                    tokens = sum(len(c.token_ids) for c in out)
                    rows.append(
                        {
                            "dtype": dtype,
                            "variant": name,
                            "batch": batch,
                            "seconds": elapsed,
                            "cpu_seconds": cpu,
                            "tok_s": tokens / elapsed,
                            "insertions_per_answer": insertions,
                        }
                    )
                    vanilla = [
                        r for r in rows if r["dtype"] == dtype and r["variant"] == "vanilla" and r["batch"] == batch
                    ][-1]
                    ratio, cpu_ratio = elapsed / vanilla["seconds"], cpu / vanilla["cpu_seconds"]
                    print(
                        f"{dtype:10s} {name:40s} batch {batch}: {tokens / elapsed:6.1f} tok/s, "
                        f"{ratio:4.2f}x vanilla's time ({cpu_ratio:4.2f}x its CPU time), "
                        f"{insertions:.1f} insertions per answer",
                        flush=True,
                    )
    if args.json:
        write_json(
            args.json,
            {"model": args.model or "embedded", "task": args.task, "tokens": args.tokens, "threads": args.threads,
             "rows": rows},  # fmt: skip
            Console(),
        )


if __name__ == "__main__":
    main()
