"""Model definitions and weight loading."""

from memlm.models.config import ModelConfig
from memlm.models.llama import LlamaModel
from memlm.models.loading import DEFAULT_MODEL, EMBEDDED, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "LlamaModel", "LoadedModel", "ModelConfig", "load_model"]
