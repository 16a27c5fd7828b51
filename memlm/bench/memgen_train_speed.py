"""Weaver training step time per weaver input (`python -m memlm.bench.memgen_train_speed`).

A weaver that reads input embeddings trains in two masked forwards; one that reads the reasoner's
states trains segment by segment (memlm/latent/training.py). This times one optimizer-free
training step (forward + backward, with bf16 autocast where `memlm train weaver` would use it) of each on the
same 8 training examples, alternating the two so that a slow spell of the machine hits both,
and prints the median of `--reps` steps each. `--json` writes the rows.
"""

import argparse
import statistics
import time

import torch
from rich.console import Console

from memlm.bench.report import write_json
from memlm.data.tasks import get_task
from memlm.generation.engine import Engine
from memlm.latent.memory import LatentMemory
from memlm.latent.training import LatentLM, make_example
from memlm.train.loop import native_bf16
from memlm.train.sft import prompt_and_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bench/models/chain-sum-lora")
    parser.add_argument("--task", default="chain_sum_mixed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.set_num_threads(2)
    task = get_task(args.task)
    variants = {}
    for weaver_input in ("embeddings", "states"):
        engine = Engine.load(args.model)  # one engine per memory: its LoRA lives inside the model
        memory = LatentMemory.create(engine, weaver_input=weaver_input)
        examples = [
            make_example(memory, *prompt_and_target(engine.tokenizer, task, p))
            for p in task.problems(args.batch, "train")
        ]
        variants[weaver_input] = LatentLM(memory), examples

    bf16 = native_bf16(torch.device("cpu"))
    times = {name: [] for name in variants}
    for _ in range(args.reps + 1):  # the first round warms up and is not counted
        for name, (lm, examples) in variants.items():
            began = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss, count = lm(examples)
            (loss / count).backward()
            lm.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - began)
    rows = []
    for name, spent in times.items():
        median = statistics.median(spent[1:])
        rows.append(
            {
                "weaver_input": name,
                "batch": args.batch,
                "bf16": bf16,
                "step_s": median,
                "examples_per_s": args.batch / median,
            }
        )
        print(f"{name:10s} {median:6.2f} s/step  {args.batch / median:5.2f} examples/s  (steps: {spent[1:]})")
    print(f"states / embeddings step time: {rows[1]['step_s'] / rows[0]['step_s']:.2f}x")
    if args.json:
        write_json(args.json, {"model": args.model, "task": args.task, "rows": rows}, Console())


if __name__ == "__main__":
    main()
