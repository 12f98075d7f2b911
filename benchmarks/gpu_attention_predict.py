"""What the cost model predicts for the rows of ``benchmarks.gpu_attention``: predictions, not
measurements, for when no GPU is at hand (and to compare with one when it is).

The attention is lifted at the shape (from shapes alone: nothing is allocated), and each
einfuse row is priced as the autotuner's model objective prices it: ``jit`` as the unfused
cascade without a schedule (XLA's), ``einfuse_jax`` as ``fuse{tile=512}`` with query tile 512
and the autotuner's defaults for the rest (one row at a time), ``einfuse_pallas`` as
``fuse{tile=64}`` with query tile 128 on the Pallas backend, and the tuned row as the choice
of ``einfuse.autotune(..., objective="model", backend="pallas")``. cuDNN, Pallas' ``mha``
and tokamax are not modelled. Re-run it when the model changes:

    python -m benchmarks.gpu_attention_predict --target h200 --sizes 4096,16384
"""

from __future__ import annotations

import argparse
import functools
import inspect
from typing import Any

import jax

from benchmarks.gpu_attention import JAX_TILE, LABELS, PALLAS_TILE, Case
from benchmarks.gpu_attention_rows import attention

PALLAS_QUERY_TILE = 128  # einfuse.backends.pallas.config.DEFAULT_QUERY_TILE
Prediction = tuple[float | None, str]  # seconds (None: none), and how it was priced or why not


def lifted(case: Case) -> tuple[Any, dict[str, int]]:
    """The canonical cascade of the attention region at this shape, and its rank sizes."""
    import einfuse
    from einfuse.compile_path import region_sizes

    q = jax.ShapeDtypeStruct((case.batch, case.seq, case.heads, case.dim), case.dtype)
    kv = jax.ShapeDtypeStruct((case.batch, case.seq, case.kv_heads, case.dim), case.dtype)
    traced = einfuse.jit(functools.partial(attention, causal=case.causal)).trace(q, kv, kv)
    program = traced.lifted
    region = max(program.regions, key=lambda r: len(r.cascade.einsums))
    return region.cascade, region_sizes(program, region)


def _price(cascade: Any, sizes: dict, target: str, backend: str, values: dict) -> Prediction:
    """The autotuner's candidate for these param values (its defaults for the rest: tiles of
    the other ranks, warps, stages), priced by its model evaluator for ``backend``."""
    import dataclasses

    from einfuse.autotune.screen import ModelEvaluator
    from einfuse.autotune.space import SpaceOptions, build_space
    from einfuse.autotune.tuner import _for_backend
    from einfuse.backends.backend import get_backend
    from einfuse.cost_model.target import get_target

    options = SpaceOptions()
    if "backend" in {f.name for f in dataclasses.fields(SpaceOptions)}:
        options = dataclasses.replace(options, backend=backend)
    options = _for_backend(options, get_backend(backend))
    space = build_space(cascade, get_target(target), sizes, options)
    names = {p.name for p in space.params}
    candidate = space.candidate(space.point({k: v for k, v in values.items() if k in names}))
    if not values.get("fuse", True):  # jax.jit: the unfused program, XLA's own schedule
        candidate = dataclasses.replace(candidate, pipeline="", schedule=None)
    if "backend" in inspect.signature(ModelEvaluator).parameters:
        evaluator, how = ModelEvaluator(cascade, target, sizes, backend=backend), backend
    else:  # a model without the Pallas kernel's pricing prices the loop alone
        evaluator = ModelEvaluator(cascade, target, sizes)
        how = backend if backend == "jax" else "the jax loop's model (no Pallas pricing here)"
    seconds, reason = evaluator.estimate(candidate)
    if reason:
        return None, reason
    schedule = candidate.schedule or "no schedule (XLA's)"
    return seconds, f"{candidate.pipeline or 'unfused'}; {schedule}; priced for {how}"


def _tuned(cascade: Any, sizes: dict, target: str) -> Prediction:
    from einfuse.autotune.tuner import autotune

    try:
        r = autotune(cascade, sizes=sizes, target=target, objective="model", backend="pallas",
                     storage="memory", progress=False, trials=2000)  # fmt: skip
    except Exception as exc:
        return None, f"autotune refused: {str(exc).splitlines()[0][:200]}"
    return r.predicted_s, f"model's choice: {r.pipeline or 'unfused'}; {r.schedule}"


def predict(case: Case, target: str = "h200") -> dict[str, Prediction]:
    """Per row of the benchmark, the predicted seconds and how they were priced."""
    cascade, sizes = lifted(case)
    fused = {"fuse": True, "fuse.tile": JAX_TILE, "fuse.query_tile": 512}
    pallas = {"fuse": True, "fuse.tile": PALLAS_TILE, "fuse.query_tile": PALLAS_QUERY_TILE}
    return {
        "jit": _price(cascade, sizes, target, "jax", {"fuse": False}),
        "einfuse_jax": _price(cascade, sizes, target, "jax", fused),
        "einfuse_pallas": _price(cascade, sizes, target, "pallas", pallas),
        "pallas_tuned": _tuned(cascade, sizes, target),
    }


def markdown(cases: list[Case], target: str) -> str:
    """A TFLOP/s table of the predictions, rows x shapes, then how each was priced."""
    preds = [predict(c, target) for c in cases]
    heads = [c.name for c in cases]
    lines = [f"| predicted on {target} (TFLOP/s) | {' | '.join(heads)} |"]
    lines.append("|---" * (len(cases) + 1) + "|")
    for row in preds[0]:
        cells = [
            f"{c.flops / p[row][0] / 1e12:.0f}" if p[row][0] else "refused"
            for c, p in zip(cases, preds)
        ]
        label = "einfuse (pallas), the model's own choice" if row == "pallas_tuned" else LABELS[row]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "How each was priced (or why the model refused it):", ""]
    for row in preds[0]:
        by_how: dict[str, list[str]] = {}
        for c, p in zip(cases, preds):
            by_how.setdefault(p[row][1], []).append(c.name)
        for how, names in by_how.items():
            lines.append(f"- {row}, {', '.join(names)}: {how}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="h200")
    ap.add_argument("--sizes", default="1024,4096,16384,32768")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.sizes.split(",")]
    cases = [Case(args.dtype, s, c) for c in (False, True) for s in seqs]
    cases += [Case(args.dtype, 16384, c, 32, 8) for c in (False, True)]
    print(markdown(cases, args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
