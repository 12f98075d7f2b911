"""The cost model: work counts, reuse traffic, fits and spills, collectives, reports, FuseMax."""

import math
import random

import pytest

from einfuse.cost_model.collectives import collective_time
from einfuse.cost_model.errors import CostModelError
from einfuse.cost_model.fusemax import fusemax_mapping
from einfuse.cost_model.model import CostModel, estimate, utilization
from einfuse.cost_model.target import get_target, parse_target
from einfuse.cost_model.work import einsum_work
from einfuse.einsum_cascade import attention, matmul_chain
from einfuse.ir import parse
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import fuse

KIB = 1024

# A small machine whose figures make traffic and times easy to work out by hand.
TOY = parse_target(
    {
        "name": "toy",
        "device_kind": "accelerator",
        "word_bytes": 4,
        "exp_cost_in_macs": 4,
        "units": [
            {"name": "mxu", "kind": "matrix", "ops_per_s": {"float32": 1e9}},
            {"name": "vpu", "kind": "vector", "ops_per_s": {"float32": 1e8}},
            {"name": "exp_on_vpu", "kind": "transcendental", "emulated_on": "vpu"},
        ],
        "memory": [
            {"name": "dram", "capacity_bytes": math.inf, "bandwidth_bytes_per_s": 1e9},
            {"name": "sram", "capacity_bytes": 64 * KIB, "bandwidth_bytes_per_s": 1e12,
             "managed": True},
        ],
        "interconnect": {"latency_s": 1e-6, "bandwidth_bytes_per_s": 1e10, "topology": "ring"},
    }
)  # fmt: skip

MATMUL = "inputs A[i, k], B[k, j]\nC[i, j] = A[i, k] * B[k, j]\noutputs C\n"
CPU = get_target("cpu", calibrate=False)


def matmul(n: int = 64) -> CostModel:
    return CostModel(parse(MATMUL), TOY, {"i": n, "j": n, "k": n})


def dram_bytes(model: CostModel, schedule: Schedule) -> float:
    return model.report(schedule).bytes_per_level()["dram"]


# ------------------------------------------------------------------------------ work
def test_contraction_macs_are_the_product_of_all_iteration_ranks():
    report = estimate(matmul_chain(2), None, TOY, {"i0": 8, "i1": 16, "i2": 4, "i3": 2})
    rows = {e.name: e for e in report.einsums}
    assert rows["C1"].macs == 8 * 16 * 4 and rows["C2"].macs == 8 * 4 * 2
    assert rows["C1"].vector_ops == 0 and rows["C2"].transcendentals == 0


def test_operators_count_once_per_point_of_the_ranks_they_depend_on():
    c = parse("inputs X[i, j], B[j]\nY[i, j] = exp(X[i, j] - B[j]) * 2.0 + where(j > 3, 1.0, 0.0)\n"
              "outputs Y\n")  # fmt: skip
    row = estimate(c, None, TOY, {"i": 10, "j": 6}).einsums[0]
    assert row.transcendentals == 60  # exp over (i, j)
    assert row.vector_ops == 3 * 60 + 2 * 6  # sub, mul, add over (i, j); gt, where over j


def test_a_reduction_adds_one_combine_per_point():
    c = parse("inputs X[i, j]\nS[i] = max(j) X[i, j]\noutputs S\n")
    assert estimate(c, None, TOY, {"i": 5, "j": 7}).einsums[0].vector_ops == 35


def test_a_masked_operand_keeps_a_contraction_and_is_masked_once_per_its_own_point():
    fused = fuse(parse("inputs Q[e, p], K[e, m], V[f, m]\nQK[m, p] = Q[e, p] * K[e, m]\n"
                       "GM[p] = max(m) QK[m, p]\nSN[m, p] = exp(QK[m, p] - GM[p])\n"
                       "SD[p] = SN[m, p]\nA[m, p] = SN[m, p] / SD[p]\n"
                       "AV[f, p] = A[m, p] * V[f, m]\noutputs AV\n"))  # fmt: skip
    lnv = next(e for e in fused.einsums if e.output == "LNV")
    work = einsum_work(lnv)
    assert work.macs == 1
    assert all("f" not in ranks for ranks, _, _ in work.terms)  # the mask does not repeat per f


