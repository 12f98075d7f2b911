"""MiniLM with SpAtten token and head pruning (``prune-tokens``, ``prune-heads``): keep
schedules x cost x quality.

For each keep schedule: XLA's FLOPs of one batch (ratio to dense), the run time of one batch
(batch 16, padded to 256 tokens) as a ratio of medians to the dense einfuse program, timed
interleaved in one process (wall and process CPU time), and the cosine of each text's
embedding to the dense embedding (mean and min) over the evaluation texts of
``benchmarks/data/pruning_texts.json`` (224 generated texts of 64-256 tokens; the calibration
split is not used here). ``real kept``:
the share of real (unpadded) tokens still present after the last pruning point; padding
receives no attention, so it is pruned first (1.00 for head pruning, which keeps every token).
A ``random:`` schedule is the control: the same pipeline keeping random tokens (among the real
ones) or random heads (``benchmarks/pruning_random.py``).

    python -m benchmarks.pruning                 # the table in benchmarks/RESULTS.md
    python -m benchmarks.pruning --texts 64 --repeats 3
    python -m benchmarks.pruning --schedule "prune-heads{keep=0.5,start=2}"
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

SCHEDULES = (
    "",
    "prune-tokens{keep=0.5,start=2}",
    "random:prune-tokens{keep=0.5,start=2}",
    "prune-tokens{keep=0.7,start=2}",
    "prune-tokens{keep=1:1:0.8:0.6:0.5:0.5}",
    "prune-tokens{keep=1:0.9:0.8:0.7:0.6:0.5}",
    "prune-tokens{keep=1:1:0.9:0.8:0.7:0.6}",
    "prune-tokens{keep=0.5,start=4}",
    "prune-tokens{keep=0.4,start=1}",
    "random:prune-tokens{keep=0.4,start=1}",
    "prune-heads{keep=0.75,start=2}",
    "random:prune-heads{keep=0.75,start=2}",
    "prune-heads{keep=0.5,start=2}",
    "random:prune-heads{keep=0.5,start=2}",
    "prune-heads{keep=1:1:0.75:0.75:0.5:0.5}",
    "prune-heads{keep=0.9,start=4},prune-tokens{keep=0.5,start=2}",
)


def main(argv: list[str] | None = None) -> None:
    import einfuse
    from benchmarks.pruning_corpus import DATA
    from benchmarks.pruning_random import build
    from einfuse.autotune.timing import time_interleaved
    from examples import minilm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--schedule",
        action="append",
        help="measure only these pipelines (repeatable; the dense one is always measured)",
    )
    args = parser.parse_args(argv)
    schedules = ("", *args.schedule) if args.schedule else SCHEDULES

    params = minilm.load_params()
    texts = json.loads(DATA.read_text())["evaluation"][: args.texts]
    ids, mask = minilm.tokenize(minilm.load_tokenizer(), texts, args.seq, pad_to=args.seq)
    batches = [
        (ids[i : i + args.batch], mask[i : i + args.batch])
        for i in range(0, len(texts), args.batch)
    ]
    fns = {s: build(s, einfuse.jit, minilm.encode) for s in schedules}
    rows: dict[str, dict[str, Any]] = {}
    dense = np.concatenate([np.asarray(fns[""](params, *b)) for b in batches])
    for s, f in fns.items():
        emb = np.concatenate([np.asarray(f(params, *b)) for b in batches])
        cos = np.sum(emb * dense, axis=-1) / np.linalg.norm(emb, axis=-1)
        flops = f.lower(params, *batches[0]).compile().cost_analysis()["flops"]
        rows[s] = {"cos": cos, "flops": flops, "real": _real_kept(f, params, batches)}
        print(f"{s or 'dense'}: mean cos {cos.mean():.4f}", flush=True)
    b0 = batches[0]
    timings = time_interleaved(
        {s: (lambda f=f: f(params, *b0)) for s, f in fns.items()}, repeats=args.repeats
    )
    base_t, base_f = timings[""].median, rows[""]["flops"]
    print(f"\nbatch {args.batch}, {args.seq} tokens, {len(texts)} texts, {args.repeats} rounds\n")
    base_cpu = np.median(timings[""].cpu_samples)
    head = "schedule | FLOPs | speed-up, wall (median) | speed-up, CPU | mean cos | min cos"
    print(f"| {head} | real kept |")
    print("|---|---|---|---|---|---|---|")
    for s, r in rows.items():
        t = timings[s]
        print(
            f"| {s or 'dense'} | {r['flops'] / base_f:.2f} | {base_t / t.median:.2f}x "
            f"({t.median * 1e3:.0f} ms) | {base_cpu / np.median(t.cpu_samples):.2f}x "
            f"| {r['cos'].mean():.4f} | {r['cos'].min():.4f} | {r['real']:.2f} |"
        )


def _real_kept(f: Any, params: Any, batches: list) -> float:
    """The share of real tokens present after the last pruning point, over all batches."""
    import jax

    from einfuse.explain_pruning import pruning_points

    traced = f.trace(params, *batches[0])
    points = pruning_points(traced.program)
    if not points:
        return 1.0
    last = points[-1].positions
    positions = jax.jit(lambda *xs: traced.runner.environment(*xs)[last])
    kept = total = 0
    for ids, mask in batches:
        total += int(mask.sum())
        pos = np.asarray(positions(*jax.tree_util.tree_leaves((params, ids, mask))))
        kept += int(np.take_along_axis(mask, pos, axis=1).sum())
    return kept / total


if __name__ == "__main__":
    main()
