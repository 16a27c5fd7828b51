"""`memlm train ...`: sft, predictor, press, weaver, trigger (Llama-family models and their memories), lcm
and lm (models trained from scratch on packed data). Every trainer runs the shared loop (progress,
checkpoints, --resume); its loop options are one group (options.py) that becomes its TrainConfig."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from memlm.cli.options import (
    DEFAULT_MODEL,
    DataOpt,
    DtypeOpt,
    GradAccumOpt,
    LrOpt,
    ModelOpt,
    ResumeOpt,
    SaveEveryBpbOpt,
    SaveEveryOpt,
    SeedOpt,
    StageStepsOpt,
    StepsOpt,
    TaskOpt,
    check_out,
    int_list,
    pick,
    trainer_config,
)
from memlm.data.tasks import get_task
from memlm.errors import MemlmError
from memlm.latent.spec import WeaverSpec

train_app = typer.Typer(no_args_is_help=True, help="Training commands (shared loop: progress, checkpoints, --resume).")

ExamplesPerStepOpt = Annotated[int, typer.Option(help="Examples per step.")]
WindowsPerStepOpt = Annotated[int, typer.Option(help="Windows per step.")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per window.")]
NTrainOpt = Annotated[int, typer.Option(help="Training problems (train split).")]
NEvalOpt = Annotated[int, typer.Option(help="Held-out problems scored at the end (0 = skip).")]
NValLossOpt = Annotated[
    int, typer.Option(help="Validation problems whose loss is logged at each checkpoint (0 = skip).")
]
MemoryOutOpt = Annotated[str, typer.Option("--out", help="Output folder (memory/, train/, eval.json).")]
ModelOutOpt = Annotated[str, typer.Option("--out", help="Output folder (model/, train/, report.json).")]


@train_app.command("sft")
def train_sft(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[
        str,
        typer.Option(
            help="Reasoning task (memlm.data.tasks), or a mix NAME:WEIGHT,... (shares of the training problems); "
            "every task is evaluated."
        ),
    ] = "chain_sum",
    out: Annotated[str, typer.Option("--out", help="Output folder (adapter/ or model/, train/, eval.json).")] = "",
    steps: StepsOpt = 250,
    batch_size: ExamplesPerStepOpt = 8,
    lr: LrOpt = 1e-3,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tune.")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 32.0,
    n_train: NTrainOpt = 4000,
    n_eval: NEvalOpt = 64,
    n_val_loss: NValLossOpt = 32,
    answer_weight: Annotated[
        float, typer.Option(help="Loss weight of the answer line's tokens (from 'Answer:' on); the reasoning's is 1.")
    ] = 1.0,
    grad_accum: GradAccumOpt = 1,
    save_every: SaveEveryOpt = 25,
    resume: ResumeOpt = False,
):
    """Fine-tune a model on a task's worked solutions (LoRA by default); save it for --model."""
    args = dict(locals())
    from memlm.train.sft import SFTConfig, run_sft  # lazy: torch

    check_out(out)
    report = run_sft(trainer_config(SFTConfig, args))
    print(json.dumps(report, indent=2))


@train_app.command("predictor")
def train_predictor(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "chain_sum",
    out: Annotated[str, typer.Option("--out", help="Output folder (predictor.safetensors + predictor.json).")] = "",
    n_train: Annotated[int, typer.Option(help="Training problems whose traces are labelled.")] = 512,
    n_val: Annotated[int, typer.Option(help="Held-out problems for loss and rank agreement.")] = 64,
    marker: Annotated[str, typer.Option(help="Text that ends the thinking part.")] = "Answer:",
    steps: StepsOpt = 1500,
    batch_tokens: Annotated[int, typer.Option(help="Thinking tokens per step.")] = 512,
    lr: LrOpt = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Traces generated together.")] = 16,
    label: Annotated[
        str,
        typer.Option(
            help="Importance label: answer (attention from answer tokens, DynTS), future_max or future_decay "
            "(from every later query), future_far (from queries more than --horizon tokens later)."
        ),
    ] = "answer",
    decay: Annotated[float, typer.Option(help="future_decay: weight decay^(distance - 1).")] = 0.95,
    horizon: Annotated[
        int, typer.Option(help="future_far: only queries further than this count (the policy's --window).")
    ] = 16,
    prompt: Annotated[
        bool, typer.Option("--prompt", help="Label prompt tokens too (for the learned policy's --evict-prompt).")
    ] = False,
    dtype: DtypeOpt = "float32",
    resume: ResumeOpt = False,
):
    """Train the DynTS importance predictor on the frozen model's own traces (MSE on attention labels)."""
    args = dict(locals())
    from memlm.train.predictor import PredictorConfig, run_predictor_training  # lazy: torch

    check_out(out)
    metrics = run_predictor_training(trainer_config(PredictorConfig, args), log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(metrics, indent=2))


