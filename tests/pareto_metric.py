"""A calibration set and metrics for Pareto-search tests: a tiny random MiniLM
(`tests.prune_model`), MiniLM's own metric (1 - mean cosine to the dense embeddings), and
metrics that misbehave."""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.minilm_pareto import loss
from tests.prune_model import tiny_params, tiny_tokens

__all__ = ["calibration", "loss", "nan_when_pruned", "raising", "small_calibration", "text"]


def calibration() -> list[tuple[Any, ...]]:
    """Two calls of ``examples.minilm.encode``: 2 layers, batch 2, 32 tokens (some padded)."""
    params = tiny_params(5, layers=2)
    return [(params, *tiny_tokens(seed, 2, 32, [32, 20])) for seed in (5, 6)]


def raising(outputs: list[np.ndarray], dense: list[np.ndarray]) -> float:
    raise ValueError("no quality today")


def text(outputs: list[np.ndarray], dense: list[np.ndarray]) -> Any:
    return "good"


def nan_when_pruned(outputs: list[np.ndarray], dense: list[np.ndarray]) -> float:
    """NaN for every candidate but the dense program (its outputs are the dense ones)."""
    return 0.0 if outputs is dense else float("nan")


def small_calibration() -> list[tuple[Any, ...]]:
    """One call of a 1-layer model at 8 tokens: enough to check a metric, quick to compile."""
    return [(tiny_params(7, layers=1), *tiny_tokens(7, 1, 8, [8]))]
