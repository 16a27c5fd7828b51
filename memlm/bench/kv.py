"""`memlm bench kv`: accuracy under a KV budget, per eviction policy.

For every (policy, budget) the model answers the task's held-out problems (test split, greedy,
batched) with each request's cache kept under the budget; the task's own scorer gives the
accuracy. Also reported: the peak KV bytes of any one sequence and decode tok/s (generated
tokens / generation time). `full` (no eviction) runs once; its row is repeated at each budget as
the reference line.

The retrieval probe shows what each policy forgets. A short prompt asks the model to remember
notes; the continuation, fed token by token through the same decode loop and eviction (teacher
forcing, `Engine.score`), states a code early ("The code for Alice is 4729."), then runs through
a long passage of prose, then repeats "The code for Alice is". A probe counts as retrieved when
greedy decoding would produce every digit of the code: the fact must survive ~300 tokens of
eviction.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from memlm.bench.decode import SAMPLE_TEXT
from memlm.bench.report import print_table, pyplot, save_figure, write_outputs
from memlm.cache.eviction import marked_tokens
from memlm.cache.importance import load_predictor
from memlm.cache.policies import POLICIES, SPAN_POLICIES, SPAN_UNITS, OraclePolicy, evicts_prompt
from memlm.cache.spec import PolicySpec
from memlm.data.evaluate import evaluate_task
from memlm.data.tasks import get_task
from memlm.errors import InvalidRequestError, MemlmError
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams

NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Keiko", "Luis"]
PROBE_SYSTEM = "Read the notes carefully. You will be asked about them."
PROBE_USER = "Take notes on the passage, then recall the code."


# ---- the retrieval probe -------------------------------------------------------------------------


def build_probes(tokenizer, n: int, filler_tokens: int = 256, seed: int = 0):
    """-> [(prompt ids, continuation ids, answer length)]: the answer is the continuation's tail."""
    rng = random.Random(seed)
    words = SAMPLE_TEXT.read_text().split()
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": PROBE_USER}],
            add_generation_prompt=True,
        )
    )
    probes = []
    for i in range(n):
        name, code = NAMES[i % len(NAMES)], str(rng.randint(1000, 9999))
        start = rng.randrange(0, max(1, len(words) - 400))
        filler = tokenizer.encode(" ".join(words[start : start + 400]), add_special_tokens=False)[:filler_tokens]
        head = tokenizer.encode(f"The code for {name} is {code}.\n", add_special_tokens=False)
        question = tokenizer.encode(f"\nThe code for {name} is", add_special_tokens=False)
        answer = tokenizer.encode(f" {code}", add_special_tokens=False)
        probes.append((prompt, head + filler + question + answer, len(answer)))
    return probes


def run_probe(engine, probes, policy_factory: Callable | None) -> float:
    """Fraction of probes whose whole answer is what greedy decoding would say."""
    prompts = [p for p, _, _ in probes]
    continuations = [c for _, c, _ in probes]
    policies = [policy_factory() for _ in probes] if policy_factory else None
    results = engine.score(prompts, continuations, kv_policy=policies)
    hits = [all(r.greedy_hits[-n:]) for r, (_, _, n) in zip(results, probes, strict=True)]
    return sum(hits) / len(hits)


# ---- the benchmark -------------------------------------------------------------------------------


