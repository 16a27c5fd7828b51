"""`memlm bench memgen`: does latent memory help? Four variants on the same held-out problems.

(a) vanilla: the base reasoner; (b) lora_sft: the reasoner fine-tuned with LoRA on the same data
and step budget (`memlm train sft`); (c) weaver: the frozen reasoner with the MemGen weaver and
the `always` trigger (`memlm train weaver`); (d) weaver_trigger: the same weaver with the learned
trigger (`memlm train trigger`). Each answers the task's test split greedily; reported per
variant: accuracy (the task's scorer), insertions per answer, decode tok/s and its ratio to
vanilla. Variants without a path are left out.
"""

from __future__ import annotations

from memlm.atomic import atomic_write, write_json_atomic

VARIANTS = ("vanilla", "lora_sft", "weaver", "weaver_trigger")


def run_memgen_bench(
    model: str,
    task_name: str,
    n: int,
    lora_sft: str | None = None,
    weaver: str | None = None,
    weaver_trigger: str | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    console=None,
) -> dict:
    from rich.console import Console

    from memlm.data.evaluate import evaluate_task
    from memlm.data.tasks import get_task
    from memlm.generation.engine import Engine
    from memlm.latent.memory import LatentMemory

    console = console or Console(stderr=True)
    task = get_task(task_name)
    problems = task.problems(n, "test")
    plan = [("vanilla", model, None), ("lora_sft", lora_sft, None)]
    plan += [("weaver", model, weaver), ("weaver_trigger", model, weaver_trigger)]
    rows = []
    for variant, model_path, memory_path in plan:
        if model_path is None or (variant.startswith("weaver") and memory_path is None):
            continue
        engine = Engine.load(model_path)
        memory = LatentMemory.load(memory_path, engine) if memory_path else None
        console.print(f"[dim]{variant}...[/dim]")
        result = evaluate_task(engine, task, problems, batch_size, max_new_tokens, memory=memory)
        rows.append(
            {
                "variant": variant,
                "task": task_name,
                "n": n,
                "accuracy": result.accuracy,
                "insertions_per_answer": result.insertions_per_answer,
                "decode_tok_s": result.decode_tok_s,
                "generated_tokens": result.generated_tokens,
            }
        )
    base = next((r["decode_tok_s"] for r in rows if r["variant"] == "vanilla"), None)
    for r in rows:
        r["speed_vs_vanilla"] = r["decode_tok_s"] / base if base else None
    report = {"model": model, "task": task_name, "n": n, "rows": rows}
    _print(report, console)
    if json_path:
        write_json_atomic(json_path, report)
    if plot_path:
        _plot(report, plot_path)
    return report


def _print(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"MemGen on {report['task']} (n={report['n']})")
    for column in ("variant", "accuracy", "insertions / answer", "decode tok/s", "vs vanilla"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in report["rows"]:
        ratio = f"{r['speed_vs_vanilla']:.2f}x" if r["speed_vs_vanilla"] else ""
        table.add_row(
            r["variant"], f"{r['accuracy']:.3f}", f"{r['insertions_per_answer']:.2f}", f"{r['decode_tok_s']:.1f}", ratio
        )
    console.print(table)


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["variant"] for r in rows]
    panels = [("accuracy", "accuracy"), ("insertions_per_answer", "insertions per answer")]
    panels.append(("speed_vs_vanilla", "decode speed / vanilla"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.bar(names, [r[key] or 0 for r in rows], color="#4477aa")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{report['model']} on {report['task']} (n={report['n']})", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
