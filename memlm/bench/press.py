"""`memlm bench press`: task score against compression ratio for each press (kvpress's plot).

For every problem (memlm/data/long_context.py, test seeds) the context is prefilled once, with
everything any press reads observed (attention statistics, the last 64 queries, query statistics,
the learned importance); each (press, ratio) presses a copy of that cache, and each question is
answered greedily from its own copy of the pressed cache (memlm/cache/context_cache.py; the presses'
copies at one ratio decode as one batch). So the cost is one prefill per problem plus short
question-and-answer decodes. snapkv_question's window is
the problem's first question, fed on a copy of the context: in `multi_query` the second question
reads a context pressed for the first.

Reported: the full cache's score per task and length (a task under 60% there is reported but not
used to rank presses), each press's score per (ratio, task, length), the mean over the usable
(task, length) pairs, KV slots held after the press, and the cost: for one problem per length, a
plain prefill against a prefill that observes what the press reads plus the press itself
(scoring, selection, compaction; the learned press's predictor forward included), each timed once.
"""

from __future__ import annotations

import os
import re
import time

import torch

from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.cache.context_cache import ask_each, context_view, prefill_context, press_copy, question_view, split_prompt
from memlm.cache.presses import kept_count, make_press
from memlm.data.long_context import make_problems, score

RATIOS = (0.25, 0.5, 0.75, 0.9)
PRESSES = (
    "random", "streaming_llm", "knorm", "snapkv", "snapkv_question", "expected_attention", "tova",
    "observed_attention", "pyramid:snapkv", "learned",
)  # fmt: skip
USABLE = 0.6  # a task the full cache scores under this is reported, not ranked
WINDOW = 64  # the observation window every prefill keeps (SnapKV's default)


def encode(tokenizer, problem) -> tuple[list[int], list[list[int]]]:
    """(context ids, each question's ids): the chat prompt split where the question starts."""
    context, questions = None, []
    for q in problem.questions:
        ask_for = "number" if len(q.answers) == 1 else "numbers"
        ids, tail = split_prompt(tokenizer, problem.context + "\n\n", f"{q.text} Answer with the {ask_for} only.")
        if context is not None and ids != context:
            raise ValueError("questions of one context must share its tokens")
        context = ids
        questions.append(tail)
    return context, questions


def answer_tokens(question) -> int:
    """Enough tokens for a sentence around the answer's numbers (one token per digit)."""
    return 12 + 7 * len(question.answers)


def _stop_after_numbers(tokenizer, count: int):
    def done(ids: list[int]) -> bool:  # `count` whole numbers written, and something after the last
        return len(re.findall(r"\d{5,}\D", tokenizer.decode(ids))) >= count

    return done


def answer_all(engine, caches, context_length: int, problem, questions: list[list[int]]) -> list[list[float]]:
    """Per cache, each question's score, answered greedily from its own copy of the cache (the
    caches decoded as one batch: e.g. every press's copy at one ratio)."""
    scores: list[list[float]] = [[] for _ in caches]
    for q, ids in zip(problem.questions, questions, strict=True):
        stop = _stop_after_numbers(engine.tokenizer, len(q.answers))
        outs = ask_each(engine.model, caches, context_length, ids, answer_tokens(q), engine.eos_ids, stop)
        for got, out in zip(scores, outs, strict=True):
            got.append(score(engine.tokenizer.decode(out), q))
    return scores


def _mean(values) -> float:
    values = [v for v in values if v is not None]  # None: not run (a task the full cache fails)
    return sum(values) / len(values) if values else float("nan")


