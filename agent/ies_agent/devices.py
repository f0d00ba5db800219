"""Site devices as the scheduler sees them: open once, then read on demand.

A :class:`SiteDevice` hides its protocol: the scheduler asks it for its identity and for
readings, and gets typed driver errors when it cannot. Modbus devices are described by a
template; SunSpec devices build theirs at ``open()`` by walking their model chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ies_agent.clock import Clock
from ies_drivers.errors import DriverError, TemplateError
from ies_drivers.modbus.model import DeviceTemplate, PointSpec, RegisterFunction
from ies_drivers.reading import Reading

if TYPE_CHECKING:
    from ies_drivers.modbus.bus import ModbusBus


class SiteDevice(Protocol):
    """A device the scheduler can identify and read."""

    id: str
    kind: str
    protocol: str
    poll_s: float

    async def open(self) -> dict[str, str]:
        """Identify the device; return what the ``source`` event records."""
        ...

    async def read(self, clock: Clock) -> list[Reading]:
        """Read every quantity once; raise a :class:`DriverError` if it cannot."""
        ...


def _is_common(point: PointSpec) -> bool:
    """Tell whether ``point`` belongs to a SunSpec common model (1, 1#2, …)."""
    return point.name.split(".", 1)[0].split("#", 1)[0] == "1"


class _BusReader:
    """Adapter giving SunSpec discovery plain register lists from a bus owner."""

    def __init__(self, bus: ModbusBus, timeout_s: float | None) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def read_registers(
        self, unit: int, function: str, address: int, count: int
    ) -> Sequence[int]:
        """Read ``count`` registers at ``address`` of ``unit``."""
        fn: RegisterFunction = "input" if function == "input" else "holding"
        block = await self.bus.read_registers(
            unit, fn, address, count, timeout_s=self.timeout_s
        )
        return block.registers


class ModbusDevice:
    """A Modbus or SunSpec device on a shared bus owner."""

    protocol = "modbus"

    def __init__(
        self,
        device_id: str,
        bus: ModbusBus,
        unit: int,
        template: DeviceTemplate,
        *,
        poll_s: float = 10.0,
        timeout_s: float | None = None,
        sunspec_models: Sequence[int] = (),
        sunspec_bases: Sequence[int] = (40000, 0, 50000),
        bus_label: str = "",
    ) -> None:
        self.id = device_id
        self.bus = bus
        self.unit = unit
        self.template = template
        self.kind = template.kind
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.sunspec_models = tuple(sunspec_models)
        self.sunspec_bases = tuple(sunspec_bases)
        self.bus_label = bus_label
        self._points: tuple[PointSpec, ...] = template.points
        self._identity: dict[str, str] = {}

    async def open(self) -> dict[str, str]:
        """Identify the device; for SunSpec, discover its models and build points.

        Raises :class:`DriverError` when the device does not answer or has no SunSpec
        marker; the scheduler retries ``open`` implicitly at the next read.
        """
        identity = {
            "bus": f"{self.bus_label}:{self.unit}",
            "kind": self.kind,
            "mfr": self.template.manufacturer,
            "model": self.template.model,
            "template": self.template.id,
        }
        if self.template.sunspec:
            identity.update(await self._open_sunspec())
        self._identity = identity
        return identity

    async def _open_sunspec(self) -> dict[str, str]:
        """Walk the SunSpec chain, build the point list, read the common model."""
        from ies_drivers.sunspec.discovery import discover, template_for

        reader = _BusReader(self.bus, self.timeout_s)
        models = await discover(reader, self.unit, base_addresses=self.sunspec_bases)
        select = self.sunspec_models or None
        built = template_for(models, select=select)
        self._points = built.points
        found = {}
        common = [p for p in built.points if _is_common(p)]
        if common:
            result = await self.bus.read_points(
                self.unit, common, sunspec=True, timeout_s=self.timeout_s
            )
            for spec, value, _raw in result.values:
                if value.value is not None:
                    found[spec.name] = value.value
        identity = {"models": ",".join(str(m.model_id) for m in models)}
        for key, point in (("mfr", "1.Mn"), ("model", "1.Md"), ("ser", "1.SN")):
            if point in found:
                identity[key] = found[point]
        if "1.Vr" in found:
            identity["fw"] = found["1.Vr"]
        # The common model is identity, not a measurement: keep it out of readings.
        self._points = tuple(p for p in built.points if not _is_common(p))
        return identity

    async def read(self, clock: Clock) -> list[Reading]:
        """Read every point once and stamp the answers with gateway time."""
        if self.template.sunspec and not self._identity:
            await self.open()
        if not self._points:
            raise TemplateError(
                f"device {self.id}: template {self.template.id} has no points"
            )
        result = await self.bus.read_points(
            self.unit,
            self._points,
            sunspec=self.template.sunspec,
            max_block=self.template.max_block,
            timeout_s=self.timeout_s,
        )
        now = clock.now()
        return [
            Reading(
                source=self.id,
                quantity=spec.name,
                obis=spec.obis,
                value=value.value,
                unit=spec.unit,
                state=value.state,
                raw=raw,
                t_ms=now.t_ms,
                tq=now.tq,
                mono_ns=now.mono_ns,
                cumulative=spec.cumulative,
                note=value.note,
            )
            for spec, value, raw in result.values
        ]


__all__ = ["DriverError", "ModbusDevice", "SiteDevice"]
