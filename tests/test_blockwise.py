"""The fused group emitted as one blockwise loop: same numbers, no P x M tensor."""

from dataclasses import replace

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.backends.blockwise_plan import drop_true_padding_masks, plan_loop
from einfuse.backends.jax_backend import emit_jax
from einfuse.backends.jax_blockwise import BlockwiseCascade
from einfuse.backends.reference import infer_sizes, interpret
from einfuse.einsum_cascade import attention
from einfuse.ir import Cascade, parse
from einfuse.ir.cascade import bind_sizes
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import fused_groups
from einfuse.passes.manager import run_passes


def _fused(form: str, tile: int, **kw) -> tuple[Cascade, Cascade]:
    if form in ("2pass", "1pass"):
        kw["tile"] = tile
    c = attention(form, e=8, f=8, **kw)
    return c, run_passes(c, f"fuse{{tile={tile}}}").cascade


def _inputs(c: Cascade, p: int, m: int, seed: int = 0, groups: int | None = None):
    rng = np.random.default_rng(seed)
    lead = (2, 3) if groups is None else (2, 3, groups)
    shapes = {"Q": (*lead, 8, p), "K": (2, 3, 8, m), "V": (2, 3, 8, m)}
    return {t.name: rng.normal(size=shapes[t.name]) for t in c.inputs}


def _run(fused: Cascade, ins: dict, query_tile: int) -> np.ndarray:
    sizes = infer_sizes(fused, {k: v.shape for k, v in ins.items()})
    bw = BlockwiseCascade(fused, fused_groups(fused)[0], sizes, query_tile=query_tile)
    out = jax.jit(bw)({k: jnp.asarray(v, jnp.float32) for k, v in ins.items()})
    return np.asarray(out["AV"])


@pytest.mark.parametrize("form", ["3pass", "deferred", "2pass"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("p", "m", "tile", "query_tile"), [(8, 8, 4, 4), (7, 10, 4, 3)])
def test_blockwise_attention_matches_the_reference(form, causal, p, m, tile, query_tile):
    c, fused = _fused(form, tile, causal=causal)
    ins = _inputs(c, p, m)
    want = interpret(c, ins)["AV"]
    np.testing.assert_allclose(_run(fused, ins, query_tile), want, rtol=2e-5, atol=2e-5)


def test_grouped_query_attention_runs_blockwise():
    c, fused = _fused("3pass", 4, causal=True, kv_groups=2)
    ins = _inputs(c, 9, 9, groups=2)
    np.testing.assert_allclose(_run(fused, ins, 4), interpret(c, ins)["AV"], rtol=2e-5, atol=2e-5)


def test_causal_mask_is_recognized_and_skips_tiles():
    c, fused = _fused("3pass", 4, causal=True)
    ins = _inputs(c, 8, 8)
    sizes = infer_sizes(fused, {k: v.shape for k, v in ins.items()})
    bw = BlockwiseCascade(fused, fused_groups(fused)[0], sizes, query_tile=4)
    assert bw.plan.causal and bw.query == "p"
    _, plain = _fused("3pass", 4, causal=False)
    bw_plain = BlockwiseCascade(plain, fused_groups(plain)[0], sizes, query_tile=4)
    assert not bw_plain.plan.causal and bw_plain.full_body is None
    # Tiles below the diagonal run a step without the mask: no comparison with the query.
    assert bw.full_body is not None
    assert "<=" in bw.body.source("step") and "<=" not in bw.full_body.source("step")


def test_loop_body_has_no_loop_rank_and_reads_one_key_tile():
    c, fused = _fused("3pass", 4)
    sizes = infer_sizes(fused, {k: v.shape for k, v in _inputs(c, 8, 8).items()})
    body = str(BlockwiseCascade(fused, fused_groups(fused)[0], sizes).body_cascade)
    assert "m1" not in body.split("\n", 2)[2]  # past the ranks and partition lines
    assert "K__blk[b, h, e, m0]" in body and "RM__prev[b, h, p]" in body


def test_the_accumulator_is_stored_query_major_as_a_plain_p_v_gemm():
    """The library writes AV[f, p]; the loop keeps the running P V as [.., p, f] instead."""
    c, fused = _fused("3pass", 4)
    assert "RNV[m1+1, b, h, f, p]" in str(fused)
    sizes = infer_sizes(fused, {k: v.shape for k, v in _inputs(c, 8, 8).items()})
    body = BlockwiseCascade(fused, fused_groups(fused)[0], sizes).body_cascade
    accumulators = [e for e in body.einsums if "f" in e.output_ranks and "p" in e.output_ranks]
    assert accumulators
    for e in accumulators:
        ranks = e.output_ranks
        assert ranks.index("p") < ranks.index("f"), str(e)


def test_no_intermediate_spans_both_queries_and_keys():
    c, fused = _fused("3pass", 16)
    ins = _inputs(c, 64, 64)
    sizes = infer_sizes(fused, {k: v.shape for k, v in ins.items()})
    bw = BlockwiseCascade(fused, fused_groups(fused)[0], sizes, query_tile=16)
    jaxpr = jax.make_jaxpr(bw)({k: jnp.asarray(v, jnp.float32) for k, v in ins.items()})
    biggest = max(
        (int(np.prod(v.aval.shape)) for eqn in _all_eqns(jaxpr.jaxpr) for v in eqn.outvars),
        default=0,
    )
    assert biggest < 64 * 64 * 2 * 3  # a [b, h, P, M] score tensor would be this big


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_gradients_flow_through_the_loop():
    c, fused = _fused("3pass", 4, causal=True)
    ins = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(c, 8, 8).items()}
    sizes = infer_sizes(fused, {k: v.shape for k, v in ins.items()})
    bw = BlockwiseCascade(fused, fused_groups(fused)[0], sizes, query_tile=4)
    plain = run_passes(c, "").cascade
    ref = emit_jax(plain)
    g1 = jax.grad(lambda q: bw({**ins, "Q": q})["AV"].sum())(ins["Q"])
    g2 = jax.grad(lambda q: ref.as_dict(**{**ins, "Q": q})["AV"].sum())(ins["Q"])
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


