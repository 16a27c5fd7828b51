"""`memlm bench memgen`: does latent memory help? Five variants on the same held-out problems.

(a) vanilla: the base reasoner; (b) lora_sft: the reasoner fine-tuned with LoRA on the same data
and step budget (`memlm train sft`); (c) weaver: the frozen reasoner with the MemGen weaver and
the `always` trigger (`memlm train weaver`); (d) weaver_trigger: the same weaver with the learned
trigger (`memlm train trigger`), and (e) weaver_never: that folder with the `never` trigger (the
prompt's latents only), so the trigger is judged between its two extremes. Several LoRA-SFT
adapters or weavers (SFT, GRPO, ...) are rows of their own, named `LABEL=PATH`; each weaver can also
run under insertion caps (the seed allows 5 per answer, memlm's weavers were trained with 8). Each
answers the task's test split greedily; reported per variant: accuracy (the task's scorer), the
share of answers that are the worked solution line for line (every step right, not only the
answer), insertions per answer, decode tok/s and its ratio to vanilla. Variants without a path
are left out.

Forgetting (MemGen's case for a frozen reasoner): fine-tuning the reasoner's weights can cost
what it could already do, a memory beside frozen weights should not. With `retain_task` each
variant also answers that task's test problems, and with `text` it scores held-out prose
(perplexity over `text_windows` windows, teacher-forced through the same decode loop, the memory
weaving at its trigger points as it would while generating).

Task decode speed mixes two things: what weaving costs, and how long the answers are (a model
that rambles to the token limit decodes at a different batch occupancy than one that stops
early). So each variant is also timed with every answer forced to exactly `speed_tokens` new
tokens (EOS ignored), both as one batch and one request at a time: those ratios are the cost of
the memory itself. They differ on a CPU: a single stream is bound by reading the weights, so a
few extra positions per step are nearly free, while a batch is bound by arithmetic, so every
position the weaver reads or the reasoner attends to costs its share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.console import Console

from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.data.corpus import corpus_windows
from memlm.data.evaluate import evaluate_task
from memlm.data.tasks import get_task
from memlm.errors import MemlmError
from memlm.formats.loading import load_model
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.latent.memory import LatentMemory, saved_config
from memlm.latent.trigger import TRAINED

SINGLE_STREAMS = 2  # requests timed one at a time
TRAINED_OWN = "trained"  # a variant's trigger: the folder's own trained one (learned or sequence)


@dataclass(frozen=True, slots=True)
class Variant:
    """One row: a model (the reasoner, or a LoRA-SFT adapter folder), with a latent memory or not."""

    name: str
    model: str
    memory: str | None = None
    trigger: str | None = None  # the memory runs with this trigger (always / never / TRAINED_OWN)
    cap: int | None = None  # most inference insertions per answer, in place of the memory's own


def labelled(values: str | list[str] | None, default: str, flag: str) -> list[tuple[str, str]]:
    """`PATH` or `LABEL=PATH` values -> [(label, path)]; an unlabelled one is called `default`, and
    only one may be unlabelled (two rows of one name would be indistinguishable in the table)."""
    if not values:
        return []
    out = []
    for value in [values] if isinstance(values, str) else values:
        label, sep, path = value.partition("=")
        out.append((label, path) if sep and label.isidentifier() else (default, value))
    names = [label for label, _ in out]
    if len(set(names)) != len(names):
        raise MemlmError(f"label each {flag} as LABEL=PATH when giving more than one (labels: {', '.join(names)})")
    return out


def plan_variants(
    model: str,
    lora_sft=None,
    weaver=None,
    weaver_trigger: str | None = None,
    caps: list[int] | None = None,
) -> list[Variant]:
    """The rows, in order: vanilla; each LoRA-SFT adapter; each weaver with the `always` trigger,
    then with each insertion cap; the weaver + learned trigger folder, learned and `never`."""
    plan = [Variant("vanilla", model)]
    plan += [Variant(label, path) for label, path in labelled(lora_sft, "lora_sft", "--lora-sft")]
    for label, path in labelled(weaver, "weaver", "--weaver"):
        plan.append(Variant(label, model, path, "always"))
        plan += [Variant(f"{label}_cap{cap}", model, path, "always", cap) for cap in caps or []]
    if weaver_trigger:
        plan.append(Variant("weaver_trigger", model, weaver_trigger, TRAINED_OWN))
        plan.append(Variant("weaver_never", model, weaver_trigger, "never"))
    return plan


def solutions_exact(task, problems, completions: list[str]) -> float | None:
    """The share of answers that are the task's worked solution line for line (every step right, not
    only the answer), or None for a task without worked solutions."""
    if not hasattr(task, "solution"):
        return None
    same = [c.strip() == task.solution(p).strip() for p, c in zip(problems, completions, strict=True)]
    return sum(same) / max(1, len(same))


def check_memories(plan: list[Variant]) -> None:
    """Every row's memory folder is readable, and a row that runs a folder's own trigger has one,
    before the first row spends minutes: a mistake in the last flag fails at once."""
    for variant in plan:
        if variant.memory is None:
            continue
        config = saved_config(variant.memory)
        if variant.trigger == TRAINED_OWN and config.get("trigger") not in TRAINED:
            raise MemlmError(f"{variant.memory} has no trained trigger (`memlm train trigger` writes one)")


def run_memgen_bench(
    model: str,
    task_name: str,
    n: int,
    lora_sft: str | list[str] | None = None,
    weaver: str | list[str] | None = None,
    weaver_trigger: str | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    speed_tokens: int = 128,
    console=None,
    retain_task: str | None = None,
    text: str | None = None,
    text_windows: int = 16,
    text_tokens: int = 256,
    caps: list[int] | None = None,
) -> dict:
    """`lora_sft` and `weaver` are a folder or a list of them, each `PATH` or `LABEL=PATH` (the row's
    name); `caps`: each weaver is also run with at most this many insertions per answer."""
    console = console or Console(stderr=True)
    task = get_task(task_name)
    plan = plan_variants(model, lora_sft, weaver, weaver_trigger, caps)
    check_memories(plan)
    problems = task.problems(n, "test")
    retain = get_task(retain_task) if retain_task else None
    retain_problems = retain.problems(n, "test") if retain else []
    windows = _text_windows(model, text, text_windows, text_tokens) if text else []
    rows = []
    for variant in plan:
        engine = Engine.load(variant.model)
        memory = None
        if variant.memory:
            own = variant.trigger == TRAINED_OWN
            memory = LatentMemory.load(variant.memory, engine, trigger=None if own else variant.trigger)
            if variant.cap is not None:
                memory.max_inference_aug = variant.cap
        console.print(f"[dim]{variant.name}...[/dim]")
        result = evaluate_task(engine, task, problems, batch_size, max_new_tokens, memory=memory)
        rows.append(
            {
                "variant": variant.name,
                "task": task_name,
                "n": n,
                "accuracy": result.accuracy,
                "solutions_exact": solutions_exact(task, problems, result.completions),
                "insertions_per_answer": result.insertions_per_answer,
                "decode_tok_s": result.decode_tok_s,
                "generated_tokens": result.generated_tokens,
            }
        )
        if memory is not None:  # what the memory is: the weaver's input, output and start, its cap
            rows[-1] |= {
                "weaver_input": memory.config.get("weaver_input", "embeddings"),
                "weaver_output": memory.config.get("weaver_output", "embeddings"),
                "init": memory.config.get("init"),
                "objective": memory.config.get("objective", "sft"),
                "max_inference_aug": memory.max_inference_aug,
            }
        if speed_tokens:
            batch = problems[:batch_size]
            rows[-1]["fixed_len_tok_s"] = _fixed_length_tok_s(engine, task, [batch], memory, speed_tokens)
            singles = [[p] for p in problems[:SINGLE_STREAMS]]
            rows[-1]["single_tok_s"] = _fixed_length_tok_s(engine, task, singles, memory, speed_tokens)
        if retain is not None:
            kept = evaluate_task(engine, retain, retain_problems, batch_size, memory=memory)
            rows[-1]["retain_accuracy"] = kept.accuracy
        if windows:
            rows[-1]["text_perplexity"] = text_perplexity(engine, windows, memory, batch_size)
    _add_ratio(rows, "decode_tok_s", "speed_vs_vanilla")
    if windows:
        _add_ratio(rows, "text_perplexity", "text_perplexity_vs_vanilla")
    _add_ratio(rows, "fixed_len_tok_s", "fixed_len_speed_vs_vanilla")
    _add_ratio(rows, "single_tok_s", "single_speed_vs_vanilla")
    report = {"model": model, "task": task_name, "n": n, "speed_tokens": speed_tokens, "rows": rows}
    report |= {"retain_task": retain_task, "text": text, "text_windows": len(windows), "text_tokens": text_tokens}
    _print(report, console)
    write_outputs(report, console, json_path, plot_path, _plot)
    return report


def _text_windows(model: str, source: str, count: int, tokens: int) -> list[list[int]]:
    """`count` windows of `tokens` tokens of a corpus with the model's tokenizer: the same text for
    every variant."""
    return corpus_windows(load_model(model).tokenizer, source, count, tokens)


def text_perplexity(engine, windows: list[list[int]], memory=None, batch_size: int = 16) -> float:
    """exp(mean NLL) of every window's tokens after its first, teacher-forced through the engine's
    decode loop (`Engine.score`), with the memory inserting wherever its trigger fires."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        for scored in engine.score([w[:1] for w in chunk], [w[1:] for w in chunk], memory=memory):
            total -= sum(scored.logprobs)
            count += len(scored.logprobs)
    return math.exp(total / count)


