"""`memlm train lcm --stage 1|2|3`: the LCM's three training stages, on the shared loop.

- stage 1: the decoder alone, as a language model (cross-entropy; encoder and grids unused);
- stage 2: encoder, grids, router and bridge learn with the decoder frozen. The LM loss still flows
  back through z_q into them (straight-through retrieval keeps the codebooks in the gradient),
  plus VQ (codebook + commitment), the contrastive grid's InfoNCE and an orthogonality penalty on
  codebooks and prototypes. Codes unused since the last restart are moved onto live z's;
- stage 3: everything together at a low learning rate, same losses; the model is saved with the
  default safety grids planted (memlm/lcm/default_safety.py), radii calibrated on training text.

After stages 2 and 3 the reasoning loop's convergence threshold is set from held-out text (half
the tokens stop after one step) and the report says what the memory does there.

Every stage reads the same packed data; batch k of the whole schedule is the same windows for
every run with the same seed (stage 2 continues the step count of stage 1), so a decoder-alone run
of the same total steps sees exactly the tokens the LCM saw. Each stage writes `model/` (an LCM
folder that `--model` loads), `train/` (metrics.jsonl, loss.png, checkpoint) and `report.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from memlm.atomic import ensure_dir, write_json_atomic
from memlm.data.packed import TokenData
from memlm.errors import MemlmError
from memlm.lcm.checkpoint import load_lcm, save_lcm
from memlm.lcm.config import LCMConfig
from memlm.lcm.default_safety import calibration_windows, plant_defaults
from memlm.lcm.memory import CodeUsage, convergence_threshold, loop_report
from memlm.lcm.model import LCMModel
from memlm.models.moe import expert_load, load_balancing_loss, router_logits_of, router_z_loss
from memlm.tokenizer import Tokenizer
from memlm.train.heldout import bits_per_byte, lcm_logits
from memlm.train.loop import TrainConfig, is_main_process, split_loop, train
from memlm.train.pretrain import FROM_SCRATCH

STAGE_LR = {1: 3e-3, 2: 2e-3, 3: 5e-4}
LOSS_WEIGHTS = {"vq": 1.0, "contrastive": 0.1, "orthogonality": 0.1, "spread": 1.0}


@dataclass(slots=True)
class LCMTrainConfig:
    data: str
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    stage: int
    init: str | None = None  # the previous stage's model folder (stages 2 and 3)
    batch_size: int = 16
    seq_len: int = 256
    eval_windows: int = 32
    restart_every: int = 40  # dead-code restarts (stages 2 and 3)
    default_safety: bool = True  # stage 3: plant the shipped safety grids (memlm/lcm/default_safety.py)
    # The model's shape, for stage 1 (later stages take it from --init).
    hidden_size: int = 192
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 4
    decoder_window: int = 0  # > 0: the decoder's view of the past is cut every this many tokens
    intermediate_size: int = 512
    z_dim: int = 64
    codes: int = 64
    memory: str | None = None  # grids (default for stage 1), continuous, single, none; later stages: as --init
    max_loop_steps: int = 3
    decoder_experts: int = 0  # > 0: MoE FFNs in the decoder, trained with the load-balancing loss
    decoder_experts_per_token: int = 2

    @staticmethod
    def loop(out_dir: str, stage: int, **given) -> TrainConfig:
        """This trainer's loop: 240 steps at the stage's lr (STAGE_LR; also where lr is None), 20
        warmup steps, weight decay 0.01, a log row every 10 steps and a checkpoint every 40, unless given."""
        if given.get("lr") is None:
            given["lr"] = STAGE_LR.get(stage, STAGE_LR[1])  # a stage that is none is refused by run_lcm_stage
        return TrainConfig(out_dir=out_dir, **(FROM_SCRATCH | {"steps": 240} | given))

    @classmethod
    def of(cls, data: str, out_dir: str, stage: int, **options) -> LCMTrainConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(data, cls.loop(out_dir, stage, **loop), stage, **own)


ROUTER_AUX_WEIGHT = 0.01  # load-balancing loss (Switch / Mixtral)
ROUTER_Z_WEIGHT = 0.001  # router z-loss (ST-MoE)


def _router_losses(model: LCMModel, loss: torch.Tensor, extras: dict) -> torch.Tensor:
    """Add the MoE decoder's load-balancing and z losses; log its balance (1 = even) and busiest expert."""
    logits = router_logits_of(model.decoder)
    if not logits:
        return loss
    k = model.config.decoder_experts_per_token
    balance = load_balancing_loss(logits, k)
    extras["expert_balance"] = float(balance.detach()) / k
    extras["expert_max_share"] = float(expert_load([x.detach() for x in logits], k).max())
    return loss + ROUTER_AUX_WEIGHT * balance + ROUTER_Z_WEIGHT * router_z_loss(logits)


