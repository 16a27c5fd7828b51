"""Train the learned press: from each prompt token's hidden state, the attention future queries pay it.

The DynTS predictor's architecture (memlm/cache/importance.py) on prompt tokens, query-agnostic as
KVzip/KVzap are: its labels come from full-cache runs of *many* questions about the same context.

1. Contexts: long-context problems of the training seeds (memlm/data/long_context.py; the bench
   draws test seeds), each with every question it has plus one that asks for every number in the
   text, each question followed by its gold answer (teacher-forced: the queries that write an
   answer are the ones that must find it). Or (`text`: a corpus such as gensim:enwiki) windows of
   ordinary text, whose one question is KVzip's: repeat the text, answered by the text itself, so
   the label is what reconstructing the context reads in it (the peak attention any one repeating
   query pays a token: `peak_attention`) -- nothing of the tasks is seen, and the held-out
   contexts (still the tasks', val seeds) measure the transfer.
2. Labels (`context_labels`): the context is prefilled once; for each question a copy of its cache
   starts attention statistics from zero and reads question + answer in one chunk, so
   `attention_sum` holds what those queries paid each context slot (mean over heads and layers,
   summed over the queries); divided by the number of queries, times the context length (uniform
   attention = 1). A slot's label is the max over the questions (one question that needs it is
   enough), and the target is log1p(label): sinks draw hundreds of times the uniform attention,
   needles a few times, and only the ranking matters to a press.
3. Training: MSE on every context token through the shared loop; held-out contexts (another seed
   range) give the rank agreement (Spearman) and the share of needle-answer tokens the predictor
   keeps at 50% and 75% compression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memlm.atomic import write_json_atomic
from memlm.cache.context_cache import copy_cache, prefill_context, split_prompt
from memlm.cache.importance import ImportancePredictor, save_predictor
from memlm.cache.presses import kept_count
from memlm.data.long_context import make_problem
from memlm.errors import MemlmError
from memlm.train.loop import TrainConfig, split_loop
from memlm.train.predictor import spearman, train_mlp

TRAIN_TASKS = ("needle", "multi_key", "multi_value", "variable_track")
ALL_NUMBERS = "List every number that appears in the text above."
LABEL = "log1p(max over questions of the mean attention of question+answer queries (heads, layers) x context length)"
TEXT_LABEL = "log1p(max over the queries repeating the text of their attention (mean over heads, layers) x keys seen)"
REPEAT = "Repeat the text above word for word."


@dataclass(slots=True)
class Labelled:
    hidden: torch.Tensor  # [n, d] final-norm hidden states of the context
    labels: torch.Tensor  # [n] log1p(label)
    answer_slots: torch.Tensor  # [k] context slots holding an answer's digits (for the keep-rate metric)


@dataclass(slots=True)
class PressTrainConfig:
    model: str
    train: TrainConfig
    lengths: tuple[int, ...] = (1000, 2000)
    n_train: int = 24  # contexts per length (spread over the tasks)
    n_val: int = 4
    batch_tokens: int = 2048
    dtype: str = "float32"
    text: str | None = None  # train on this corpus's windows with the repeat question (None: the tasks)

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        steps = given.get("steps", 600)
        defaults = {"steps": 600, "lr": 1e-3, "warmup_steps": min(50, steps // 10)}
        defaults |= {"save_every": max(100, steps // 2), "log_every": min(50, steps)}
        return TrainConfig(out_dir=out_dir, **(defaults | given))

    @classmethod
    def of(cls, model: str, out_dir: str, **options) -> PressTrainConfig:
        loop, own = split_loop(options)
        return cls(model, cls.loop(out_dir, **loop), **own)


def question_set(problem) -> list[tuple[str, str]]:
    """(question, gold answer) pairs about one context: its own questions and every number in it."""
    pairs = [(q.text, "The answer is " + ", ".join(q.answers) + ".") for q in problem.questions]
    numbers = list(dict.fromkeys(re.findall(r"\d{5}", problem.context)))
    return [*pairs, (ALL_NUMBERS, ", ".join(numbers) + ".")]


@torch.inference_mode()
def question_attention(model, ctx, tokens: list[int]) -> torch.Tensor:
    """[n] the mean attention the query tokens, fed after the context in one chunk, pay each context
    slot (mean over heads and layers), from a copy of the context's cache."""
    cache = copy_cache(ctx.cache)
    cache.track(attention=True, importance=False)
    positions = torch.arange(ctx.length, ctx.length + len(tokens))[None]
    model.forward_tokens(torch.tensor([tokens], device=model.device), positions, cache)
    return cache.attention_sum[0, : ctx.length].float() / len(tokens)


