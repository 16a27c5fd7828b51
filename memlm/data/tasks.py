"""Reasoning tasks from reasoning-gym, with a step-by-step worked format memlm trains and scores.

reasoning-gym generates problems offline, each with its own scoring function. A `Task` adds what
training and evaluation need on top: chat messages for the prompt, a worked solution in a fixed
format (reasoning lines, then one answer line) for supervised fine-tuning, the marker that ends
the reasoning, and answer extraction for scoring.

Problems are drawn with a seed: training and held-out evaluation use different seeds (and
`problems` refuses to hand out the same seed for both through `split`).

The format (chain sums):

    57 + 87 = 144
    144 - 70 = 74
    Answer: 74

Every line carries its running partial result, so the model never has to add more than two
numbers at once; the last line starts with the answer marker.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memlm.errors import InvalidRequestError

ANSWER_MARKER = "Answer:"
SYSTEM_PROMPT = "Work step by step, one operation per line, then give the answer."

# One seed per split: problems drawn for training never reach validation or evaluation.
SPLIT_SEEDS = {"train": 1234, "val": 4321, "test": 98765}


@dataclass(frozen=True, slots=True)
class Problem:
    question: str
    answer: str
    entry: dict[str, Any]  # the reasoning-gym entry, for its scorer


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    dataset: str  # reasoning-gym dataset name
    config: dict[str, Any] = field(default_factory=dict)
    worked: Callable[[dict[str, Any]], list[str]] | None = None  # reasoning lines of a worked solution
    max_new_tokens: int = 256  # a generation budget that fits any worked solution of the task
    source: Callable[[int, int], list[dict[str, Any]]] | None = None  # (n, seed) -> entries, else reasoning-gym
    # An empty system text still displaces the chat template's default one (SmolLM2's adds 16 tokens).
    system_prompt: str = SYSTEM_PROMPT
    # (completion, problem) -> score, for a task of memlm's own (no reasoning-gym scorer); else reasoning-gym's
    scorer: Callable[[str, Problem], float] | None = None
    # entry -> indices of the reasoning lines the answer depends on (the generator knows them): what
    # the oracle KV policy keeps. None: the task does not know (no oracle).
    key_lines: Callable[[dict[str, Any]], list[int]] | None = None

    def problems(self, n: int, split: str = "test", seed: int | None = None) -> list[Problem]:
        """`n` problems of a split ("train", "val" or "test"), or of an explicit seed."""
        if seed is None:
            if split not in SPLIT_SEEDS:
                raise InvalidRequestError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
            seed = SPLIT_SEEDS[split]
        if self.source is not None:
            data = self.source(n, seed)
        else:
            import reasoning_gym  # lazy: it imports every task family it knows (seconds)

            data = reasoning_gym.create_dataset(self.dataset, size=n, seed=seed, **self.config)
        return [Problem(e["question"], str(e["answer"]), e) for e in data]

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": problem.question}]

    def solution(self, problem: Problem) -> str:
        """The worked solution SFT trains on: reasoning lines, then the answer line."""
        lines = self.worked(problem.entry) if self.worked else []
        return "\n".join([*lines, f"{ANSWER_MARKER} {problem.answer}"])

    def key_tokens(self, tokenizer, problem: Problem) -> list[int]:
        """Indices, within the worked solution's tokens (as SFT encodes it), of the tokens of the
        reasoning lines the answer depends on (`key_lines`), each with the newline that ends it (as
        `--kv-spans lines` counts a line; without it the oracle scored 0.44 / 0.94 on 16 validation
        pair searches at 20% / 30%, with it 0.50 / 1.00): what an oracle KV policy keeps. A model
        that writes the worked solution has them at its prompt length plus these indices."""
        if self.key_lines is None:
            raise InvalidRequestError(f"task {self.name!r} does not know which lines its answers depend on")
        text = self.solution(problem)
        starts = [0]
        for line in text.split("\n")[:-1]:
            starts.append(starts[-1] + len(line) + 1)
        spans = [(starts[i], starts[i + 1]) for i in self.key_lines(problem.entry)]  # each line with its newline
        offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
        return [t for t, (a, b) in enumerate(offsets) if any(a < end and b > start for start, end in spans)]

    def score(self, completion: str, problem: Problem) -> float:
        """The task's own scorer on the extracted answer (0.0 when there is no answer line)."""
        if self.scorer is not None:
            return self.scorer(completion, problem)
        import reasoning_gym  # lazy: it imports every task family it knows (seconds)

        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        scorer = reasoning_gym.get_score_answer_fn(problem.entry["metadata"]["source_dataset"])
        return float(scorer(answer, problem.entry))


