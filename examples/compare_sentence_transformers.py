"""Compare our plain-JAX MiniLM embeddings with the sentence-transformers reference (not a test).

sentence-transformers needs torch, which the project does not depend on, so the reference runs
in a throwaway virtual environment and this script talks to it through a subprocess. Set it up
once (torch 2.13.0 CPU is available to pip locally; don't pull a CUDA build):

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers numpy

then, from the repository root, with the project's own Python (the one that has jax):

    python examples/compare_sentence_transformers.py --st-python /tmp/stvenv/bin/python

It prints the max abs difference between the two sets of embeddings of ``minilm.SENTENCES``.
The ``--reference`` mode is what the subprocess runs inside the venv; it never imports jax.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def reference_embeddings(request_path: Path, out_path: Path) -> None:
    """Inside the torch venv: embed the requested sentences with sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    request = json.loads(request_path.read_text())
    model = SentenceTransformer(request["model_dir"], device="cpu")
    embeddings = model.encode(
        request["sentences"], batch_size=64, convert_to_numpy=True, normalize_embeddings=False
    )
    np.save(out_path, embeddings.astype(np.float32))


def compare(st_python: str) -> float:
    """Embed SENTENCES both ways and print how far apart they are; return the max abs diff."""
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    import jax

    from examples import minilm

    params = minilm.load_params()
    input_ids, attention_mask = minilm.tokenize(minilm.load_tokenizer(), minilm.SENTENCES)
    ours = np.asarray(jax.jit(minilm.encode)(params, input_ids, attention_mask))

    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        out = Path(tmp) / "reference.npy"
        request.write_text(
            json.dumps({"model_dir": str(minilm.model_dir()), "sentences": list(minilm.SENTENCES)})
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [st_python, __file__, "--reference", str(request), str(out)]
        subprocess.run(cmd, check=True, env=env)
        reference = np.load(out)

    if reference.shape != ours.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape}, ours {ours.shape}")
    diff = np.abs(ours - reference)
    cosines = np.sum(ours * reference, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    print(f"sentences: {len(minilm.SENTENCES)}, tokens per batch row: {input_ids.shape[1]}")
    print(f"max abs diff:  {diff.max():.3e}")
    print(f"mean abs diff: {diff.mean():.3e}")
    print(f"min cosine(ours, reference): {cosines.min():.9f}")
    worst = int(np.argmax(diff.max(axis=1)))
    print(f"worst sentence: {minilm.SENTENCES[worst][:60]!r}")
    return float(diff.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--st-python", help="python of a venv with sentence-transformers")
    parser.add_argument("--reference", nargs=2, metavar=("REQUEST_JSON", "OUT_NPY"))
    args = parser.parse_args()
    if args.reference:
        reference_embeddings(Path(args.reference[0]), Path(args.reference[1]))
    elif args.st_python:
        compare(args.st_python)
    else:
        parser.error("give --st-python PATH (see the module docstring for the venv setup)")


if __name__ == "__main__":
    main()