@torch.inference_mode()
def peak_attention(model, ctx, tokens: list[int]) -> torch.Tensor:
    """[n] the most attention any one query token, fed after the context in one chunk, pays each
    context slot (mean over heads and layers), scaled by the number of keys that query saw (uniform
    = 1): KVzip's score. Repeating a text, each query reads mostly the token it copies next, so
    the *mean* is flat (every token is copied once); the peak separates the tokens a copy must read
    (digits, names) from those it can predict."""
    cache = copy_cache(ctx.cache)
    cache.track(attention=True, importance=False)
    n, layers, received = ctx.length, model.config.num_layers, []

    def observe(layer: int, weights: torch.Tensor) -> None:  # weights [1, heads, T, width]
        part = weights[0].float().mean(dim=0)[:, :n] / layers
        received[:] = [part if layer == 0 else received[0] + part]

    cache.observe_attention = observe  # this copy only: the statistic the labels need
    positions = torch.arange(n, n + len(tokens))
    model.forward_tokens(torch.tensor([tokens], device=model.device), positions[None], cache)
    return (received[0] * (positions + 1)[:, None].float()).amax(dim=0)


def context_labels(model, tokenizer, problem, ctx=None, pairs=None, peak=False) -> tuple[list[int], torch.Tensor, torch.Tensor]:  # noqa: E501
    """(context ids, hidden [n, d], labels [n] before log1p: max over questions of the attention x n,
    or with `peak` of `peak_attention`); the questions are `pairs` ((question, answer) about
    `problem.context`) or the problem's own."""
    pairs = pairs or question_set(problem)
    tails = []
    context = None
    for question, answer in pairs:
        ids, tail = split_prompt(tokenizer, problem.context + "\n\n", question)
        context = context or ids
        tails.append(tail + tokenizer.encode(answer, add_special_tokens=False))
    if ctx is None:
        ctx = prefill_context(model, context, len(context) + max(map(len, tails)) + 8)
    if peak:
        label = torch.stack([peak_attention(model, ctx, tail) for tail in tails]).amax(dim=0)
    else:
        label = torch.stack([question_attention(model, ctx, tail) for tail in tails]).amax(dim=0) * ctx.length
    return context, ctx.hidden.float(), label


def answer_slots(tokenizer, context: list[int], problem) -> torch.Tensor:
    """Context slots of the digits of every answer (SmolLM2 writes one token per digit)."""
    answers = {a for q in problem.questions for a in q.answers}
    text, slots, ends = "", [], []
    for token in context:
        text += tokenizer.decode([token], skip_special_tokens=False)
        ends.append(len(text))
    for answer in answers:
        for m in re.finditer(answer, text):
            start = 0
            for slot, end in enumerate(ends):
                if end > m.start() and start < m.end():
                    slots.append(slot)
                start = end
    return torch.tensor(sorted(set(slots)), dtype=torch.long)


@dataclass(slots=True)
class TextContext:
    context: str  # a window of a corpus: what `context_labels` reads of a problem