def extract_answer(completion: str) -> str | None:
    """The text after the last answer marker, up to the end of its line."""
    at = completion.rfind(ANSWER_MARKER)
    if at < 0:
        return None
    rest = completion[at + len(ANSWER_MARKER) :].strip()
    return rest.splitlines()[0].strip() if rest else None


def split_reasoning(completion: str) -> tuple[str, str]:
    """(reasoning, answer part): everything before the answer marker, and the marker onwards."""
    at = completion.rfind(ANSWER_MARKER)
    return (completion, "") if at < 0 else (completion[:at], completion[at:])


_TERM = re.compile(r"([+-])\s*(\d+)")


def _chain_sum_steps(entry: dict[str, Any]) -> list[str]:
    """Running partial sums: one binary operation per line."""
    expression = entry["metadata"]["expression"]
    first = re.match(r"\s*(-?\d+)", expression)
    total = int(first.group(1))
    lines = []
    for op, number in _TERM.findall(expression[first.end() :]):
        value = total + int(number) if op == "+" else total - int(number)
        lines.append(f"{total} {op} {number} = {value}")
        total = value
    if total != int(entry["answer"]):  # the parser and the generator must agree
        raise AssertionError(f"worked solution of {expression!r} gives {total}, expected {entry['answer']}")
    return lines


def _column_addition(a: int, b: int) -> str:
    """a + b digit by digit from the right, each column with its carry: "4+0=4, 2+8=10 c1, ... -> s"."""
    da, db = str(a)[::-1], str(b)[::-1]
    columns, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        columns.append(f"{x}+{y}{f'+{carry}' if carry else ''}={total}" + (" c1" if total >= 10 else ""))
        carry = total // 10
    return f"{a} + {b}: {', '.join(columns)} -> {a + b}"


def _long_multiplication_steps(entry: dict[str, Any]) -> list[str]:
    """Long multiplication as taught: one row per digit of the second factor, each digit product
    with its carry added as a step of its own (scratch work that only the next step reads), the
    row's partial product shifted into place (a result read again later), then the partial
    products added column by column."""
    left, right = (int(t) for t in entry["metadata"]["expression"].split("*"))
    lines, partials = [], []
    for place, digit in enumerate(int(d) for d in str(right)[::-1]):
        steps, carry = [], 0
        for i, a in enumerate(int(d) for d in str(left)[::-1]):
            value = a * digit + carry
            step = f"{a}*{digit}={a * digit}" + (f"+{carry}={value}" if carry else "")
            steps.append(step if i == len(str(left)) - 1 else f"{step} c{value // 10}")
            carry = value // 10
        partial = left * digit * 10**place
        shifted = f", shifted {partial}" if place else ""
        lines.append(f"{left} * {digit}: {', '.join(steps)} -> {left * digit}{shifted}")
        partials.append(partial)
    total = partials[0]
    for partial in partials[1:]:
        lines.append(_column_addition(total, partial))
        total += partial
    if total != int(entry["answer"]):
        raise AssertionError(f"worked solution of {entry['metadata']['expression']!r} gives {total}")
    return lines


def _long_multiplication_problems(n: int, seed: int) -> list[dict[str, Any]]:
    """4-digit by 3-digit products, reasoning-gym's `products` entries (its question and scorer).
    Fixed sizes and a multiplier without zero digits give every trace the same shape (4 steps a
    row, 3 rows, 2 sums), so a 135M model learns the arithmetic rather than when each row ends."""
    rng = random.Random(seed)
    entries = []
    for _ in range(n):
        left = rng.randint(1000, 9999)
        right = int("".join(str(rng.randint(1, 9)) for _ in range(3)))
        expression = f"{left} * {right}"
        question = f"Solve the following multiplication: {expression}. Give only the result as your final answer."
        entries.append(
            {
                "question": question,
                "answer": str(left * right),
                "metadata": {"source_dataset": "products", "expression": expression},
            }
        )
    return entries


