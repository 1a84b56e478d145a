"""Moved to `training.tiny_model`. This re-export stays only until benchmarks/bench_{train,dataplane,gateway}.py
import from there (they are being reworked alongside `loragate bench`); nothing else may use it."""

from training.tiny_model import build_random_adapter, cached_tiny_model

__all__ = ["build_random_adapter", "cached_tiny_model"]
