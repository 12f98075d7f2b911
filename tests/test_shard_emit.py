"""A cascade with device ranks emits as one shard_map: every communication kind equals the
reference, differentiates like the unsharded program, and shows its collective in the HLO.

The checks run on 8 simulated CPU devices in one subprocess (tests/shard_emit_checks.py),
since XLA_FLAGS must be set before jax is imported."""

from __future__ import annotations

import pytest

from tests.shard_subprocess import ok, run_checks


@pytest.fixture(scope="module")
def checks() -> dict:
    return run_checks("tests.shard_emit_checks")


KINDS = {
    "local": "local",
    "local_slice": "local",
    "local_ring_slice": "local",
    "all_reduce": "all_reduce",
    "all_reduce_max": "all_reduce",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_min": "reduce_scatter",
    "all_gather": "all_gather",
    "ppermute_ring": "ppermute",
    "ppermute_edge": "ppermute",
}


def test_each_communication_kind_equals_the_reference(checks: dict) -> None:
    got = ok(checks, "kinds")
    assert got["classified"] == KINDS
    assert set(got["checked"]) == set(KINDS)
    assert all(8 in ns for ns in got["checked"].values())  # the full mesh, every kind


def test_gradients_equal_the_unsharded_program(checks: dict) -> None:
    errors = ok(checks, "grads")
    assert set(errors) == set(KINDS)
    assert max(errors.values()) < 1e-4, errors


def test_optimized_hlo_has_one_collective_of_each_kind(checks: dict) -> None:
    hlo = ok(checks, "source_and_hlo")["hlo"]
    for kind in ("all-reduce", "reduce-scatter", "all-gather", "collective-permute"):
        assert hlo.get(kind) == 1, hlo


def test_this_devices_offset_in_a_data_index_is_a_slice_not_a_gather(checks: dict) -> None:
    assert ok(checks, "source_and_hlo")["gathers"] == {"local_slice": 0, "local_ring_slice": 0}


def test_source_shows_the_shard_map_and_its_collectives(checks: dict) -> None:
    source = ok(checks, "source_and_hlo")["source"]
    for text in (
        "lax.psum(",
        "lax.psum_scatter(",
        "lax.all_gather(",
        "lax.ppermute(",
        "jax.shard_map(body",
        "lax.axis_index",
        "# mesh: tp=8",
    ):
        assert text in source, text


def test_too_few_devices_is_a_clear_error(checks: dict) -> None:
    assert ok(checks, "too_few_devices").startswith(
        "the cascade's mesh (tp=16) needs 16 devices; JAX sees 8"
    )


def test_a_gathered_view_reads_back_by_floor_division_on_one_device() -> None:
    """``G[t/T0, mod(t, T0)]`` (how a gathered tensor reads as one dim): integer indices."""
    import numpy as np

    from einfuse.backends.jax_backend import emit_jax
    from einfuse.backends.reference import interpret
    from einfuse.ir import parse

    c = parse("ranks t=12, a=3, b=4\ninputs G[a, b]\nGT[t] = G[t/B, mod(t, B)]\noutputs GT\n")
    g = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (got,) = emit_jax(c)(g)
    np.testing.assert_allclose(np.asarray(got), interpret(c, {"G": g})["GT"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), g.reshape(12), rtol=1e-6)


def test_a_size_one_rank_beside_a_unit_coefficient_is_a_window_not_a_gather() -> None:
    """``P[x*T0+t0]`` with ``T0 = 1`` (a reduce-scatter of one row per device) is a reshape."""
    from einfuse.backends.jax_backend import emit_jax_source
    from einfuse.ir import parse

    c = parse("ranks x=4, t0=1, d=3\ninputs P[t, d]\nB[x, t0, d] = P[x*T0+t0, d]\noutputs B\n")
    source = emit_jax_source(c.with_sizes(t=4))
    assert "gather_or_zero" not in source and "jnp.reshape(P, shape=(4, 1, 3))" in source
