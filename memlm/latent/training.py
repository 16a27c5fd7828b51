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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memlm.latent.memory import LatentMemory
from memlm.models.lora import lora_switched

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
    return [[weaver.to_reasoner(hidden[b, s : s + k]) for s, k in mine] for b, mine in enumerate(spans)]


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


class LatentLM(torch.nn.Module):
    """Loss of the frozen reasoner on targets with latent memory woven in: one module for DDP."""

    def __init__(self, memory: LatentMemory):
        super().__init__()
        self.memory = memory
        # Both registered, so DDP and the optimizer see every trainable tensor: the weaver's own
        # (queries, projections) and the LoRA inside the reasoner (its base weights stay frozen).
        self.weaver = memory.weaver
        self.reasoner = memory.weaver.reasoner

    def forward(self, examples: list[LatentExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (summed next-token loss over real target tokens, number of such tokens)."""
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
        logits = model.logits(hidden[scored])
        return F.cross_entropy(logits, labels[scored], reduction="sum"), scored.sum()

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
        model = self.memory.weaver.reasoner
        latents = weave_for_training(self.memory, [example])[0]
        embeds, labels = interleave(model, example, latents)
        hidden = model(embeds[None], torch.arange(embeds.shape[0], device=model.device)[None])[0]
        scored = labels != IGNORE
        logprobs = torch.log_softmax(model.logits(hidden[scored]), -1)
        return logprobs[torch.arange(int(scored.sum())), labels[scored]]
