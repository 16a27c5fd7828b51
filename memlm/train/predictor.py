"""Train the DynTS importance predictor on a frozen model's own reasoning traces.

1. Traces: the frozen model answers problems of the task (batched, greedy). Each trace splits at
   the end-of-thinking marker into thinking (before) and answer (the marker onwards); traces
   without a marker are dropped.
2. Labels: the attention the answer tokens pay to each thinking token, averaged over answer
   queries, heads and layers (the DynTS target). Measured with memlm's own cache: prompt and
   thinking are prefilled, the statistics are reset, then the answer chunk runs with attention
   tracking on, so only answer queries count (a query attending to itself only ever concerns
   answer tokens, so the diagonal never enters a thinking token's label). Labels are multiplied
   by the number of keys the answer saw, so uniform attention scores 1 whatever the length.
   The features are the final-layer hidden states of the thinking tokens from the same pass.
   Alternative labels (`label`), for traces where the reasoning itself re-reads earlier lines
   (the answer of a long multiplication reads only the last partial sum, while each partial sum
   was read by later lines): every later query counts, thinking and answer alike, each query's
   attention scaled by the keys it saw (uniform = 1). `future_max` keeps a token's largest such
   attention (one later step that needed it is enough); `future_decay` averages them weighted by
   decay^(distance - 1) (nearby readers count most); `future_far` keeps the largest attention from
   queries more than `horizon` tokens later: reads within the policy's recent window need no
   score (the window keeps those tokens anyway), so the label rates only what must survive the
   window, such as a partial product copied a hundred tokens later, and not the scratch a step
   reads a few tokens after writing it. All come from one cache-less pass over the whole trace
   that records every query's attention, mean over heads, summed over layers.
   With `prompt`, prompt tokens are labelled and trained on too (the same labels, from the same
   queries), for a policy that may evict prompt tokens once their use is over (`evict_prompt`):
   a long multiplication reads its factors until the last row is written, then never again.
3. Training: MSE on the labelled tokens (thinking, and the prompt with `prompt`), base model
   frozen, through the shared loop. Held-out traces (the task's validation split) give the loss
   and the rank agreement (Spearman and Kendall, per trace, averaged) between predicted and true
   importance, next to two baselines: recency (later = more important) and a constant predictor
   for the loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memlm.atomic import write_json_atomic
from memlm.cache.importance import ImportancePredictor, save_predictor
from memlm.cache.kv_cache import KVCache
from memlm.data.tasks import ANSWER_MARKER, Task, get_task
from memlm.errors import MemlmError
from memlm.generation.detokenizer import IncrementalDetokenizer, token_at_char
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.train.loop import TrainConfig, split_loop, train


@dataclass(slots=True)
class Trace:
    ids: list[int]  # prompt + generated tokens
    prompt_length: int
    think_end: int  # index of the first answer token (where the marker starts)


@dataclass(slots=True)
class Labelled:
    hidden: torch.Tensor  # [n, d] final-layer hidden states of the labelled tokens (thinking; + prompt)
    labels: torch.Tensor  # [n] their importance label (scaled: uniform attention = 1)


LABELS = {
    "answer": "mean attention from answer tokens (over queries, heads, layers) x keys seen",
    "future_max": "max over every later query (thinking and answer) of its attention (heads, layers) x keys it saw",
    "future_decay": "mean over every later query of its attention (heads, layers) x keys it saw, "
    "weighted decay^(distance - 1)",
    "future_far": "max over every query more than `horizon` tokens later of its attention (heads, layers) "
    "x keys it saw",
}


@dataclass(slots=True)
class PredictorConfig:
    model: str
    task: str
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    n_train: int = 512
    n_val: int = 64
    marker: str = ANSWER_MARKER
    batch_tokens: int = 512
    batch_size: int = 16  # traces generated at once
    max_new_tokens: int | None = None  # the task's own budget when None
    label: str = "answer"  # one of LABELS
    decay: float = 0.95  # for the future_decay label
    horizon: int = 16  # for the future_far label: match the learned policy's window
    prompt: bool = False  # label prompt tokens too (for the learned policy's evict_prompt)
    dtype: str = "float32"  # the model's weights while tracing and labelling (q4_1: the GGUF's own blocks, faster)

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        """This trainer's loop: 1500 steps at lr 1e-3; warmup, checkpoints and logs scaled to the
        steps (min(100, steps / 10) warmup steps, a checkpoint every max(100, steps / 5), a log row
        every min(50, steps)), unless given."""
        steps = given.get("steps", 1500)
        defaults = {"steps": 1500, "lr": 1e-3, "warmup_steps": min(100, steps // 10)}
        defaults |= {"save_every": max(100, steps // 5), "log_every": min(50, steps)}
        return TrainConfig(out_dir=out_dir, **(defaults | given))

    @classmethod
    def of(cls, model: str, task: str, out_dir: str, **options) -> PredictorConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(model, task, cls.loop(out_dir, **loop), **own)


def collect_traces(engine, task: Task, problems, marker: str, batch_size: int, max_new_tokens: int) -> list[Trace]:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    traces = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        for c in engine.generate([task.messages(p) for p in chunk], params):
            think_end = marker_index(engine.tokenizer, c.token_ids, marker)
            if think_end is not None and think_end > 0:
                n = len(c.prompt_token_ids)
                traces.append(Trace(c.prompt_token_ids + c.token_ids, n, n + think_end))
    return traces


def marker_index(tokenizer, output_ids: list[int], marker: str) -> int | None:
    """Index of the output token where the last `marker` begins, or None."""
    detok, text, ends = IncrementalDetokenizer(tokenizer), "", []
    for token in output_ids:
        text += detok.push(token)
        ends.append(len(text))
    at = text.rfind(marker)
    return None if at < 0 else token_at_char(ends, at)


def _first(trace: Trace, prompt: bool) -> int:
    """The first labelled token: the trace's start with `prompt`, else its first thinking token."""
    return 0 if prompt else trace.prompt_length