def test_padding_masks_vanish_when_the_tile_divides():
    c, fused = _fused("3pass", 4)
    sizes = infer_sizes(fused, {k: v.shape for k, v in _inputs(c, 8, 8).items()})
    assert "< M" in str(fused)
    assert "< M" not in str(drop_true_padding_masks(fused, sizes))
    sizes_odd = infer_sizes(fused, {k: v.shape for k, v in _inputs(c, 8, 9).items()})
    assert "< M" in str(drop_true_padding_masks(fused, sizes_odd))


def test_scores_are_query_major_and_q_is_copied_query_first_once():
    """The design stores QK[m, p] and Q[e, p]: each step's dots would read transposed tiles."""
    c = attention("3pass", b=1, h=2, e=8, f=8, p=16, m=16)
    fused = run_passes(c, "fuse{tile=4}").cascade
    looped, plan, rows = plan_loop(fused, fused_groups(fused)[0], bind_sizes(fused, None))
    text = str(looped)
    assert "Qs__qm[b, h, p, e] = Qs[b, h, e, p]" in text
    assert "QK[b, h, m1, p, m0] = Qs__qm[b, h, p, e] * K[b, h, e, m1*M0+m0]" in text
    assert "SN[b, h, m1, p, m0] = exp(QK[b, h, m1, p, m0]" in text
    assert "Qs__qm" in [e.output for e in plan.pre.einsums]  # copied before the loop
    assert rows == ("b", "h")


def test_an_operand_already_query_first_is_not_copied():
    c = _layout(q="p, e", qk="p, m", k="e, m", v="f, m", causal=False)
    fused = run_passes(c, "fuse{tile=4}").cascade
    looped, _, _ = plan_loop(fused, fused_groups(fused)[0], bind_sizes(fused, None))
    assert "__qm" not in str(looped)


_LAYOUT = """ranks h=2, e=8, f=8, p=12, m=12
inputs Q[h, {q}], K[h, {k}], V[h, {v}]
QK[h, {qk}] = Q[h, {q}] * K[h, {k}] * 0.35
MQK[h, {qk}] = {masked}
GM[h, p] = max(m) MQK[h, {qk}]
SN[h, {qk}] = exp(MQK[h, {qk}] - GM[h, p])
SD[h, p] = SN[h, {qk}]
AV[h, f, p] = SN[h, {qk}] * V[h, {v}] / SD[h, p]
outputs AV
"""


def _layout(q: str, qk: str, k: str, v: str, causal: bool) -> Cascade:
    """Attention with its operands and scores stored in the given rank orders."""
    scores = f"QK[h, {qk}]"
    masked = f"where(m <= p, {scores}, -inf)" if causal else scores
    return parse(_LAYOUT.format(q=q, qk=qk, k=k, v=v, masked=masked))


@settings(max_examples=12, deadline=None)
@given(
    q=st.sampled_from(["e, p", "p, e"]),
    qk=st.sampled_from(["m, p", "p, m"]),
    k=st.sampled_from(["e, m", "m, e"]),
    v=st.sampled_from(["f, m", "m, f"]),
    causal=st.booleans(),
    tile=st.sampled_from([3, 4, 12]),
    query_tile=st.sampled_from([1, 4, 5, 12]),
    seed=st.integers(0, 2**16),
)
def test_every_operand_layout_gives_the_reference_numbers(
    q, qk, k, v, causal, tile, query_tile, seed
):
    c = _layout(q, qk, k, v, causal)
    fused = run_passes(c, f"fuse{{tile={tile}}}").cascade
    rng = np.random.default_rng(seed)
    ins = {t.name: rng.normal(size=c.tensor_shape(t.name, {})) for t in c.inputs}
    sizes = infer_sizes(fused, {n: x.shape for n, x in ins.items()})
    bw = BlockwiseCascade(fused, fused_groups(fused)[0], sizes, query_tile=query_tile)
    got = jax.jit(bw)({n: jnp.asarray(x, jnp.float32) for n, x in ins.items()})["AV"]
    np.testing.assert_allclose(got, interpret(c, ins)["AV"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_loop_carries_float32_state_and_returns_bfloat16(causal):
    """The tiles stay bfloat16; the running max, sums and P V are float32, as in flash kernels."""
    c = _layout(q="e, p", qk="m, p", k="e, m", v="f, m", causal=causal)
    c = replace(c, inputs=tuple(replace(t, dtype="bfloat16") for t in c.inputs))
    fused = run_passes(c, "fuse{tile=4}").cascade
    rng = np.random.default_rng(3)
    ins = {t.name: jnp.asarray(rng.normal(size=c.tensor_shape(t.name, {})), jnp.bfloat16)
           for t in c.inputs}  # fmt: skip
    want = interpret(c, {n: np.asarray(x, np.float64) for n, x in ins.items()})["AV"]
    got = emit_jax(fused, schedule=Schedule.of(tiles={"p": 4}))(**ins)[0]
    plain = emit_jax(c)(**ins)[0]
    assert got.dtype == plain.dtype == jnp.bfloat16
    error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert error < 1e-2
