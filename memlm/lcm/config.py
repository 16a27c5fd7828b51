"""LCMConfig: the shape of a codebook-memory model, and the runtime switches its evaluation turns.

Shape fields are saved in the model folder's config.json (`"model_type": "memlm-lcm"`). The runtime
fields (loop steps, re-encode period, safety, ablations) have defaults there too, and evaluation
or generation may override them without retraining.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from memlm.errors import ModelFormatError

MODEL_TYPE = "memlm-lcm"
# A model trained on plain text knows no chat format: `memlm chat` shows it the turns as plain lines.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
GRID_NAMES = ("hyperbolic", "sparse", "lowrank", "manifold", "binding", "contrastive")


@dataclass(frozen=True, slots=True)
class LCMConfig:
    vocab_size: int
    hidden_size: int = 192  # width of encoder and decoder
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 4
    intermediate_size: int = 512  # GLU hidden width (each expert's, with decoder_experts)
    decoder_experts: int = 0  # > 0: the decoder's FFNs are mixture-of-experts blocks (memlm/models/moe.py)
    decoder_experts_per_token: int = 2
    conv_kernel: int = 4  # causal depthwise convolution before each linear attention (local word order)
    # > 0: the decoder's view of the past is cut every this many tokens (its state cleared at positions
    # 0, W, 2W, ...); the encoder keeps the whole history, which then reaches the decoder only through z.
    decoder_window: int = 0
    z_dim: int = 64  # the bottleneck the grids work on
    codes: int = 64  # codes per grid (the hierarchical grid has two levels of codes // 2)
    lowrank_rank: int = 8
    manifold_dims: int = 4
    binding_roles: int = 8
    route_top_k: int = 3  # grids retrieved from per loop step
    # Memory on/off and its kind: "grids" (six grids + loop), "continuous" (z passes unquantized),
    # "single" (one VQ codebook of the six grids' total size, no routing), "none" (decoder alone).
    memory: str = "grids"
    max_loop_steps: int = 3
    converge_threshold: float = 0.02  # change of z (relative to its norm) below which a row's loop stops
    reencode_period: int = 256  # 0 = never re-encode
    safety: bool = True
    value_mode: str = "correct"  # "flag" or "correct"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    max_position_embeddings: int = 1 << 20  # recurrent state: no architectural limit
    # Runtime ablations (evaluation only): "zero" or "shuffle" z, grids left out.
    z_ablation: str | None = None
    grids_off: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ModelFormatError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.decoder_experts and not 0 < self.decoder_experts_per_token <= self.decoder_experts:
            raise ModelFormatError("decoder_experts_per_token must be between 1 and decoder_experts")
        if self.memory not in ("grids", "continuous", "single", "none"):
            raise ModelFormatError(f"unknown LCM memory kind {self.memory!r}")
        if self.decoder_window < 0:
            raise ModelFormatError(f"decoder_window must be >= 0 (0 = unbounded), got {self.decoder_window}")
        unknown = set(self.grids_off) - set(GRID_NAMES)
        if unknown:
            raise ModelFormatError(f"unknown grid(s) {sorted(unknown)}; grids are {', '.join(GRID_NAMES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_layers(self) -> int:  # what `memlm info` and the engine's generic code read
        return self.encoder_layers + self.decoder_layers

    def with_runtime(self, **overrides) -> LCMConfig:
        return replace(self, **overrides)

    def to_json(self) -> dict:
        data = asdict(self)
        data["model_type"] = MODEL_TYPE
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["grids_off"] = list(self.grids_off)
        return data

    @classmethod
    def from_json(cls, data: dict) -> LCMConfig:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("eos_token_ids", "grids_off"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ModelFormatError(f"bad LCM config: {e}") from None

    @staticmethod
    def is_lcm_folder(path: str | Path) -> bool:
        config = Path(path) / "config.json"
        if not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
        except (OSError, json.JSONDecodeError):
            return False