@torch.inference_mode()
def label_traces(model, traces: list[Trace], batch_size: int = 16, prompt: bool = False) -> list[Labelled]:
    out = []
    for start in range(0, len(traces), batch_size):
        chunk = traces[start : start + batch_size]
        cache = KVCache.for_model(
            model.config, len(chunk), max(len(t.ids) for t in chunk), model.dtype, model.device, track_attention=True
        )
        heads = [t.ids[: t.think_end] for t in chunk]
        tails = [t.ids[t.think_end :] for t in chunk]
        hidden = model(*_padded(model, heads, [0] * len(chunk)), cache)
        cache.attention_sum.zero_()  # from here on, only answer queries count
        model(*_padded(model, tails, [t.think_end for t in chunk]), cache)
        for row, t in enumerate(chunk):
            first = _first(t, prompt)
            received = cache.attention_sum[row, first : t.think_end] / len(tails[row])
            out.append(Labelled(hidden[row, first : t.think_end].float().cpu(), received.cpu() * t.think_end))
    return out


class _AttentionRecorder(KVCache):
    """A cache that keeps what every query of the chunk paid every key: [B, T, T], the mean over
    heads summed over layers / layers (the same average as the DynTS label)."""

    received: torch.Tensor | None = None

    def observe_attention(self, layer: int, weights: torch.Tensor) -> None:
        received = weights.float().mean(dim=1) / self.num_layers
        self.received = received if layer == 0 else self.received + received


