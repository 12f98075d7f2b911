"""One vocabulary of target names for ``einfuse.jit``, the CLI and the tuning key.

A target names the machine a program is planned and tuned for: ``cpu`` (the host), ``h100``,
``h200``, ``a100``, ``tpu_v5e``, and ``fusemax`` (the FuseMax paper's accelerator, which the
cost model prices but JAX cannot run on). ``gpu`` and ``tpu`` are aliases of the device JAX
runs on here, read from ``jax.devices()[0].device_kind`` (``NVIDIA H200`` -> ``h200``,
``TPU v5 lite`` -> ``tpu_v5e``). An alias with no such device here is an error that names the
targets to choose from, never a silent guess: a CPU-only machine can still model an H200
(``--target h200``) but cannot claim to *be* one.

The tuning key records the device kind as JAX reports it when the target is the device JAX
runs on, so results measured on one chip (an H100 PCIe) are never served for another (an
H100 SXM or an H200). Where the target is not the device here (modelling an H200 from a
laptop), the key holds the kind JAX reports on the chip the target's figures describe.

This module imports nothing heavy; jax is imported only to detect the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfuse.errors import EinfuseError


class TargetNameError(EinfuseError, ValueError):
    """A target name that is not in the vocabulary, or an alias with no device to resolve to."""


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What a target name stands for besides its cost-model figures (``cost_model/targets``).

    ``platform`` is the JAX platform that runs it (None: modelled only); ``kinds`` the
    prefixes of JAX device kinds that are this target; ``nominal_kind`` the device kind JAX
    reports on the exact chip the figures describe.
    """

    name: str
    platform: str | None
    kinds: tuple[str, ...]
    nominal_kind: str


TARGETS: dict[str, TargetInfo] = {
    t.name: t
    for t in (
        TargetInfo("cpu", "cpu", ("cpu",), "cpu"),
        TargetInfo("h100", "gpu", ("NVIDIA H100",), "NVIDIA H100 80GB HBM3"),
        TargetInfo("h200", "gpu", ("NVIDIA H200",), "NVIDIA H200"),
        TargetInfo("a100", "gpu", ("NVIDIA A100",), "NVIDIA A100-SXM4-80GB"),
        TargetInfo("tpu_v5e", "tpu", ("TPU v5 lite", "TPU v5e"), "TPU v5 lite"),
        TargetInfo("fusemax", None, (), "FuseMax accelerator (modelled)"),
    )
}
ALIASES = ("gpu", "tpu")  # the device of this platform that JAX runs on here
NAMES = (*TARGETS, *ALIASES)
RUNNABLE = tuple(n for n in NAMES if n in ALIASES or TARGETS[n].platform)  # einfuse.jit's


def detected_device() -> tuple[str, str]:
    """``(platform, device_kind)`` of JAX's default device (``("gpu", "NVIDIA H200")``).

    Tests fake another chip by monkeypatching this function.
    """
    import jax

    device = jax.devices()[0]
    platform = "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
    return platform, device.device_kind


def target_of_kind(kind: str) -> str | None:
    """The target a JAX device kind is (``NVIDIA H100 PCIe`` -> ``h100``), or None."""
    for info in TARGETS.values():
        if any(kind.lower().startswith(prefix.lower()) for prefix in info.kinds):
            return info.name
    return None


def resolve_target(name: str | None) -> str:
    """The target a name stands for: itself, or for an alias (or None) the device JAX runs on
    here."""
    if name is None:
        platform = detected_device()[0]
        name = platform if platform in ALIASES else "cpu"
    if name in TARGETS:
        return name
    if name not in ALIASES:
        raise TargetNameError(f"unknown target {name!r}; targets: {', '.join(NAMES)}")
    platform, kind = detected_device()
    choices = ", ".join(t.name for t in TARGETS.values() if t.platform == name)
    if platform != name:
        raise TargetNameError(
            f"target {name!r} means the {name.upper()} JAX runs on, and JAX sees none here "
            f"(its device is {platform}: {kind}); to model one, name it: {choices}"
        )
    found = target_of_kind(kind)
    if found is None:
        raise TargetNameError(
            f"target {name!r}: JAX's device {kind!r} has no built-in target; name the closest "
            f"of {choices}, or describe it in a target .toml (einfuse explain --target FILE)"
        )
    return found


def is_here(name: str) -> bool:
    """Whether the target is the device JAX runs on here (so it can be measured)."""
    info = TARGETS.get(name)
    if info is None or info.platform is None:
        return False
    platform, kind = detected_device()
    return platform == info.platform and (platform == "cpu" or target_of_kind(kind) == name)


def check_measurable(name: str, objective: str) -> None:
    """Refuse to time candidates for a target that is not the device JAX runs on here."""
    if name in TARGETS and not is_here(name):
        platform, kind = detected_device()
        raise TargetNameError(
            f"objective {objective!r} times candidates on this machine's device ({platform}: "
            f"{kind}), which is not target {name!r}; tune {name} here with --objective model "
            "(objective='model'), or measure on that machine"
        )


def key_device_kind(name: str) -> str:
    """The device kind a tuning key records for target ``name`` (see the module docstring)."""
    info = TARGETS[name]
    if info.platform is not None and info.platform != "cpu":
        platform, kind = detected_device()
        if platform == info.platform and target_of_kind(kind) == name:
            return kind
    return info.nominal_kind