def test_an_exp_on_an_emulating_target_costs_exp_cost_in_macs_on_its_base_unit():
    c = parse("inputs X[i]\nY[i] = exp(X[i])\noutputs Y\n")
    report = estimate(c, None, TOY, {"i": 1000})
    assert report.total_s == pytest.approx(1000 * 4 / 1e8)
    assert utilization(report, "exp_on_vpu") == pytest.approx(1.0)


# ------------------------------------------------------------------------------ traffic
def test_a_tile_is_refetched_once_per_iteration_of_loops_outside_its_innermost_loop():
    model = matmul(64)
    tiles = {"i": 32, "j": 16}
    c_bytes = 64 * 64 * 4
    # order i, j: A once (2 x 32x64), B once per i (2 x 4 x 64x16); the reverse: B once, A 4x.
    assert dram_bytes(model, Schedule.of(tiles=tiles, loop_order=("i", "j"))) == (
        16 * KIB + 32 * KIB + c_bytes
    )
    assert dram_bytes(model, Schedule.of(tiles=tiles, loop_order=("j", "i"))) == (
        64 * KIB + 16 * KIB + c_bytes
    )


def test_partial_sums_go_out_and_come_back_when_a_reduction_loop_is_outside():
    model = matmul(64)
    tiles = {"i": 16, "k": 16}
    tile = 16 * 64 * 4  # one C tile (and one B tile)
    # i outside k: A once, B once per i tile (4 x 16 KiB), each C tile written once.
    inside = dram_bytes(model, Schedule.of(tiles=tiles, loop_order=("i", "k")))
    assert inside == 16 * KIB + 64 * KIB + 4 * tile
    # k outside i: A once, B once, but C's 4 tiles are revisited 4 times each: 16 writes and
    # 12 reads of partial sums.
    outside = dram_bytes(model, Schedule.of(tiles=tiles, loop_order=("k", "i")))
    assert outside == 16 * KIB + 16 * KIB + (16 + 12) * tile


def test_a_tile_that_does_not_fit_its_level_is_rejected_with_the_reason():
    model = matmul(128)  # A, B and C tiles of 64 KiB each in a 64 KiB scratchpad
    report = model.report(Schedule())
    assert not report.fits and report.total_s == math.inf
    assert "sram" in report.reason and "64.0 KiB" in report.reason
    assert model.estimate(Schedule()) == math.inf
    assert model.report(Schedule.of(tiles={"i": 32, "j": 32})).fits


# Unscaled attention (scale=1.0) in the placement tests: a scale would be folded into Q by
# fuse, and the small kernel scaling Q would come first in the report.
def test_fused_intermediates_stay_on_chip_while_they_fit_and_spill_otherwise():
    c = fuse(
        attention("3pass", batch=False, heads=False, scale=1.0, e=64, f=64, p=1024, m=1024),
        tile=64,
    )
    model = CostModel(c, "h100")
    small = model.report(Schedule.of(tiles={"p": 64}))
    # p=512: Q, K, V and AV tiles (144 KiB) and QK (64 KiB) fit 228 KiB; SN (64 KiB) does not.
    big = model.report(Schedule.of(tiles={"p": 512}))
    assert small.fits and big.fits
    assert small.kernels[0].spilled == ()
    assert "SN" in big.kernels[0].spilled and "QK" not in big.kernels[0].spilled
    assert big.bytes_per_level()["l2"] > small.bytes_per_level()["l2"]


def test_an_explicit_placement_that_does_not_fit_is_rejected_not_spilled():
    c = fuse(
        attention("3pass", batch=False, heads=False, scale=1.0, e=64, f=64, p=1024, m=1024),
        tile=64,
    )
    placed = Schedule.of(tiles={"p": 1024}, placement={"QK": "shared_memory"})
    report = CostModel(c, "h100").report(placed)
    assert not report.fits and "QK" in report.reason