def _fixed_length_tok_s(engine, task, batches, memory, tokens: int) -> float:
    """Decode tok/s over these batches of problems, every answer exactly `tokens` long (prefill
    included); the engine is already warm from the task run."""
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    generated, elapsed = 0, 0.0
    for problems in batches:
        began = time.perf_counter()
        completions = engine.generate([task.messages(p) for p in problems], params, memory=memory)
        elapsed += time.perf_counter() - began
        generated += sum(len(c.token_ids) for c in completions)
    return generated / elapsed


def _add_ratio(rows: list[dict], key: str, ratio_key: str) -> None:
    base = next((r.get(key) for r in rows if r["variant"] == "vanilla"), None)
    for r in rows:
        r[ratio_key] = r[key] / base if base and r.get(key) else None


def _print(report: dict, console) -> None:
    columns = ["variant", "accuracy", "whole solution", "insertions / answer", "decode tok/s", "vs vanilla"]
    if report["speed_tokens"]:
        columns += ["vs vanilla, fixed length", "vs vanilla, one request"]
    if report.get("retain_task"):
        columns.append(f"{report['retain_task']} accuracy")
    if report.get("text"):
        columns.append("text perplexity")

    def ratio(value):
        return f"{value:.2f}x" if value else ""

    rows = []
    for r in report["rows"]:
        exact = r.get("solutions_exact")
        cells = [r["variant"], f"{r['accuracy']:.3f}", "" if exact is None else f"{exact:.3f}"]
        cells.append(f"{r['insertions_per_answer']:.2f}")
        cells += [f"{r['decode_tok_s']:.1f}", ratio(r["speed_vs_vanilla"])]
        if report["speed_tokens"]:
            cells += [ratio(r["fixed_len_speed_vs_vanilla"]), ratio(r["single_speed_vs_vanilla"])]
        if report.get("retain_task"):
            cells.append(f"{r['retain_accuracy']:.3f}")
        if report.get("text"):
            cells.append(f"{r['text_perplexity']:.2f}")
        rows.append(cells)
    print_table(console, f"MemGen on {report['task']} (n={report['n']})", columns, rows, left=("variant",))


