"""A generated English corpus for the token-pruning benchmark: texts of 64-256 MiniLM tokens.

Texts are built from seeded templates over several topics (sentences of subjects, verbs,
objects and clauses), grown sentence by sentence to a target token count drawn uniformly
from [64, 256]. The evaluation and calibration splits use different seeds and share no text
(checked). ``python -m benchmarks.pruning_corpus`` rewrites ``benchmarks/data/pruning_texts.json``
(needs the MiniLM tokenizer); the benchmark reads the shipped file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data" / "pruning_texts.json"

TOPICS = {
    "science": (
        [
            "the researchers",
            "a small team of biologists",
            "the physicist",
            "our laboratory",
            "the new telescope",
            "a graduate student",
            "the climate model",
            "the chemists",
        ],
        ["measured", "observed", "predicted", "reported", "simulated", "questioned", "confirmed"],
        [
            "the rate of cell division",
            "a faint signal from a distant galaxy",
            "the melting point",
            "an unexpected mutation",
            "the ocean temperature",
            "the decay of the isotope",
        ],
    ),
    "business": (
        [
            "the company",
            "our quarterly report",
            "the board",
            "a regional bank",
            "the startup",
            "investors",
            "the retail chain",
            "the finance director",
        ],
        ["announced", "delayed", "reviewed", "increased", "cut", "approved", "forecast"],
        [
            "its annual revenue",
            "a new line of credit",
            "the merger with a rival firm",
            "shipping costs",
            "the price of its shares",
            "hiring plans for next year",
        ],
    ),
    "travel": (
        [
            "the tourists",
            "my sister",
            "a tired backpacker",
            "the tour guide",
            "our family",
            "the pilot",
            "the hotel staff",
            "a group of students",
        ],
        ["visited", "photographed", "missed", "booked", "explored", "recommended", "crossed"],
        [
            "the old harbour",
            "a crowded night market",
            "the mountain pass",
            "the last train",
            "a quiet village near the coast",
            "the museum of modern art",
        ],
    ),
    "cooking": (
        [
            "the chef",
            "my grandmother",
            "the bakery",
            "a home cook",
            "the restaurant",
            "the kitchen assistant",
            "our neighbour",
            "the food critic",
        ],
        ["prepared", "tasted", "burned", "seasoned", "served", "praised", "improved"],
        [
            "a thick vegetable soup",
            "the sourdough bread",
            "a plate of grilled fish",
            "the chocolate cake",
            "a spicy curry with rice",
            "fresh pasta with tomatoes",
        ],
    ),
    "software": (
        [
            "the compiler",
            "our build system",
            "the new release",
            "a junior engineer",
            "the database",
            "the test suite",
            "the web server",
            "the scheduler",
        ],
        ["rejected", "optimized", "crashed on", "cached", "refactored", "logged", "parsed"],
        [
            "the configuration file",
            "a corrupted index",
            "every incoming request",
            "the matrix multiplication",
            "a slow query",
            "the memory allocator",
        ],
    ),
}
CLAUSES = [
    "after a long discussion",
    "because the weather was terrible",
    "despite the warnings",
    "early in the morning",
    "for the second time this year",
    "while everyone was watching",
    "without telling anyone",
    "as the deadline approached",
    "in the middle of the night",
    "although nobody expected it",
    "to the surprise of the committee",
    "before lunch",
]
CONNECTIVES = ["Later,", "Meanwhile,", "However,", "As a result,", "Then", "In the end,", ""]


def _sentence(rng: random.Random, topic: str) -> str:
    subjects, verbs, objects = TOPICS[topic]
    parts = [rng.choice(CONNECTIVES), rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
    if rng.random() < 0.6:
        parts.append(rng.choice(CLAUSES))
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:] + "."


def generate(n: int, seed: int, tokenizer: object) -> list[str]:
    """``n`` texts whose token counts (with CLS and SEP) lie in [64, 256]."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < n:
        topic = rng.choice(sorted(TOPICS))
        target = rng.randint(64, 256)
        sentences: list[str] = []
        while True:
            sentence = _sentence(rng, topic)
            if len(tokenizer.encode(" ".join([*sentences, sentence])).ids) > target:  # type: ignore[attr-defined]
                break
            sentences.append(sentence)
        text = " ".join(sentences)
        if len(tokenizer.encode(text).ids) >= 64:  # type: ignore[attr-defined]
            texts.append(text)
    return texts


def main() -> None:
    from examples import minilm

    tokenizer = minilm.load_tokenizer()
    tokenizer.no_truncation()
    tokenizer.no_padding()
    evaluation = generate(224, seed=12, tokenizer=tokenizer)
    calibration = generate(64, seed=1012, tokenizer=tokenizer)
    assert not set(evaluation) & set(calibration)
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps({"evaluation": evaluation, "calibration": calibration}, indent=0))
    lengths = [len(tokenizer.encode(t).ids) for t in evaluation]
    print(f"wrote {DATA}: {len(evaluation)} evaluation texts, {min(lengths)}-{max(lengths)} tokens")


if __name__ == "__main__":
    main()