@train_app.command("press")
def train_press(
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[str, typer.Option("--out", help="Output folder (predictor.safetensors + predictor.json).")] = "",
    lengths: Annotated[str, typer.Option(help="Comma-separated context lengths in tokens.")] = "1000,2000",
    n_train: Annotated[int, typer.Option(help="Training contexts per length (the tasks take turns).")] = 24,
    n_val: Annotated[int, typer.Option(help="Held-out contexts per length.")] = 4,
    steps: StepsOpt = 600,
    batch_tokens: Annotated[int, typer.Option(help="Context tokens per step.")] = 2048,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    text: Annotated[
        str | None,
        typer.Option(help="Train on windows of this corpus (gensim:enwiki, gensim:lee or a file) labelled by "
                     "repeating them (KVzip), not on the tasks; held-out contexts stay the tasks'."),
    ] = None,  # fmt: skip
    resume: ResumeOpt = False,
):
    """Train the learned press (--kv-press learned): each context token's hidden state -> the attention
    many questions about that context pay it (query-agnostic labels from full-cache runs)."""
    args = dict(locals())
    from memlm.train.press import PressTrainConfig, run_press_training  # lazy: torch

    check_out(out)
    args["lengths"] = tuple(int_list(lengths, "--lengths"))
    metrics = run_press_training(trainer_config(PressTrainConfig, args), log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(metrics, indent=2))


def _delimiters(given: list[str] | None) -> tuple[str, ...] | None:
    """--delimiter values -> the memory's delimiters ('\\n' written on a command line is a newline);
    None: the default ones."""
    return tuple(d.replace("\\n", "\n") for d in given) if given else None


