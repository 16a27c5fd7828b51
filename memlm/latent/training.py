"""Training-time latent memory: the same insertions as generation, differentiable, in two forwards.

For a batch of (prompt, target) examples:

1. Insertion points: after the prompt, and after each target token that is a delimiter (the
   same rule generation applies, `DelimiterSet.is_insertion_point`, with the true next token as
   the peeked one), at most `max_inference_aug` of them, never after the last token.
2. Weaver: one forward (LoRA on) over [tokens, query block 0, query block 1, ...] with a block
   mask. Tokens attend causally to tokens; query block j attends to the tokens before its
   insertion point and causally within itself, at the positions it would have at generation. Its
   rows are exactly what the incremental weaver computes at that point.
3. Reasoner: one forward (LoRA off, frozen) over the interleaved sequence [prompt, latents 0,
   target part 1, latents 1, ...]. The loss is next-token cross-entropy on the real target tokens
   only: no latent slot is ever a label.

A weaver that reads the reasoner's states (`Weaver.input == "states"`) cannot be run in one
forward: insertion j's latents come from the reasoner's keys and values over everything before
it, latents 0..j-1 included. So its twin runs the generation order segment by segment, in a
`SegmentCache` that keeps the graph: the reasoner over [latents j-1, target part j] (appended),
then the weaver's queries over that cache (LoRA on, dropped again), for every insertion point.
Rows of a batch advance together, each at its own positions; a row with nothing left pads.
A weaver that writes keys and values (`Weaver.output == "kv"`) runs the same order, except that
its queries' keys and values stay in the cache as the latent slots (no reasoner pass over them),
and the token after an insertion point is predicted from the delimiter, before the latents, as
generation keeps the token it sampled there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memlm.adapters.lora import lora_switched
from memlm.latent.memory import LatentMemory

IGNORE = -100


@dataclass(slots=True)
class LatentExample:
    prompt: list[int]
    target: list[int]
    points: list[int]  # insert after this many target tokens (0 = right after the prompt)


def insertion_points(memory: LatentMemory, prompt: list[int], target: list[int]) -> list[int]:
    points = [0] if memory.prompt_latents() else []
    sequence = prompt + target
    found = []
    for k in range(1, len(target)):  # after target token k-1, with target[k] following it
        previous = sequence[len(prompt) + k - 2]
        if memory.delimiters.is_insertion_point(previous, target[k - 1], target[k]):
            found.append(k)
    return points + found[: memory.max_inference_aug]


def make_example(memory: LatentMemory, prompt: list[int], target: list[int]) -> LatentExample:
    return LatentExample(prompt, target, insertion_points(memory, prompt, target))


def weave_for_training(memory: LatentMemory, examples: list[LatentExample]) -> list[list[torch.Tensor]]:
    """Per example, the latents [K, d] of each insertion point, from one masked weaver forward."""
    weaver = memory.weaver
    model = weaver.reasoner
    device = model.device
    layouts, width = [], 0
    for ex in examples:
        tokens = ex.prompt + ex.target
        blocks = [("prompt" if k == 0 else "inference", len(ex.prompt) + k) for k in ex.points]
        size = len(tokens) + sum(weaver.num_latents[kind] for kind, _ in blocks)
        layouts.append((tokens, blocks))
        width = max(width, size)
    batch, d = len(examples), model.config.hidden_size
    x = torch.zeros(batch, width, d, dtype=model.dtype, device=device)
    positions = torch.full((batch, width), -1, dtype=torch.long, device=device)
    mask = torch.eye(width, dtype=torch.bool, device=device).repeat(batch, 1, 1)  # padding sees itself
    spans = []
    for b, (tokens, blocks) in enumerate(layouts):
        n = len(tokens)
        x[b, :n] = weaver.to_weaver(model.embed(torch.tensor(tokens, device=device)))
        positions[b, :n] = torch.arange(n)
        mask[b, :n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        start, mine = n, []
        for kind, seen in blocks:
            k = weaver.num_latents[kind]
            x[b, start : start + k] = weaver.queries(kind)
            positions[b, start : start + k] = seen + torch.arange(k)
            mask[b, start : start + k, :seen] = True
            mask[b, start : start + k, start : start + k] = torch.ones(k, k, dtype=torch.bool, device=device).tril()
            mine.append((start, k))
            start += k
        spans.append(mine)
    with lora_switched(model, True):
        hidden = model(x, positions, mask=mask[:, None], depth=weaver.depth)
    return [[weaver.project(hidden[b, s : s + k]) for s, k in mine] for b, mine in enumerate(spans)]


def interleave(model, example: LatentExample, latents: list[torch.Tensor]):
    """-> (embeds [L, d], labels [L]): prompt, latents and target parts in generation order."""
    device = model.device
    embed = model.embed
    parts, labels = [], []
    cut = 0
    segments = list(zip(example.points, latents, strict=True))
    prompt = embed(torch.tensor(example.prompt, device=device))
    parts.append(prompt)
    labels += [IGNORE] * len(example.prompt)
    for k, block in segments + [(len(example.target), None)]:
        if k > cut:
            parts.append(embed(torch.tensor(example.target[cut:k], device=device)))
            labels += example.target[cut:k]
            cut = k
        if block is not None:
            parts.append(block.to(model.dtype))
            labels += [IGNORE] * block.shape[0]
    # labels[i] is the token AT i; shift so position i predicts the next real token.
    next_labels = labels[1:] + [IGNORE]
    return torch.cat(parts), torch.tensor(next_labels, device=device)


class SegmentCache:
    """The keys and values of a forward run in segments, differentiable: each layer's are
    concatenated, never written in place. Rows share the slot axis; `valid` marks which slots
    hold real tokens (padding never becomes a key). The KVCache calls a model makes
    (`begin`/`update`/`end`, `truncate` to drop temporary queries) work unchanged."""

    track_attention = False
    query_observer = None  # no press reads a training forward's queries

    def __init__(self, batch: int, num_layers: int, device):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.last_step = None
        self._real = None

    @property
    def lengths(self) -> torch.Tensor:
        return torch.full((self.valid.shape[0],), self.valid.shape[1], dtype=torch.long, device=self.valid.device)

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        batch, chunk = positions.shape
        real = positions >= 0
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=positions.device).tril()
        # A padding query sees itself only, so that no row of the mask is empty.
        own = causal[None] & real[:, None, :] | torch.eye(chunk, dtype=torch.bool, device=positions.device)
        past = self.valid[:, None, :].expand(batch, chunk, self.valid.shape[1])
        self._real = real
        return torch.cat((past, own), dim=2)[:, None]

    def prepare_queries(self, q: torch.Tensor) -> torch.Tensor:
        return q  # keys are kept as computed (no rotation)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def end(self) -> None:
        self.valid = torch.cat((self.valid, self._real), dim=1)

    def truncate(self, lengths: torch.Tensor) -> None:
        keep = int(lengths.max())
        self.valid = self.valid[:, :keep]
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is not None and k.shape[2] > keep:
                self.k[layer], self.v[layer] = k[:, :, :keep], v[:, :, :keep]


def _segments(memory: LatentMemory, example: LatentExample) -> list[tuple[list[int], str | None]]:
    """Generation order as (tokens fed, kind of the latents written after them or None)."""
    cuts = example.points
    kinds = ["prompt" if k == 0 and memory.prompt_latents() else "inference" for k in cuts]
    out, cut = [], 0
    for i, k in enumerate(cuts):
        out.append(((example.prompt if i == 0 else []) + example.target[cut:k], kinds[i]))
        cut = k
    out.append(((example.prompt if not cuts else []) + example.target[cut:], None))
    return out


def reasoner_states_pass(memory: LatentMemory, examples: list[LatentExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of generation for a weaver that reads the reasoner's states.

    -> (hidden [N, d] at the positions that predict a real target token, those tokens [N]), in
    each example's order, examples one after another."""
    weaver = memory.weaver
    model = weaver.reasoner
    device, d = model.device, model.config.hidden_size
    plans = [_segments(memory, ex) for ex in examples]
    batch, rounds = len(examples), max(len(p) for p in plans)
    cache = SegmentCache(batch, model.config.num_layers, device)
    following = [_next_labels(weaver, ex, plan) for ex, plan in zip(examples, plans, strict=True)]
    kv = weaver.writes_kv
    pending: list[torch.Tensor | None] = [None] * batch  # latents each row feeds before its next tokens
    next_pos = [0] * batch  # the row's position = its index in the interleaved sequence
    picked: list[torch.Tensor] = []  # per round, the states that predict a target token
    order: list[tuple[int, int]] = []  # (row, interleaved index) of each picked state
    for r in range(rounds):
        parts = []
        for b in range(batch):
            tokens = plans[b][r][0] if r < len(plans[b]) else []
            chunk = [] if pending[b] is None else [pending[b].to(model.dtype)]
            if tokens:
                chunk.append(model.embed(torch.tensor(tokens, device=device)))
            parts.append(torch.cat(chunk) if chunk else torch.zeros(0, d, dtype=model.dtype, device=device))
        width = max(part.shape[0] for part in parts)
        x = torch.zeros(batch, width, d, dtype=model.dtype, device=device)
        positions = torch.full((batch, width), -1, dtype=torch.long, device=device)
        for b, part in enumerate(parts):
            n = part.shape[0]
            x[b, :n] = part
            positions[b, :n] = torch.arange(next_pos[b], next_pos[b] + n)
        hidden = model(x, positions, cache)  # LoRA off: the plain reasoner, appended to the cache
        rows, columns = [], []
        for b, part in enumerate(parts):
            for i in range(part.shape[0]):
                if following[b][next_pos[b] + i] != IGNORE:
                    rows.append(b)
                    columns.append(i)
                    order.append((b, next_pos[b] + i))
            next_pos[b] += part.shape[0]
        picked.append(hidden[torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)])
        kinds = [plans[b][r][1] if r < len(plans[b]) else None for b in range(batch)]
        if kv:  # the latent slots are the queries' own keys and values, left in the cache
            next_pos = [p + k for p, k in zip(next_pos, weaver.write_states(cache, next_pos, kinds), strict=True)]
        else:
            pending = weaver.weave_states(cache, next_pos, kinds)
    # Example by example, in sequence order (rounds interleave the rows).
    ranked = sorted(range(len(order)), key=order.__getitem__)
    hidden = torch.cat(picked)[torch.tensor(ranked, dtype=torch.long, device=device)]
    targets = torch.tensor([following[b][g] for b, g in (order[i] for i in ranked)], device=device)
    return hidden, targets