def test_a_gpu_tile_gets_one_sm_of_shared_memory():
    model = CostModel(parse(MATMUL), "h100", {"i": 1024, "j": 1024, "k": 64})
    assert not model.report(Schedule.of(tiles={"i": 512, "j": 512})).fits  # 512 KiB of C
    assert model.report(Schedule.of(tiles={"i": 128, "j": 128})).fits


def test_default_tiles_fit_a_managed_target():
    c = fuse(attention("3pass", b=2, h=4, e=64, f=64, p=2048, m=2048), tile=128)
    model = CostModel(c, "h100")
    assert not model.report(Schedule()).fits
    report = model.report()
    assert report.fits and model.default_tiles()
    assert all(not k.spilled for k in report.kernels)


# ------------------------------------------------------------------------------ time
def test_a_sum_over_a_device_rank_costs_an_all_reduce():
    h100 = get_target("h100")
    model = CostModel(parse(MATMUL), h100, {"i": 1024, "j": 1024, "k": 64})
    sharded = Schedule.of(tiles={"i": 128, "j": 128}, parallel={"k": "x"}, options={"mesh.x": 8})
    report = model.report(sharded)
    expected = collective_time("all_reduce", 1024 * 1024 * 2, 8, h100.interconnect)
    assert report.einsums[0].comm_s == pytest.approx(expected)
    assert report.bound == "communication"
    assert report.einsums[0].macs == 1024 * 1024 * 8  # each device sums its 64 / 8 slice


def test_chunks_overlap_the_all_reduce_with_compute():
    # C is 128 MiB: its all-reduce takes about as long as each device's share of the matmul.
    model = CostModel(parse(MATMUL), "h100", {"i": 8192, "j": 8192, "k": 32768})
    base = {"tiles": {"i": 128, "j": 128, "k": 64}, "parallel": {"k": "x"}}
    serial = model.estimate(Schedule.of(**base, options={"mesh.x": 8}))
    overlapped = model.estimate(Schedule.of(**base, options={"mesh.x": 8, "chunks": 4}))
    assert math.isfinite(serial) and overlapped < serial


def test_a_device_rank_needs_its_mesh_size():
    model = CostModel(parse(MATMUL), "h100", {"i": 64, "j": 64, "k": 64})
    with pytest.raises(CostModelError, match=r"mesh\.x=N"):
        model.estimate(Schedule.of(parallel={"k": "x"}))


def test_smaller_cpu_tiles_pay_more_per_step_overhead():
    model = CostModel(matmul_chain(2), CPU, {f"i{k}": 256 for k in range(4)})
    times = [model.report(Schedule.of(tiles={"i0": t, "i2": t})) for t in (256, 64, 16)]
    overheads = [r.kernels[0].overhead_s for r in times]
    assert overheads[0] < overheads[1] < overheads[2]
    assert times[0].total_s < times[2].total_s


def test_the_fast_path_agrees_with_the_report():
    c = fuse(attention("3pass", b=1, h=4, e=64, f=64, p=512, m=512), tile=128)
    rng = random.Random(0)
    for target in (CPU, "h100", TOY):
        model = CostModel(c, target)
        for _ in range(5):
            s = Schedule.of(tiles={"p": rng.choice([16, 64, 256]), "m": rng.choice([32, 128])})
            assert model.estimate(s) == model.report(s).total_s