def run_lcm_stage(cfg: LCMTrainConfig) -> dict:
    if cfg.stage not in (1, 2, 3):
        raise MemlmError(f"--stage must be 1, 2 or 3, got {cfg.stage}")
    out = ensure_dir(cfg.train.out_dir)
    train_data = TokenData.open(cfg.data, "train")
    val_data = TokenData.open(cfg.data, "val")
    torch.manual_seed(cfg.train.seed)  # the initialisation is part of the seed
    if cfg.stage == 1:
        if cfg.init is not None:
            model, step_offset = _from_init(cfg.init, train_data, cfg.memory)
        else:
            model, step_offset = LCMModel(_new_config(cfg, train_data.header)), 0
    else:
        if cfg.init is None:
            raise MemlmError(f"stage {cfg.stage} needs --init: the model folder of stage {cfg.stage - 1}")
        model, step_offset = _from_init(cfg.init, train_data, cfg.memory)
        if not model.has_memory:
            raise MemlmError(f"{cfg.init} is a decoder-only model (memory 'none'): it has no stage {cfg.stage}")
    _set_trainable(model, cfg.stage)
    use_memory = cfg.stage > 1

    stats: dict = {"restarted": 0, "usage": None, "summary": {}}  # usage: CodeUsage since the last restart

    def batch_fn(step: int, micro: int, rank: int, world: int):
        ids = train_data.random_windows(cfg.batch_size, cfg.seq_len + 1, cfg.train.seed, step_offset + step, micro)
        return {"ids": ids[rank::world], "step": step, "micro": micro}

    def loss_fn(lm, batch):
        ids = batch["ids"]
        logits, aux = lm(ids[:, :-1], use_memory=use_memory, with_regularisers=use_memory)
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        extras = {"ce": float(ce.detach())}
        if not use_memory:
            return (_router_losses(model, ce, extras), extras) if model.config.decoder_experts else ce
        loss = ce + sum(LOSS_WEIGHTS[k] * aux[k] for k in LOSS_WEIGHTS if k in aux)
        loss = _router_losses(model, loss, extras)
        for term in LOSS_WEIGHTS:
            if term in aux:
                extras[term] = float(aux[term].detach())
        trace = aux["trace"]
        extras["loop_steps"] = float(trace.steps.float().mean())
        entropy = trace.route_entropy()
        if entropy is not None:
            extras["route_entropy"] = float(entropy.mean())
        if trace.codes is None:  # continuous z: no codes to count or restart
            return loss, extras
        if stats["usage"] is None:
            stats["usage"] = CodeUsage(model.memory)
        stats["usage"].add(trace)
        if batch["micro"] == 0 and batch["step"] > 0 and batch["step"] % cfg.restart_every == 0:
            stats["restarted"] = model.memory.restart_dead_codes(aux["z"].detach(), stats["usage"])
            stats["summary"] = stats["usage"].summary()
            stats["usage"] = None
        return loss, extras

    def evaluate(m) -> dict:
        metrics = {"val_bpb": bits_per_byte(lcm_logits(m, use_memory), val_data, cfg.seq_len, cfg.eval_windows)}
        if use_memory:
            metrics["dead_codes_restarted"] = stats["restarted"]
            for name, grid in stats["summary"].items():  # code use since the restart before the last
                metrics[f"usage_{name}_used"] = grid["used"] / grid["codes"]
                metrics[f"usage_{name}_perplexity"] = grid["perplexity"]
        return metrics

    last = train(model, loss_fn, batch_fn, cfg.train.inside("train"), evaluate)
    if not is_main_process():
        return last
    memory_report = _calibrate_loop(model, val_data, cfg) if use_memory else None
    if cfg.stage == 3 and cfg.default_safety:
        calibration = calibration_windows(train_data, cfg.train.seed)
        memory_report["safety"] = plant_defaults(model, Tokenizer.from_folder(cfg.data), calibration)
    report = {
        "stage": cfg.stage,
        "steps": cfg.train.steps,
        "total_steps": step_offset + cfg.train.steps,
        "tokens_seen": (step_offset + cfg.train.steps) * cfg.batch_size * cfg.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),  # tied weights count once
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lr": cfg.train.lr,
        "init": cfg.init,
        "data": cfg.data,
        "final": last,
        "memory": memory_report,
        "recipe": asdict(cfg),
    }
    save_lcm(out / "model", model, cfg.data, report)
    write_json_atomic(out / "report.json", report)
    return report