def _next_labels(weaver, example: LatentExample, plan) -> list[int]:
    """For each index of the interleaved sequence, the real target token after it (or IGNORE).

    Latent embeddings are read by the reasoner, so the token after them is predicted from the last
    latent; latent keys and values ("kv") are not, so it is predicted from the token before them."""
    at = []  # the token at each index: a target token, IGNORE (prompt), or None (a latent slot)
    for r, (tokens, _) in enumerate(plan):
        if r > 0 and plan[r - 1][1] is not None:
            at += [None] * weaver.num_latents[plan[r - 1][1]]
        prompt = len(example.prompt) if r == 0 else 0
        at += [IGNORE] * prompt + tokens[prompt:]
    labels, following = [IGNORE] * len(at), IGNORE
    for i in reversed(range(len(at))):
        if at[i] is None and weaver.writes_kv:
            continue
        labels[i], following = following, IGNORE if at[i] is None else at[i]
    return labels


class LatentLM(torch.nn.Module):
    """Loss of the frozen reasoner on targets with latent memory woven in: one module for DDP."""

    def __init__(self, memory: LatentMemory):
        super().__init__()
        self.memory = memory
        # Both registered, so DDP and the optimizer see every trainable tensor: the weaver's own
        # (queries, projections) and the LoRA inside the reasoner (its base weights stay frozen).
        self.weaver = memory.weaver
        self.reasoner = memory.weaver.reasoner

    def scored_states(self, examples: list[LatentExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the reasoner's hidden states [N, d] that predict a real target token, those tokens
        [N]), example by example in sequence order."""
        if self.memory.weaver.reads_states:
            return reasoner_states_pass(self.memory, examples)
        model = self.memory.weaver.reasoner
        all_latents = weave_for_training(self.memory, examples)
        rows = [interleave(model, ex, lat) for ex, lat in zip(examples, all_latents, strict=True)]
        width = max(e.shape[0] for e, _ in rows)
        batch, d = len(rows), model.config.hidden_size
        x = torch.zeros(batch, width, d, dtype=model.dtype, device=model.device)
        positions = torch.full((batch, width), -1, dtype=torch.long, device=model.device)
        labels = torch.full((batch, width), IGNORE, dtype=torch.long, device=model.device)
        for b, (embeds, lab) in enumerate(rows):
            n = embeds.shape[0]
            x[b, :n], labels[b, :n] = embeds, lab
            positions[b, :n] = torch.arange(n)
        hidden = model(x, positions)  # LoRA is off outside the weaver: the plain reasoner
        scored = labels != IGNORE
        return hidden[scored], labels[scored]

    def forward(self, examples: list[LatentExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (summed next-token loss over real target tokens, number of such tokens)."""
        hidden, targets = self.scored_states(examples)
        logits = self.memory.weaver.reasoner.logits(hidden)
        return F.cross_entropy(logits, targets, reduction="sum"), torch.tensor(targets.numel())

    @torch.no_grad()
    def heldout_loss(self, examples: list[LatentExample], batch: int = 8) -> float:
        """Mean next-token loss (nats) over the real target tokens of `examples`."""
        total, count = 0.0, 0
        for start in range(0, len(examples), batch):
            loss, n = self(examples[start : start + batch])
            total, count = total + float(loss), count + int(n)
        return total / max(count, 1)

    def token_logprobs(self, example: LatentExample) -> torch.Tensor:
        """log p of each target token (for tests and evaluation)."""
        hidden, targets = self.scored_states([example])
        logprobs = torch.log_softmax(self.memory.weaver.reasoner.logits(hidden), -1)
        return logprobs[torch.arange(targets.numel()), targets]
