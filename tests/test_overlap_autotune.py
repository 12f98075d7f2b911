"""The cost model decides the overlap passes: ``auto`` options, the ``when=pays`` veto, the
autotuner's overlap space, and the reports ``explain`` / ``passes --why`` print.

Decisions are taken at the shapes that decide them (thousands of tokens, H100 widths); the
rewrites the autotuner picked there are checked against the float64 reference at a small
shape where the same options are legal (the reference cannot run a 16K x 8192 layer here).
"""

from __future__ import annotations

import itertools

import pytest

import einfuse
from einfuse.autotune import SpaceOptions, build_space
from einfuse.cost_model.overlap_choice import layer_shape
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade.tp_block import tp_block
from einfuse.ir import parse, verify
from einfuse.ir.cascade import bind_sizes
from einfuse.passes.manager import parse_pipeline, run_passes
from einfuse.passes.overlap_common import OverlapError, cost_target
from einfuse.passes.overlap_report import overlap_explain
from tests.overlap_cases import assert_same

SPEC = "examples/specs/tp_allreduce_norm.ein"
LARGE = dict(t=16384, h=1024, d=8192, x=8, y=8)  # a Llama-70B row-parallel GEMM, TP=8
AUTO = "split-tokens{offset=auto},reorder-norm{when=pays},chunk-collective{chunks=auto}"


def spec(**sizes: int):
    return verify(parse(open(SPEC).read())).with_sizes(**sizes)


def reports(c, pipeline: str) -> str:
    """Every overlap pass's report along ``pipeline`` (run under target h100)."""
    with cost_target("h100"):
        result = run_passes(c, pipeline)
        lines = []
        for (_, before), (text, _) in itertools.pairwise(result.history):
            (step,) = parse_pipeline(text)
            lines.append(overlap_explain(before, step.name, dict(step.options)))
    return "\n".join(lines)


def test_tp_block_small_batches_apply_nothing_and_say_why() -> None:
    c = tp_block(8, p=64, d=64, h=8, g=4, e=16, f=16, i=256, rotary=False)
    text = reports(c, AUTO)
    assert (
        run_passes(
            c, AUTO.replace("auto}", "auto,cost=h100}").replace("pays}", "pays,cost=h100}")
        ).cascade
        == c
    )
    assert "split-tokens: p: not applied: 64 tokens < 1024" in text
    assert "reorder-norm: O: not applied: the cost model says it does not pay: saves -" in text
    assert (
        "chunk-collective: O: not applied: the cost model says it does not pay: best is 1" in text
    )


def test_tp_block_large_batches_pick_offset_and_chunks_per_shape() -> None:
    c = tp_block(8, p=4096, d=8192, h=8, g=8, e=128, f=128, i=28672, rotary=False)
    shape, tp, _ = layer_shape(c, "p")
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.ffn, tp) == (64, 8, 128, 28672, 8)
    text = reports(c, "split-tokens{offset=auto},chunk-collective{chunks=auto,cost=h100}")
    assert "split-tokens: p: applied: p = 2304 + 1792 tokens" in text  # offset +256
    assert "cost model: split: " in text and "(round_up(4096, 256)/2 +256)" in text
    # each half's all-reduce gets its own count: the MLP's longer GEMM hides more
    assert "chunk-collective: O_a: applied: 7-step ring x 2 chunks" in text
    assert "chunk-collective: MO_a: applied: 7-step ring x 6 chunks" in text


def test_auto_needs_a_target_and_when_is_checked() -> None:
    c = spec()
    with pytest.raises(OverlapError, match="chunks=auto needs the cost model's target"):
        run_passes(c, "chunk-collective{chunks=auto}")
    with pytest.raises(OverlapError, match="when must be always or pays, got 'never'"):
        run_passes(c, "reorder-norm{when=never}")
    out = run_passes(c, "chunk-collective{chunks=auto,cost=fusemax}").cascade
    assert out == c  # FuseMax joins no devices: a reason, not a crash
    why = overlap_explain(c, "chunk-collective", {"chunks": "auto", "cost": "fusemax"})
    assert "target 'fusemax' has no interconnect" in why
    why = overlap_explain(c, "chunk-collective", {"chunks": "auto", "cost": "cpu"})
    assert "cpu runs collectives synchronously, nothing overlaps" in why


def tune(c):
    return einfuse.autotune(
        c,
        target="h100",
        objective="model",
        storage="memory",
        progress=False,
        space_options=SpaceOptions(providers=("overlap",)),
    )


def test_autotune_leaves_small_shapes_alone_and_overlaps_large_ones() -> None:
    small = tune(spec(t=64))
    assert small.pipeline == "" and small.default_pipeline == ""
    h100 = get_target("h100", calibrate=False)
    c = spec(t=64)
    space = build_space(c, h100, bind_sizes(c), SpaceOptions(providers=("overlap",)))
    assert {p.name: p.default for p in space.params if p.kind == "pass"} == {
        "reorder-norm": False,
        "chunk-collective": False,
    }
    cpu = get_target("cpu", calibrate=False)  # synchronous collectives: nothing to search
    assert build_space(c, cpu, bind_sizes(c), SpaceOptions(providers=("overlap",))).params == ()
    large = tune(spec(**LARGE))
    want = "reorder-norm,chunk-collective{chunks=8,bidirectional=False}"
    assert large.pipeline == want
    assert large.predicted_s < tune_off(spec(**LARGE))
    # the rewrite it picked, at a shape the float64 reference runs (8 devices x 8 chunks)
    small_c = spec(t=128, x=8, y=8)
    out = run_passes(small_c, want).cascade
    assert out != small_c
    assert_same(small_c, out, seed=3)


def tune_off(c) -> float:
    """The model's time of the cascade with no overlap pass."""
    from einfuse.autotune.screen import ModelEvaluator
    from einfuse.autotune.space import Candidate
    from einfuse.ir.schedule import Schedule

    evaluator = ModelEvaluator(c, get_target("h100", calibrate=False), bind_sizes(c))
    return evaluator.estimate(Candidate("", Schedule(), ()))[0]


def test_the_split_offset_chosen_at_scale_is_exact_on_the_reference() -> None:
    pipeline = "split-tokens{offset=256,force=true},reorder-norm,chunk-collective{chunks=2}"
    c = tp_block(8, p=768, d=8, h=8, g=1, e=2, f=2, i=16, rotary=False)
    out = run_passes(c, pipeline).cascade
    assert {e.output for e in out.einsums} >= {"O_a_SH", "MO_b_SH"}
    assert_same(c, out, seed=5, rtol=1e-9)


def test_explain_and_passes_why_print_the_reports(capsys: pytest.CaptureFixture) -> None:
    from einfuse.cli import main

    passes = "reorder-norm{when=pays},chunk-collective{chunks=auto}"
    sizes = "t=1024,h=1024,d=8192,x=8,y=8"
    main(["explain", SPEC, "--target", "h100", "--sizes", sizes, "--passes", passes])
    out = capsys.readouterr().out
    assert "reorder-norm: AR: applied: reduce-scatter over 8 devices (128 tokens each)" in out
    assert "chunk-collective: AR_SH: applied: 7-step ring x 2 chunks" in out
    assert main(["passes", SPEC, "--why", "--passes", passes.replace("}", ",cost=h100}")]) == 0
    out = capsys.readouterr().out
    assert "chunk-collective: AR: not applied: the cost model says it does not pay" in out
