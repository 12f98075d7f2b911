"""One target vocabulary for einfuse.jit, the CLI and the tuning key; the key names the chip."""

from __future__ import annotations

import pytest

import einfuse.targets as targets
from einfuse.autotune.key import make_key
from einfuse.autotune.store import TuningStore
from einfuse.autotune.tuner import autotune, tuned_pipeline
from einfuse.cost_model.target import get_target, known_targets
from einfuse.einsum_cascade import attention
from einfuse.frontend import jit
from einfuse.ir.errors import EinfuseError
from einfuse.targets import TargetNameError, resolve_target, target_of_kind


def fake_device(monkeypatch, platform: str, kind: str) -> None:
    monkeypatch.setattr(targets, "detected_device", lambda: (platform, kind))


def small_attention():
    return attention("3pass", heads=False, batch=False, p=256, m=256, e=16, f=16)


def test_the_vocabulary_is_the_set_of_built_in_target_files():
    assert set(targets.TARGETS) == set(known_targets())
    assert targets.NAMES[-2:] == ("gpu", "tpu")


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("TPU v5 lite", "tpu_v5e"),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_jax_device_kinds_map_to_targets(kind, name):
    assert target_of_kind(kind) == name


def test_gpu_and_tpu_resolve_to_the_detected_chip(monkeypatch):
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    assert resolve_target("gpu") == resolve_target(None) == "h200"
    assert get_target("gpu").name == "h200"
    fake_device(monkeypatch, "tpu", "TPU v5 lite")
    assert resolve_target("tpu") == "tpu_v5e"


def test_gpu_without_a_gpu_is_an_error_naming_the_gpu_targets():
    # This machine has no GPU (the default device is the CPU).
    assert resolve_target(None) == "cpu"
    with pytest.raises(TargetNameError, match=r"JAX sees none here.*h100, h200, a100"):
        resolve_target("gpu")


def test_an_unknown_gpu_is_an_error_not_a_guess(monkeypatch):
    fake_device(monkeypatch, "gpu", "NVIDIA GeForce RTX 4090")
    with pytest.raises(TargetNameError, match=r"RTX 4090.*no built-in target"):
        resolve_target("gpu")


def test_jit_takes_the_same_names_and_refuses_a_modelled_only_target():
    for name in ("cpu", "h100", "h200", "a100", "tpu_v5e", "gpu", "tpu"):
        assert jit(lambda x: x, target=name).target == name
    for name in ("fusemax", "v100"):
        with pytest.raises(EinfuseError, match=r"unknown target .* for einfuse.jit"):
            jit(lambda x: x, target=name)


def test_the_key_holds_the_device_kind_jax_reports(monkeypatch):
    c = small_attention()
    sizes = dict.fromkeys(c.all_ranks(), 256)
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    assert make_key(c, sizes, get_target("h200")).device_kind == "NVIDIA H200"
    # Modelling another chip from here: the kind JAX reports on the chip the figures describe.
    assert make_key(c, sizes, get_target("h100")).device_kind == "NVIDIA H100 80GB HBM3"
    fake_device(monkeypatch, "gpu", "NVIDIA H100 PCIe")
    assert make_key(c, sizes, get_target("h100")).device_kind == "NVIDIA H100 PCIe"


def test_a_result_tuned_on_one_chip_is_not_served_on_another(monkeypatch):
    store = TuningStore("memory")
    c = small_attention()
    fake_device(monkeypatch, "gpu", "NVIDIA H100 PCIe")
    autotune(c, target="h100", objective="model", trials=40, storage=store, progress=False)
    assert tuned_pipeline(c, None, "gpu", store) is not None
    fake_device(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3")  # same target, another chip
    assert tuned_pipeline(c, None, "gpu", store) is None
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    assert tuned_pipeline(c, None, "gpu", store) is None


def test_measuring_needs_the_target_to_be_the_device_here():
    with pytest.raises(TargetNameError, match=r"not target 'h200'.*--objective model"):
        autotune(small_attention(), target="h200", objective="measure", storage="memory")
