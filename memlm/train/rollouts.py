"""Groups of sampled answers, for the RL trainers (the trigger's REINFORCE, the weaver's GRPO).

RL from a task's score only has signal in a *mixed* group, one that holds right and wrong answers:
where all score the same, every advantage is 0. A reasoner that half-solves a task on average does
not half-solve each problem (some are always right, others always wrong), so the trainers can first
screen problems and draw only those whose group was mixed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from memlm.atomic import write_json_atomic
from memlm.data.evaluate import evaluate_saved
from memlm.errors import MemlmError
from memlm.generation.params import SamplingParams
from memlm.train.loop import CHECKPOINT, TrainConfig


def is_mixed(scores: list[float]) -> bool:
    """Does a group hold both a right (>= 0.5) and a wrong answer, so that its advantages differ?"""
    right = sum(s >= 0.5 for s in scores)
    return 0 < right < len(scores)


def sample_answers(engine, memory, task, problems, group_size: int, temperature: float, max_new_tokens: int, rng):
    """`group_size` sampled answers per problem (each with its own seed from `rng`), `memory` woven in
    by its trigger: completions problem by problem, a group's answers next to each other."""
    prompts = [task.messages(p) for p in problems for _ in range(group_size)]
    params = [
        SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=rng.randrange(2**31))
        for _ in prompts
    ]
    return engine.generate(prompts, params, memory=memory)


def mixed_problems(task, problems, completions, group_size: int) -> tuple[list[int], dict]:
    """Indices of the problems whose group (`group_size` completions each, in order) is mixed, and
    a summary: screened, mixed, mixed_fraction, score (the share of right answers)."""
    kept, right = [], 0
    for index, problem in enumerate(problems):
        group = completions[index * group_size : (index + 1) * group_size]
        scores = [task.score(c.text, problem) for c in group]
        right += sum(s >= 0.5 for s in scores)
        if is_mixed(scores):
            kept.append(index)
    summary = {
        "screened": len(problems),
        "mixed": len(kept),
        "mixed_fraction": len(kept) / max(1, len(problems)),
        "score": right / max(1, len(problems) * group_size),
    }
    return kept, summary


SCREENING = "screening.json"


def screened(
    problems: list, screen, problems_per_step: int, out_dir: str | Path | None = None, resume: bool = False
) -> tuple[list, dict | None]:
    """The problems RL draws from: all of them when `screen` is None, else those `screen(problems)`
    (-> kept indices, summary) keeps, at least a step's worth. -> (problems, the summary or None).

    With `out_dir` the kept indices are saved there (screening.json), and a resumed run reads them
    back instead of screening again: the screen samples every problem's group (the slowest part of
    a short run), and with the starting weights and seeds it would keep the same problems anyway."""
    if screen is None:
        return problems, None
    cache = Path(out_dir) / SCREENING if out_dir is not None else None
    if resume and cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("problems") == len(problems):
            return [problems[i] for i in saved["kept"]], saved["summary"]
    kept, summary = screen(problems)
    if len(kept) < problems_per_step:
        raise MemlmError(
            f"only {len(kept)} of {len(problems)} screened problems gave a mixed group; "
            "screen more, or change --temperature or --group-size"
        )
    if cache is not None:
        write_json_atomic(cache, {"problems": len(problems), "kept": list(kept), "summary": summary})
    return [problems[i] for i in kept], summary


def save_rl_result(memory, cfg, report: dict, screening: dict | None) -> dict:
    """The end of an RL run on a latent memory: save it to out_dir/memory, and the `report` (with the
    memory's folder, the screening summary and, if cfg.n_eval, held-out accuracy of what was saved)
    to out_dir/eval.json. `cfg`: the trainer's config (model, task, n_eval, train.out_dir)."""
    out = Path(cfg.train.out_dir)
    folder = memory.save(out / "memory")
    report = {"memory": str(folder), **report}
    if screening is not None:
        report["screening"] = screening
    if cfg.n_eval:
        report["eval"] = evaluate_saved(cfg.model, cfg.task, cfg.n_eval, memory=str(folder))
    write_json_atomic(out / "eval.json", report)
    return report


def loop_config(train: TrainConfig) -> TrainConfig:
    """The loop's settings for an RL run (its out_dir/train). A run stopped after its screening but
    before its first checkpoint resumes the screening only: `--resume` then starts the steps afresh
    instead of failing for want of a checkpoint."""
    loop = train.inside("train")
    if loop.resume and not (Path(loop.out_dir) / CHECKPOINT).is_file():
        loop = replace(loop, resume=False)
    return loop