def _plot(report: dict, path: str) -> None:
    plt = pyplot()
    rows = report["rows"]
    names = [r["variant"] for r in rows]
    panels = [("accuracy", "accuracy")]
    if any(r.get("solutions_exact") is not None for r in rows):
        panels.append(("solutions_exact", "worked solution exact"))
    panels.append(("insertions_per_answer", "insertions per answer"))
    panels.append(("speed_vs_vanilla", "decode speed / vanilla"))
    if report.get("retain_task"):
        panels.append(("retain_accuracy", f"kept: {report['retain_task']} accuracy"))
    if report.get("text"):
        panels.append(("text_perplexity_vs_vanilla", "kept: text perplexity / vanilla"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    x = list(range(len(names)))
    for ax, (key, label) in zip(axes, panels, strict=True):
        if key == "speed_vs_vanilla" and report["speed_tokens"]:
            series = [(key, "task answers, batched", "#4477aa")]
            series.append(("fixed_len_speed_vs_vanilla", f"{report['speed_tokens']} tokens each, batched", "#ee7733"))
            series.append(("single_speed_vs_vanilla", f"{report['speed_tokens']} tokens, one request", "#228833"))
            for j, (name, label_, color) in enumerate(series):
                ax.bar([i + (j - 1) * 0.27 for i in x], [r[name] or 0 for r in rows], 0.27, color=color, label=label_)
            ax.legend(fontsize=6)
        else:
            ax.bar(x, [r[key] or 0 for r in rows], color="#4477aa")
        ax.set_xticks(x, names)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{report['model']} on {report['task']} (n={report['n']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
