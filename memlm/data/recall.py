"""Training documents with a reason to carry the past: made-up facts stated, then asked for again
after stretches of ordinary text (issue 32).

Wikipedia text gives a bounded decoder little to lose (a cut costs it ~0.05 bits/byte on the next
few tokens), so a memory trained on it has nothing to carry. These documents restate each fact
(a four-digit code bound to a two-word name) after filler of tens to hundreds of tokens of the
corpus itself (within a 1,024-token training window as a rule), so a model that carries the fact
across the gap predicts the restated code and one that does not pays ~13 bits for it.
`memlm data pack --recall-share S` mixes them into the training split only; validation stays the
plain corpus.

The names share their shape with `memlm eval lcm-reach`'s retrieval probe ("the <adjective>
<animal> vault") but no word with it: the probe asks about names never seen in training.
"""

from __future__ import annotations

import random

from memlm.errors import MemlmError

# Disjoint from the probe's words (memlm/bench/lcm_reach.py NAMES), so its names are all new.
ADJECTIVES = (
    "silver", "copper", "scarlet", "hollow", "quiet", "rapid", "velvet", "winter",
    "golden", "misty", "rusty", "sable", "tidal", "umber", "violet", "young",
)  # fmt: skip
ANIMALS = (
    "badger", "condor", "dolphin", "falcon", "gecko", "weasel", "jackal", "koala",
    "lemur", "mole", "newt", "puffin", "quail", "raven", "salmon", "tapir",
)  # fmt: skip
# Name first, code last: the restatement's name is the cue, its code the answer.
TEMPLATES = (
    "The secret code of the {who} vault is {code}.",
    "The {who} locker opens with the number {code}.",
    "Members of the {who} club use the password {code}.",
)


def check_share(share: float) -> None:
    """A share of the training text: at least 0 (none), below 1 (some corpus left for filler)."""
    if not 0 <= share < 1:
        raise MemlmError(f"--recall-share must be in [0, 1), got {share}")


def recall_documents(
    filler: list[str],
    total_chars: int,
    seed: int,
    facts: tuple[int, int] = (1, 3),
    gap_chars: tuple[int, int] = (200, 2000),
) -> list[str]:
    """Documents of about `total_chars` characters in all, each stating 1-3 facts and restating
    every one (in another order), every sentence followed by `gap_chars` characters of `filler`
    text (slices of its documents, drawn with `seed`): ~50-500 tokens between sentences, so a
    fact comes back from within the same few dozen tokens to past a thousand."""
    if not filler:
        raise ValueError("recall documents need filler text")
    rng = random.Random(seed)
    docs, made = [], 0
    while made < total_chars:
        bound = []
        for _ in range(rng.randint(*facts)):
            who = f"{rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)}"
            if who in (b[0] for b in bound):
                continue
            bound.append((who, "".join(rng.choice("0123456789") for _ in range(4)), rng.choice(TEMPLATES)))
        asked = bound[:]
        rng.shuffle(asked)
        parts = []
        for who, code, template in bound + asked:  # each fact stated, then (shuffled) restated
            parts.append(template.format(who=who, code=code))
            parts.append(_slice(filler, rng.randint(*gap_chars), rng))
        doc = " ".join(parts[:-1])  # it ends on the last restatement
        docs.append(doc)
        made += len(doc)
    return docs


def _slice(filler: list[str], length: int, rng: random.Random) -> str:
    """About `length` characters of one filler document, from a word boundary."""
    text = rng.choice(filler)
    if len(text) <= length:
        return text
    start = rng.randrange(len(text) - length)
    start = text.find(" ", start) + 1  # a whole word first
    return text[start : start + length].rsplit(" ", 1)[0]
