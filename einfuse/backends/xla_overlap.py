"""XLA settings that make collectives overlap compute for real, per platform, and documented.

An overlap pass (T3's chunks, TokenWeave's halves) only makes collectives *independent* of some
compute; whether they then run at the same time is XLA's business:

* on a GPU, collectives are async start/done pairs, but without the latency-hiding scheduler
  XLA puts each done right after its start; and its combiners merge independent collectives
  below a size threshold back into one, which undoes the split;
* on XLA:CPU collectives are synchronous (nothing overlaps), and its all-reduce combiner merges
  TokenWeave's two halves into one all-reduce unless that pass is disabled (checked here in a
  test: two independent psums in a shard_map become one tuple all-reduce, two with the flag);
* on a TPU, the scheduler hides latency by default; async all-gather on v5e needs libtpu flags.

``overlap_settings`` returns them as data. Apply them to one compile with
``jax.jit(f).lower(*args).compile(compiler_options(settings))`` (verified with this jax for the
CPU flag), or process-wide with ``XLA_FLAGS=xla_flags(settings)`` set before jax initializes its
backend (TPU flags go in ``LIBTPU_INIT_ARGS`` instead). Flag names were checked against this
jaxlib's own flag table (the strings in ``libjax_common.so``) where it has them; the TPU and GPU
pass names come from XLA's and libtpu's documentation and source, and cannot be checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.errors import EinfuseError

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


class OverlapSettingsError(EinfuseError, ValueError):
    """An unknown platform for ``overlap_settings``."""


@dataclass(frozen=True, slots=True)
class XlaSetting:
    """One XLA option: its name (no leading ``--``), its value and what it does for overlap."""

    name: str
    value: bool | int | str
    what: str


def overlap_settings(
    platform: str, *, keep_collectives_apart: bool = False
) -> tuple[XlaSetting, ...]:
    """The options that let collectives overlap compute on ``platform`` (cpu, gpu/cuda/rocm,
    tpu); ``keep_collectives_apart`` adds those that stop XLA merging independent collectives
    (TokenWeave's halves, T3's chunks) back into one."""
    kind = _ALIASES.get(platform, platform)
    if kind not in PLATFORMS:
        raise OverlapSettingsError(
            f"unknown platform {platform!r}; expected one of {', '.join(PLATFORMS)}, cuda, rocm"
        )
    settings: list[XlaSetting] = []
    if kind == "gpu":
        settings.append(_LHS)
        if keep_collectives_apart:
            settings += [_threshold(c) for c in ("all_reduce", "reduce_scatter", "all_gather")]
            settings.append(_disable(_GPU_COMBINERS))
    elif kind == "cpu" and keep_collectives_apart:
        settings.append(_disable(("cpu-all-reduce-combiner",)))
    elif kind == "tpu":
        settings += _TPU_ASYNC
    return tuple(settings)


def top_level_options(
    platform: str | None = None, keep_collectives_apart: bool = True
) -> dict[str, bool | int | str]:
    """What einfuse compiles a top-level call with: collectives may overlap compute, and with
    ``keep_collectives_apart`` (a pipeline that splits them: split-tokens, chunk-collective)
    those the cascade wrote run as written, not merged back by XLA's combiners. Settings for
    collectives only: a program without any is unaffected."""
    import jax

    return compiler_options(
        overlap_settings(
            platform or jax.default_backend(), keep_collectives_apart=keep_collectives_apart
        )
    )


def compiler_options(settings: tuple[XlaSetting, ...]) -> dict[str, bool | int | str]:
    """For ``Lowered.compile(compiler_options=...)``: one compile, nothing process-wide."""
    return {s.name: s.value for s in settings}


def xla_flags(settings: tuple[XlaSetting, ...]) -> str:
    """For ``XLA_FLAGS`` (or ``LIBTPU_INIT_ARGS``): ``--name=value`` words, booleans lowercase."""
    words = []
    for s in settings:
        value = str(s.value).lower() if isinstance(s.value, bool) else s.value
        words.append(f"--{s.name}={value}")
    return " ".join(words)


_LHS = XlaSetting(
    "xla_gpu_enable_latency_hiding_scheduler",
    True,
    "schedule each async collective's start as early and its done as late as data allows, so "
    "independent kernels run between them; without it the done follows the start",
)
# XLA's GPU combiner passes ("gpu-all-reduce-combiner" in current XLA, "all-reduce-combiner"
# in older ones and on other backends); disabling a name a build lacks does nothing.
_GPU_COMBINERS = (
    "all-reduce-combiner",
    "gpu-all-reduce-combiner",
    "reduce-scatter-combiner",
    "all-gather-combiner",
)


def _threshold(collective: str) -> XlaSetting:
    name = collective.replace("_", "-")
    return XlaSetting(
        f"xla_gpu_{collective}_combine_threshold_bytes",
        0,
        f"size up to which XLA merges independent {name}s into one (fewer launches and alphas); "
        f"0 skips the combiner, so split collectives stay split",
    )


def _disable(passes: tuple[str, ...]) -> XlaSetting:
    return XlaSetting(
        "xla_disable_hlo_passes",
        ",".join(passes),
        "HLO passes XLA skips: its collective combiners, which would merge the independent "
        "collectives an overlap pass made back into one",
    )


_TPU_ASYNC = (
    XlaSetting(
        "xla_enable_async_all_gather",
        "kAuto",
        "libtpu: let XLA make all-gathers asynchronous (openxla.org/xla/flags_guidance, v5e)",
    ),
    XlaSetting(
        "xla_tpu_enable_async_collective_fusion",
        True,
        "libtpu: run collectives as async fusions that overlap compute",
    ),
    XlaSetting(
        "xla_tpu_enable_async_collective_fusion_fuse_all_gather",
        True,
        "libtpu: include all-gathers in those async collective fusions",
    ),
)
