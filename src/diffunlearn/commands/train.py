"""``diffunlearn train``: train a DDPM from scratch, the base model on X or the retrain gold standard on X \\ A (the
recipe and its loop are :mod:`diffunlearn.scratch`, which the benchmarks' retrain rows call too)."""

from ..scratch import TrainConfig, train

__all__ = ["TrainConfig", "train"]
