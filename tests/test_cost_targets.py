"""Hardware targets, host calibration and the collective/overlap model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.cost_model import calibrate
from einfuse.cost_model.calibrate_overheads import fit_dot_element_costs
from einfuse.cost_model.collectives import (
    best_chunk_count,
    collective_latency_s,
    collective_time,
    collective_transfer_s,
    overlapped_time,
)
from einfuse.cost_model.target import (
    ComputeUnit,
    Interconnect,
    MemoryLevel,
    Target,
    TargetSpecError,
    UnknownTargetError,
    get_target,
    known_targets,
    load_target,
)

BUILTIN = known_targets()
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


# ---------------------------------------------------------------------------------------------
# Built-in targets.


def test_the_required_targets_are_built_in():
    assert {"cpu", "h100", "h200", "a100", "tpu_v5e", "fusemax"} <= set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_target_loads_and_is_internally_consistent(name):
    target = get_target(name, calibrate=False)
    assert target.name == name
    capacities = [level.capacity_bytes for level in target.memory]
    assert capacities == sorted(capacities, reverse=True)
    assert len(set(capacities)) == len(capacities)
    assert all(level.bandwidth_bytes_per_s > 0 for level in target.memory)
    assert {unit.kind for unit in target.units} == {"matrix", "vector", "transcendental"}
    for unit in target.units:
        assert unit.dtypes
        assert all(rate > 0 and math.isfinite(rate) for _, rate in unit.ops_per_s)
    assert target.word_bytes in (1, 2, 4, 8)


@pytest.mark.parametrize("name", BUILTIN)
def test_smaller_memory_levels_are_at_least_as_fast(name):
    bandwidths = [level.bandwidth_bytes_per_s for level in get_target(name, calibrate=False).memory]
    assert bandwidths == sorted(bandwidths)


@pytest.mark.parametrize("name", BUILTIN)
def test_matrix_unit_outpaces_vector_unit_and_vector_outpaces_exp(name):
    target = get_target(name, calibrate=False)
    matrix, vector, exp = (target.unit(k) for k in ("matrix", "vector", "transcendental"))
    shared = set(matrix.dtypes) & set(vector.dtypes) & set(exp.dtypes)
    assert shared
    for dtype in shared:
        assert matrix.rate(dtype) > vector.rate(dtype) > exp.rate(dtype)


def test_unknown_target_names_the_known_ones():
    with pytest.raises(UnknownTargetError) as error:
        get_target("h300")
    message = str(error.value)
    assert "h300" in message
    for name in BUILTIN:
        assert name in message


def test_fusemax_matrix_rate_is_256_by_256_pes_at_940_mhz():
    pe_2d = get_target("fusemax").unit("matrix")
    assert pe_2d.rate("bf16") == pytest.approx(256 * 256 * 940e6, rel=1e-12)


def test_fusemax_exp_costs_six_macs_and_an_add_on_the_1d_array():
    target = get_target("fusemax")
    pe_1d = target.unit("vector")
    assert pe_1d.rate("bf16") == pytest.approx(256 * 940e6, rel=1e-12)
    exp = target.unit("transcendental")
    assert exp.emulated_on == pe_1d.name
    assert exp.rate("bf16") == pytest.approx(256 * 940e6 / (6 + 1), rel=1e-12)


def test_datasheet_flops_are_halved_into_macs():
    h100 = get_target("h100")
    assert h100.unit("matrix").rate("bfloat16") == pytest.approx(989.4e12 / 2)
    assert h100.main_memory.bandwidth_bytes_per_s == pytest.approx(3.35e12)


def test_h200_has_h100_compute_and_faster_larger_hbm():
    h100, h200 = get_target("h100"), get_target("h200")
    assert h200.units == h100.units
    assert h200.main_memory.bandwidth_bytes_per_s > h100.main_memory.bandwidth_bytes_per_s
    assert h200.main_memory.capacity_bytes > h100.main_memory.capacity_bytes


def test_rate_accepts_aliases_and_numpy_dtypes():
    unit = get_target("h100").unit("vector")
    assert unit.rate("f32") == unit.rate("float32") == unit.rate(np.dtype("float32"))
    assert unit.rate(np.float32) == unit.rate("fp32")


def test_rate_for_an_unsupported_dtype_names_the_supported_ones():
    unit = get_target("tpu_v5e").unit("matrix")
    with pytest.raises(KeyError, match="bfloat16"):
        unit.rate("float32")


def test_target_rejects_memory_not_ordered_largest_first():
    unit = ComputeUnit("alu", "vector", {"float32": 1e9})
    small, big = MemoryLevel("sram", 1 << 20, 1e12), MemoryLevel("dram", 1 << 30, 1e10)
    with pytest.raises(TargetSpecError, match="largest to smallest"):
        Target("bad", "cpu", (unit,), (small, big), None, 4)


def test_target_rejects_an_emulated_rate_that_does_not_follow_exp_cost():
    base = ComputeUnit("alu", "vector", {"float32": 7e9})
    exp = ComputeUnit("exp", "transcendental", {"float32": 2e9}, emulated_on="alu")
    memory = (MemoryLevel("dram", 1 << 30, 1e10),)
    with pytest.raises(TargetSpecError, match="exp_cost_in_macs"):
        Target("bad", "cpu", (base, exp), memory, None, 4, exp_cost_in_macs=7)


def test_target_file_with_a_misspelled_key_is_rejected(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'name = "mine"\ndevice_kind = "cpu"\nword_bytes = 4\n'
        '[[units]]\nname = "alu"\nkind = "vector"\n[units.ops_per_s]\nfloat32 = 1e9\n'
        '[[memory]]\nname = "dram"\ncapacity_bytes = 1e9\nbandwith_bytes_per_s = 1e9\n'
    )
    with pytest.raises(TargetSpecError, match="bandwith_bytes_per_s"):
        load_target(path)


def test_user_target_file_loads_with_derived_rates(tmp_path):
    lanes, clock = random.randint(2, 512), random.uniform(1e8, 3e9)
    path = tmp_path / "mine.toml"
    path.write_text(
        f'name = "mine"\ndevice_kind = "accelerator"\nword_bytes = 2\nexp_cost_in_macs = 5\n'
        f'[[units]]\nname = "pe"\nkind = "vector"\nlanes = {lanes}\nclock_hz = {clock!r}\n'
        f'dtypes = ["bf16"]\n'
        f'[[units]]\nname = "exp"\nkind = "transcendental"\nemulated_on = "pe"\n'
        f'[[memory]]\nname = "dram"\ncapacity_bytes = inf\nbandwidth_bytes_per_s = 1e11\n'
    )
    target = load_target(path)
    assert target.unit("vector").rate("bfloat16") == pytest.approx(lanes * clock)
    assert target.unit("exp").rate("bfloat16") == pytest.approx(lanes * clock / 5)
    assert target.interconnect is None


# ---------------------------------------------------------------------------------------------
# Host calibration.


def _fake_measure(calls):
    """A stand-in for the kernels: random positive figures, counting how often it runs."""

    def measure(host, *, quick=False):
        calls.append(quick)
        rng = random.Random(len(calls))
        return calibrate.HostMeasurements(
            matmul_macs_per_s=(("float32", 64, rng.uniform(1e9, 1e11)),),
            vector_ops_per_s=(("float32", rng.uniform(1e10, 2e10)), ("bfloat16", 5e9)),
            exp_per_s=rng.uniform(1e8, 1e9),
            dram_bytes_per_s=rng.uniform(1e9, 1e10),
            dram_buffer_bytes=1 << 30,
            cache_bytes_per_s=tuple(rng.uniform(2e10, 1e12) for _ in host.caches),
            seconds=0.01,
            overheads=tuple(rng.uniform(1e-10, 1e-6) for _ in range(5)),
        )

    return measure


def test_calibration_cache_round_trips(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_host", _fake_measure(calls))
    first = calibrate.calibrate_host(cache_dir=tmp_path)
    assert calls == [False]
    assert len(list(tmp_path.glob("*.json"))) == 1
    second = calibrate.calibrate_host(cache_dir=tmp_path)
    assert calls == [False]
    assert second == first


def test_the_sliced_element_cost_is_calibrated_cached_and_read_back(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_host", _fake_measure(calls))
    first = calibrate.calibrate_host(cache_dir=tmp_path)
    (record,) = (json.loads(p.read_text()) for p in tmp_path.glob("*.json"))
    stored = record["measurements"]["overheads"]
    assert len(stored) == 5
    assert first.overheads is not None and first.overheads.slice_element_s == stored[4] > 0
    again = calibrate.calibrate_host(cache_dir=tmp_path)
    assert calls == [False]
    assert again.overheads is not None and again.overheads.slice_element_s == stored[4]


def test_force_recalibrates_and_overwrites_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_host", _fake_measure(calls))
    first = calibrate.calibrate_host(cache_dir=tmp_path)
    forced = calibrate.calibrate_host(force=True, cache_dir=tmp_path)
    assert len(calls) == 2
    assert forced != first
    assert calibrate.calibrate_host(cache_dir=tmp_path) == forced


def test_corrupt_cache_file_is_measured_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_host", _fake_measure(calls))
    calibrate.calibrate_host(cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    calibrate.calibrate_host(cache_dir=tmp_path)
    assert len(calls) == 2
    assert json.loads(path.read_text())["key"]["hostname"]


def test_cache_key_changes_with_the_jax_version(tmp_path):
    host = calibrate.describe_host()
    other = dataclasses.replace(host, jax_version="0.0.0")
    assert calibrate.cache_path(host, tmp_path) != calibrate.cache_path(other, tmp_path)


def test_get_target_cpu_calibrates_on_first_use(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_host", _fake_measure(calls))
    target = get_target("cpu", cache_dir=tmp_path)
    assert calls == [False]
    assert "calibrated" in target.notes
    assert target.memory[0].capacity_bytes > target.memory[-1].capacity_bytes


def test_get_target_cpu_without_calibration_is_the_nominal_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure_host", _fake_measure(calls))
    target = get_target("cpu", calibrate=False, cache_dir=tmp_path)
    assert calls == []
    assert target == load_target(Path(calibrate.__file__).parent / "targets" / "cpu.toml")


def test_host_caches_are_read_largest_first():
    caches, source = calibrate.read_cpu_caches(2)
    assert source in ("sysfs", "lscpu", "defaults")
    sizes = [cache.size_bytes for cache in caches]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0


def test_real_quick_calibration_gives_plausible_figures(tmp_path):
    target = calibrate.calibrate_host(cache_dir=tmp_path, quick=True)
    assert 1e7 < target.unit("matrix").rate("float32") < 1e14
    assert 1e7 < target.unit("vector").rate("float32") < 1e14
    assert 1e5 < target.unit("transcendental").rate("float32") < target.unit("vector").rate("f32")
    assert 1e8 < target.main_memory.bandwidth_bytes_per_s < 1e12
    assert all(1e8 < level.bandwidth_bytes_per_s < 1e13 for level in target.memory)
    assert len(target.memory) >= 2
    oh = target.overheads
    assert oh is not None and 0 < oh.op_s < 1e-3 and 0 <= oh.loop_step_s < 1e-3
    assert 0 <= oh.dot_operand_element_s < 1e-6 and 0 <= oh.dot_result_element_s < 1e-6
    assert 0 <= oh.slice_element_s < 1e-6
    assert calibrate.calibrate_host(cache_dir=tmp_path, quick=True) == target


def test_dot_element_costs_are_recovered_from_step_times():
    shapes = ((256, 256, 256, True), (256, 256, 8, True), (512, 512, 32, True))
    shapes += ((256, 16, 256, True), (64, 64, 64, True), (16, 128, 512, True))
    shapes += ((16, 128, 512, False), (64, 32, 128, True), (64, 32, 128, False))
    rng = random.Random(3)
    t0, rate = rng.uniform(1e-7, 1e-6), rng.uniform(1e10, 1e11)
    result, operand = rng.uniform(1e-10, 1e-9), rng.uniform(1e-11, 1e-10)
    per_slice = rng.uniform(1e-10, 1e-9)
    seconds = [t0 + m * n * k / rate + result * m * n + operand * (m * k + k * n)
               + per_slice * (m * k + (k * n if sliced else 0))
               for m, n, k, sliced in shapes]  # fmt: skip
    fitted = fit_dot_element_costs(shapes, seconds)
    assert fitted == pytest.approx((result, operand, per_slice), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Collectives and overlap.

links = st.builds(
    Interconnect,
    latency_s=st.floats(1e-7, 1e-4),
    bandwidth_bytes_per_s=st.floats(1e8, 1e12),
    topology=st.sampled_from(["switch", "ring", "torus_2d", "shared_memory"]),
)


def test_ring_formulas_match_hand_computed_values():
    link = Interconnect(latency_s=2e-6, bandwidth_bytes_per_s=5e10, topology="switch")
    n_bytes, n = 3e8, 8
    assert collective_time("all_reduce", n_bytes, n, link) == pytest.approx(
        2 * 7 / 8 * 3e8 / 5e10 + 2 * 7 * 2e-6
    )
    for kind in ("reduce_scatter", "all_gather", "all_to_all"):
        assert collective_time(kind, n_bytes, n, link) == pytest.approx(
            7 / 8 * 3e8 / 5e10 + 7 * 2e-6
        )


def test_all_to_all_on_a_ring_crosses_a_quarter_of_the_ring_per_byte():
    link = Interconnect(latency_s=1e-6, bandwidth_bytes_per_s=1e11, topology="torus_2d")
    assert collective_transfer_s("all_to_all", 1e9, 16, link) == pytest.approx(16 / 4 * 1e9 / 1e11)


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_device_collective_costs_nothing(kind):
    link = get_target("h100").interconnect
    assert collective_time(kind, 1e9, 1, link) == 0.0


@settings(max_examples=40, deadline=None)
@given(link=links, n_bytes=st.floats(1.0, 1e10), n=st.integers(2, 512))
def test_all_reduce_is_reduce_scatter_then_all_gather(link, n_bytes, n):
    total = collective_time("reduce_scatter", n_bytes, n, link) + collective_time(
        "all_gather", n_bytes, n, link
    )
    assert collective_time("all_reduce", n_bytes, n, link) == pytest.approx(total)


@settings(max_examples=40, deadline=None)
@given(link=links, n_bytes=st.floats(1.0, 1e10), n=st.integers(2, 256), kind=st.sampled_from(KINDS))
def test_collectives_grow_with_bytes_and_devices(link, n_bytes, n, kind):
    base = collective_time(kind, n_bytes, n, link)
    assert base > 0
    assert collective_time(kind, 2 * n_bytes, n, link) > base
    assert collective_time(kind, n_bytes, n + 1, link) > base


def test_unknown_collective_is_rejected_by_name():
    with pytest.raises(ValueError, match="broadcast"):
        collective_latency_s("broadcast", 4, get_target("a100").interconnect)


@settings(max_examples=60, deadline=None)
@given(compute=st.floats(1e-6, 1.0), comm=st.floats(1e-6, 1.0), chunks=st.integers(1, 64))
def test_overlap_without_alpha_lies_between_max_and_sum(compute, comm, chunks):
    time_s = overlapped_time(compute, comm, chunks)
    assert max(compute, comm) * (1 - 1e-12) <= time_s <= (compute + comm) * (1 + 1e-12)


@settings(max_examples=40, deadline=None)
@given(compute=st.floats(1e-6, 1.0), comm=st.floats(1e-6, 1.0))
def test_one_chunk_is_serial_compute_then_comm(compute, comm):
    assert overlapped_time(compute, comm, 1, alpha_s=comm / 3) == pytest.approx(compute + comm)


def test_overlap_improves_with_chunks_until_alpha_dominates():
    compute, comm, alpha = random.uniform(0.8e-3, 1.2e-3), random.uniform(0.8e-3, 1.2e-3), 2e-6
    times = [overlapped_time(compute, comm, k, alpha) for k in range(1, 257)]
    best = best_chunk_count(compute, comm, alpha, max_chunks=256)
    assert 1 < best < 256
    assert all(a > b for a, b in itertools.pairwise(times[:best]))
    assert all(a < b for a, b in itertools.pairwise(times[best - 1 :]))
    assert max(compute, comm) < times[best - 1] < compute + comm


def test_overlap_does_not_pay_when_alpha_is_most_of_the_collective():
    compute = random.uniform(1e-6, 2e-6)
    assert best_chunk_count(compute, comm_s=1.1e-5, alpha_s=1e-5) == 1
