"""The pass manager: pipelines from strings, checked before anything runs."""

import pytest

from einfuse.ir import parse
from einfuse.passes.manager import PipelineError, parse_pipeline, run_passes

MATMUL = "inputs A[i, k], B[k, j]\nC[i, j] = A[i, k] * B[k, j]\noutputs C\n"


def test_pipeline_string_parses_names_and_options():
    specs = parse_pipeline("partition{rank=k,tile=4}, partition{rank=k0,tile=2}")
    assert [s.name for s in specs] == ["partition", "partition"]
    assert dict(specs[0].options) == {"rank": "k", "tile": 4}
    assert str(specs[0]) == "partition{rank=k,tile=4}"


def test_unknown_pass_lists_registered_ones():
    with pytest.raises(PipelineError, match=r"unknown pass 'nope'; registered: .*partition"):
        parse_pipeline("nope")


def test_unknown_option_lists_the_pass_options():
    with pytest.raises(PipelineError, match=r"no option 'size'; its options: .*tile"):
        parse_pipeline("partition{rank=k,size=4}")


def test_missing_required_option_is_named():
    with pytest.raises(PipelineError, match="needs option tile"):
        parse_pipeline("partition{rank=k}")


def test_malformed_option_is_an_error():
    with pytest.raises(PipelineError, match="key=value"):
        parse_pipeline("partition{rank}")


def test_history_keeps_every_stage_stamped_with_its_pass():
    result = run_passes(parse(MATMUL), "partition{rank=k,tile=2}")
    assert [name for name, _ in result.history] == ["input", "partition{rank=k,tile=2}"]
    printed = result.print_after_all()
    assert "// ----- after partition{rank=k,tile=2}" in printed
    assert "C[i, j] = A[i, k1*K0+k0] * B[k1*K0+k0, j]" in printed


def test_empty_pipeline_is_identity():
    c = parse(MATMUL)
    assert run_passes(c, "").cascade == c
