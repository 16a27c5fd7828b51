"""What the command modules share: option types (each defined once), and the helpers behind them:
integer lists, --out checked first, the engine, sampling parameters, a latent memory, the KV-policy
group (-> a PolicySpec) and the training-loop group (-> a trainer's config with its TrainConfig).

Nothing here imports torch: `memlm --help` stays fast. What needs it is imported inside the helper
that runs it, when a command runs.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated

import typer

from memlm.atomic import ensure_dir
from memlm.errors import MemlmError

DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_POLICIES = ("full", "window", "clear", "sinks", "h2o", "tova", "snapkv", "rkv", "learned")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name or path (HF folder or .gguf).")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Weights: auto (the default: a GGUF file runs on its own blocks, each tensor in its format; "
        "anything else in float32), float32, bfloat16, int8 (dynamic int8 linears), or GGUF blocks q4_0, "
        "q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k (native kernels; converts other blocks). Add :q8_0 "
        "(e.g. q4_k:q8_0) to quantize activations per block like llama.cpp: faster, not exact."
    ),
]
TaskOpt = Annotated[str, typer.Option(help="Reasoning task (memlm.data.tasks).")]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write results here.")]
MemoryOpt = Annotated[str | None, typer.Option(help="Latent memory folder (from `memlm train weaver`).")]
TriggerOpt = Annotated[
    str | None,
    typer.Option(help="Override the memory's trigger: always, never, or learned / sequence (if it has one)."),
]
DataOpt = Annotated[str, typer.Option("--data", help="Packed token data folder (from `memlm data pack`).")]
BatchSizeOpt = Annotated[int, typer.Option(help="Requests decoded together.")]
MaxTokensOpt = Annotated[
    int | None, typer.Option(help="Most tokens per answer (default: the task's own, 256; long_mult 512).")
]
# How the KV cache is stored (the engine's KVCacheConfig); parameters named cache_* so that the
# kv_* policy group stays what `policy_spec` collects.
KvCacheTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-cache-type",
        help="KV cache storage: f32, bf16, q8_0 or q4_0 (llama.cpp's blocks of 32; default: the model's dtype).",
    ),
]
KvMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-memory", help="KV block pool budget: bytes (2GiB, 512MB) or tokens (65536). Default: grows as needed."
    ),
]
KvBlockSizeOpt = Annotated[int, typer.Option("--kv-block-size", help="Tokens per KV block.")]
KvRotateOpt = Annotated[
    bool, typer.Option("--kv-rotate", help="Hadamard-rotate keys and queries before storing (helps q4_0).")
]
PrefixCachingOpt = Annotated[
    bool,
    typer.Option("--prefix-caching/--no-prefix-caching", help="Reuse cached KV blocks of shared prompt prefixes."),
]
PagedKvOpt = Annotated[
    bool, typer.Option("--paged-kv/--no-paged-kv", help="KV blocks from one pool (off: one tensor per batch).")
]


def kv_cache_config(cache_type, cache_memory, cache_block_size, cache_rotate, prefix_caching, paged_kv):
    """The KV storage group -> a KVCacheConfig, its names and sizes checked before any model loads."""
    from memlm.cache.blocks import KVCacheConfig, parse_kv_memory  # lazy: torch
    from memlm.cache.kv_format import kv_format

    if cache_type is not None:
        kv_format(cache_type)
    if cache_memory is not None:
        parse_kv_memory(cache_memory, 1.0)
        if not paged_kv:
            raise MemlmError("--kv-memory sizes the paged pool: drop --no-paged-kv")
    if cache_block_size < 1:
        raise MemlmError("--kv-block-size must be >= 1")
    return KVCacheConfig(cache_type, cache_memory, cache_block_size, cache_rotate, prefix_caching, paged_kv)


def int_list(text: str, option: str) -> list[int]:
    """"1,8,16" -> [1, 8, 16]: positive integers, or a one-line error naming `option`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MemlmError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise MemlmError(f"{option} needs positive integers")
    return values


def check_out(out: str) -> None:
    """Check --out before any work: required, and a folder that can be created and written."""
    if not out:
        raise MemlmError("--out is required")
    ensure_dir(out)


def load_engine(model: str, dtype: str, kv_cache=None):
    import memlm  # lazy: the engine loads torch

    return memlm.load(model, dtype=dtype, kv_cache=kv_cache)


def load_memory(folder: str | None, engine, trigger: str | None = None):
    """--memory DIR (with --trigger) on `engine`, or None."""
    if folder is None:
        if trigger is not None:
            raise MemlmError("--trigger needs --memory DIR")
        return None
    from memlm.latent.memory import LatentMemory  # lazy: torch

    return LatentMemory.load(folder, engine, trigger=trigger)


# ---- sampling (memlm generate; chat names the same options without help) -----------------------

MaxNewTokensOpt = Annotated[int, typer.Option(help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy.")]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")]
MinPOpt = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(help="> 1 discourages repeats.")]
StopOpt = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
SeedSamplingOpt = Annotated[int | None, typer.Option(help="Seed for sampling.")]


def sampling_params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed):
    from memlm.generation.params import SamplingParams  # lazy: the generation package loads torch

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop=list(stop or []),
        seed=seed,
    )


