"""The cost model and autotuner for the Pallas backend: per-kernel capacity, refusals with
their reason, the kernel's search space, and its price on a GPU (waves, TF32 dots)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from einfuse.autotune.loop_plan import planned_loops
from einfuse.autotune.providers import PALLAS_TILES, QUERY_TILES
from einfuse.autotune.screen import ModelEvaluator
from einfuse.autotune.space import build_space
from einfuse.autotune.tuner import _for_backend, tuned_pipeline
from einfuse.backends.backend import get_backend
from einfuse.cli import main
from einfuse.compile_path import region_key
from einfuse.cost_model.kernel_footprint import footprint
from einfuse.cost_model.kernel_pallas import jax_loop_seconds, pallas_seconds, step_compute_s
from einfuse.cost_model.target import TargetSpecError, get_target, parse_target
from einfuse.einsum_cascade import attention
from einfuse.ir import parse
from einfuse.ir.dtypes import with_input_dtype
from einfuse.ir.schedule import Schedule
from einfuse.passes.fuse import fuse

H200 = get_target("h200")
V5E = get_target("tpu_v5e")
SPEC = "examples/specs/attention_3pass.ein"


def kernel(dtype: str, n: int = 4096, d: int = 128, key: int = 128, q: int = 128, heads: int = 0):
    """The Pallas kernel of fused attention (``heads`` > 0: that many rows)."""
    sizes = dict(p=n, m=n, e=d, f=d) | ({"h": heads} if heads else {})
    c = attention("3pass", heads=bool(heads), batch=False, **sizes)
    fused = fuse(with_input_dtype(c, dtype), tile=key)
    (loop,) = planned_loops(fused, tuple(sorted(sizes.items())))
    return loop.kernel(q, dtype)


def test_targets_give_what_one_kernel_program_may_hold():
    assert H200.level("shared_memory").kernel_capacity_bytes == 232448
    assert get_target("h100").level("shared_memory").kernel_capacity_bytes == 232448
    assert get_target("a100").level("shared_memory").kernel_capacity_bytes == 166912
    assert V5E.level("vmem").kernel_capacity_bytes == 16 << 20
    spec = {"name": "x", "device_kind": "gpu", "word_bytes": 2}
    spec |= {"units": [{"name": "v", "kind": "vector", "ops_per_s": {"float32": 1e12}}]}
    spec |= {"memory": [{"name": "m", "capacity_bytes": 1024, "bandwidth_bytes_per_s": 1e9}]}
    spec["memory"][0]["per_kernel_bytes"] = 2048
    with pytest.raises(TargetSpecError, match="per_kernel_bytes 2048"):
        parse_target(spec)


def test_a_float32_kernel_that_triton_refuses_is_refused_with_its_blocks():
    fp = footprint(kernel("float32"), H200, num_stages=2)
    assert fp.bytes == 65536 + 2 * (65536 + 65536) and not fp.fits
    assert fp.refusal(H200) == (
        "needs 327680 B of shared memory per block (query Qs 128x128 float32 = 65536 B, "
        "K/V 2 stages x (K 128x128 float32 + V 128x128 float32) = 262144 B); "
        "h200 has 232448 B"
    )
    ok = footprint(kernel("bfloat16"), H200, num_stages=2)
    assert ok.fits and ok.bytes == 32768 + 2 * 65536 and ok.refusal(H200) == ""
    assert ok.registers == 128 * 128 * 4 * 2 + 2 * 128 * 4  # P.V and scores, max and sum


def test_a_tpu_kernel_holds_whole_key_rows_in_vmem():
    assert footprint(kernel("bfloat16", n=4096), V5E).fits
    long = footprint(kernel("bfloat16", n=32768), V5E)
    assert not long.fits and "of vmem per kernel" in long.refusal(V5E)
    assert "tpu_v5e has 16777216 B" in long.refusal(V5E)
    assert footprint(kernel("float32"), get_target("cpu", calibrate=False)).fits
    streamed = footprint(kernel("bfloat16", n=32768), V5E, streamed=frozenset({"K", "V"}))
    assert streamed.fits and "streamed K/V 2 DMA slots" in " ".join(w for w, _ in streamed.parts)


def evaluator(backend: str, target=H200, n: int = 4096, dtype: str = "bfloat16"):
    c = attention("3pass", heads=False, batch=False, p=n, m=n, e=128, f=128)
    c = with_input_dtype(c, dtype)
    return ModelEvaluator(c, target, {"p": n, "m": n, "e": 128, "f": 128}, backend)


def candidate(pipeline: str, schedule: str):
    from einfuse.autotune.space import Candidate

    return Candidate(pipeline, Schedule.parse(schedule), ())


def test_the_model_refuses_a_pallas_schedule_that_does_not_fit_and_says_why():
    big = candidate("fuse{tile=256}", "tile p=128; option pallas.num_stages=4")
    seconds, reason = evaluator("pallas").estimate(big)
    assert seconds == math.inf
    assert reason.startswith("does not fit: pallas kernel over m1 needs 557056 B of shared")
    assert reason.endswith("h200 has 232448 B")
    seconds, reason = evaluator("pallas").estimate(
        candidate("fuse{tile=64}", "tile p=128; option pallas.num_stages=2")
    )
    assert math.isfinite(seconds) and reason == ""


def test_the_jax_backend_is_not_refused_and_has_no_pallas_params():
    big = candidate("fuse{tile=256}", "tile p=128; option pallas.num_stages=4")
    assert math.isfinite(evaluator("jax").estimate(big)[0])
    c = attention("3pass", heads=False, batch=False, p=4096, m=4096, e=128, f=128)
    space = build_space(c, H200, {"p": 4096, "m": 4096, "e": 128, "f": 128})
    assert not [p for p in space.params if p.name.startswith("pallas.")]
    assert space.param("fuse.query_tile").choices == QUERY_TILES
    key = {"p": 4096, "m": 4096, "e": 128, "f": 128}
    assert region_key(c, key, H200, "jax") != region_key(c, key, H200, "pallas")


def test_the_pallas_space_offers_gpu_blocks_warps_and_stages_and_keeps_xla():
    c = attention("3pass", heads=False, batch=False, p=4096, m=4096, e=128, f=128)
    sizes = {"p": 4096, "m": 4096, "e": 128, "f": 128}
    pallas = _for_backend(None, get_backend("pallas"))  # the space the tuner builds
    gpu = build_space(c, H200, sizes, pallas)
    keys, queries, _ = PALLAS_TILES["gpu"]
    assert gpu.param("fuse.tile").choices == keys == (32, 64, 128, 256)
    assert gpu.param("fuse.query_tile").choices == queries == (64, 128, 256)
    assert gpu.param("pallas.num_warps").choices == (4, 8)
    assert gpu.param("pallas.num_stages").choices == (1, 2, 3, 4)
    assert gpu.param("pallas.kernel").choices == (True, False)
    assert False in gpu.param("fuse").choices  # plain XLA stays a candidate
    tpu = build_space(c, V5E, sizes, pallas)
    assert {p.name for p in tpu.params if p.name.startswith("pallas.")} == {"pallas.kernel"}
    # On a TPU each key input is held whole in VMEM or streamed from HBM by DMA; nothing
    # else is placed (the kernel holds its intermediates on chip).
    placed = {p.name: p.choices for p in tpu.params if p.kind == "placement"}
    assert placed == {"place.K": ("vmem", "hbm"), "place.V": ("vmem", "hbm")}
    assert not [p for p in gpu.params if p.kind == "placement"]


def test_on_a_tpu_long_keys_are_streamed_from_hbm_rather_than_refused():
    c = attention("3pass", heads=False, batch=False, p=32768, m=32768, e=128, f=128)
    sizes = {"p": 32768, "m": 32768, "e": 128, "f": 128}
    from einfuse.autotune.tuner import autotune

    result = autotune(
        with_input_dtype(c, "bfloat16"), sizes=sizes, target="tpu_v5e", objective="model",
        storage="memory", progress=False, backend="pallas",
    )  # fmt: skip
    assert result.schedule.option("pallas.kernel") is True
    assert result.schedule.place("K") == result.schedule.place("V") == "hbm"


def test_the_grid_runs_in_waves_over_the_sms():
    rows = [kernel("bfloat16", n=256, q=256, heads=h) for h in (132, 133)]
    assert [(k.rows, k.q_blocks) for k in rows] == [(132, 1), (133, 1)]  # one program a row
    one, two = (pallas_seconds(k, H200, 8, 2) for k in rows)
    assert two == pytest.approx(2 * one, rel=0.1)
    # Serially, as the JAX loop runs it, 133 rows take about 133 times one row.
    assert jax_loop_seconds(rows[1], H200) > 50 * two


def test_float32_kernel_dots_are_priced_as_tf32_on_the_tensor_cores():
    f32 = pallas_seconds(kernel("float32", d=64, heads=16), H200, 8, 2)
    bf16 = pallas_seconds(kernel("bfloat16", d=64, heads=16), H200, 8, 2)
    assert math.isfinite(f32) and bf16 < f32 < 3 * bf16
    # At HIGHEST, Triton runs float32 dots in IEEE float32: on the CUDA cores, far slower.
    f32_k = kernel("float32", d=64)
    assert step_compute_s(f32_k, H200, "highest") > 3 * step_compute_s(f32_k, H200, "default")
    flops = 4 * 4096**2 * 128 * 16
    tflops = flops / pallas_seconds(kernel("bfloat16", heads=16), H200, 8, 2) / 1e12
    assert 150 < tflops < 989  # below the H200's bf16 peak, above a plain XLA softmax


def test_autotune_pallas_on_h200_returns_a_fused_schedule_that_fits(tmp_path, capsys):
    store = f"journal:{tmp_path / 'j.log'}"
    argv = ["autotune", SPEC, "--sizes", "p=4096,m=4096", "--backend", "pallas"]
    argv += ["--target", "h200", "--objective", "model", "--storage", store, "--quiet"]
    assert main(argv) == 0
    assert "pallas kernel over m1 needs" in capsys.readouterr().out  # refusals are listed
    c = parse(Path(SPEC).read_text())
    sizes = {"p": 4096, "m": 4096}
    pipeline, schedule = tuned_pipeline(c, sizes, "h200", store, backend="pallas")
    assert pipeline.startswith("fuse{") and schedule.option("pallas.kernel") is True
    tile = int(pipeline.split("tile=")[1].rstrip("}"))
    fused = fuse(c, tile=tile)
    (loop,) = planned_loops(fused, tuple(sorted({**sizes, "e": 64, "f": 64}.items())))
    stages = schedule.option("pallas.num_stages")
    assert footprint(loop.kernel(schedule.tile("p"), "bfloat16"), H200, stages).fits


def test_explain_with_the_pallas_backend_shows_the_kernel_and_refuses_what_does_not_fit(capsys):
    argv = ["explain", SPEC, "--sizes", "p=4096,m=4096,e=128,f=128", "--passes", "fuse{tile=256}"]
    argv += ["--target", "h200", "--backend", "pallas", "--schedule"]
    assert main([*argv, "tile p=128; option pallas.num_stages=1"]) == 0
    out = capsys.readouterr().out
    assert "pallas kernel over m1: grid 1 rows x 32 query blocks of 128, 16 key steps" in out
    assert "holds 163840 of 232448 B of shared memory" in out and "predicted" in out
    assert main([*argv, "tile p=128; option pallas.num_stages=4"]) == 1
    assert "refused: needs 557056 B of shared memory per block" in capsys.readouterr().out
    jax = [a if a != "pallas" else "jax" for a in argv]
    assert main([*jax, "tile p=128; option pallas.num_stages=4"]) == 0
    assert "pallas kernel" not in capsys.readouterr().out