@torch.inference_mode()
def run_press_bench(
    engine,
    presses=PRESSES,
    ratios=RATIOS,
    tasks=("needle", "multi_key", "multi_value", "variable_track", "multi_query"),
    lengths=(1000, 2000),
    n: int = 4,
    predictor=None,
    skip_unusable: bool = True,
    json_path: str | None = None,
    plot_path: str | None = None,
    console=None,
    log=print,
) -> dict:
    model, tokenizer = engine.model, engine.tokenizer
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    built = {name: make_press(name, 0.0, predictor) for name in presses}  # what each press reads
    track = any(p.needs_attention for p in built.values())
    stats = any(p.needs_query_stats for p in built.values())
    # per (task, length): question scores; per press, ratio, task, length: question scores
    full: dict[str, dict[int, list[float]]] = {t: {length: [] for length in lengths} for t in tasks}
    got = {p: {r: {t: {length: [] for length in lengths} for t in tasks} for r in ratios} for p in presses}
    started = time.perf_counter()
    for length in lengths:
        for task in tasks:
            # every problem's prefill and full-cache answers first: a task the full cache fails is not pressed
            runs = []
            for problem in make_problems(task, length, n, count):
                context, questions = encode(tokenizer, problem)
                ctx = prefill_context(model, context, len(context) + 8, WINDOW, stats, track)
                full[task][length] += answer_all(engine, [ctx.cache], ctx.length, problem, questions)[0]
                runs.append((problem, questions, ctx))
            pressed = not skip_unusable or _mean(full[task][length]) >= USABLE
            for problem, questions, ctx in runs if pressed else ():
                importance = predictor(ctx.hidden).float() if predictor is not None else None
                views = {
                    name: question_view(model, ctx, questions[0], press)
                    if press.question_window
                    else context_view(ctx, press, importance)
                    for name, press in built.items()
                }
                scored = {name: p.flat_scores(views[name]) if p.ratio_free else None for name, p in built.items()}
                for ratio in ratios:  # every press's copy at this ratio answers in one batch
                    keeps = [make_press(name, ratio, predictor).keep(views[name], scored[name]) for name in presses]
                    caches = [press_copy(ctx, keep) for keep in keeps]
                    answered = answer_all(engine, caches, ctx.length, problem, questions)
                    for name, scores in zip(presses, answered, strict=True):
                        got[name][ratio][task][length] += scores
            log(
                f"{length} {task}: {n} problems, full {_mean(full[task][length]):.2f}"
                f"{'' if pressed else ' (under 60%: not pressed)'}, {time.perf_counter() - started:.0f}s"
            )
        if json_path:  # what is done so far survives an interrupted run
            done = lengths[: lengths.index(length) + 1]
            write_outputs(_report(engine, presses, ratios, tasks, done, n, full, got), None, json_path + ".partial")
    report = _report(engine, presses, ratios, tasks, lengths, n, full, got)
    report["cost"] = measure_cost(engine, presses, lengths, predictor, count)
    report["seconds"] = time.perf_counter() - started
    if console is not None:
        print_report(report, console)
    report = _clean(report)
    write_outputs(report, console, json_path, plot_path, plot_report)
    return report


def _report(engine, presses, ratios, tasks, lengths, n, full, got) -> dict:
    report = {
        "model": engine.name,
        "lengths": list(lengths),
        "tasks": list(tasks),
        "ratios": list(ratios),
        "presses": list(presses),
        "problems_per_task": n,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "full": {t: {str(x): _mean(full[t][x]) for x in lengths} for t in tasks},
        "questions": {t: {str(x): len(full[t][x]) for x in lengths} for t in tasks},
        "scores": {
            p: {str(r): {t: {str(x): _mean(got[p][r][t][x]) for x in lengths} for t in tasks} for r in ratios}
            for p in presses
        },
    }
    usable = [(t, x) for t in tasks for x in lengths if _mean(full[t][x]) >= USABLE]
    report["usable"] = [f"{t}@{x}" for t, x in usable]
    report["full_usable_mean"] = _mean(_mean(full[t][x]) for t, x in usable)
    report["usable_mean"] = {
        p: {str(r): _mean(_mean(got[p][r][t][x]) for t, x in usable) for r in ratios} for p in presses
    }
    report["kept_tokens"] = {str(x): {str(r): kept_count(x, r) for r in ratios} for x in lengths}
    # tasks asking several questions of one context: the score of each question by its place (the
    # first is the one snapkv_question's window saw); answers are listed problem by problem
    report["by_question"] = {}
    for t in tasks:
        for x in lengths:
            k = len(full[t][x]) // n
            if k > 1:
                split = {"full": [_mean(full[t][x][i::k]) for i in range(k)]}
                split |= {f"{p}@{r}": [_mean(got[p][r][t][x][i::k]) for i in range(k)] for p in presses for r in ratios}
                report["by_question"][f"{t}@{x}"] = split
    return report


def measure_cost(engine, presses, lengths, predictor, count) -> dict:
    """Per length, one needle problem: a plain prefill's seconds (the faster of two), and per press
    (at ratio 0.5) the prefill observing what it reads plus the press (scoring, selection,
    compaction), each once."""
    model, tokenizer = engine.model, engine.tokenizer
    cost = {}
    for length in lengths:
        problem = make_problems("needle", length, 1, count)[0]
        context, questions = encode(tokenizer, problem)
        # the fastest of two plain prefills: the first of a run also pays for warming up
        plain = min(prefill_context(model, context, len(context) + 8).seconds for _ in range(2))
        rows = {}
        for name in presses:
            press = make_press(name, 0.5, predictor)
            window = press.window if not press.question_window else WINDOW
            ctx = prefill_context(
                model, context, len(context) + 8, window, press.needs_query_stats, press.needs_attention
            )
            start = time.perf_counter()
            importance = predictor(ctx.hidden).float() if press.needs_importance else None
            view = context_view(ctx, press, importance)
            ctx.cache.compact(0, press.keep(view))
            rows[name] = {"prefill_s": ctx.seconds, "press_s": time.perf_counter() - start}
        cost[str(length)] = {"context_tokens": len(context), "plain_prefill_s": plain, "presses": rows}
    return cost


