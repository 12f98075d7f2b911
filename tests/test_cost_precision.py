"""GPU and TPU targets price float32 dots as XLA runs them under JAX's matmul precision."""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from importlib import resources
from pathlib import Path

import jax
import pytest

from einfuse.autotune.screen import program_cost_model
from einfuse.cli import main
from einfuse.cost_model.model import CostModel
from einfuse.cost_model.precision import current_precision, precision_level
from einfuse.cost_model.target import TargetSpecError, parse_target
from einfuse.einsum_cascade import attention
from einfuse.passes.manager import run_passes

SPEC = "examples/specs/attention_3pass.ein"  # declares bfloat16 inputs


def attn(dtype: str = "float32", n: int = 4096):
    c = attention("3pass", heads=False, batch=False, p=n, m=n, e=64, f=64)
    return replace(c, inputs=tuple(replace(t, dtype=dtype) for t in c.inputs))


def unit_seconds(report, einsum: str) -> dict[str, float]:
    (row,) = [r for r in report.einsums if r.name == einsum]
    return dict(row.unit_seconds)


def h100_data() -> dict:
    text = resources.files("einfuse.cost_model").joinpath("targets/h100.toml").read_text()
    return tomllib.loads(text)


def test_jax_precision_names_map_to_three_levels():
    assert [precision_level(v) for v in (None, "bfloat16", "tensorfloat32", "float32")] == [
        "default",
        "default",
        "high",
        "highest",
    ]
    assert current_precision() == "default"
    with jax.default_matmul_precision("highest"):
        assert current_precision() == "highest"


@pytest.mark.parametrize("target", ["h100", "h200", "a100"])
def test_gpu_float32_dots_run_tf32_on_tensor_cores_and_fp32_at_highest(target):
    default = CostModel(attn(), target, dtype="float32").report()
    highest = CostModel(attn(), target, dtype="float32", matmul_precision="highest").report()
    tf32, fp32 = unit_seconds(default, "QK"), unit_seconds(highest, "QK")
    assert "tensor_core" in tf32 and "tensor_core" not in fp32
    assert fp32["cuda_cores"] > tf32["tensor_core"]
    assert highest.total_s > default.total_s


def test_tpu_float32_dots_take_one_three_or_six_bf16_passes():
    mxu = [
        unit_seconds(
            CostModel(attn(), "tpu_v5e", dtype="float32", matmul_precision=p).report(), "QK"
        )["mxu"]
        for p in ("default", "high", "highest")
    ]
    assert mxu[1] == pytest.approx(3 * mxu[0]) and mxu[2] == pytest.approx(6 * mxu[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_loop_prices_on_gpus_with_its_float32_carry(dtype):
    fused = run_passes(attn(dtype), "fuse{tile=128}").cascade
    times = {}
    for target in ("h100", "h200"):
        model = program_cost_model(fused, target, {})
        times[target] = model.estimate()
        assert math.isfinite(times[target])
    assert times["h200"] <= times["h100"]  # the same compute, faster HBM


def test_h200_and_h100_differ_where_their_rates_do():
    """The unfused float32 cascade moves its score matrix through HBM: 4.8 against 3.35 TB/s."""
    unfused = {t: program_cost_model(attn(), t, {}).estimate() for t in ("h100", "h200")}
    assert unfused["h200"] < 0.9 * unfused["h100"]


def test_a_float32_route_to_a_missing_unit_is_rejected():
    data = h100_data()
    data["float32_dots"] = {"default": {"unit": "nope", "dtype": "float32"}}
    with pytest.raises(TargetSpecError, match=r"float32_dots\.default"):
        parse_target(data)
    data["float32_dots"] = {"fastest": {"unit": "cuda_cores", "dtype": "float32"}}
    with pytest.raises(TargetSpecError, match="levels are default, high, highest"):
        parse_target(data)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_autotune_on_a_gpu_picks_a_fused_program(tmp_path, capsys, dtype):
    spec = tmp_path / "attn.ein"
    spec.write_text(Path(SPEC).read_text().replace("bfloat16", dtype))
    args = ["autotune", str(spec), "--sizes", "p=4096,m=4096", "--target", "h200", "--quiet"]
    assert main([*args, "--objective", "model", "--storage", "memory", "--trials", "300"]) == 0
    tuned = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tuned"))
    assert tuned.split()[1].startswith("fuse{")


def test_explain_prices_the_specs_declared_dtype(capsys):
    assert main(["explain", SPEC, "--target", "h100", "--passes", "fuse"]) == 0
    assert "dtype: bfloat16" in capsys.readouterr().out
    assert main(["explain", SPEC, "--target", "h100", "--pipeline", "fuse", "--dtype", "f32"]) == 0
    assert "dtype: float32" in capsys.readouterr().out