def _pair_search_problems(n: int, seed: int, count: int = 10) -> list[dict[str, Any]]:
    """`count` distinct two-digit numbers and a target that exactly one pair of them sums to; the
    pair's place among the pairs is uniform, so the line that finds it lands anywhere in the trace."""
    rng = random.Random(seed)
    entries = []
    while len(entries) < n:
        numbers = rng.sample(range(10, 100), count)
        i, j = sorted(rng.sample(range(count), 2))
        target = numbers[i] + numbers[j]
        hits = [(a, b) for a in range(count) for b in range(a + 1, count) if numbers[a] + numbers[b] == target]
        if len(hits) != 1:  # the answer must be unique, else "the pair" is ill-posed
            continue
        listed = " ".join(str(x) for x in numbers)
        entries.append(
            {
                "question": f"Which two numbers sum to {target}? {listed}",
                "answer": f"{numbers[i]} {numbers[j]}",
                "metadata": {"source_dataset": "pair_search", "numbers": numbers, "target": target, "pair": [i, j]},
            }
        )
    return entries


def _pair_search_steps(entry: dict[str, Any]) -> list[str]:
    """Every pair in list order, its sum, and whether it hits the target: one line each, all but one
    a dead end. The search does not stop at the hit (a model that re-checks everything, as reasoning
    models do): the answer line reads only the one "yes" line, wherever it is."""
    numbers, target = entry["metadata"]["numbers"], entry["metadata"]["target"]
    lines = []
    for a in range(len(numbers)):
        for b in range(a + 1, len(numbers)):
            total = numbers[a] + numbers[b]
            lines.append(f"{numbers[a]}+{numbers[b]}={total} {'yes' if total == target else 'no'}")
    return lines


def _pair_search_key_lines(entry: dict[str, Any]) -> list[int]:
    """The index of the "yes" line among the reasoning lines: all the answer depends on."""
    count = len(entry["metadata"]["numbers"])
    i, j = entry["metadata"]["pair"]
    return [i * count - i * (i + 1) // 2 + (j - i - 1)]


def _pair_search_score(completion: str, problem: Problem) -> float:
    """1.0 when the answer line names the pair (either order), else 0.0."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    given = re.findall(r"\d+", answer)
    return float(sorted(given) == sorted(problem.answer.split()))


TASKS: dict[str, Task] = {
    # Redundant by construction (issue 30): a search that checks 45 candidate pairs, one line each,
    # and rejects all but one; the answer depends on that one line alone (plus the prompt's list,
    # which every line reads). ~470 generated tokens after a ~55-token prompt (~11% of the trace).
    "pair_search": Task(
        "pair_search",
        "pair_search",
        worked=_pair_search_steps,
        max_new_tokens=560,
        source=_pair_search_problems,
        system_prompt="",
        scorer=_pair_search_score,
        key_lines=_pair_search_key_lines,
    ),
    # Long thinking after a short question, the regime a KV budget is for (DynTS): 4-digit by
    # 3-digit factors, ~10% of the trace is prompt, and most thinking tokens (digit products, column
    # sums) are scratch work that only the next step reads; the partial products are read again later.
    "long_mult": Task(
        "long_mult",
        "products",
        worked=_long_multiplication_steps,
        max_new_tokens=512,  # traces run to ~420 tokens
        source=_long_multiplication_problems,
        system_prompt="",  # a fine-tuned model needs no instruction: the prompt stays 40 tokens
    ),
    # 10-14 one-digit terms: ~120 reasoning tokens, and a 135M model can learn every step of it.
    "chain_sum": Task(
        "chain_sum",
        "chain_sum",
        {"min_terms": 10, "max_terms": 14, "min_digits": 1, "max_digits": 1},
        _chain_sum_steps,
    ),
    # Two-digit terms: SmolLM2-135M after 250 LoRA steps gets the format right but only 9% of the
    # answers (one wrong subtraction in ten steps is enough to miss).
    "chain_sum_2d": Task(
        "chain_sum_2d",
        "chain_sum",
        {"min_terms": 8, "max_terms": 12, "min_digits": 2, "max_digits": 2},
        _chain_sum_steps,
    ),
    # MemGen's setting (issue 11): 8-12 terms of one or two digits. The chain_sum adapter, frozen,
    # already solves about half of them (56% of 32 validation problems at q4_1): room to help, and
    # enough right answers for RL on the trigger to see mixed groups.
    "chain_sum_mixed": Task(
        "chain_sum_mixed",
        "chain_sum",
        {"min_terms": 8, "max_terms": 12, "min_digits": 1, "max_digits": 2},
        _chain_sum_steps,
    ),
    "chain_sum_short": Task(
        "chain_sum_short",
        "chain_sum",
        {"min_terms": 3, "max_terms": 5, "min_digits": 1, "max_digits": 2},
        _chain_sum_steps,
    ),
}


def get_task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise InvalidRequestError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return task