@train_app.command("weaver")
def train_weaver(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "chain_sum",
    out: MemoryOutOpt = "",
    objective: Annotated[
        str,
        typer.Option(
            help="sft: the reasoner's token loss on worked solutions; grpo: the task's score on whole sampled "
            "answers (groups per problem, clipped surrogate, KL to the starting weaver)."
        ),
    ] = "sft",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: 250 sft, 40 grpo).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step (sft).")] = 8,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 1e-3 sft, 1e-4 grpo).")] = None,
    prompt_latents: Annotated[int, typer.Option(help="Latents inserted after the prompt.")] = 8,
    inference_latents: Annotated[int, typer.Option(help="Latents inserted at a delimiter.")] = 8,
    lora_rank: Annotated[int, typer.Option(help="The weaver's LoRA rank.")] = 16,
    max_inference_aug: Annotated[int, typer.Option(help="Most insertions per answer.")] = 8,
    weaver_layers: Annotated[
        int | None, typer.Option(help="Truncated weaver: only the reasoner's first N layers (default all).")
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            help="Latents at step 0: random; delimiter (copies of the delimiter's embedding); gated (those "
            "copies, plus the weaver's states behind a gate that starts shut)."
        ),
    ] = "random",
    weaver_input: Annotated[
        str,
        typer.Option(
            help="What the weaver reads: embeddings (its own pass over the tokens) or states (the "
            "reasoner's KV cache)."
        ),
    ] = "embeddings",
    weaver_output: Annotated[
        str,
        typer.Option(
            help="What the weaver writes: embeddings (latent tokens the reasoner reads) or kv (the latent "
            "slots' keys and values at every layer; needs --weaver-input states)."
        ),
    ] = "embeddings",
    delimiter: Annotated[
        list[str] | None,
        typer.Option(
            help="Insertion point: latents go after a token ending in this text (repeatable; '\\n' is a "
            "newline). Default: ',', '.', newline."
        ),
    ] = None,
    start_from: Annotated[
        str | None,
        typer.Option(help="grpo: start from this SFT weaver (a memory folder; also the KL reference)."),
    ] = None,
    start_trigger: Annotated[
        str | None, typer.Option(help="grpo: run --start-from's weaver with this trigger (always, never, learned).")
    ] = None,
    problems_per_step: Annotated[int, typer.Option(help="grpo: problems per step.")] = 4,
    group_size: Annotated[int, typer.Option(help="grpo: sampled answers per problem (the group).")] = 8,
    temperature: Annotated[float, typer.Option(help="grpo: sampling temperature of the answers.")] = 0.7,
    beta: Annotated[float, typer.Option(help="grpo: weight of the KL to the starting weaver (0 = none).")] = 0.04,
    clip: Annotated[float, typer.Option(help="grpo: the ratio's clipping range.")] = 0.2,
    format_reward: Annotated[float, typer.Option(help="grpo: reward added when an answer has an answer line.")] = 0.0,
    screen: Annotated[
        int, typer.Option(help="grpo: screen this many training problems, draw those with a mixed group (0 = off).")
    ] = 0,
    n_train: NTrainOpt = 4000,
    n_eval: NEvalOpt = 64,
    n_val_loss: Annotated[
        int, typer.Option(help="sft: validation problems whose loss is logged at each checkpoint (0 = skip).")
    ] = 32,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default: 25 sft, 10 grpo).")] = None,
    resume: ResumeOpt = False,
):
    """Train the MemGen weaver (reasoner frozen) by SFT or GRPO; save a latent memory for --memory."""
    args = dict(locals())
    check_out(out)
    get_task(task)  # an unknown task fails before the model loads
    if objective not in ("sft", "grpo"):
        raise MemlmError(f"--objective must be sft or grpo, got {objective!r}")
    delimiters = _delimiters(delimiter)
    spec = WeaverSpec(**pick(WeaverSpec, args), **({"delimiters": delimiters} if delimiters else {}))
    if objective == "grpo":
        from memlm.train.weaver_grpo import WeaverGRPOConfig, run_weaver_grpo  # lazy: torch

        report = run_weaver_grpo(trainer_config(WeaverGRPOConfig, args, spec=spec))
    else:
        if start_from is not None or start_trigger is not None:
            raise MemlmError("--start-from and --start-trigger are options of --objective grpo")
        from memlm.train.weaver import WeaverConfig, run_weaver_training  # lazy: torch

        report = run_weaver_training(trainer_config(WeaverConfig, args, spec=spec))
    print(json.dumps(report, indent=2))


@train_app.command("trigger")
def train_trigger(
    memory: Annotated[str, typer.Option(help="The trained weaver (memory folder of `memlm train weaver`).")],
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = "chain_sum",
    out: MemoryOutOpt = "",
    steps: StepsOpt = 60,
    problems_per_step: Annotated[int, typer.Option(help="Problems per step.")] = 4,
    group_size: Annotated[int, typer.Option(help="Sampled answers per problem (the GRPO group).")] = 4,
    temperature: Annotated[float, typer.Option(help="Token sampling temperature of the rollouts.")] = 0.7,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-3,
    penalty: Annotated[float, typer.Option(help="Weight of the insertion penalty.")] = 0.5,
    screen: Annotated[
        int, typer.Option(help="Screen this many training problems; RL draws only those with a mixed group (0 = off).")
    ] = 0,
    kind: Annotated[
        str,
        typer.Option(
            help="learned: a head on the reasoner's hidden state at the delimiter; sequence: a two-way head on "
            "the weaver's probe of the whole sequence (the reasoner's cache, earlier latents included)."
        ),
    ] = "learned",
    n_eval: NEvalOpt = 64,
    resume: ResumeOpt = False,
):
    """Train the MemGen trigger by RL (group-baseline REINFORCE, adaptive insertion penalty), weaver frozen."""
    args = dict(locals())
    from memlm.train.trigger import TriggerConfig, run_trigger_training  # lazy: torch

    check_out(out)
    get_task(task)
    report = run_trigger_training(trainer_config(TriggerConfig, args))
    print(json.dumps(report, indent=2))


