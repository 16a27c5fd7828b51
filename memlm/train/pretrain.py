"""`memlm train lm`: a Llama-architecture transformer trained from scratch on packed token data.

The baseline the LCM is measured against: same data, same windows in the same order (one seed,
one step count), same loop, sized to a parameter count. The result is a Hugging Face folder with
the data's tokenizer, which memlm, transformers and `memlm eval lcm` load as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
from memlm.train.loop import TrainConfig, is_main_process, split_loop, train

# The loop's settings for a model trained from scratch on packed data (`train lm`, `train lcm`).
FROM_SCRATCH = {"warmup_steps": 20, "log_every": 10, "save_every": 40, "weight_decay": 0.01}


@dataclass(slots=True)
class LMTrainConfig:
    data: str
    train: TrainConfig  # out_dir: the output folder (the loop writes to out_dir/train); see `loop`
    batch_size: int = 16
    seq_len: int = 256
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 8192
    eval_windows: int = 32

    @staticmethod
    def loop(out_dir: str, **given) -> TrainConfig:
        """This trainer's loop: 480 steps at lr 3e-3, 20 warmup steps, weight decay 0.01, a log row
        every 10 steps and a checkpoint every 40, unless given."""
        return TrainConfig(out_dir=out_dir, **(FROM_SCRATCH | {"steps": 480, "lr": 3e-3} | given))

    @classmethod
    def of(cls, data: str, out_dir: str, **options) -> LMTrainConfig:
        """From flat options: the loop's (steps, lr, seed, ...) go to `train`."""
        loop, own = split_loop(options)
        return cls(data, cls.loop(out_dir, **loop), **own)


class CausalLM(nn.Module):
    """ids -> logits through `forward`, so the loop (and DDP) sees one module call."""

    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return self.model.logits(self.model(self.model.embed(ids), positions))


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
    out = ensure_dir(cfg.train.out_dir)
    train_data = TokenData.open(cfg.data, "train")
    val_data = TokenData.open(cfg.data, "val")
    config = transformer_config(cfg, train_data.header)
    model = new_transformer(config, cfg.train.seed)
    lm = CausalLM(model)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        return train_data.random_windows(cfg.batch_size, cfg.seq_len + 1, cfg.train.seed, step, micro)[rank::world]

    def loss_fn(wrapped, ids):
        logits = wrapped(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def evaluate(m) -> dict:
        return {"val_bpb": bits_per_byte(llama_logits(m.model), val_data, cfg.seq_len, cfg.eval_windows)}

    last = train(lm, loss_fn, batch_fn, cfg.train.inside("train"), evaluate)
    if not is_main_process():
        return last
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "total_steps": cfg.train.steps,
        "tokens_seen": cfg.train.steps * cfg.batch_size * cfg.seq_len,
        "final": last,
        "recipe": asdict(cfg),
    }
    save_model(out / "model", model, Tokenizer.from_folder(cfg.data), {"description": "memlm train lm", **report})
    write_json_atomic(out / "report.json", report)
    return report
