"""The cost model's fast path (``estimate``, which remembers kernels) against ``report``."""

import math
import random

import pytest

from einfuse.cost_model.model import CostModel
from einfuse.cost_model.overheads import Overheads
from einfuse.cost_model.target import get_target
from einfuse.einsum_cascade import attention, matmul_chain
from einfuse.ir import parse
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import fuse

CPU = get_target("cpu", calibrate=False)

# Several unfused kernels over overlapping ranks, a layer-norm-like chain: most tiles touch
# only some kernels, so the fast path reuses the others.
LAYER = parse(
    "inputs X[t, d], W[d, h], G[d]\n"
    "S[t] = X[t, d]\n"
    "C[t, d] = X[t, d] - S[t] / 64.0\n"
    "V[t] = C[t, d] * C[t, d]\n"
    "N[t, d] = C[t, d] / sqrt(V[t] / 64.0 + 0.00001) * G[d]\n"
    "Y[t, h] = N[t, d] * W[d, h]\n"
    "Z[t, h] = max(Y[t, h], 0.0)\n"
    "outputs Z\n"
)


def random_schedules(rng, ranks, orders, n, extra=None):
    for _ in range(n):
        tiles = {r: rng.choice(choices) for r, choices in ranks.items() if rng.random() < 0.8}
        order = rng.choice(orders)
        yield Schedule.of(tiles=tiles, loop_order=order, **(extra(rng) if extra else {}))


def check_agrees(model, schedules):
    for s in schedules:
        fast, full = model.estimate(s), model.report(s).total_s
        assert fast == pytest.approx(full, rel=1e-12, abs=0.0) or fast == full == math.inf


def test_the_fast_path_agrees_with_the_report_on_random_attention_schedules():
    c = fuse(attention("3pass", causal=True, b=1, h=2, e=16, f=16, p=256, m=256), tile=64)
    rng = random.Random(1)
    ranks = {"p": [8, 32, 64, 256], "e": [8, 16], "f": [4, 16], "h": [1, 2], "m0": [16, 64]}
    orders = [(), ("p", "h"), ("h", "f", "p")]
    for target in (CPU, "h100"):
        check_agrees(CostModel(c, target), random_schedules(rng, ranks, orders, 60))


def test_the_fast_path_agrees_with_the_report_on_many_kernels():
    model = CostModel(LAYER, CPU, {"t": 128, "d": 64, "h": 96})
    rng = random.Random(2)
    ranks = {"t": [8, 32, 128], "d": [16, 64], "h": [32, 96]}
    orders = [(), ("t", "d"), ("d", "h", "t")]
    schedules = list(random_schedules(rng, ranks, orders, 120))
    assert len(model.kernels) > 3
    check_agrees(model, schedules + schedules[:20])  # again: every kernel remembered


def test_the_fast_path_agrees_with_the_report_under_placement_units_and_parallel_ranks():
    model = CostModel(matmul_chain(2), "h100", {f"i{k}": 256 for k in range(4)})
    rng = random.Random(3)

    def extra(rng):
        return {
            "placement": {"C1": rng.choice(["hbm", "shared_memory"])},
            "parallel": {"i0": None} if rng.random() < 0.5 else {},
            "options": {"unit.C2": "cuda_cores"} if rng.random() < 0.5 else {},
        }

    ranks = {f"i{k}": [16, 64, 256] for k in range(4)}
    orders = [(), ("i1", "i0"), ("i2", "i3", "i0")]
    check_agrees(model, random_schedules(rng, ranks, orders, 80, extra))


def test_a_tile_that_does_not_fit_is_infinite_on_the_fast_path_every_time():
    model = CostModel(matmul_chain(2), "h100", {f"i{k}": 1024 for k in range(4)})
    huge = Schedule.of(tiles={f"i{k}": 1024 for k in range(4)}, placement={"C1": "shared_memory"})
    assert not model.report(huge).fits
    assert model.estimate(huge) == math.inf and model.estimate(huge) == math.inf


def test_thin_dot_tiles_cost_more_per_mac_on_a_cpu():
    sizes = {f"i{k}": 512 for k in range(4)}
    fat, thin = Schedule.of(tiles={"i1": 512}), Schedule.of(tiles={"i1": 8})
    with_dots = CostModel(matmul_chain(2), CPU, sizes)
    without = CostModel(matmul_chain(2), CPU, sizes, overheads=Overheads())
    extra = with_dots.estimate(thin) - with_dots.estimate(fat)
    assert extra > without.estimate(thin) - without.estimate(fat)
    c1_steps = 512 // 8  # C1 reduces over i1: each step writes its 512 x 512 result tile
    oh = with_dots.overheads
    assert extra >= c1_steps * 512 * 512 * oh.dot_result_element_s * 0.99
