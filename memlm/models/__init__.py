"""Architectures only: the Llama family (dense and MoE), its config, RoPE and shared layers.
Reading and writing files is memlm.formats; quantized weights memlm.quant; adapters memlm.adapters."""

from memlm.models.config import ModelConfig
from memlm.models.llama import LlamaModel

__all__ = ["LlamaModel", "ModelConfig"]
