"""`memlm eval lcm-reach`: does the codebook memory carry the past when the decoder cannot reach it?

Every model here but one has a bounded decoder: its view of the text is cut every W tokens
(`LCMConfig.decoder_window`), so what it knows of earlier segments can only come through the
encoder's z (which reads the whole window) and the grids. Compared, each over seeds:
- the LCM (z -> grids -> z_q), the same with z passed unquantised (no grids), the bounded decoder
  alone, and an unbounded decoder (the ceiling); parameter counts are reported beside them;
- held-out bits per byte by the position of the last token read in windows of L tokens: [0, W)
  (nothing cut yet: every model sees the whole window), [W, 4W), [4W, L);
- the LCM (and the unquantised variant) with z zeroed or shuffled across positions: what the
  decoder takes from the memory, by position;
- a retrieval probe: a made-up fact ("The secret code of the <name> vault is 4817.") stated early,
  asked again after filler text. The score is the bits of the code's tokens when the early fact
  gave the same code, against when it gave another probe's code: the difference is what the
  model carried from the fact. "near": fact and question in the first segment (a decoder that can
  copy at all can copy there); "far": the question more than 4W tokens after the fact;
- what the LCM's loop and grids do on the held-out windows (steps per token, code use per grid).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlm.bench.report import pyplot, save_figure, write_outputs
from memlm.data.packed import TokenData
from memlm.errors import MemlmError
from memlm.lcm.checkpoint import load_lcm
from memlm.lcm.config import LCMConfig
from memlm.lcm.memory import loop_report
from memlm.lcm.model import LCMModel
from memlm.tokenizer import Tokenizer

KINDS = ("lcm", "continuous", "decoder", "unbounded")
AFTER_CUT = 8  # tokens just after a cut, scored apart
LABELS = {
    "lcm": "LCM (grids)",
    "continuous": "LCM, z unquantised",
    "decoder": "bounded decoder alone",
    "unbounded": "unbounded decoder",
}
NAMES = (
    "amber heron", "basalt fox", "cobalt lynx", "dune owl", "ember stag", "frost wren", "granite elk", "harbor seal",
    "iris moth", "jade crane", "kelp otter", "lunar hare", "marble ibis", "north bison", "opal swift", "pine marten",
)  # fmt: skip


@dataclass
class ReachBenchConfig:
    data: str
    models: dict[str, list[str]]  # kind (KINDS) -> model folders, one per seed
    seq_len: int = 1024  # tokens per held-out window
    windows: int = 64
    probes: int = 64
    probe_seed: int = 4321  # the probes' names, codes and filler: drawn apart from any training seed
    progress: bool = True
    buckets: tuple[int, ...] = field(default=(1, 4))  # bucket edges in units of W: [0, W), [W, 4W), [4W, L)


def run_reach_bench(cfg: ReachBenchConfig, json_path: str | None = None, plot_path: str | None = None) -> dict:
    if not cfg.models.get("lcm"):
        raise MemlmError("give at least one LCM model (--lcm)")
    unknown = set(cfg.models) - set(KINDS)
    if unknown:
        raise MemlmError(f"unknown model kind(s) {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    for folders in cfg.models.values():
        for folder in folders:
            if not LCMConfig.is_lcm_folder(folder):
                raise MemlmError(f"{folder} is not an LCM model folder")
    val = TokenData.open(cfg.data, "val")
    tokenizer = Tokenizer.from_folder(cfg.data)
    window = load_lcm(cfg.models["lcm"][0]).config.decoder_window
    if window <= 0:
        raise MemlmError(f"{cfg.models['lcm'][0]} has an unbounded decoder: train it with --decoder-window")
    edges = [0] + [k * window for k in cfg.buckets] + [cfg.seq_len]
    if edges[-2] >= cfg.seq_len:
        raise MemlmError(f"--seq-len {cfg.seq_len} leaves no tokens beyond {edges[-2]} (4W): make it longer")
    far = f"{edges[-2]}-{edges[-1]}"
    bucket_names = [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)]
    masks = [_positions(cfg.seq_len, a, b) for a, b in zip(edges, edges[1:], strict=False)]
    # Beyond the first cut, by the offset in the segment: right after a cut the bounded decoder
    # knows nothing of the text but what z brings.
    after = _positions(cfg.seq_len, window, cfg.seq_len)
    offset = torch.arange(cfg.seq_len) % window
    fresh = min(AFTER_CUT, window)
    masks += [after & (offset < fresh), after & (offset >= fresh)]
    bucket_names += [f"cut+0-{fresh}", f"cut+{fresh}-{window}"]
    say = print if cfg.progress else (lambda *a, **k: None)
    windows = val.eval_windows(cfg.seq_len, cfg.windows)
    probes = _probes(tokenizer, val, window, cfg.probes, cfg.probe_seed)

    result: dict = {
        "setup": {
            "data": cfg.data,
            "decoder_window": window,
            "seq_len": cfg.seq_len,
            "windows": int(windows.shape[0]),
            "buckets": bucket_names,
            "bytes_per_token": val.bytes_per_token,
            "probes": cfg.probes,
            "probe_gap_tokens": {name: p["gap"] for name, p in probes.items()},  # at least this many
            "probe_example": probes["far"]["example"],
        },
        "models": {},
    }
    for kind in KINDS:
        folders = cfg.models.get(kind) or []
        if not folders:
            continue
        runs = []
        for folder in folders:
            model = load_lcm(folder).eval()
            _check(model, val, kind, window)
            run = {"model": folder, "parameters": sum(p.numel() for p in model.parameters())}
            run["bpb"] = _bucket_bpb(model, windows, masks, val.bytes_per_token)
            if model.has_memory:  # what the decoder takes from z, by position
                for ablation in ("zero", "shuffle"):
                    model.set_runtime(z_ablation=ablation)
                    run[f"bpb_z_{ablation}"] = _bucket_bpb(model, windows, masks, val.bytes_per_token)
                model.set_runtime(z_ablation=None)
                run["memory"] = _memory_stats(model, windows)
            run["probe"] = {name: _probe_score(model, p) for name, p in probes.items()}
            say(
                f"{kind:10s} {folder}: "
                + "  ".join(f"{b} {v:.4f}" for b, v in zip(bucket_names, run["bpb"], strict=True))
            )
            runs.append(run)
        result["models"][kind] = {"runs": runs, "summary": _summary(runs, bucket_names)}
    result["goals"] = _goals(result, bucket_names, far)
    write_outputs(result, None, json_path, plot_path, plot)
    return result


def _check(model: LCMModel, val: TokenData, kind: str, window: int) -> None:
    if model.config.vocab_size != val.header["vocab_size"]:
        raise MemlmError(
            f"a model has a vocabulary of {model.config.vocab_size}; the data has {val.header['vocab_size']}"
        )
    expected = 0 if kind == "unbounded" else window
    if model.config.decoder_window != expected:
        raise MemlmError(
            f"--{kind} models must have decoder_window {expected} (the LCM's); one has {model.config.decoder_window}"
        )
    if (kind in ("decoder", "unbounded")) != (not model.has_memory):
        raise MemlmError(f"--{kind} takes {'decoder-alone' if kind in ('decoder', 'unbounded') else 'LCM'} models")


# ---- bits per byte by position ------------------------------------------------------------------


@torch.no_grad()
def token_nats(model: LCMModel, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """[N, L] nats of each next token given the window so far (position t: the token after t)."""
    out = []
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch].to(model.device)
        logits = model(ids[:, :-1])[0]
        out.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu())
    return torch.cat(out)


def _positions(length: int, start: int, end: int) -> torch.Tensor:
    """[length] bool: positions (of the last token read) in [start, end)."""
    t = torch.arange(length)
    return (t >= start) & (t < end)


def _bucket_bpb(
    model: LCMModel, windows: torch.Tensor, masks: list[torch.Tensor], bytes_per_token: float
) -> list[float]:
    nats = token_nats(model, windows)
    return [float(nats[:, m].mean()) / math.log(2) / bytes_per_token for m in masks]


# ---- the retrieval probe --------------------------------------------------------------------------


def _probes(tokenizer: Tokenizer, val: TokenData, window: int, count: int, seed: int) -> dict[str, dict]:
    """Two probe sets ("near": all in the first segment; "far": the question > 4W after the fact),
    each as the token ids of every probe told its own code and told another probe's code.

    The question starts at the same position in both tellings and the filler before it is the
    same tokens (its tail), so the two differ only before the question's segment: a bounded
    decoder alone scores them exactly alike, and any difference is carried by the memory."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        name = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i // len(NAMES) + 1}")
        items.append((name, "".join(rng.choice("0123456789") for _ in range(4))))
    shift = rng.randrange(1, count)  # told another probe's code: a derangement
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    facts = [[encode(f"The secret code of the {who} vault is {code}.") for code in (own, items[(i + shift) % count][1])]
             for i, (who, own) in enumerate(items)]  # fmt: skip
    questions = [encode(f" The secret code of the {who} vault is") for who, _ in items]
    answers = [encode(f" {code}") for _, code in items]
    longest_fact = max(len(f) for pair in facts for f in pair)
    longest_tail = max(len(q) + len(a) for q, a in zip(questions, answers, strict=True))
    fillers = [val.windows([rng.randrange(len(val) - 8 * window)], 8 * window)[0].tolist() for _ in range(count)]
    out = {}
    for name, question_at in (("near", longest_fact + 8), ("far", 4 * window + window // 2 + longest_fact)):
        if name == "near" and question_at + longest_tail > window:
            continue  # W too small for fact and question in one segment: the far probe only
        rows = []
        for fact_pair, question, answer, filler in zip(facts, questions, answers, fillers, strict=True):
            own, other = (
                fact + filler[len(filler) - (question_at - len(fact)) :] + question + answer for fact in fact_pair
            )
            rows.append({"own": own, "other": other, "answer": len(answer)})
        out[name] = {"gap": question_at - longest_fact, "rows": rows, "example": tokenizer.decode(rows[0]["own"])}
    return out


@torch.no_grad()
def _probe_score(model: LCMModel, probe: dict) -> dict:
    """Bits of the answer's tokens told the same code vs another's; carried = their difference."""
    own, other = [], []
    for row in probe["rows"]:
        for told, sink in (("own", own), ("other", other)):
            ids = torch.tensor([row[told]], device=model.device)
            logits = model(ids[:, :-1])[0][0]
            n = row["answer"]
            nats = F.cross_entropy(logits[-n:], ids[0, -n:], reduction="sum")
            sink.append(float(nats) / math.log(2))
    carried = [b - a for a, b in zip(own, other, strict=True)]
    return {
        "bits_own": statistics.fmean(own),
        "bits_other": statistics.fmean(other),
        "carried_bits": statistics.fmean(carried),
        "prefers_own": sum(c > 0 for c in carried) / len(carried),
    }


# ---- memory statistics, summaries -----------------------------------------------------------------


@torch.no_grad()
def _memory_stats(model: LCMModel, windows: torch.Tensor) -> dict:
    if model.config.memory not in ("grids", "single"):
        return {}
    traces = [model(windows[start : start + 4, :-1])[1]["trace"] for start in range(0, windows.shape[0], 4)]
    return {"converge_threshold": model.config.converge_threshold} | loop_report(model.memory, traces)


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summary(runs: list[dict], bucket_names: list[str]) -> dict:
    out: dict = {"parameters": runs[0]["parameters"], "seeds": len(runs)}
    for key in ("bpb", "bpb_z_zero", "bpb_z_shuffle"):
        if key in runs[0]:
            out[key] = {b: _mean_sd([r[key][i] for r in runs]) for i, b in enumerate(bucket_names)}
    out["probe"] = {
        name: {k: _mean_sd([r["probe"][name][k] for r in runs]) for k in ("carried_bits", "prefers_own")}
        for name in runs[0]["probe"]
    }
    return out


def _goals(result: dict, bucket_names: list[str], far: str) -> dict:
    """The issue's goals, read off the summaries (far: the bucket beyond 4W)."""
    models = result["models"]
    lcm = models["lcm"]["summary"]
    goals: dict = {}
    if "decoder" in models:
        decoder = models["decoder"]["summary"]
        gain = decoder["bpb"][far]["mean"] - lcm["bpb"][far]["mean"]
        spread = max(decoder["bpb"][far]["sd"], lcm["bpb"][far]["sd"])
        goals["far_gain_over_bounded_decoder"] = {"bits_per_byte": gain, "seed_spread": spread, "met": gain > spread}
        goals["probe_far_carried_bits"] = {
            "lcm": lcm["probe"]["far"]["carried_bits"]["mean"],
            "bounded_decoder": decoder["probe"]["far"]["carried_bits"]["mean"],
        }
    cost = lcm["bpb_z_zero"][far]["mean"] - lcm["bpb"][far]["mean"]
    goals["zeroing_z_costs_far"] = {"bits_per_byte": cost, "met": cost >= 0.05}
    # What the past beyond the cut is worth (bounded vs unbounded decoder), and how much of what z
    # gives depends on position: its value after the cuts minus its value before the first one
    # (where the decoder sees everything itself, z can only add computation).
    first = bucket_names[0]
    if {"decoder", "unbounded"} <= set(models):
        worth = models["decoder"]["summary"]["bpb"][far]["mean"] - models["unbounded"]["summary"]["bpb"][far]["mean"]
        goals["past_beyond_the_cut_worth"] = worth
    for kind in ("lcm", "continuous"):
        if kind in models:
            m = models[kind]["summary"]
            value = {b: m["bpb_z_zero"][b]["mean"] - m["bpb"][b]["mean"] for b in bucket_names}
            fresh, rest = bucket_names[-2:]
            goals[f"{kind}_z_value"] = value | {
                "beyond_the_cut_minus_before": value[far] - value[first],
                "just_after_a_cut_minus_later": value[fresh] - value[rest],
            }
    return goals


# ---- plot -------------------------------------------------------------------------------------------


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    buckets = result["setup"]["buckets"]
    ax = axes[0]
    series = [(LABELS[k], m["summary"]["bpb"]) for k, m in result["models"].items()]
    if "lcm" in result["models"]:
        series.insert(1, ("LCM, z zeroed", result["models"]["lcm"]["summary"]["bpb_z_zero"]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, [values[b]["mean"] for b in buckets], width, yerr=[values[b]["sd"] for b in buckets], label=label)
    low = min(v[b]["mean"] for _, v in series for b in buckets)
    high = max(v[b]["mean"] for _, v in series for b in buckets)
    ax.set_ylim(low - 0.1 * (high - low) - 0.05, high + 0.1 * (high - low) + 0.05)
    ax.set_xticks(range(len(buckets)), [f"tokens {b}" for b in buckets])
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"by position; decoder cut every W={result['setup']['decoder_window']} (mean ± sd over seeds)")
    ax.legend(fontsize=8)

    ax = axes[1]
    kinds = list(result["models"])
    names = list(result["models"]["lcm"]["summary"]["probe"])
    for i, name in enumerate(names):
        values = [result["models"][k]["summary"]["probe"][name]["carried_bits"] for k in kinds]
        xs = [j + (i - (len(names) - 1) / 2) * 0.4 for j in range(len(kinds))]
        ax.bar(xs, [v["mean"] for v in values], 0.4, yerr=[v["sd"] for v in values], label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(kinds)), [LABELS[k] for k in kinds], rotation=15, fontsize=8)
    ax.set_ylabel("bits of the code saved by the early fact")
    ax.set_title("retrieval probe: the fact stated early, asked late")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
