"""One training loop for every trainer (importance predictor, SFT, weaver, trigger, LCM stages)."""

from memlm.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
