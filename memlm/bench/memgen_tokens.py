"""Where a latent memory lowers the reasoner's loss: teacher-forced on held-out worked solutions,
nats/token and greedy hit rate per kind of token, the frozen reasoner alone and with the memory
(`always` trigger). Kinds: `result` (digits after "=" or "Answer:", what the step computes),
`operand` (digits before "=": copied from the line above and the prompt), `other` (spaces, signs,
"=", newlines, "Answer:", the end token). `all results` is the share of solutions whose result
digits would all be greedy hits. Usage:
    python -m memlm.bench.memgen_tokens --model M --memory DIR [--task T] [--n N] [--json OUT]"""

import argparse
import collections

import torch
from rich.console import Console

from memlm.bench.report import write_json
from memlm.data.tasks import get_task
from memlm.generation.engine import Engine
from memlm.latent.memory import LatentMemory
from memlm.train.sft import prompt_and_target


def kinds(tokenizer, target: list[int]) -> list[str]:
    out, after_equals = [], False
    for token in target:
        text = tokenizer.decode([token])
        if text.strip().isdigit():
            out.append("result" if after_equals else "operand")
        else:
            out.append("other")
            if "=" in text or ":" in text:
                after_equals = True
            if "\n" in text:
                after_equals = False
    return out


def measure(engine, prompts, targets, memory=None) -> dict:
    nll, hits = collections.defaultdict(list), collections.defaultdict(list)
    solved = []
    for target, completion in zip(targets, engine.score(prompts, targets, memory=memory), strict=True):
        labels = kinds(engine.tokenizer, target)
        for kind, logprob, hit in zip(labels, completion.logprobs, completion.greedy_hits, strict=True):
            nll[kind].append(-logprob)
            hits[kind].append(hit)
        solved.append(all(h for k, h in zip(labels, completion.greedy_hits, strict=True) if k == "result"))
    row = {k: {"nll": sum(v) / len(v), "greedy_hits": sum(hits[k]) / len(v), "tokens": len(v)} for k, v in nll.items()}
    row["all_results"] = sum(solved) / len(solved)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--memory", required=True)
    parser.add_argument("--task", default="chain_sum_mixed")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = get_task(args.task)
    engine = Engine.load(args.model)
    pairs = [prompt_and_target(engine.tokenizer, task, p) for p in task.problems(args.n, "val")]
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    memory = LatentMemory.load(args.memory, engine, trigger="always")
    rows = {"vanilla": measure(engine, prompts, targets), "memory": measure(engine, prompts, targets, memory)}
    print(f"{'':8s} {'kind':8s} {'tokens':>6s} {'nll':>7s} {'hits':>6s}")
    for name, row in rows.items():
        for kind in ("result", "operand", "other"):
            r = row[kind]
            print(f"{name:8s} {kind:8s} {r['tokens']:6d} {r['nll']:7.3f} {r['greedy_hits']:6.3f}")
        print(f"{name:8s} all results right: {row['all_results']:.3f}")
    if args.json:
        meta = {"model": args.model, "memory": args.memory, "task": args.task, "n": args.n}
        write_json(args.json, meta | rows, Console())


if __name__ == "__main__":
    main()
