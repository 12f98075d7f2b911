"""The overlap cost model: GEMM efficiency, T3 chunking, TokenWeave splitting, reorder-norm."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.gemm import gemm_time, processors
from einfuse.cost_model.overlap import (
    MIN_GAIN,
    chunk_gain,
    reorder_norm_gain,
    stage_s,
)
from einfuse.cost_model.target import Interconnect, TargetSpecError, get_target, parse_target
from einfuse.cost_model.token_split import (
    MIN_SPLIT_TOKENS,
    LayerShape,
    _attention_s,
    _finish,
    split_gain,
)

H100 = get_target("h100")
V5E = get_target("tpu_v5e")
CPU = get_target("cpu", calibrate=False)
DOWN = {"n": 8192, "k": 28672 // 8, "tp": 8}  # Llama-70B's down projection under TP=8


def llama(tokens: int) -> LayerShape:
    return LayerShape(tokens, hidden=8192, ffn=28672, heads=64, kv_heads=8)


# --- GEMM efficiency ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20000), n=st.integers(1, 20000), k=st.integers(1, 20000))
def test_gemm_never_beats_peak_and_grows_with_every_size(m, n, k):
    g = gemm_time(m, n, k, "bfloat16", H100)
    assert 0 < g.efficiency <= 1 + 1e-9
    for bigger in ((2 * m, n, k), (m, 2 * n, k), (m, n, 2 * k)):
        assert gemm_time(*bigger, "bfloat16", H100).seconds >= g.seconds


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 20000), cores=st.integers(1, 132))
def test_fewer_sms_never_run_a_gemm_faster(m, cores):
    full = gemm_time(m, 8192, 3584, "bfloat16", H100)
    assert gemm_time(m, 8192, 3584, "bfloat16", H100, cores=cores).seconds >= full.seconds


def test_small_gemms_lose_efficiency_and_a_lost_wave_costs_a_whole_wave():
    assert gemm_time(128, 8192, 3584, "bfloat16", H100).efficiency < 0.5
    assert gemm_time(8192, 8192, 3584, "bfloat16", H100).efficiency > 0.7
    # 1024 x 8192 is 256 tiles of 128 x 256: 2 waves on 132 SMs, 3 on the 116 NCCL leaves.
    full = gemm_time(1024, 8192, 3584, "bfloat16", H100)
    held = gemm_time(1024, 8192, 3584, "bfloat16", H100, cores=116)
    assert (full.waves, held.waves) == (2, 3)
    assert held.seconds == pytest.approx(1.5 * full.seconds)
    assert processors(H100) == 132 and processors(V5E) == 1


def test_gemm_rejects_bad_sizes_and_core_counts():
    with pytest.raises(CostModelError, match="positive"):
        gemm_time(0, 8, 8, "bfloat16", H100)
    with pytest.raises(CostModelError, match="133 cores"):
        gemm_time(8, 8, 8, "bfloat16", H100, cores=133)


# --- T3 chunking -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    alone=st.floats(1e-6, 1e-3), slowdown=st.floats(1.0, 3.0), comm=st.floats(0.0, 2e-3)
)  # fmt: skip
def test_a_stage_lasts_between_its_longest_part_and_the_slowed_compute(alone, slowdown, comm):
    busy = alone * slowdown
    stage = stage_s(alone, busy, comm)
    assert max(alone, comm) * (1 - 1e-12) <= stage <= max(busy, comm) * (1 + 1e-12)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 32768), k=st.sampled_from([1024, 3584]), bidi=st.booleans())
def test_chunking_never_predicts_worse_than_serial_nor_better_than_the_larger_part(tokens, k, bidi):
    g = chunk_gain(tokens, 8192, k, tp=8, target=H100, bidirectional=bidi)
    assert g.overlapped_s <= g.serial_s
    assert g.overlapped_s >= max(g.gemm_s, g.comm_s)
    assert g.applies == (g.chunks > 1) and (g.chunks == 1) == (g.overlapped_s == g.serial_s)
    assert g.why


def test_one_chunk_is_the_serial_gemm_then_collective():
    g = chunk_gain(16384, **DOWN, target=H100, max_chunks=1)
    assert g.chunks == 1 and g.overlapped_s == g.serial_s
    assert g.serial_s == pytest.approx(g.gemm_s + g.comm_s + 4e-6)  # two 2-us launches


def test_small_batches_do_not_pay_and_large_ones_do():
    small = chunk_gain(128, **DOWN, target=H100)
    assert small.chunks == 1 and small.why.startswith("not applied")
    large = chunk_gain(16384, **DOWN, target=H100)
    assert large.chunks > 1 and large.gain > MIN_GAIN
    assert large.why.startswith(f"{large.chunks} chunks")


def test_gain_grows_with_the_batch_on_h100():
    gains = [chunk_gain(t, **DOWN, target=H100).gain for t in (1024, 4096, 16384)]
    assert gains == sorted(gains)


def test_free_communication_leaves_nothing_to_hide():
    fast = dataclasses.replace(
        H100, interconnect=dataclasses.replace(H100.interconnect, bandwidth_bytes_per_s=1e18)
    )
    g = chunk_gain(16384, **DOWN, target=fast)
    assert g.comm_s < 0.1 * g.gemm_s and g.gain < 0.1


def test_sm_theft_costs_overlap():
    free = dataclasses.replace(
        H100, interconnect=dataclasses.replace(H100.interconnect, collective_cores=0)
    )
    assert chunk_gain(8192, **DOWN, target=free).gain > chunk_gain(8192, **DOWN, target=H100).gain


def test_a_bidirectional_ring_pays_on_a_torus_but_not_through_a_switch():
    one_way = chunk_gain(4096, 8192, 1024, tp=8, target=V5E)
    both = chunk_gain(4096, 8192, 1024, tp=8, target=V5E, bidirectional=True)
    assert both.overlapped_s < one_way.overlapped_s
    switch = [chunk_gain(4096, **DOWN, target=H100, bidirectional=b) for b in (False, True)]
    assert switch[0] == switch[1]


def test_no_overlap_where_collectives_are_synchronous_or_absent():
    cpu = chunk_gain(4096, 512, 512, tp=8, target=CPU)
    assert cpu.chunks == 1 and "synchronously" in cpu.why
    assert chunk_gain(4096, **{**DOWN, "tp": 1}, target=H100).why == "one device: no collective"


def test_a_tp_degree_beyond_the_switch_is_a_clear_error():
    with pytest.raises(CostModelError, match="at most 8 devices"):
        chunk_gain(4096, **{**DOWN, "tp": 16}, target=H100)


# --- reorder-norm ------------------------------------------------------------------------------


def test_reordering_the_norm_pays_for_large_batches_only():
    small, large = (reorder_norm_gain(t, 8192, tp=8, target=H100) for t in (64, 8192))
    assert not small.applies and small.why.startswith("not applied")
    assert large.applies and large.reordered_s < large.serial_s
    # the norm on 1/8 of the rows is what it saves: at most the whole norm
    assert large.serial_s - large.reordered_s < 0.25 * large.serial_s


# --- TokenWeave splitting ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    start=st.floats(0, 1e-3),
    alone=st.floats(1e-6, 1e-3),
    slowdown=st.floats(1.0, 3.0),
    gap=st.floats(0, 1e-3),
    length=st.floats(0, 1e-3),
)
def test_compute_ends_between_its_free_and_its_fully_slowed_time(
    start, alone, slowdown, gap, length
):
    busy = [(start + gap, start + gap + length)]
    end = _finish(start, alone, alone * slowdown, busy)
    assert start + alone * (1 - 1e-9) <= end <= start + alone * slowdown * (1 + 1e-9)
    assert _finish(start, alone, alone * slowdown, []) == start + alone


def test_split_halves_sit_at_the_wave_rounded_middle_plus_the_offset():
    g = split_gain(llama(4000), tp=8, target=H100)
    assert g.first == 4096 // 2 + g.offset
    assert g.split_s <= g.serial_s and 0 < g.gain < 0.5
    assert f"{g.first} + {4000 - g.first}" in g.why


def test_token_weave_only_splits_large_batches():
    small = split_gain(llama(MIN_SPLIT_TOKENS - 1), tp=8, target=H100)
    assert not small.applies and f"< {MIN_SPLIT_TOKENS}" in small.why
    gains = [split_gain(llama(t), tp=8, target=H100).gain for t in (1024, 4096)]
    assert all(g > MIN_GAIN for g in gains)


def test_split_and_reorder_together_beat_split_alone():
    alone = split_gain(llama(4096), tp=8, target=H100)
    both = split_gain(llama(4096), tp=8, target=H100, reorder_norm=True)
    assert both.serial_s < alone.serial_s and both.split_s < alone.split_s


def test_later_tokens_of_one_causal_sequence_cost_more_attention():
    one = llama(4096)
    early, late = (_attention_s(one, s, 2048, 8, H100, "bfloat16", H100.interconnect, False)
                   for s in (0, 2048))  # fmt: skip
    assert late == pytest.approx(3 * early, rel=1e-3)  # keys 2048..4096 vs 0..2048 a query
    two = dataclasses.replace(one, seq_len=2048)  # two sequences: the halves cost the same
    assert _attention_s(two, 2048, 2048, 8, H100, "bfloat16", H100.interconnect, False) == early


def test_all_reduce_chunking_prices_the_twice_larger_collective():
    rs = chunk_gain(8192, **DOWN, target=H100)
    ar = chunk_gain(8192, **DOWN, target=H100, kind="all_reduce")
    assert ar.comm_s > 1.9 * rs.comm_s and ar.serial_s > rs.serial_s
    assert "all-reduce" in ar.why


def test_split_rejects_a_tp_degree_that_does_not_divide_the_heads():
    with pytest.raises(CostModelError, match="must divide heads"):
        split_gain(LayerShape(4096, 8192, 28672, 60, 8), tp=8, target=H100)


# --- targets -----------------------------------------------------------------------------------


def test_gpu_targets_describe_their_collectives():
    ic = get_target("h200").interconnect
    assert (ic.bus_efficiency, ic.collective_cores, ic.max_devices) == (0.82, 16, 8)
    assert not CPU.interconnect.asynchronous and V5E.interconnect.asynchronous


def test_interconnect_rejects_an_efficiency_above_one():
    with pytest.raises(TargetSpecError, match="bus_efficiency"):
        Interconnect(1e-6, 1e9, "switch", bus_efficiency=1.5)
    with pytest.raises(TargetSpecError, match="unknown keys"):
        parse_target(
            {"name": "x", "device_kind": "gpu", "word_bytes": 2,
             "units": [{"name": "u", "kind": "matrix", "ops_per_s": {"bfloat16": 1e12}}],
             "memory": [{"name": "hbm", "capacity_bytes": 1e9, "bandwidth_bytes_per_s": 1e12}],
             "interconnect": {"latency_s": 1e-6, "bandwidth_bytes_per_s": 1e9,
                              "topology": "switch", "nvls": True}}
        )  # fmt: skip
