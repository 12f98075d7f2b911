"""benchmarks.gpu_attention on this CPU: every row checked or skipped with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_attention, gpu_attention_rows
from benchmarks.gpu_attention import Case, as_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = Case("bfloat16", 64, True, heads=4, kv_heads=2, dim=32)  # causal GQA


def test_each_row_is_checked_against_the_reference_or_says_why_not(tmp_path, monkeypatch):
    real_build = gpu_attention_rows.build

    def build(row, case, config=None):
        if row == "einfuse_jax":
            raise MemoryError("pretend")  # a failing row must not stop the others
        return real_build(row, case, config)

    monkeypatch.setattr(gpu_attention_rows, "build", build)
    side = tmp_path / "rows.json"
    rows = ["cudnn", "jit", "einfuse_jax", "pallas_tuned", "tokamax"]
    calls = gpu_attention_rows.make([as_dict(TINY)], rows, str(side), sweep_s=0.0)
    info = json.loads(side.read_text())
    got = info["cases"][0]["rows"]
    assert info["cases"][0]["reference"] == "float32 jax.jit softmax"
    assert got["cudnn"]["error"].startswith("skipped: cuDNN needs")
    assert got["einfuse_jax"]["error"] == "out of memory: MemoryError: pretend"
    for row in ("jit", "pallas_tuned"):
        assert 0 < got[row]["max_err"] < 0.05, row
        assert got[row]["ok"] and got[row]["first_call_s"] > 0 and "temp_mib" in got[row]
    assert got["pallas_tuned"]["label"].endswith("best of 1/16")  # no budget: one config
    assert set(calls) >= {"0:jit", "0:pallas_tuned"}
    assert "0:einfuse_jax" not in calls and "0:cudnn" not in calls


def test_rows_still_run_unchecked_when_the_reference_does_not_fit(tmp_path, monkeypatch):
    real = gpu_attention_rows.attention

    def attention(q, k, v, causal):
        if q.dtype == "float32":
            raise MemoryError("pretend the float32 reference does not fit")
        return real(q, k, v, causal)

    monkeypatch.setattr(gpu_attention_rows, "attention", attention)
    side = tmp_path / "rows.json"
    calls = gpu_attention_rows.make([as_dict(TINY)], ["jit"], str(side), sweep_s=0.0)
    case = json.loads(side.read_text())["cases"][0]
    assert case["reference"].startswith("none (out of memory: MemoryError: pretend")
    assert "max_err" not in case["rows"]["jit"] and list(calls) == ["0:jit"]


def test_the_check_flags_an_output_off_by_more_than_a_few_ulps():
    import jax.numpy as jnp

    ref = jnp.array([0.5, 4.0, -6.0], jnp.float32)
    near = jnp.array([0.5078125, 4.0625, -6.0], jnp.bfloat16)  # 2 ulps off at 0.5 and at 4
    assert gpu_attention_rows.check(near, ref, "bfloat16")["ok"]
    far = jnp.array([0.5, 4.0, -5.5], jnp.bfloat16)
    assert gpu_attention_rows.check(far, ref, "bfloat16") == {"max_err": 0.5, "ok": False}


def test_a_scheduled_row_lowers_its_warps_and_query_tile_for_cuda():
    case = Case("float16", 64, True, heads=2, kv_heads=2, dim=32)
    args = gpu_attention_rows.inputs(case)
    f = gpu_attention_rows.build("pallas_tuned", case, (32, 16, 8, 3))
    text = f.lower(*args, lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "num_warps = 8" in text
    schedule = f.trace(*args).program.regions[0].schedule
    assert schedule.option("pallas.num_stages") == 3 and 16 in dict(schedule.tiles).values()


def test_the_smoke_run_prints_the_table_and_writes_it_as_it_goes(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "benchmarks.gpu_attention", "--cpu-smoke", "--masks", "causal",
           "--gqa-sizes=", "--rows", "cudnn,jit", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cudnn           skipped: cuDNN needs an NVIDIA GPU" in run.stdout
    assert "jit" in run.stdout and "TFLOP/s" in run.stdout
    (record,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert record["rows"]["jit"]["tflops"] > 0 and record["rows"]["jit"]["ok"]
    table = out.with_suffix(".md").read_text()
    assert "| jax.jit of a plain softmax attention | " in table and "| skipped |" in table


def test_a_spent_budget_skips_shapes_instead_of_overrunning(tmp_path, capsys):
    out = tmp_path / "res"
    assert gpu_attention.main(["--budget", "0", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped, the budget is spent") == 6  # 4 shapes, 2 GQA: nothing runs
    assert out.with_suffix(".jsonl").read_text() == ""


@pytest.mark.parametrize("row", ["bogus"])
def test_an_unknown_row_is_refused_in_one_line(row, capsys):
    with pytest.raises(SystemExit):
        gpu_attention.main(["--rows", row])
    assert "unknown rows ['bogus']" in capsys.readouterr().err


def test_the_cost_model_predicts_each_einfuse_row_or_says_why_not():
    from benchmarks.gpu_attention_predict import predict

    got = predict(Case("bfloat16", 1024, False, heads=2, kv_heads=2, dim=128), "h200")
    assert set(got) == {"jit", "einfuse_jax", "einfuse_pallas", "pallas_tuned"}
    for row, (seconds, how) in got.items():
        assert how, row  # how it was priced, or why the model refused
        assert seconds is None or 0 < seconds < 1, row
    assert got["jit"][0] is not None and got["pallas_tuned"][0] is not None
