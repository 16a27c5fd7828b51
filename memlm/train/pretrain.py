"""`memlm train lm`: a Llama-architecture transformer trained from scratch on packed token data.

The baseline the LCM is measured against: same data, same windows in the same order (one seed,
one step count), same loop, sized to a parameter count. The result is a Hugging Face folder with
the data's tokenizer, which memlm, transformers and `memlm eval lcm` load as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memlm.atomic import ensure_dir, write_json_atomic
from memlm.data.packed import TokenData
from memlm.formats.loading import save_model
from memlm.models.config import ModelConfig
from memlm.models.llama import LlamaModel
from memlm.tokenizer import Tokenizer
from memlm.train.heldout import bits_per_byte, llama_logits
from memlm.train.loop import TrainConfig, is_main_process, train


@dataclass(slots=True)
class LMTrainConfig:
    data: str
    out_dir: str
    steps: int = 480
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 8192
    resume: bool = False
    progress: bool = True
    log_every: int = 10
    save_every: int = 40
    eval_windows: int = 32


class CausalLM(nn.Module):
    """ids -> logits through `forward`, so the loop (and DDP) sees one module call."""

    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return self.model.logits(self.model(self.model.embed(ids), positions))


def loop_config(cfg, out: Path, lr: float) -> TrainConfig:
    """The shared loop's settings for a model trained from scratch on packed data (`train lm`, `train lcm`)."""
    return TrainConfig(
        out_dir=str(out / "train"),
        steps=cfg.steps,
        lr=lr,
        warmup_steps=cfg.warmup_steps,
        log_every=cfg.log_every,
        save_every=cfg.save_every,
        seed=cfg.seed,
        resume=cfg.resume,
        progress=cfg.progress,
        weight_decay=0.01,
    )


def transformer_config(cfg: LMTrainConfig, header: dict) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=header["vocab_size"],
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_ids=(header["eos_id"],),
    )


def new_transformer(config: ModelConfig, seed: int) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(config)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model


def run_pretrain(cfg: LMTrainConfig) -> dict:
    out = ensure_dir(cfg.out_dir)
    train_data = TokenData.open(cfg.data, "train")
    val_data = TokenData.open(cfg.data, "val")
    config = transformer_config(cfg, train_data.header)
    model = new_transformer(config, cfg.seed)
    lm = CausalLM(model)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        return train_data.random_windows(cfg.batch_size, cfg.seq_len + 1, cfg.seed, step, micro)[rank::world]

    def loss_fn(wrapped, ids):
        logits = wrapped(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def evaluate(m) -> dict:
        return {"val_bpb": bits_per_byte(llama_logits(m.model), val_data, cfg.seq_len, cfg.eval_windows)}

    last = train(lm, loss_fn, batch_fn, loop_config(cfg, out, cfg.lr), evaluate)
    if not is_main_process():
        return last
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "total_steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final": last,
        "recipe": asdict(cfg),
    }
    save_model(out / "model", model, Tokenizer.from_folder(cfg.data), {"description": "memlm train lm", **report})
    write_json_atomic(out / "report.json", report)
    return report
