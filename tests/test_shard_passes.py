"""The overlap passes (split-tokens, reorder-norm, chunk-collective) on the library's TP Llama
block, emitted as shard_maps on 8 simulated devices: each and all three equal the unsharded
reference and its gradients, and the optimized HLO holds the collectives each promises.
"""

from __future__ import annotations

import pytest

from tests.shard_subprocess import ok, run_checks

RTOL = 1e-5  # float32 against float64; collectives and rings add partial sums in new orders


@pytest.fixture(scope="module")
def pipelines() -> dict:
    return ok(run_checks("tests.shard_pass_checks"), "pipelines")


PIPELINES = [
    "none",
    "reorder-norm",
    "split-tokens",
    "chunk-collective",
    "chunk-collective-bidirectional",
    "all-three",
]


@pytest.mark.parametrize("name", PIPELINES)
def test_each_pipeline_equals_the_unsharded_reference(pipelines: dict, name: str) -> None:
    assert pipelines[name]["values"] < RTOL


@pytest.mark.parametrize("name", ["reorder-norm", "split-tokens", "chunk-collective", "all-three"])
def test_each_pipeline_differentiates_like_the_unsharded_program(
    pipelines: dict, name: str
) -> None:
    assert pipelines[name]["grads"] < RTOL


def test_the_collectives_each_pass_promises_are_in_the_optimized_hlo(pipelines: dict) -> None:
    hlo = {name: pipelines[name]["hlo"] for name in PIPELINES}
    assert hlo["none"] == {"all-reduce": 2}
    assert hlo["reorder-norm"] == {"reduce-scatter": 2, "all-gather": 2}
    assert hlo["split-tokens"] == {"all-reduce": 4}  # the halves are not combined back
    # two layers x 2 chunks x (8-1) ring steps, then the gathers of the scattered results
    assert hlo["chunk-collective"] == {"collective-permute": 28, "all-gather": 2}
    assert all(pipelines[name]["gathers"] == 0 for name in PIPELINES)  # slices, not gathers
