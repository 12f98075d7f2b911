"""The CPU cost of copying tiles sliced out of (or updated into) a larger tensor."""

import pytest

from einfuse.cost_model.model import CostModel
from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import matmul_chain
from einfuse.ir.schedule import Schedule

CPU = get_target("cpu", calibrate=False)
SIZES = {"i0": 64, "i1": 64, "i2": 64}  # C1[i0, i2] = A0[i0, i1] A1[i1, i2]
PER_ELEMENT = 2e-9


def sliced_seconds(schedule: Schedule) -> float:
    """What the sliced-element cost adds to the estimate, all else equal."""
    with_copies = CostModel(matmul_chain(1), CPU, SIZES, overheads=Overheads(slice_element_s=2e-9))
    without = CostModel(matmul_chain(1), CPU, SIZES, overheads=Overheads())
    return with_copies.estimate(schedule) - without.estimate(schedule)


def test_a_loop_order_that_reslices_the_larger_operand_every_step_costs_more():
    tiles = {"i0": 16, "i2": 32}  # A0 tile 16 x 64, A1 tile 64 x 32, C1 tile 16 x 32
    rows_outer = sliced_seconds(Schedule.of(tiles=tiles, loop_order=("i0", "i2")))
    cols_outer = sliced_seconds(Schedule.of(tiles=tiles, loop_order=("i2", "i0")))
    # i0 outer: A0 sliced 4 times, A1 8 times, C1 written 8 times; i2 outer: A1 only twice.
    assert rows_outer == pytest.approx(PER_ELEMENT * (4 * 1024 + 8 * 2048 + 8 * 512))
    assert cols_outer == pytest.approx(PER_ELEMENT * (8 * 1024 + 2 * 2048 + 8 * 512))
    assert rows_outer > cols_outer


def test_a_tile_that_is_the_whole_tensor_is_not_copied():
    one_rank = sliced_seconds(Schedule.of(tiles={"i0": 16}))  # A1 is used whole
    assert one_rank == pytest.approx(PER_ELEMENT * (4 * 1024 + 4 * 1024))
    assert sliced_seconds(Schedule.of()) == 0.0