def print_report(report: dict, console) -> None:
    ratios = report["ratios"]
    rows = [[t, *(f"{report['full'][t][str(length)]:.2f}" for length in report["lengths"])] for t in report["tasks"]]
    print_table(
        console, "full cache, per task and length", ["task", *map(str, report["lengths"])], rows, left=("task",)
    )
    rows = [["full", *(_cell(report["full_usable_mean"]) for _ in ratios)]]
    rows += [[p, *(_cell(report["usable_mean"][p][str(r)]) for r in ratios)] for p in report["presses"]]
    title = f"mean over usable {', '.join(report['usable'])}"
    print_table(console, title, ["press", *map(str, ratios)], rows, left=("press",))
    for length, c in report["cost"].items():
        plain = c["plain_prefill_s"]
        rows = [
            [p, f"{v['prefill_s']:.2f}", f"{v['press_s'] * 1000:.1f}", f"{100 * v['press_s'] / plain:.1f}%"]
            for p, v in c["presses"].items()
        ]
        title = f"cost at {length} ({c['context_tokens']} tokens; plain prefill {plain:.2f}s)"
        columns = ["press", "prefill s", "press ms", "press / plain prefill"]
        print_table(console, title, columns, rows, left=("press",))


def _cell(value) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def plot_report(report: dict, path: str) -> None:
    """kvpress's figure: score against compression ratio, one line per press, one panel per task
    (mean over the lengths where the task is usable, i.e. pressed); the full cache is every line's
    score at ratio 0."""
    plt = pyplot()
    tasks, lengths = report["tasks"], [str(x) for x in report["lengths"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False, sharey=True)
    ratios = [0.0, *report["ratios"]]
    for ax, task in zip(axes[0], tasks, strict=True):
        used = [x for x in lengths if f"{task}@{x}" in report["usable"]]  # where its presses ran
        shown = used or lengths
        full = _mean(report["full"][task][x] for x in shown)
        for i, press in enumerate(report["presses"]):
            ys = [full, *(_mean(report["scores"][press][str(r)][task][x] for x in shown) for r in report["ratios"])]
            style = (
                {"linewidth": 2.5, "color": "black"} if press == "learned" else {"linestyle": ("-", "--", ":")[i % 3]}
            )
            ax.plot(ratios, ys, marker="os^vD<>"[i % 7], markersize=3, label=press, **style)
        where = f"{', '.join(used)} tokens" if used else "full < 60%: not ranked"
        ax.set_title(f"{task} ({where})", fontsize=9)
        ax.set_xlabel("compression ratio (share removed)")
        ax.set_xlim(-0.03, 0.93)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (mean over the usable lengths)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def _clean(value):
    """NaN (a press not run on a task the full cache fails) -> None, for strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def merge_reports(reports: list[dict]) -> dict:
    """Runs over different lengths (same presses, ratios, tasks) as one report; the usable means are
    recomputed over every usable (task, length)."""
    first = reports[0]
    merged = {k: first[k] for k in ("model", "tasks", "ratios", "presses")}
    merged["lengths"] = [x for r in reports for x in r["lengths"]]
    merged["problems_per_task"] = {str(x): r["problems_per_task"] for r in reports for x in r["lengths"]}
    merged["threads"] = first["threads"]
    merged["load_average"] = {str(r["lengths"][0]): r["load_average"] for r in reports}
    for key in ("full", "questions"):
        merged[key] = {t: {x: v for r in reports for x, v in r[key][t].items()} for t in first["tasks"]}
    merged["scores"] = {
        p: {
            str(q): {t: {x: v for r in reports for x, v in r["scores"][p][str(q)][t].items()} for t in first["tasks"]}
            for q in first["ratios"]
        }
        for p in first["presses"]
    }
    usable = [
        (t, str(x)) for t in first["tasks"] for x in merged["lengths"] if (merged["full"][t][str(x)] or 0) >= USABLE
    ]
    merged["usable"] = [f"{t}@{x}" for t, x in usable]
    merged["full_usable_mean"] = _mean(merged["full"][t][x] for t, x in usable)
    merged["usable_mean"] = {
        p: {str(q): _mean(merged["scores"][p][str(q)][t][x] for t, x in usable) for q in first["ratios"]}
        for p in first["presses"]
    }
    merged["kept_tokens"] = {x: v for r in reports for x, v in r["kept_tokens"].items()}
    merged["by_question"] = {k: v for r in reports for k, v in r.get("by_question", {}).items()}
    merged["cost"] = {x: v for r in reports for x, v in r["cost"].items()}
    merged["seconds"] = sum(r["seconds"] for r in reports)
    return _clean(merged)


if __name__ == "__main__":  # python -m memlm.bench.press OUT.json OUT.png RUN.json [RUN.json ...]
    import json
    import sys

    from rich.console import Console

    out_json, out_png, *runs = sys.argv[1:]
    merged = merge_reports([json.loads(open(path).read()) for path in runs])
    merged["runs"] = runs
    print_report(merged, Console())
    write_outputs(merged, Console(), out_json, out_png, plot_report)