CALIBRATION_STOP_SHARE = 0.5  # of held-out tokens stop after the loop's first step


@torch.no_grad()
def _calibrate_loop(model: LCMModel, val: TokenData, cfg: LCMTrainConfig) -> dict:
    """Set the loop's convergence threshold from held-out text (the model is saved with it), and
    say what the memory does there: loop steps per token, code use and perplexity per grid."""
    model.eval()
    out: dict = {}
    if model.config.memory == "grids":
        model.set_runtime(converge_threshold=0.0)  # every step taken: how far the first one moves z
        out["val_bpb_loop_to_limit"], traces = _held_out(model, val, cfg)
        first = torch.cat([t.changes[:, 0] for t in traces])
        out["converge_threshold"] = convergence_threshold(first, CALIBRATION_STOP_SHARE)
        model.set_runtime(converge_threshold=out["converge_threshold"])
    out["val_bpb"], traces = _held_out(model, val, cfg)
    return out | loop_report(model.memory, traces)


def _held_out(model: LCMModel, val: TokenData, cfg: LCMTrainConfig):
    """-> (held-out bits per byte, the loop traces of that same pass)."""
    traces = []

    def run(ids: torch.Tensor) -> torch.Tensor:
        logits, aux = model(ids.to(model.device))
        traces.append(aux["trace"])
        return logits

    return bits_per_byte(run, val, cfg.seq_len, cfg.eval_windows), traces


def _new_config(cfg: LCMTrainConfig, header: dict) -> LCMConfig:
    return LCMConfig(
        vocab_size=header["vocab_size"],
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        decoder_window=cfg.decoder_window,
        intermediate_size=cfg.intermediate_size,
        z_dim=cfg.z_dim,
        codes=cfg.codes,
        memory=cfg.memory or "grids",
        max_loop_steps=cfg.max_loop_steps,
        eos_token_ids=(header["eos_id"],),
        decoder_experts=cfg.decoder_experts,
        decoder_experts_per_token=cfg.decoder_experts_per_token,
    )


def _from_init(folder: str, data: TokenData, memory: str | None = None) -> tuple[LCMModel, int]:
    """The model of a previous stage. With another `memory` kind, a new memory around the same
    trained decoder: how the retrained variants (continuous z, one codebook) share stage 1."""
    model = load_lcm(folder)
    if memory is not None and memory != model.config.memory:
        variant = LCMModel(replace(model.config, memory=memory))
        variant.decoder.load_state_dict(model.decoder.state_dict())
        model = variant
    if model.config.vocab_size != data.header["vocab_size"]:
        raise MemlmError(
            f"{folder} has a vocabulary of {model.config.vocab_size}; the data has {data.header['vocab_size']}"
        )
    source = Path(folder) / "memlm_source.json"
    total = json.loads(source.read_text()).get("total_steps", 0) if source.is_file() else 0
    return model, int(total)


def _set_trainable(model: LCMModel, stage: int) -> None:
    if stage == 1:
        model.requires_grad_(False)
        model.decoder.requires_grad_(True)
    elif stage == 2:
        model.requires_grad_(True)
        model.decoder.requires_grad_(False)
    else:
        model.requires_grad_(True)
    model.train()
