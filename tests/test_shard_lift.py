"""The lifter enters shard_map bodies: a hand-written tensor-parallel Llama block lifts into
one cascade with device ranks whose collectives are its two psums, and through einfuse.jit
it equals the original function, the unsharded block, and their gradients.

The checks run on 8 simulated CPU devices in one subprocess (tests/shard_lift_checks.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.shard_subprocess import ok, run_checks

RTOL = 2e-5  # float32; the psums add the 8 partial products in another order


@pytest.fixture(scope="module")
def checks() -> dict:
    return run_checks("tests.shard_lift_checks")


def test_llama_block_lifts_into_one_region_with_two_all_reduces(checks: dict) -> None:
    got = ok(checks, "llama_block")
    assert got["regions"] == 1 and got["opaque"] == [] and got["fallbacks"] == []
    assert got["kinds"] == [["all_reduce", "all_reduce"]]
    assert [axis for _, axis in got["devices"][0]] == ["tp", "tp"]


def test_a_check_vma_body_lifts_the_same(checks: dict) -> None:
    got = ok(checks, "llama_block")
    assert got["checked_vma"] == [["all_reduce", "all_reduce"]]
    assert got["checked_vma_vs_shard_map"] < RTOL


def test_llama_block_equals_the_shard_map_and_the_unsharded_block(checks: dict) -> None:
    got = ok(checks, "llama_block")
    assert got["vs_shard_map"] < RTOL and got["vs_unsharded"] < RTOL
    assert got["fused_vs_shard_map"] < RTOL  # fuse's online softmax runs inside the body


def test_llama_block_gradients_equal_the_shard_maps(checks: dict) -> None:
    assert ok(checks, "llama_block")["grads_vs_shard_map"] < RTOL


def test_llama_block_optimized_hlo_has_exactly_two_all_reduces(checks: dict) -> None:
    assert ok(checks, "llama_block")["hlo"] == {"all-reduce": 2}


@pytest.mark.parametrize(
    ("name", "hlo"),
    [
        ("none", {"all-reduce": 2}),
        ("split", {"all-reduce": 4}),  # two halves per psum, not merged back by XLA
        ("reorder", {"reduce-scatter": 2, "all-gather": 2}),
        ("chunk", {"collective-permute": 14, "all-gather": 2}),  # 2 rings of 7 steps
        ("all", {"collective-permute": 28, "all-gather": 4}),
        ("auto", {"all-reduce": 2}),
    ],
)
def test_overlap_passes_through_jit_keep_values_gradients_and_collectives(
    checks: dict, name: str, hlo: dict
) -> None:
    """The hand-written block, lifted from shard_map, through each pass and all three."""
    got = ok(checks, "passes")[name]
    assert got["values"] < RTOL and got["grads"] < RTOL
    assert got["hlo"] == hlo


RING = {"collective-permute": 7, "all-gather": 1}


@pytest.mark.parametrize(
    ("name", "most"),
    [
        ("none", {"all-reduce": 1}),
        ("split", {"all-reduce": 1}),
        ("reorder", {"reduce-scatter": 1, "all-gather": 1}),
        ("chunk", RING),
        ("all", RING),
    ],
)
def test_no_matmul_waits_on_the_other_half_or_on_its_own_rings_steps(
    checks: dict, name: str, most: dict
) -> None:
    """In the optimized HLO: a matmul of one half waits on at most its own half's first
    all-reduce; a ring step's matmul on no permute of its ring, so the most any matmul waits
    on is the one earlier ring (7 steps on 8 devices) and its all-gather. Some matmul does
    wait on that much: the check sees through the fusions."""
    waits = [Counter(w) for w in ok(checks, "passes")[name]["matmul_waits"]]
    assert all(all(w[k] <= most[k] for k in w) and set(w) <= set(most) for w in waits)
    assert any(w == Counter(most) for w in waits)


def test_explain_names_the_region_and_its_psums(checks: dict) -> None:
    text = ok(checks, "llama_block")["explain"]
    assert "lifted 1 region(s)" in text and "psum x2" in text and "0 opaque op(s)" in text
    assert (
        "shard_map over mesh tp=8; collectives: all_reduce AR0 on tp, all_reduce AR1 on tp" in text
    )


def test_every_collective_lifts_and_runs_like_jax(checks: dict) -> None:
    got = ok(checks, "every_collective")
    assert got["kinds"] == sorted(
        ["all_reduce", "all_reduce", "all_gather", "reduce_scatter", "ppermute", "ppermute"]
    )
    assert got["fallbacks"] == []
    assert got["values"] < RTOL and got["grads"] < RTOL


def test_every_collective_shows_in_the_optimized_hlo(checks: dict) -> None:
    got = ok(checks, "every_collective")
    hlo = got["hlo"]
    assert hlo["all-reduce"] >= 2 and hlo["collective-permute"] == 2, hlo
    assert hlo["reduce-scatter"] == 1 and hlo["all-gather"] == 1, hlo
    assert got["gathers"] == 0  # the gathered tensor reads back as one dim by a reshape


def test_a_body_the_lifter_does_not_understand_stays_whole_with_the_reason(checks: dict) -> None:
    got = ok(checks, "not_understood")
    assert got["opaque"] == [
        ["shard_map", "shard_map not lifted: cumsum inside the shard_map has no lifting rule"]
    ]
    assert got["values"] == 0.0
    assert "(shard_map not lifted: cumsum" in got["text"]