def run_kv_bench(
    model: str,
    task_name: str,
    budgets: list[int],
    policies: list[str],
    n: int,
    predictor: str | list[str] | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    probe_n: int = 32,
    probe_filler: int = 256,
    dtype: str = "float32",
    console=None,
    window: int | None = None,
    ratio: float | None = None,
    split: str = "test",
    rescore: float | None = None,
    spans: str = "off",
    span_unit: str = "numbers",
    evict_prompt: bool | None = None,
    threshold: float | None = None,
) -> dict:
    """`window`, `ratio` and `rescore` set the learned policy's recent window, keep ratio and share
    re-scored by attention (its defaults when None); the report records the values used.
    `evict_prompt`: the learned policy lets prompt tokens compete on their score (True), or keeps
    them all (False or None); a predictor folder given as `DIR:evict-prompt` opts in for its row
    alone. `threshold`: the learned policy keeps older tokens scoring >= it (the budget a hard cap)
    instead of the top `ratio` of them. The `oracle` policy (tasks that know which lines each
    answer depends on) keeps those lines' positions in the worked solution, the prompt, and the
    most recent tokens: the ceiling the others are measured against.
    `split`: the held-out problems ("val" to choose settings, "test" to report them). `spans`: the
    scored policies (h2o, tova, snapkv, rkv, learned) keep spans whole ("on"), token by token
    ("off"), or both side by side ("both": a spanned row beside each); or a comma-separated list of
    those that get a spanned row beside them. `span_unit`: what a span is, "numbers" (rows named
    `+spans`) or "lines" (rows named `+lines`)."""
    console = console or Console(stderr=True)
    if split not in ("val", "test"):
        raise MemlmError(f"--split must be val or test (held-out problems), got {split!r}")
    spanned, plain = _span_rows(spans)
    if span_unit not in SPAN_UNITS:
        raise MemlmError(f"--span-unit must be one of {', '.join(SPAN_UNITS)}, got {span_unit!r}")
    suffix = SPAN_SUFFIX[span_unit]
    unknown = [p for p in policies if p not in POLICIES and p != OraclePolicy.name]
    if unknown:
        raise MemlmError(f"unknown KV policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    task = get_task(task_name)
    if OraclePolicy.name in policies and task.key_lines is None:
        raise MemlmError(
            f"the oracle policy needs a task that knows which lines its answers depend on; {task_name} does not"
        )
    max_new_tokens = max_new_tokens or task.max_new_tokens
    engine = Engine.load(model, dtype=dtype)
    given = predictor.split(",") if isinstance(predictor, str) else predictor or []
    folders = [f for f in (g.strip() for g in given) if f]
    if "learned" in policies and not folders:
        raise MemlmError("the learned policy needs --predictor DIR (from `memlm train predictor`)")
    tuning = {
        "window": window,
        "ratio": ratio,
        "rescore": rescore,
        "evict_prompt": evict_prompt,
        "threshold": threshold,
    }
    variants = _learned_variants(folders, engine.config, model, tuning) if "learned" in policies else {}
    if variants:  # a bad window, ratio or rescore fails now; the report records what ran
        learned = spec_factory("learned", max(budgets), next(iter(variants.values())))()
        window, ratio, rescore = learned.window, learned.ratio, learned.rescore
    problems = task.problems(n, split)
    probes = build_probes(engine.tokenizer, probe_n, probe_filler) if probe_n else []

    rows, full_row = [], None
    names = [v for p in policies if p != "full" for v in (variants if p == "learned" else [p])]
    names = [v for name in names for v in _rows_of(name, spanned, plain, suffix)]
    configs = [("full", None)] if "full" in policies else []
    configs += [(name, b) for name in names for b in budgets]
    for policy, budget in configs:
        kind, _, _ = policy.partition("+")
        factory = None
        if policy == OraclePolicy.name:
            factory = _oracle_factory(engine, task, budget)
        elif policy != "full":
            spans_of_row = span_unit if policy.endswith(suffix) else False
            factory = spec_factory(kind.split(":")[0], budget, variants.get(kind), spans_of_row)
        console.print(f"[dim]{policy:8s} budget {budget or '-':>5}[/dim]", end=" ")
        began = time.perf_counter()
        try:
            result = evaluate_task(engine, task, problems, batch_size, max_new_tokens, factory)
            probe = run_probe(engine, probes, factory) if probes and policy != OraclePolicy.name else None
        except InvalidRequestError as e:  # e.g. a prompt longer than the budget, for a policy that keeps prompts
            console.print(f"skipped: {e}")
            rows.append({"policy": policy, "budget": budget, "skipped": str(e)})
            continue
        row = {
            "policy": policy,
            "budget": budget,
            "accuracy": result.accuracy,
            "probe_accuracy": probe,
            "peak_kv_bytes": result.peak_kv_bytes,
            "peak_kv_tokens": result.peak_kv_tokens,
            "decode_tok_s": result.decode_tok_s,
            "generated_tokens": result.generated_tokens,
        }
        console.print(f"accuracy {result.accuracy:.3f}  probe {probe}  ({time.perf_counter() - began:.0f} s)")
        if policy == "full":
            full_row = row
            lengths = [len(engine.encode_prompt(task.messages(p))) for p in problems]
            trace = (sum(lengths) + result.generated_tokens) / len(problems)
        else:
            rows.append(row)
    if full_row is not None:  # the reference, repeated at every budget
        rows = [{**full_row, "budget": b} for b in budgets] + rows
    cost = None
    ran = [r["budget"] for r in rows if r["policy"].startswith("learned") and "skipped" not in r]
    if variants and ran:  # the first predictor's, at its smallest budget that ran (most evictions), spans if any ran
        first = next(iter(variants.values()))
        factory = spec_factory("learned", min(ran), first, "learned" in spanned and span_unit)
        cost = [policy_cost(engine, task, problems, factory, b, max_new_tokens) for b in (1, 8)]
        for c in cost:
            console.print(
                f"learned policy cost, batch {c['batch']}: predictor {c['predictor_frac']:.1%} + eviction "
                f"{c['eviction_frac']:.1%} of a {c['step_ms']:.1f} ms decode step"
            )
    report = {
        "model": model,
        "task": task_name,
        "n": n,
        "split": split,
        "probe_n": probe_n,
        "probe_filler_tokens": probe_filler,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "predictor": ",".join(folders) or None,
        "predictors": {name: folder for name, (folder, _, _) in variants.items()},
        "learned_window": window if "learned" in policies else None,
        "learned_ratio": ratio if "learned" in policies else None,
        "learned_rescore": rescore if "learned" in policies else None,
        "learned_threshold": threshold if "learned" in policies else None,
        # per learned row: whether its prompt tokens could be evicted
        "learned_evict_prompt": {name: opts["evict_prompt"] for name, (_, _, opts) in variants.items()},
        "spans": spans,
        "span_unit": span_unit,
        "mean_full_trace_tokens": trace if full_row is not None else None,
        "learned_cost": cost,
        "rows": rows,
    }
    print_report(report, console)
    write_outputs(report, console, json_path, plot_path, plot_report)
    return report


def policy_cost(engine, task, problems, factory: Callable, batch: int, max_new_tokens: int) -> dict:
    """What a policy's predictor and eviction cost per decode step, against the whole step, with
    `batch` requests decoded together (the engine's phase timings over decode-only steps)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    chosen = [problems[i % len(problems)] for i in range(batch)]
    policies = [factory() for _ in chosen]
    # the span mask is built once per process (0.65 s for lines): not a decode step's cost
    if policies[0] is not None and policies[0].spans:
        marked_tokens(engine.tokenizer, policies[0].spans, engine.config.vocab_size)
    engine.timings = {}
    try:
        engine.generate([task.messages(p) for p in chosen], params, kv_policy=policies)
        timings = engine.timings
    finally:
        engine.timings = None
    steps = timings.get("steps", 0)
    total = sum(v for k, v in timings.items() if k != "steps")
    if not steps or total <= 0:
        raise MemlmError("no decode step was timed")
    return {
        "batch": batch,
        "steps": steps,
        "step_ms": round(1000 * total / steps, 3),
        "predictor_frac": round(timings.get("predictor", 0.0) / total, 4),
        "eviction_frac": round(timings.get("eviction", 0.0) / total, 4),
        "overhead_frac": round((timings.get("predictor", 0.0) + timings.get("eviction", 0.0)) / total, 4),
    }


EVICT_PROMPT = ":evict-prompt"  # a --predictor folder's suffix: its learned row may evict prompt tokens


def _learned_variants(folders: list[str], model_config, model: str, tuning: dict) -> dict[str, tuple]:
    """One learned policy per predictor folder: "learned" alone, "learned:<its label>" side by side,
    with ":prompt" where that policy may evict prompt tokens (the folder's name where two still
    share a name) -> (folder, loaded predictor, its PolicySpec options)."""
    variants = {}
    for given in folders:
        folder, opted = (given.removesuffix(EVICT_PROMPT), True) if given.endswith(EVICT_PROMPT) else (given, False)
        predictor, config = load_predictor(folder, model_config, model)
        options = {k: v for k, v in tuning.items() if v is not None}
        options["evict_prompt"] = evicts_prompt(opted or tuning.get("evict_prompt"))  # resolved once, per row
        label = f"learned:{config.get('label', 'answer')}" + ":prompt" * options["evict_prompt"]
        name = "learned" if len(folders) == 1 else label
        if name in variants:
            name = f"learned:{Path(folder).name}"
        variants[name] = (folder, predictor, options)
    return variants


SPAN_MODES = ("off", "on", "both")
SPAN_SUFFIX = {"numbers": "+spans", "lines": "+lines"}  # a spanned row's name: the policy, then this


def _span_rows(spans: str) -> tuple[frozenset[str], bool]:
    """--spans -> (the scored policies that get a spanned row, whether they keep their plain row)."""
    if spans in SPAN_MODES:
        return frozenset(SPAN_POLICIES if spans != "off" else ()), spans != "on"
    listed = frozenset(s.strip() for s in spans.split(",") if s.strip())
    if not listed or not listed <= set(SPAN_POLICIES):
        raise MemlmError(
            f"--spans must be one of {', '.join(SPAN_MODES)} or a list of {', '.join(SPAN_POLICIES)}, got {spans!r}"
        )
    return listed, True


def _rows_of(name: str, spanned: frozenset[str], plain: bool, suffix: str) -> list[str]:
    """One policy's rows: itself, its spanned form (`suffix`: +spans, +lines), or both."""
    if name.split(":")[0] not in spanned:
        return [name]
    return [name, name + suffix] if plain else [name + suffix]


def spec_factory(policy: str, budget: int, variant: tuple | None, spans: bool | str = False) -> Callable:
    """A fresh policy per request (policies hold no per-row state, but rows never share one): the
    row's PolicySpec, with a learned variant's folder, loaded predictor and options."""
    folder, predictor, options = variant or (None, None, {})
    spec = PolicySpec(policy, budget, predictor=folder, spans=spans, **options)
    spec.build(predictor)  # fail now, once, on a bad (policy, budget)
    return lambda problem=None: spec.build(predictor)


def _oracle_factory(engine, task, budget: int) -> Callable:
    """Per problem: an oracle keeping the positions its worked solution's key lines take when the
    model writes that solution after its prompt."""
    OraclePolicy(budget)  # fail now, once, on a bad budget

    def build(problem):
        start = len(engine.encode_prompt(task.messages(problem)))
        return OraclePolicy(budget, [start + t for t in task.key_tokens(engine.tokenizer, problem)])

    return build


def print_report(report: dict, console) -> None:
    trace = report.get("mean_full_trace_tokens")
    title = f"KV budget vs accuracy: {report['task']} (n={report['n']})"
    if trace:
        title += f", full trace {trace:.0f} tokens on average"
    rows = []
    for r in report["rows"]:
        if "skipped" in r:
            rows.append([r["policy"], str(r["budget"]), "skipped", "", "", ""])
            continue
        probe = "" if r["probe_accuracy"] is None else f"{r['probe_accuracy']:.2f}"
        kib = f"{r['peak_kv_bytes'] / 1024:.0f}"
        rows.append([r["policy"], str(r["budget"]), f"{r['accuracy']:.3f}", probe, kib, f"{r['decode_tok_s']:.1f}"])
    columns = ("policy", "budget", "accuracy", "probe", "peak KV (KiB)", "decode tok/s")
    print_table(console, title, columns, rows, left=("policy",))


def plot_report(report: dict, path: str) -> None:
    plt = pyplot()
    rows = [r for r in report["rows"] if "skipped" not in r]
    probe = any(r.get("probe_accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if probe else 1, figsize=(11 if probe else 6, 4), squeeze=False)
    panels = [("accuracy", f"{report['task']} accuracy")] + ([("probe_accuracy", "retrieval probe")] if probe else [])
    for ax, (key, label) in zip(axes[0], panels, strict=False):
        colors = plt.get_cmap("tab20").colors  # more policies than the default cycle's 10 colors
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows)):
            mine = sorted((r["budget"], r[key]) for r in rows if r["policy"] == policy)
            style = {"linestyle": "--", "color": "black"}
            if policy != "full":  # a spanned row (+spans, +lines) dotted beside the solid plain ones
                style = {"marker": "o", "color": colors[i % len(colors)], "linestyle": ":" if "+" in policy else "-"}
            ax.plot([b for b, _ in mine], [a for _, a in mine], label=policy, **style)
        ax.set_xlabel("KV budget (tokens per sequence)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    trace = report.get("mean_full_trace_tokens")
    fig.suptitle(f"{report['model']}" + (f" (full trace {trace:.0f} tokens)" if trace else ""), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