@train_app.command("lcm")
def train_lcm(
    stage: Annotated[int, typer.Option(help="1: decoder LM; 2: encoder + grids, decoder frozen; 3: joint.")] = 1,
    data: DataOpt = "",
    out: ModelOutOpt = "",
    init: Annotated[str | None, typer.Option(help="The previous stage's model folder (stages 2 and 3).")] = None,
    steps: StageStepsOpt = 240,
    batch_size: WindowsPerStepOpt = 16,
    seq_len: SeqLenOpt = 256,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 3e-3, 2e-3, 5e-4 by stage).")] = None,
    seed: SeedOpt = 0,
    memory: Annotated[
        str | None,
        typer.Option(
            help="grids (default), continuous, single (one codebook), none (decoder alone); "
            "at stage 2, another kind than --init's builds that memory around its decoder."
        ),
    ] = None,
    hidden_size: Annotated[int, typer.Option(help="Width (stage 1).")] = 192,
    encoder_layers: Annotated[int, typer.Option(help="Encoder blocks (stage 1).")] = 2,
    decoder_layers: Annotated[int, typer.Option(help="Decoder blocks (stage 1).")] = 4,
    decoder_window: Annotated[
        int,
        typer.Option(
            help="Cut the decoder's view of the past every W tokens (0 = unbounded; stage 1): "
            "the history then reaches it only through the memory."
        ),
    ] = 0,
    z_dim: Annotated[int, typer.Option(help="Bottleneck width (stage 1).")] = 64,
    codes: Annotated[int, typer.Option(help="Codes per grid (stage 1).")] = 64,
    max_loop_steps: Annotated[int, typer.Option(help="Reasoning-loop step limit (stage 1).")] = 3,
    decoder_experts: Annotated[
        int, typer.Option(help="Mixture-of-experts FFNs in the decoder: this many experts (0 = dense; stage 1).")
    ] = 0,
    experts_per_token: Annotated[int, typer.Option(help="Experts each token is routed to (stage 1).")] = 2,
    default_safety: Annotated[
        bool, typer.Option(help="Stage 3: plant the shipped safety grids (memlm/lcm/default_safety.py).")
    ] = True,
    save_every: SaveEveryBpbOpt = 40,
    resume: ResumeOpt = False,
):
    """Train one stage of an LCM model (see memlm/train/lcm.py)."""
    args = dict(locals())
    from memlm.train.lcm import LCMTrainConfig, run_lcm_stage  # lazy: torch

    if not data:
        raise MemlmError("--data is required")
    check_out(out)
    report = run_lcm_stage(trainer_config(LCMTrainConfig, args, decoder_experts_per_token=experts_per_token))
    print(json.dumps({k: report[k] for k in ("stage", "total_steps", "parameters", "final") if k in report}, indent=2))


@train_app.command("lm")
def train_lm(
    data: DataOpt = "",
    out: ModelOutOpt = "",
    steps: StepsOpt = 480,
    batch_size: WindowsPerStepOpt = 16,
    seq_len: SeqLenOpt = 256,
    lr: LrOpt = 3e-3,
    seed: SeedOpt = 0,
    hidden_size: Annotated[int, typer.Option(help="Width.")] = 192,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 8,
    save_every: SaveEveryBpbOpt = 40,
    resume: ResumeOpt = False,
):
    """Train a Llama-architecture transformer from scratch (the LCM's same-size baseline)."""
    args = dict(locals())
    from memlm.train.pretrain import LMTrainConfig, run_pretrain  # lazy: torch

    if not data:
        raise MemlmError("--data is required")
    check_out(out)
    report = run_pretrain(trainer_config(LMTrainConfig, args, num_layers=layers))
    print(json.dumps({k: report[k] for k in ("total_steps", "parameters", "final") if k in report}, indent=2))