def label_text(model, tokenizer, source: str, n_per_length: int, lengths, log=print) -> list[Labelled]:
    """Windows of a corpus (consecutive, none shared between lengths), each labelled by the
    attention that repeating it pays its tokens."""
    from memlm.data.corpus import corpus_windows  # lazy: reads a corpus

    stream = [t for w in corpus_windows(tokenizer, source, sum(lengths) * n_per_length // 256 + 1, 256) for t in w]
    out, at = [], 0
    for length in lengths:
        for i in range(n_per_length):
            if len(stream) < at + length:
                raise MemlmError(f"--text {source}: too short for {n_per_length} windows per length")
            text = tokenizer.decode(stream[at : at + length])
            at += length
            problem = TextContext(text)
            context, hidden, label = context_labels(model, tokenizer, problem, pairs=[(REPEAT, text)], peak=True)
            out.append(Labelled(hidden, torch.log1p(label), torch.zeros(0, dtype=torch.long)))
            log(f"  train {length} {source} #{i}: {len(context)} tokens labelled")
    return out


def label_contexts(model, tokenizer, split: str, n_per_length: int, lengths, log=print) -> list[Labelled]:
    """Labelled contexts of the split's seeds, the tasks taking turns."""
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    base = {"train": 3_100_000, "val": 3_900_000}[split]  # apart from the bench's test seeds
    out = []
    for length in lengths:
        for i in range(n_per_length):
            task = TRAIN_TASKS[i % len(TRAIN_TASKS)]
            problem = make_problem(task, length, base + i, count)
            context, hidden, label = context_labels(model, tokenizer, problem)
            out.append(Labelled(hidden, torch.log1p(label), answer_slots(tokenizer, context, problem)))
            log(f"  {split} {length} {task} #{i}: {len(context)} tokens labelled")
    return out


def keep_rate(scores: torch.Tensor, slots: torch.Tensor, ratio: float) -> float:
    """Share of `slots` among the top (1 - ratio) of `scores`."""
    kept = scores.topk(kept_count(len(scores), ratio)).indices
    return float(torch.isin(slots, kept).float().mean()) if len(slots) else float("nan")


def evaluate(predictor: ImportancePredictor, data: list[Labelled]) -> dict:
    with torch.no_grad():
        predicted = [predictor(d.hidden) for d in data]
    metrics = {"val_mse": float(F.mse_loss(torch.cat(predicted), torch.cat([d.labels for d in data])))}
    metrics["spearman"] = _mean(spearman(p, d.labels) for p, d in zip(predicted, data, strict=True))
    for ratio in (0.5, 0.75):
        metrics[f"answer_kept@{ratio}"] = _mean(
            keep_rate(p, d.answer_slots, ratio) for p, d in zip(predicted, data, strict=True)
        )
        metrics[f"answer_kept_by_label@{ratio}"] = _mean(keep_rate(d.labels, d.answer_slots, ratio) for d in data)
    return metrics


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def run_press_training(cfg: PressTrainConfig, log=print) -> dict:
    from memlm.generation.engine import Engine  # lazy: the engine's imports are heavy

    if not cfg.lengths or cfg.n_train < 1 or cfg.n_val < 1:
        raise MemlmError("--lengths, --n-train and --n-val must be non-empty and >= 1")
    engine = Engine.load(cfg.model, dtype=cfg.dtype)
    model, tokenizer = engine.model, engine.tokenizer
    splits = {
        "train": label_text(model, tokenizer, cfg.text, cfg.n_train, cfg.lengths, log)
        if cfg.text
        else label_contexts(model, tokenizer, "train", cfg.n_train, cfg.lengths, log),
        "val": label_contexts(model, tokenizer, "val", cfg.n_val, cfg.lengths, log),  # the tasks: the transfer
    }
    predictor, last = train_mlp(engine.config.hidden_size, splits["train"], cfg.batch_tokens, cfg.train)
    tokens = sum(len(d.labels) for d in splits["train"])
    out = Path(cfg.train.out_dir)
    metrics = {"train_loss": last.get("loss"), **evaluate(predictor, splits["val"])}
    config = {
        "base_model": cfg.model,
        "kind": "press",
        "label_definition": TEXT_LABEL if cfg.text else LABEL,
        "tasks": [] if cfg.text else list(TRAIN_TASKS),
        "text": cfg.text,  # trained on this corpus (the repeat question) instead of the tasks
        "lengths": list(cfg.lengths),
        "dtype": cfg.dtype,
        "prompt": True,  # trained on prompt tokens: its scores rank prompt tokens
        "train_contexts": len(splits["train"]),
        "train_tokens": tokens,
        "steps": cfg.train.steps,
        "metrics": metrics,
    }
    save_predictor(out, predictor, config)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
