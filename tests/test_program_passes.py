"""Program passes: passes over a whole lifted program, with the pipeline syntax, option
checks, verifier and history of region passes, and ``--print-after-all``."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einfuse
from einfuse.compile_path import trace_canonical
from einfuse.errors import EinfuseError
from einfuse.ir import parse
from einfuse.passes.manager import PipelineError, is_program_pass, run_passes, split_pipeline
from einfuse.passes.program import ProgramVerifyError, run_program_passes, verify_program


def layer(x: jax.Array, wq: jax.Array, wk: jax.Array) -> jax.Array:
    b, s, d = x.shape
    q = (x @ wq).reshape(b, s, 2, d // 2)
    k = (x @ wk).reshape(b, s, 2, d // 2)
    v = x.reshape(b, s, 2, d // 2)
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return x + jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, d)


def two_layers(x: jax.Array, wq: jax.Array, wk: jax.Array) -> jax.Array:
    """Two attention layers, then a sum over the tokens."""
    return layer(layer(x, wq, wk), wq, wk).sum(1)


ARGS = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((2, 6, 4), (4, 4), (4, 4))]


def test_program_passes_lead_the_pipeline_and_the_rest_runs_per_region() -> None:
    specs, rest = split_pipeline("prune-tokens{keep=0.5,start=1},fuse{tile=2}")
    assert [str(s) for s in specs] == ["prune-tokens{keep=0.5,start=1}"]
    assert rest == "fuse{tile=2}"
    assert is_program_pass("prune-tokens") and not is_program_pass("fuse")


def test_a_program_pass_after_a_region_pass_is_refused() -> None:
    with pytest.raises(PipelineError, match="must come before the region passes"):
        split_pipeline("fuse,prune-tokens{keep=0.5}")
    with pytest.raises(PipelineError, match="must come before"):
        einfuse.jit(two_layers, passes="fuse,prune-tokens{keep=0.5}")


def test_program_pass_options_are_checked_like_region_pass_options() -> None:
    with pytest.raises(PipelineError, match="no option 'ratio'; its options: keep, start"):
        split_pipeline("prune-tokens{ratio=0.5}")


def test_a_program_pass_does_not_run_on_one_cascade() -> None:
    cascade = parse("inputs A[i, k], B[k, j]\nC[i, j] = A[i, k] * B[k, j]\noutputs C\n")
    with pytest.raises(PipelineError, match="prune-tokens is a program pass"):
        run_passes(cascade, "prune-tokens{keep=0.5}")


def test_history_stamps_each_program_with_its_pass() -> None:
    program = trace_canonical(two_layers, ARGS)
    result = run_program_passes(program, "prune-tokens{keep=0.5}")
    assert [name for name, _ in result.history] == ["input", "prune-tokens{keep=0.5}"]
    text = result.print_after_all()
    assert "// ----- after prune-tokens{keep=0.5}" in text
    assert "# opaque: jit prune_tokens_layer0_keep3" in text


def test_the_verifier_catches_a_region_that_disagrees_with_its_values() -> None:
    program = trace_canonical(two_layers, ARGS)
    verify_program(program)
    value = program.regions[0].inputs[0]
    avals = dict(program.avals)
    avals[value] = avals[value].update(shape=(2, 5, 4))
    with pytest.raises(ProgramVerifyError, match=r"region 0: tensor X0\[2, 6, 4\] holds"):
        verify_program(replace(program, avals=avals))


def test_pruned_program_runs_later_layers_on_fewer_tokens() -> None:
    f = einfuse.jit(two_layers, passes="prune-tokens{keep=0.5}")
    text = f.cascade(*ARGS)
    assert "ranks a=2, b=3, c=4" in text  # the last region sums 3 of the 6 tokens
    x, wq, wk = (np.random.default_rng(0).normal(size=a.shape).astype(np.float32) for a in ARGS)
    assert f(x, wq, wk).shape == (2, 4)


def test_print_after_all_shows_the_program_after_each_program_pass(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "einfuse",
        "passes",
        f"{__file__}:two_layers",
        "--args",
        "f32[2,6,4] f32[4,4] f32[4,4]",
        "--passes",
        "prune-tokens{keep=0.5}",
        "--print-after-all",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "// ----- after input" in out.stdout
    assert "// ----- after prune-tokens{keep=0.5}" in out.stdout
    assert "ranks a=2, b=3, c=4" in out.stdout


def test_a_mean_over_the_pruned_tokens_is_refused_not_miscounted() -> None:
    def mean_of_two_layers(x: jax.Array, wq: jax.Array, wk: jax.Array) -> jax.Array:
        return layer(layer(x, wq, wk), wq, wk).mean(1)

    with pytest.raises(EinfuseError, match=r"divides a sum over the pruned tokens by .* 6"):
        einfuse.jit(mean_of_two_layers, passes="prune-tokens{keep=0.5}").trace(*ARGS)
