"""Sampling, stopping, detokenization and the Engine (prefill + decode loop, batching, streaming)."""

from memlm.generation.engine import Completion, Engine, StreamDelta
from memlm.generation.params import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamDelta"]
