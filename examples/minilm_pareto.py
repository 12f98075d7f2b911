"""The quality metric and calibration set for a Pareto search of MiniLM's pruning.

    einfuse autotune examples.minilm:encode --objective pareto \\
        --metric examples.minilm_pareto:loss --max-loss 0.02 --prune tokens

``loss``: 1 - the mean cosine of each text's embedding to the dense program's (the
embeddings are unit vectors, so the cosine is their dot product). ``calibration``: the 64
calibration texts of ``benchmarks/data/pruning_texts.json`` (disjoint from its evaluation
texts), in batches of 16 padded to 256 tokens, the shapes the benchmark times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from examples import minilm

TEXTS = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "pruning_texts.json"
BATCH, SEQ = 16, 256


def loss(outputs: list[np.ndarray], dense: list[np.ndarray]) -> float:
    """1 - mean cosine to the dense embeddings, over every calibration text."""
    a, b = np.concatenate(outputs), np.concatenate(dense)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(1 - cos.mean())


def calibration() -> list[tuple[Any, ...]]:
    """``(params, input_ids, attention_mask)`` per batch of the calibration texts."""
    texts = json.loads(TEXTS.read_text())["calibration"]
    params = minilm.load_params()
    ids, mask = minilm.tokenize(minilm.load_tokenizer(), texts, SEQ, pad_to=SEQ)
    return [(params, ids[i : i + BATCH], mask[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
