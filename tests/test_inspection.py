"""inspect_hlo / hlo_text / xla_dump_flags on real jitted functions and on HLO text."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from einfuse.backends.hlo_summary import CollectiveCount
from einfuse.backends.inspection import (
    STAGES,
    _xla_cost,
    hlo_text,
    inspect_hlo,
    xla_dump_flags,
)

M, K, N = 64, 128, 32


def _lowered(fn, *shapes):
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))


def _matmul_softmax(x, w):
    return jax.nn.softmax(x @ w, axis=-1)


@pytest.fixture(scope="module")
def matmul_softmax():
    return _lowered(_matmul_softmax, (M, K), (K, N)).compile()


@pytest.fixture(scope="module")
def matmul():
    return _lowered(lambda x, w: x @ w, (M, K), (K, N)).compile()


def test_matmul_softmax_summary_counts_a_dot_and_a_fusion(matmul_softmax):
    summary = inspect_hlo(matmul_softmax)
    assert summary.op_counts["dot"] == 1
    assert summary.num_fusions >= 1
    assert summary.op_counts["fusion"] == summary.num_fusions
    assert summary.collectives == {}


def test_cost_analysis_flops_of_matmul_are_2mkn(matmul):
    cost = inspect_hlo(matmul).cost
    assert cost is not None
    assert cost.flops == pytest.approx(2 * M * K * N, rel=0.02)


def test_memory_analysis_reports_argument_and_output_bytes(matmul):
    memory = inspect_hlo(matmul).memory
    assert memory is not None
    assert memory.argument_bytes == 4 * (M * K + K * N)
    assert memory.output_bytes == 4 * M * N


def test_lowered_is_compiled_and_summarized_like_its_compiled(matmul_softmax):
    from_lowered = inspect_hlo(_lowered(_matmul_softmax, (M, K), (K, N)))
    from_compiled = inspect_hlo(matmul_softmax)
    assert from_lowered.op_counts == from_compiled.op_counts
    assert from_lowered.cost == from_compiled.cost


def test_text_input_has_counts_but_no_xla_analyses(matmul_softmax):
    summary = inspect_hlo(hlo_text(matmul_softmax, "optimized"))
    assert summary.op_counts == inspect_hlo(matmul_softmax).op_counts
    assert summary.cost is None and summary.memory is None


def test_scalar_combiners_of_reductions_are_not_counted_as_ops():
    summary = inspect_hlo(_lowered(lambda x: jnp.sum(x, axis=1), (8, 16)))
    assert summary.op_counts["reduce"] == 1
    assert "add" not in summary.op_counts
    assert "parameter" not in summary.op_counts


def test_cost_analysis_list_of_dicts_is_summed_over_modules(matmul):
    raw = matmul.cost_analysis()
    assert _xla_cost([raw, raw]).flops == pytest.approx(2 * _xla_cost(raw).flops)
    assert _xla_cost([raw]) == _xla_cost(raw)


def test_as_dict_is_json_ready(matmul_softmax):
    summary = inspect_hlo(matmul_softmax)
    data = json.loads(json.dumps(summary.as_dict()))
    assert data["op_counts"] == dict(summary.op_counts)
    assert data["num_fusions"] == summary.num_fusions
    assert data["cost"]["flops"] == summary.cost.flops
    assert data["memory"]["argument_bytes"] == summary.memory.argument_bytes


def test_table_has_a_row_per_fusion_kind_and_the_flops(matmul_softmax):
    summary = inspect_hlo(matmul_softmax)
    rows = [line.split() for line in summary.table().splitlines()]
    for kind, count in summary.fusion_kinds.items():
        assert [kind, str(count)] in rows
    assert ["flops", f"{int(summary.cost.flops):,}"] in rows


def test_table_values_start_in_one_column(matmul_softmax):
    lines = inspect_hlo(matmul_softmax).table().splitlines()
    top_level = [line for line in lines if line.split()[0] in ("module", "fusions", "ops")]
    assert len(top_level) == 3
    assert len({line.rindex(" ") + 1 for line in top_level}) == 1


def test_stablehlo_stage_contains_dot_general():
    text = hlo_text(_lowered(_matmul_softmax, (M, K), (K, N)), "stablehlo")
    assert "stablehlo.dot_general" in text


def test_optimized_stage_is_an_hlo_module():
    text = hlo_text(_lowered(_matmul_softmax, (M, K), (K, N)), "optimized")
    assert text.startswith("HloModule")
    assert " dot(" in text


def test_unknown_stage_is_a_clear_error(matmul):
    with pytest.raises(ValueError, match=r"'llvm'.*stablehlo, optimized"):
        hlo_text(matmul, "llvm")
    assert STAGES == ("stablehlo", "optimized")


def test_stablehlo_of_a_compiled_is_refused(matmul):
    with pytest.raises(TypeError, match="Lowered"):
        hlo_text(matmul, "stablehlo")


def test_other_objects_are_refused_by_name():
    with pytest.raises(TypeError, match="got function"):
        inspect_hlo(_matmul_softmax)


def test_dump_flags_name_the_directory_and_every_pass():
    flags = xla_dump_flags("/tmp/einfuse-dump").split()
    assert "--xla_dump_to=/tmp/einfuse-dump" in flags
    assert "--xla_dump_hlo_pass_re=.*" in flags
    with pytest.raises(ValueError, match="spaces"):
        xla_dump_flags("/tmp/with space")


# Hand-written in XLA's printed format (after XLA's own GPU test modules): this machine has no
# GPU and XLA's CPU backend makes no async collectives, cuBLAS calls or Triton fusions.
FIXTURES = Path(__file__).parent / "fixtures"
ASYNC_HLO = (FIXTURES / "async_collectives.hlo").read_text()
GPU_HLO = (FIXTURES / "gpu_matmul_reduce.hlo").read_text()


def test_async_collective_pairs_are_counted_by_kind():
    collectives = inspect_hlo(ASYNC_HLO).collectives
    assert collectives["all-reduce"] == CollectiveCount(0, 1, 1, bytes=32)
    assert collectives["reduce-scatter"] == CollectiveCount(0, 2, 2, bytes=32 + 64)
    assert collectives["all-gather"] == CollectiveCount(1, 0, 0, bytes=64)
    assert inspect_hlo(ASYNC_HLO).num_collectives == 4


def test_gpu_style_text_counts_custom_calls_and_custom_fusion_names():
    summary = inspect_hlo(GPU_HLO)
    assert summary.custom_call_targets == {"__cublas$gemm": 1}
    assert summary.fusion_kinds == {"kCustom:__triton_gemm": 1, "kInput": 1}
    assert summary.op_counts["dot"] == 1  # inside the triton fusion
    assert summary.op_counts["reduce"] == 1
    assert "add" not in summary.op_counts  # the reduce's combiner


def test_wrapped_instruction_lines_are_joined():
    summary = inspect_hlo(ASYNC_HLO)
    assert summary.module_names == ("async_pairs",)
    assert summary.op_counts["async-start"] == 1
    assert summary.op_counts["tuple"] == 1
    assert "reduce-scatter" not in summary.op_counts  # lives inside the async wrapper


_SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from einfuse.backends.inspection import inspect_hlo

    mesh = jax.make_mesh((8,), ("x",))
    spec = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=NamedSharding(mesh, P("x")))

    def psum(x):
        return jax.lax.psum(x, "x")

    def others(x):
        perm = [(i, (i + 1) % 8) for i in range(8)]
        return (jax.lax.psum_scatter(x, "x", tiled=True), jax.lax.all_gather(x, "x"),
                jax.lax.ppermute(x, "x", perm), jax.lax.all_to_all(x, "x", 1, 1, tiled=True))

    def summarize(fn, out_specs):
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=out_specs,
                               check_vma=False)
        return inspect_hlo(jax.jit(mapped).lower(spec)).as_dict()["collectives"]

    print(json.dumps({"psum": summarize(psum, P()),
                      "others": summarize(others, (P("x"), P(), P("x"), P("x")))}))
    """
)


@pytest.fixture(scope="module")
def shard_map_collectives():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_psum_under_shard_map_shows_an_all_reduce(shard_map_collectives):
    all_reduce = shard_map_collectives["psum"]["all-reduce"]
    assert all_reduce["sync"] + all_reduce["async_start"] >= 1


def test_each_shard_map_collective_shows_under_its_kind(shard_map_collectives):
    kinds = shard_map_collectives["others"]
    for kind in ("reduce-scatter", "all-gather", "collective-permute", "all-to-all"):
        assert kinds[kind]["sync"] + kinds[kind]["async_start"] >= 1, kind
    assert "all-reduce" not in kinds
