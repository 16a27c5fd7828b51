"""Long-context retrieval tasks (RULER-style), generated with a seed, for prompt compression.

Each problem is one context (filler text with facts hidden at random depths) and one or more
questions about it. A press compresses the context once; each question is then asked of a copy of
the compressed cache (`memlm bench press`), so a press that chose by one question has to serve the
others too (`multi_query`).

    needle          one 5-digit pass key in filler; "What is the pass key?"
    multi_key       two pass keys, each for a named thing; one is asked
    multi_value     one thing has three special numbers, all asked (scored by the share found)
    variable_track  a chain of assignments (VAR A = 12345, VAR B = A, ...) with a distractor chain;
                    the value of the chain's last variable is asked
    multi_query     two pass keys for named things; both are asked, each of the same context

Lengths are in tokens of the given tokenizer (the context is filled to `length` minus the question),
so 1k, 2k and 4k mean the same to every press. Seeds: evaluation and training (the learned press's
labels) draw from different seeds (`SPLIT_SEEDS`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from memlm.errors import InvalidRequestError

TASKS = ("needle", "multi_key", "multi_value", "variable_track", "multi_query")
SPLIT_SEEDS = {"train": 2911, "test": 2977}

INTRO = "Some special numbers are hidden inside the following text. Read it and remember them.\n\n"

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river runs past the old mill.",
    "A cat sleeps on the warm windowsill.",
    "The train leaves the station at noon.",
    "Leaves fall slowly in the autumn wind.",
    "The market opens early on Saturdays.",
    "Children play football in the park.",
    "The bakery smells of fresh bread.",
)

THINGS = (
    "apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pencil", "quarry", "rocket", "saddle", "tunnel",
)  # fmt: skip

NAMES = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ")
KEYS = 2  # pass keys in multi_key and multi_query contexts (SmolLM2-135M: 4 keys 33%, 3 keys 50%, 2 keys 6/6 at 1k)


@dataclass(frozen=True, slots=True)
class Question:
    text: str  # asked after the context
    answers: tuple[str, ...]  # every number the answer must contain


@dataclass(frozen=True, slots=True)
class ContextProblem:
    task: str
    context: str  # the user message's text before the question (intro, filler and facts)
    questions: tuple[Question, ...]


def score(completion: str, question: Question) -> float:
    """The share of the expected numbers that appear in the completion as whole numbers."""
    found = set(re.findall(r"\d+", completion))
    return sum(a in found for a in question.answers) / len(question.answers)


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = str(rng.randint(10000, 99999))
        if key not in taken:
            taken.add(key)
            return key


def _facts(task: str, rng: random.Random) -> tuple[list[str], tuple[Question, ...]]:
    """The sentences to hide (in order of depth) and the questions."""
    taken: set[str] = set()
    if task == "needle":
        key = _key(rng, taken)
        return [f"The pass key is {key}. Remember it. {key} is the pass key."], (
            Question("What is the pass key?", (key,)),
        )
    if task in ("multi_key", "multi_query"):
        things = rng.sample(THINGS, KEYS)
        keys = [_key(rng, taken) for _ in things]
        facts = [
            f"The pass key for the {t} is {k}. Remember it. {k} is the pass key for the {t}."
            for t, k in zip(things, keys, strict=True)
        ]
        questions = tuple(
            Question(f"What is the pass key for the {t}?", (k,)) for t, k in zip(things, keys, strict=True)
        )
        if task == "multi_key":
            questions = (questions[rng.randrange(len(questions))],)
        return facts, questions
    if task == "multi_value":
        thing = rng.choice(THINGS)
        values = [_key(rng, taken) for _ in range(3)]
        facts = [f"One of the special numbers for the {thing} is {v}." for v in values]
        return facts, (Question(f"What are all the special numbers for the {thing}?", tuple(values)),)
    if task == "variable_track":
        names = rng.sample(NAMES, 8)
        chain, other = names[:4], names[4:]
        value, decoy = _key(rng, taken), _key(rng, taken)
        lines = [(0, f"VAR {chain[0]} = {value}."), (0, f"VAR {other[0]} = {decoy}.")]
        lines += [(i, f"VAR {chain[i]} = VAR {chain[i - 1]}.") for i in range(1, len(chain))]
        lines += [(i, f"VAR {other[i]} = VAR {other[i - 1]}.") for i in range(1, len(other))]
        lines.sort(key=lambda line: line[0])  # a chain's assignments stay in order; the two interleave
        return [text for _, text in lines], (Question(f"What is the value of VAR {chain[-1]}?", (value,)),)
    raise InvalidRequestError(f"unknown long-context task {task!r}; choose one of {', '.join(TASKS)}")


def make_problem(task: str, length: int, seed: int, count_tokens, question_room: int = 64) -> ContextProblem:
    """One problem whose context is about `length - question_room` tokens (`count_tokens(text)`)."""
    rng = random.Random(f"{task}/{length}/{seed}")
    facts, questions = _facts(task, rng)
    target = length - question_room - count_tokens(INTRO + " ".join(facts))
    filler: list[str] = []
    per = max(1, count_tokens(" ".join(FILLER)) / len(FILLER))
    while len(filler) * per < target:
        filler.append(rng.choice(FILLER))
    while filler and count_tokens(" ".join(filler)) > target:
        filler.pop()
    depths = sorted(rng.sample(range(len(filler) + 1), len(facts)))
    for shift, (depth, fact) in enumerate(zip(depths, facts, strict=True)):
        filler.insert(depth + shift, fact)
    return ContextProblem(task, INTRO + " ".join(filler), questions)


def make_problems(task: str, length: int, n: int, count_tokens, split: str = "test") -> list[ContextProblem]:
    """`n` problems of a task at a length, from the split's seed (train and test never share one)."""
    if split not in SPLIT_SEEDS:
        raise InvalidRequestError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
    base = SPLIT_SEEDS[split] * 100_000
    return [make_problem(task, length, base + i, count_tokens) for i in range(n)]