# ---- the KV-policy group (memlm generate) -----------------------------------------------------

KvPolicyOpt = Annotated[
    str, typer.Option(help="KV-cache eviction: full, window, clear, sinks, h2o, tova, snapkv, rkv, learned.")
]
KvBudgetOpt = Annotated[int | None, typer.Option(help="Most tokens the KV cache keeps (with --kv-policy).")]
KvPredictorOpt = Annotated[str | None, typer.Option(help="Importance predictor folder for --kv-policy learned.")]
KvWindowOpt = Annotated[
    int | None,
    typer.Option(
        help="--kv-policy learned, snapkv, rkv: the most recent tokens always kept (default 8; snapkv and rkv "
        "score older tokens by their attention)."
    ),
]
KvRatioOpt = Annotated[
    float | None,
    typer.Option(help="--kv-policy learned: share of older tokens an eviction keeps, in (0, 1] (default 0.5)."),
]
KvRescoreOpt = Annotated[
    float | None,
    typer.Option(help="--kv-policy learned: share of kept older tokens chosen by current attention (default 0)."),
]
KvSpansOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-spans",
        metavar="UNIT",
        help="--kv-policy h2o, tova, snapkv, rkv, learned: keep or drop spans whole, numbers or lines.",
    ),
]
KvThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help="--kv-policy learned: threshold mode, keep older tokens whose importance is >= this (the budget a "
        "hard cap) instead of the top --kv-ratio of them."
    ),
]
KvSinksOpt = Annotated[
    int | None, typer.Option(help="--kv-policy sinks: the first tokens always kept (attention sinks; default 4).")
]
KvEvictPromptOpt = Annotated[
    bool | None,
    typer.Option(
        "--kv-evict-prompt/--kv-keep-prompt",
        help="--kv-policy learned: let prompt tokens compete on their score, or keep them all "
        "(default: keep them, however the predictor was trained).",
        show_default=False,
    ),
]


KvPressOpt = Annotated[
    str | None,
    typer.Option(
        help="Compress the prompt once after its prefill: random, streaming_llm, knorm, snapkv, snapkv_question, "
        "expected_attention, tova, observed_attention, learned (--kv-predictor), pyramid:<per-layer press>."
    ),
]
KvPressRatioOpt = Annotated[
    float | None, typer.Option(help="--kv-press: share of the prompt's KV removed, in [0, 1) (default 0.5).")
]


def policy_spec(**kv):
    """The --kv-* group (a command's `kv_<option>` parameters, passed by name) -> a PolicySpec, checked
    (names, budgets, which options go with which policy). A new spec field needs only its flag."""
    from memlm.cache.spec import PolicySpec  # lazy: the policies load torch

    return PolicySpec(name=kv.pop("kv_policy"), **{name.removeprefix("kv_"): value for name, value in kv.items()})


def load_kv_predictor(spec) -> tuple:
    """A learned spec's predictor, loaded from its folder: (predictor, its config), else (None, None).
    Check it against the model with `check_kv_predictor` once the model is loaded."""
    if spec.name != "learned" and spec.press != "learned":
        return None, None
    from memlm.cache.importance import load_predictor  # lazy: torch

    return load_predictor(spec.predictor)


def check_kv_predictor(spec, config: dict | None, engine, model: str) -> None:
    if config is not None:
        from memlm.cache.importance import check_predictor  # lazy: torch

        check_predictor(spec.predictor, config, engine.config, model)


# ---- the training-loop group (memlm train ...) -------------------------------------------------
# Every trainer takes --out, --steps, --lr, --save-every, --resume (some --grad-accum, --seed); their
# values become the trainer's TrainConfig (`trainer_config`). The defaults are each command's own.

StepsOpt = Annotated[int, typer.Option(help="Optimizer steps.")]
StageStepsOpt = Annotated[int, typer.Option(help="Optimizer steps of this stage.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate.")]
SaveEveryOpt = Annotated[int, typer.Option(help="Checkpoint every N steps.")]
SaveEveryBpbOpt = Annotated[int, typer.Option(help="Checkpoint (and held-out bits/byte) every N steps.")]
GradAccumOpt = Annotated[int, typer.Option(help="Micro-batches per step.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")]

# a command's argument -> the TrainConfig field it sets
LOOP_OPTIONS = {
    "out": "out_dir",
    "steps": "steps",
    "lr": "lr",
    "save_every": "save_every",
    "grad_accum": "grad_accum",
    "seed": "seed",
    "resume": "resume",
}


def pick(cls, args: dict) -> dict:
    """The arguments named like the fields of dataclass `cls`."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in args.items() if k in names}


def trainer_config(cls, args: dict, **given):
    """A trainer's config from a command's arguments (`dict(locals())`, taken first thing): the
    training-loop group becomes its `train` (`cls.of` adds that trainer's own loop defaults), the
    arguments named like its fields fill them, and `given` adds the rest (renamed or built)."""
    # An option left at None takes the trainer's own default.
    loop = {field: args[name] for name, field in LOOP_OPTIONS.items() if args.get(name) is not None}
    return cls.of(**(pick(cls, args) | loop | given))