def test_table_lists_every_einsum_and_why_names_the_bottleneck():
    c = fuse(attention("3pass", b=1, h=4, e=64, f=64, p=512, m=512), tile=128)
    report = CostModel(c, "h100").report()
    table = report.table()
    for e in c.einsums:
        assert e.output in table
    for column in ("MACs", "vector", "transc.", "hbm", "shared_memory", "time", "bound"):
        assert column in table
    assert report.bound in report.why()
    heaviest = max(report.kernels, key=lambda k: k.time_s)
    assert heaviest.name in report.why()


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (Schedule.of(tiles={"nope": 4}), "rank 'nope'"),
        (Schedule.of(placement={"C": "l9"}), "levels dram, sram"),
        (Schedule.of(options={"unit.C": "tpu"}), "units mxu, vpu, exp_on_vpu"),
    ],
)
def test_a_schedule_naming_what_the_cascade_or_target_lacks_is_an_error(schedule, message):
    with pytest.raises(CostModelError, match=message):
        matmul().estimate(schedule)


def test_unbound_sizes_are_an_error_naming_the_size():
    with pytest.raises(CostModelError, match="give a value for K"):
        CostModel(parse(MATMUL), TOY, {"i": 4, "j": 4})


# ------------------------------------------------------------------------------ FuseMax
def bert_attention(seq: int):
    return attention("1pass", b=64, h=12, e=64, f=64, p=seq, m=seq, tile=256)


def test_the_fusemax_mapping_puts_whole_tiles_on_the_2d_array_and_the_rest_on_the_1d_array():
    c = bert_attention(1024)
    s = fusemax_mapping(c)
    for einsum in ("BQK", "LM", "SLN", "SLD", "SLNV"):
        assert s.option(f"unit.{einsum}") == "pe_2d"
    for einsum in ("RM", "PRM", "RD", "RNV", "AV"):
        assert s.option(f"unit.{einsum}") == "pe_1d"
    assert s.place("BQK") == "pe_registers" and s.place("SLN") == "pe_registers"
    assert s.tile("m0") == 256 and s.tile("b") == 1 and s.tile("h") == 1


@pytest.mark.parametrize(
    ("seq", "paper"), [(1024, 0.89), (4096, 0.97), (16384, 0.99), (65536, 0.99), (262144, 0.99)]
)
def test_fusemax_2d_array_utilization_matches_the_paper(seq, paper):
    c = bert_attention(seq)
    report = CostModel(c, "fusemax").report(fusemax_mapping(c))
    assert report.fits
    assert abs(utilization(report, "pe_2d") - paper) < 0.05


def test_fusemax_2d_array_utilization_rises_with_sequence_length():
    utils = []
    for seq in (1024, 4096, 16384):
        c = bert_attention(seq)
        utils.append(utilization(CostModel(c, "fusemax").report(fusemax_mapping(c)), "pe_2d"))
    assert utils[0] < utils[1] < utils[2]


def test_fusemax_mapping_refuses_an_unfused_cascade():
    with pytest.raises(CostModelError, match="fused 1-pass"):
        fusemax_mapping(attention("3pass", b=1, h=1, e=64, f=64, p=256, m=256))


def test_carried_state_and_what_reads_it_are_priced_in_the_carry_dtype():
    """The JAX blockwise loop keeps a bfloat16 attention's running state in float32."""
    fused = fuse(attention("3pass", heads=False, batch=False, e=64, f=64, p=1024, m=1024), tile=256)
    plain = CostModel(fused, CPU, dtype="bfloat16")
    wide = CostModel(fused, CPU, dtype="bfloat16", carry_dtype="float32")
    dtypes = dict(zip((e.output for e in fused.einsums), wide.einsum_dtypes))
    assert dtypes["QK"] == dtypes["LM"] == "bfloat16"  # tiles of bfloat16 inputs
    assert dtypes["RM"] == dtypes["SN"] == dtypes["RNV"] == dtypes["AV"] == "float32"
    assert set(plain.einsum_dtypes) == {"bfloat16"}
    # XLA:CPU runs bfloat16 element-wise ops at an eighth of the float32 rate (cpu.toml)
    schedule = Schedule.of(tiles={"p": 256})
    assert wide.estimate(schedule) < 0.8 * plain.estimate(schedule)
    same = CostModel(fused, CPU, carry_dtype="float32")  # a float32 cascade: nothing widens
    assert set(same.einsum_dtypes) == {"float32"}
