"""Where does the MemGen weaver's help run out? Per line of held-out worked chain-sum solutions,
the frozen reasoner's teacher-forced loss (nats/token) and greedy hit rate, alone and with the
committed latent memory (`always` trigger). Usage: python -m memlm.bench.memgen_lines [N_PROBLEMS]"""

import argparse
import collections
from pathlib import Path

from memlm.data.tasks import get_task
from memlm.generation.engine import Engine
from memlm.latent.memory import LatentMemory
from memlm.train.sft import prompt_and_target

MEMORY = Path(__file__).resolve().parents[2] / "bench" / "models" / "chain-sum-memgen"


def per_line(engine, prompts, targets, memory=None) -> tuple[float, dict[int, tuple[float, float]]]:
    scored = engine.score(prompts, targets, memory=memory)
    nll, hits = collections.defaultdict(list), collections.defaultdict(list)
    for target, completion in zip(targets, scored, strict=True):
        line = 0
        for token, logprob, hit in zip(target, completion.logprobs, completion.greedy_hits, strict=True):
            nll[line].append(-logprob)
            hits[line].append(hit)
            line += "\n" in engine.tokenizer.decode([token])
    mean = sum(sum(v) for v in nll.values()) / sum(len(v) for v in nll.values())
    return mean, {k: (sum(v) / len(v), sum(hits[k]) / len(hits[k])) for k, v in sorted(nll.items())}


def main(n: int = 24) -> None:
    engine = Engine.load("smollm2-135m-instruct")
    task = get_task("chain_sum")
    pairs = [prompt_and_target(engine.tokenizer, task, p) for p in task.problems(n, "test")]
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    memory = LatentMemory.load(MEMORY, engine, trigger="always")
    for name, m in (("reasoner alone", None), ("with the weaver", memory)):
        mean, lines = per_line(engine, prompts, targets, m)
        print(f"{name}: {mean:.3f} nats/token")
        print("  " + "  ".join(f"line {k}: {loss:.2f} / {hit:.2f}" for k, (loss, hit) in lines.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", nargs="?", type=int, default=24, help="held-out problems (default 24)")
    main(parser.parse_args().n)