def future_importance(
    received: torch.Tensor, start: int, end: int, kind: str, decay: float = 0.95, horizon: int = 16
) -> torch.Tensor:
    """Labels of the keys start..end-1 from every later query of one trace.

    `received` [T, T]: what query q paid key k (rows: queries). Query q saw q + 1 keys, so its
    attention is scaled by q + 1 (uniform attention scores 1). `future_max`: the largest scaled
    attention any later query paid the key; `future_decay`: their mean weighted by
    decay^(q - k - 1); `future_far`: the largest from queries with q - k > horizon. A key no
    counted query saw gets 0."""
    length = received.shape[0]
    scaled = received[:, start:end] * torch.arange(1, length + 1, dtype=received.dtype)[:, None]
    distance = torch.arange(length)[:, None] - torch.arange(start, end)[None, :]  # q - k
    later = distance > 0
    if kind == "future_max":
        return torch.where(later, scaled, torch.zeros(())).amax(dim=0)
    if kind == "future_far":
        return torch.where(distance > horizon, scaled, torch.zeros(())).amax(dim=0)
    if kind == "future_decay":
        weights = torch.where(later, decay ** (distance - 1).clamp(min=0).to(received.dtype), torch.zeros(()))
        return (weights * scaled).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)
    raise MemlmError(f"unknown importance label {kind!r}; choose one of {', '.join(LABELS)}")


@torch.inference_mode()
def label_traces_future(
    model, traces: list[Trace], kind: str, decay: float, batch_size: int = 8, horizon: int = 16, prompt: bool = False
) -> list[Labelled]:
    """`future_*` labels: one pass over each whole trace, recording attention."""
    out = []
    for start in range(0, len(traces), batch_size):
        chunk = traces[start : start + batch_size]
        longest = max(len(t.ids) for t in chunk)
        cache = _AttentionRecorder.for_model(
            model.config, len(chunk), longest, model.dtype, model.device, track_attention=True
        )
        hidden = model(*_padded(model, [t.ids for t in chunk], [0] * len(chunk)), cache)
        for row, t in enumerate(chunk):
            n, first = len(t.ids), _first(t, prompt)
            labels = future_importance(cache.received[row, :n, :n], first, t.think_end, kind, decay, horizon)
            out.append(Labelled(hidden[row, first : t.think_end].float().cpu(), labels.cpu()))
    return out


