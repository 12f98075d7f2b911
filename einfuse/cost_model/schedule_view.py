"""What the cost model reads from a ``Schedule``: plain dicts, checked once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from einfuse.cost_model.errors import CostModelError


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """What the cost model reads from an ``einfuse.ir.schedule.Schedule``, as dicts.

    ``parallel`` maps a rank to a mesh axis (a device rank: its size is divided among
    ``mesh[axis]`` devices) or to None (plain parallelism: its tiles run at the same time on one
    device and share the instances of each memory level). Options the model reads:
    ``unit.<Einsum>=<unit>`` binds an Einsum (by output tensor) to a compute unit by name,
    ``mesh.<axis>=<devices>`` gives a mesh axis its device count, and ``chunks=<k>`` overlaps a
    kernel's collectives with its compute in ``k`` pieces.
    """

    tiles: Mapping[str, int] = field(default_factory=dict)
    loop_order: tuple[str, ...] = ()
    parallel: Mapping[str, str | None] = field(default_factory=dict)
    placement: Mapping[str, str] = field(default_factory=dict)
    units: Mapping[str, str] = field(default_factory=dict)
    mesh: Mapping[str, int] = field(default_factory=dict)
    overlap_chunks: int = 1

    @staticmethod
    def of(schedule: object | None) -> ScheduleView:
        if schedule is None:
            return ScheduleView()
        if isinstance(schedule, ScheduleView):
            return schedule
        options = dict(getattr(schedule, "options", ()) or ())
        units = {k[5:]: str(v) for k, v in options.items() if k.startswith("unit.")}
        mesh: dict[str, int] = {}
        for k, v in options.items():
            if k.startswith("mesh."):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise CostModelError(
                        f"schedule option {k}={v!r}: a device count is an int >= 1"
                    )
                mesh[k[5:]] = v
        chunks = options.get("chunks", 1)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise CostModelError(f"schedule option chunks={chunks!r}: an int >= 1")
        return ScheduleView(
            tiles=dict(getattr(schedule, "tiles", ()) or ()),
            loop_order=tuple(getattr(schedule, "loop_order", ()) or ()),
            parallel=dict(getattr(schedule, "parallel", ()) or ()),
            placement=dict(getattr(schedule, "placement", ()) or ()),
            units=units,
            mesh=mesh,
            overlap_chunks=chunks,
        )

    def device_ranks(self) -> dict[str, int]:
        """Ranks bound to a mesh axis, with the number of devices along it."""
        out = {}
        for r, axis in self.parallel.items():
            if axis is None:
                continue
            if axis not in self.mesh:
                raise CostModelError(
                    f"schedule binds {r} to mesh axis {axis!r}; give its device count with "
                    f"option mesh.{axis}=N"
                )
            out[r] = self.mesh[axis]
        return out
