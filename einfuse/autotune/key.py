"""What a tuned result depends on: the `TuningKey`.

A result is only valid for what it was measured on, so every stored result is keyed by the
cascade's fingerprint, every rank's size, the input dtypes, the target and the device kind
(the host CPU's model for ``cpu``), the backend that emits it, and the versions of einfuse,
jax and jaxlib (TVM's database once handed out records for the wrong hardware: tvm#15549).
The Optuna study name derives from the key, so a lookup never crosses keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from einfuse.cost_model.target import Target
    from einfuse.ir.cascade import Cascade

SCHEMA = 1  # bump when the stored record layout changes; part of every key


@dataclass(frozen=True, slots=True)
class TuningKey:
    """Everything a tuned result depends on; two results share a key only if interchangeable."""

    fingerprint: str
    sizes: tuple[tuple[str, int], ...]
    dtypes: tuple[tuple[str, str], ...]
    target: str
    device_kind: str
    versions: tuple[tuple[str, str], ...]
    schema: int = SCHEMA
    backend: str = "jax"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "sizes": dict(self.sizes),
            "dtypes": dict(self.dtypes),
            "target": self.target,
            "device_kind": self.device_kind,
            "versions": dict(self.versions),
            "schema": self.schema,
            "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuningKey:
        return cls(
            str(data["fingerprint"]),
            tuple(sorted((str(k), int(v)) for k, v in data["sizes"].items())),
            tuple(sorted((str(k), str(v)) for k, v in data["dtypes"].items())),
            str(data["target"]),
            str(data["device_kind"]),
            tuple(sorted((str(k), str(v)) for k, v in data["versions"].items())),
            int(data.get("schema", SCHEMA)),
            str(data.get("backend", "jax")),  # keys stored before backends were named
        )

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def study_name(self, kind: str) -> str:
        """``einfuse-<fingerprint>-<key digest>-<kind>``; kind is ``model`` or ``measured``."""
        return f"einfuse-{self.fingerprint[:12]}-{self.digest()[:12]}-{kind}"


def library_versions() -> tuple[tuple[str, str], ...]:
    """Installed versions of the libraries that change generated code (no imports needed)."""
    out = []
    for name in ("einfuse", "jax", "jaxlib"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "unknown"))
    return tuple(out)


def host_cpu_model() -> str:
    """The host CPU's model name and core count: tuned CPU results are per machine type."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    return f"{model} x{os.cpu_count()}"


def device_kind_for(target: Target) -> str:
    """The concrete device a target stands for: the host CPU model for ``cpu``, the device
    kind JAX reports for a built-in accelerator (``einfuse.targets.key_device_kind``), and a
    user's own target file's ``device_kind``."""
    from einfuse.targets import TARGETS, key_device_kind

    if target.device_kind == "cpu":
        return f"cpu:{host_cpu_model()}"
    if target.name in TARGETS:
        return key_device_kind(target.name)
    return target.device_kind


def make_key(
    cascade: Cascade,
    sizes: Mapping[str, int],
    target: Target,
    dtypes: Mapping[str, str] | None = None,
    backend: str = "jax",
) -> TuningKey:
    """The key of ``cascade`` bound to ``sizes`` (every rank) on ``target``.

    ``dtypes`` overrides the declared input dtypes (a function traced with bfloat16 inputs).
    """
    declared = {t.name: str(t.dtype) for t in cascade.inputs}
    declared.update({k: str(v) for k, v in (dtypes or {}).items()})
    return TuningKey(
        fingerprint=cascade.fingerprint(),
        sizes=tuple(sorted((r, int(n)) for r, n in sizes.items())),
        dtypes=tuple(sorted(declared.items())),
        target=target.name,
        device_kind=device_kind_for(target),
        versions=library_versions(),
        backend=backend,
    )
