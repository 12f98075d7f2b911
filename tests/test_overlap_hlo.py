"""Overlap settings for XLA, and collectives by kind, count and bytes in the HLO summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from einfuse.backends.xla_overlap import (
    OverlapSettingsError,
    compiler_options,
    overlap_settings,
    xla_flags,
)

HALVES = Path(__file__).parent / "fixtures" / "tp_halves.py"

# Two independent psums of [32, 16] float32 (2 KiB each) on 8 host devices: XLA:CPU's combiner
# merges them; overlap_settings("cpu", keep_collectives_apart=True) keeps them apart. The GPU
# settings compile on the CPU too, because they name real XLA options (a misspelt one fails).
_SCRIPT = textwrap.dedent(
    f"""
    import contextlib, io, json, sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, {str(HALVES.parent)!r})
    from tp_halves import halves
    from einfuse.backends.inspection import inspect_hlo
    from einfuse.backends.xla_overlap import compiler_options, overlap_settings
    from einfuse.cli import main

    lowered = jax.jit(halves).lower(jnp.ones((64, 64)), jnp.ones((64, 16)))
    apart = compiler_options(overlap_settings("cpu", keep_collectives_apart=True))
    gpu = compiler_options(overlap_settings("gpu", keep_collectives_apart=True))
    out = {{
        "merged": inspect_hlo(lowered.compile()).as_dict(),
        "apart": inspect_hlo(lowered.compile(apart)).as_dict(),
        "gpu_names_compile": lowered.compile(gpu) is not None,
    }}
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        out["cli_rc"] = main(["hlo", {str(HALVES)!r} + ":halves", "--args",
                              "f32[64,64] f32[64,16]", "--summary"])
    out["cli"] = table.getvalue()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def halves_hlo():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_xla_cpu_merges_the_halves_all_reduces_into_one(halves_hlo):
    merged = halves_hlo["merged"]
    assert merged["collectives"]["all-reduce"]["sync"] == 1
    assert merged["collectives"]["all-reduce"]["bytes"] == 2 * 32 * 16 * 4


def test_disabling_the_combiner_keeps_two_all_reduces_neither_asynchronous(halves_hlo):
    apart = halves_hlo["apart"]
    assert apart["collectives"]["all-reduce"] == {
        "sync": 2, "async_start": 0, "async_done": 0, "bytes": 4096, "marked_sync": 0
    }  # fmt: skip
    ops = apart["collective_ops"]
    assert [(op["kind"], op["bytes"], op["asynchronous"], op["depends_on"]) for op in ops] == [
        ("all-reduce", 2048, False, []),
        ("all-reduce", 2048, False, []),  # neither half waits for the other's all-reduce
    ]


def test_gpu_settings_name_real_xla_options(halves_hlo):
    assert halves_hlo["gpu_names_compile"]


def test_hlo_summary_command_lists_collectives_with_bytes_and_asynchrony(halves_hlo):
    assert halves_hlo["cli_rc"] == 0
    lines = halves_hlo["cli"].splitlines()
    assert any(line.split() == ["collectives", "1", "(0", "asynchronous)"] for line in lines)
    assert any("all-reduce" in line and "1 x, 4.0 KiB: 1 sync" in line for line in lines)


def test_gpu_settings_turn_on_the_latency_hiding_scheduler_and_stop_combining():
    names = {s.name: s.value for s in overlap_settings("cuda", keep_collectives_apart=True)}
    assert names["xla_gpu_enable_latency_hiding_scheduler"] is True
    assert names["xla_gpu_all_reduce_combine_threshold_bytes"] == 0
    assert "gpu-all-reduce-combiner" in names["xla_disable_hlo_passes"]
    plain = overlap_settings("gpu")
    assert [s.name for s in plain] == ["xla_gpu_enable_latency_hiding_scheduler"]
    assert all(s.what for s in overlap_settings("tpu"))


def test_settings_render_as_compiler_options_and_as_xla_flags():
    settings = overlap_settings("gpu", keep_collectives_apart=True)
    flags = xla_flags(settings).split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_reduce_scatter_combine_threshold_bytes=0" in flags
    assert compiler_options(overlap_settings("cpu")) == {}
    assert compiler_options(overlap_settings("cpu", keep_collectives_apart=True)) == {
        "xla_disable_hlo_passes": "cpu-all-reduce-combiner"
    }


def test_an_unknown_platform_is_a_clear_error():
    with pytest.raises(OverlapSettingsError, match="unknown platform 'metal'"):
        overlap_settings("metal")


# XLA:GPU marks an async pair "is_sync" when the scheduler found nothing to overlap it with.
_MARKED_HLO = (HALVES.parent / "marked_sync.hlo").read_text()
ASYNC_HLO = (HALVES.parent / "async_collectives.hlo").read_text()


def test_an_async_pair_marked_sync_does_not_count_as_asynchronous():
    from einfuse.backends.inspection import inspect_hlo

    summary = inspect_hlo(_MARKED_HLO)
    count = summary.collectives["all-reduce"]
    assert (count.total, count.asynchronous, count.marked_sync) == (2, 1, 1)
    assert count.bytes == 2 * 1024 * 8192 * 2
    assert [op.asynchronous for op in summary.collective_ops] == [False, True]
    assert "2 x, 32.0 MiB: 0 sync, 2/2 start/done (1 marked sync)" in summary.table()


def test_each_collective_names_the_collectives_its_inputs_come_from():
    from einfuse.backends.inspection import inspect_hlo

    ops = {op.name: op.depends_on for op in inspect_hlo(ASYNC_HLO).collective_ops}
    assert ops == {
        "rs-start": (),
        "ar-start": (),
        "ag": ("ar-start",),  # reads ar-done
        "rs2-start": ("ag", "ar-start"),  # reads ag, which read ar-done
    }