def _padded(model, rows: list[list[int]], offsets: list[int]):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (r, offset) in enumerate(zip(rows, offsets, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        positions[i, : len(r)] = torch.arange(offset, offset + len(r))
    return model.embed(ids.to(model.device)), positions.to(model.device)


# ---- rank agreement ---------------------------------------------------------------------------


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():  # few ties in practice; exact handling keeps rho honest
        same = x == value
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else 0.0


def kendall(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b."""
    da = (a[:, None] - a[None, :]).sign()
    db = (b[:, None] - b[None, :]).sign()
    concordance = (da * db).sum().item()
    denominator = ((da != 0).sum().item() * (db != 0).sum().item()) ** 0.5
    return concordance / denominator if denominator > 0 else 0.0


def evaluate_predictor(predictor: ImportancePredictor, data: list[Labelled]) -> dict:
    usable = [d for d in data if len(d.labels) >= 2]
    if not usable:
        raise MemlmError("no held-out trace has two or more thinking tokens")
    with torch.no_grad():
        predicted = [predictor(d.hidden) for d in usable]
    labels = torch.cat([d.labels for d in usable])
    mean = float(torch.cat([d.labels for d in data]).mean())
    recency = [torch.arange(len(d.labels), dtype=torch.float32) for d in usable]
    return {
        "val_mse": float(F.mse_loss(torch.cat(predicted), labels)),
        "val_mse_constant": float(((labels - mean) ** 2).mean()),
        "spearman": _mean(spearman(p, d.labels) for p, d in zip(predicted, usable, strict=True)),
        "kendall": _mean(kendall(p, d.labels) for p, d in zip(predicted, usable, strict=True)),
        "spearman_recency": _mean(spearman(r, d.labels) for r, d in zip(recency, usable, strict=True)),
        "kendall_recency": _mean(kendall(r, d.labels) for r, d in zip(recency, usable, strict=True)),
        "val_traces": len(usable),
        "val_tokens": int(labels.numel()),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---- the command --------------------------------------------------------------------------------


def run_predictor_training(cfg: PredictorConfig, log=print) -> dict:
    if cfg.label not in LABELS:
        raise MemlmError(f"unknown importance label {cfg.label!r}; choose one of {', '.join(LABELS)}")
    if not 0 < cfg.decay < 1:
        raise MemlmError(f"--decay must be in (0, 1), got {cfg.decay}")
    if cfg.horizon < 0:
        raise MemlmError(f"--horizon must be >= 0, got {cfg.horizon}")
    task = get_task(cfg.task)
    engine = Engine.load(cfg.model, dtype=cfg.dtype)
    log(f"traces: {cfg.n_train} training and {cfg.n_val} validation problems of {cfg.task}")
    splits = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        budget = cfg.max_new_tokens or task.max_new_tokens
        traces = collect_traces(engine, task, task.problems(n, split), cfg.marker, cfg.batch_size, budget)
        if not traces:
            raise MemlmError(f"no {split} trace contains the end-of-thinking marker {cfg.marker!r}")
        if cfg.label == "answer":
            splits[split] = label_traces(engine.model, traces, cfg.batch_size, cfg.prompt)
        else:
            splits[split] = label_traces_future(
                engine.model, traces, cfg.label, cfg.decay, min(cfg.batch_size, 8), cfg.horizon, cfg.prompt
            )
        what = "prompt and thinking" if cfg.prompt else "thinking"
        tokens = sum(len(d.labels) for d in splits[split])
        log(f"  {split}: {len(traces)}/{n} traces have the marker, {tokens} {what} tokens labelled")

    return fit_predictor(engine.config.hidden_size, splits["train"], splits["val"], cfg)


def _label_setting(cfg: PredictorConfig) -> str:
    return {"future_decay": f" (decay {cfg.decay})", "future_far": f" (horizon {cfg.horizon})"}.get(cfg.label, "")


def train_mlp(hidden_size: int, train_data: list, batch_tokens: int, loop: TrainConfig):
    """The predictor MLP fitted by MSE to the labels of `train_data` (anything with `hidden` [n, d]
    and `labels` [n]), `batch_tokens` random tokens a step, through the shared loop (its folder:
    loop.out_dir/train). -> (the predictor in eval mode, the loop's last metrics)."""
    features = torch.cat([d.hidden for d in train_data])
    targets = torch.cat([d.labels for d in train_data])
    torch.manual_seed(loop.seed)
    predictor = ImportancePredictor(hidden_size)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        rng = random.Random(loop.seed * 1_000_003 + step)
        index = torch.tensor(rng.sample(range(len(targets)), min(batch_tokens, len(targets))))[rank::world]
        return {"hidden": features[index], "labels": targets[index]}

    def loss_fn(model, batch):
        return F.mse_loss(model(batch["hidden"]), batch["labels"])

    last = train(predictor, loss_fn, batch_fn, loop.inside("train"))
    return predictor.eval(), last


def fit_predictor(hidden_size: int, train_data: list[Labelled], val_data: list[Labelled], cfg: PredictorConfig):
    """MSE on the thinking tokens of `train_data`; metrics on `val_data`; save to cfg.train.out_dir."""
    predictor, last = train_mlp(hidden_size, train_data, cfg.batch_tokens, cfg.train)
    targets = torch.cat([d.labels for d in train_data])
    out = Path(cfg.train.out_dir)
    metrics = {"train_loss": last.get("loss"), **evaluate_predictor(predictor, val_data)}
    config = {
        "base_model": cfg.model,
        "task": cfg.task,
        "marker": cfg.marker,
        "label": cfg.label,
        "dtype": cfg.dtype,
        "label_definition": LABELS[cfg.label] + _label_setting(cfg),
        "prompt": cfg.prompt,  # prompt tokens were labelled too: fit for the policy's evict_prompt
        "train_traces": len(train_data),
        "train_tokens": int(targets.numel()),
        "steps": cfg.train.steps,
        "metrics": metrics,
    }
    save_predictor(out, predictor, config)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
