"""Acting on devices: write a setpoint, read back what the device really took, revert.

An :class:`Actuator` is one device seen from dispatch:

- :class:`SunSpecLimit`: an inverter's active-power limit through SunSpec, model 123
  (immediate controls: ``WMaxLimPct``, ``WMaxLimPct_RvrtTms``, ``WMaxLim_Ena``) or,
  when 123 is absent, model 704 (``WMaxLimPct``, ``WMaxLimPctRvrtTms``,
  ``WMaxLimPctEna``). The limit is written with the device's own revert timer set to
  the rest of the event plus a margin, so the inverter lifts it by itself if the agent
  dies. Read-back reads the model again; the limit counts as applied only when the
  device shows the value and the enable flag written.
- :class:`ChargerLimit`: a charger's current limit as an OCPP charging profile above
  the CSMS's, through :meth:`ies_agent.ocpp.server.CentralSystem.set_dispatch_limit`;
  the charger's answer is its read-back (``Accepted``), and the profile expires at the
  event's end on the charger side too.

Reverting puts back the state read before the event, but never a weaker inverter
limit than the installer's own (``floor_pct``). Errors:
:class:`~ies_agent.dispatch.errors.DeviceCommandError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Protocol

from ies_agent.dispatch.errors import DeviceCommandError
from ies_drivers.errors import DriverError
from ies_drivers.sunspec.discovery import DEFAULT_BASE_ADDRESSES, discover

if TYPE_CHECKING:
    from ies_agent.ocpp.server import CentralSystem
    from ies_drivers.modbus.bus import ModbusBus

REVERT_MARGIN_S = 30
"""Seconds the inverter's own revert timer runs past the event's end."""


class Actuator(Protocol):
    """One device dispatch acts on; ``unit`` is ``pct`` or ``A``."""

    device_id: str
    unit: str

    async def prior(self) -> dict[str, str]:
        """The device's state before the event (to revert to)."""
        ...

    async def apply(self, value: Decimal, *, until: datetime, now: datetime) -> str:
        """Send ``value``; return the command as text for the evidence log.

        Raises :class:`DeviceCommandError` when the device refuses it.
        """
        ...

    async def readback(self, value: Decimal) -> tuple[bool, dict[str, str]]:
        """Return whether the device shows ``value`` applied, and what it shows."""
        ...

    async def restore(
        self, prior: Mapping[str, str], floor_pct: Decimal | None
    ) -> dict[str, str]:
        """Put back ``prior`` (never weaker than ``floor_pct``); return what was
        written. Raises :class:`DeviceCommandError`."""
        ...


@dataclass(frozen=True)
class _Layout:
    """Where model 123 or 704 keeps the limit, as offsets from the model's ``ID``."""

    model: int
    pct: int
    enable: int
    revert: int
    revert_words: int
    scale: int
    length: int


_LAYOUTS = {
    123: _Layout(123, pct=5, enable=9, revert=7, revert_words=1, scale=23, length=26),
    704: _Layout(
        704, pct=15, enable=14, revert=18, revert_words=2, scale=54, length=67
    ),
}


class SunSpecLimit:
    """An inverter's active-power limit over SunSpec (see the module docstring)."""

    unit = "pct"

    def __init__(
        self,
        device_id: str,
        bus: ModbusBus,
        unit_id: int,
        *,
        bases: Sequence[int] = DEFAULT_BASE_ADDRESSES,
    ) -> None:
        self.device_id = device_id
        self.bus = bus
        self.unit_id = unit_id
        self.bases = tuple(bases)
        self._layout: _Layout | None = None
        self._address = 0

    async def _locate(self) -> _Layout:
        if self._layout is not None:
            return self._layout
        try:
            models = await discover(self.bus, self.unit_id, base_addresses=self.bases)
        except DriverError as exc:
            raise DeviceCommandError(
                f"{self.device_id}: cannot find its SunSpec models: {exc}"
            ) from None
        for wanted in (123, 704):
            found = next((m for m in models if m.model_id == wanted), None)
            if found is not None:
                self._layout, self._address = _LAYOUTS[wanted], found.address
                return self._layout
        raise DeviceCommandError(
            f"{self.device_id}: no SunSpec controls model (123 or 704) among "
            f"{', '.join(str(m.model_id) for m in models)}; it cannot be limited"
        )

    async def _read(self) -> tuple[_Layout, list[int]]:
        layout = await self._locate()
        try:
            block = await self.bus.read_registers(
                self.unit_id, "holding", self._address, layout.length
            )
        except DriverError as exc:
            raise DeviceCommandError(
                f"{self.device_id}: read-back failed: {exc}"
            ) from None
        return layout, list(block.registers)

    @staticmethod
    def _scale(layout: _Layout, regs: Sequence[int]) -> int:
        raw = regs[layout.scale]
        return raw - 65536 if raw >= 32768 else raw

    async def _state(self) -> dict[str, str]:
        layout, regs = await self._read()
        sf = self._scale(layout, regs)
        pct = Decimal(regs[layout.pct]).scaleb(sf)
        revert = regs[layout.revert]
        if layout.revert_words == 2:
            revert = (revert << 16) | regs[layout.revert + 1]
        return {
            "model": str(layout.model),
            "pct": format(pct.normalize(), "f"),
            "enabled": str(regs[layout.enable]),
            "revert_s": str(revert),
        }

    async def prior(self) -> dict[str, str]:
        """The limit and enable flag before the event."""
        return await self._state()

    async def _write(self, offset: int, values: list[int]) -> None:
        try:
            await self.bus.write_registers(self.unit_id, self._address + offset, values)
        except DriverError as exc:
            raise DeviceCommandError(
                f"{self.device_id}: the inverter refused the write at "
                f"{self._address + offset}: {exc}"
            ) from None

    async def _set(self, pct: Decimal, enable: bool, revert_s: int) -> str:
        layout, regs = await self._read()
        sf = self._scale(layout, regs)
        raw = int(pct.scaleb(-sf).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
        words = (
            [min(revert_s, 65535)]
            if layout.revert_words == 1
            else [(revert_s >> 16) & 0xFFFF, revert_s & 0xFFFF]
        )
        # Value and revert timer first, the enable flag last: never a stale value.
        await self._write(layout.pct, [raw])
        await self._write(layout.revert, words)
        await self._write(layout.enable, [1 if enable else 0])
        return (
            f"sunspec:{layout.model}:WMaxLimPct={raw}(sf {sf}),"
            f"RvrtTms={revert_s},Ena={1 if enable else 0}"
        )

    async def apply(self, value: Decimal, *, until: datetime, now: datetime) -> str:
        """Write the limit ``value`` percent, enabled, with a revert timer to
        ``until`` plus :data:`REVERT_MARGIN_S`."""
        revert_s = max(1, int((until - now).total_seconds()) + REVERT_MARGIN_S)
        return await self._set(value, True, revert_s)

    async def readback(self, value: Decimal) -> tuple[bool, dict[str, str]]:
        """Read the model again: applied when enabled at ``value`` percent."""
        state = await self._state()
        return state["enabled"] == "1" and Decimal(state["pct"]) == value, state

    async def restore(
        self, prior: Mapping[str, str], floor_pct: Decimal | None
    ) -> dict[str, str]:
        """Put the limit back as it was, or at the installer's limit if tighter."""
        enabled = prior.get("enabled") == "1"
        pct = Decimal(prior.get("pct", "100")) if enabled else Decimal(100)
        if floor_pct is not None and pct > floor_pct:
            pct, enabled = floor_pct, True
        command = await self._set(pct, enabled, 0)
        return {
            "command": command,
            "pct": format(pct, "f"),
            "enabled": str(int(enabled)),
        }


class ChargerLimit:
    """A charger's current limit as an OCPP charging profile (module docstring)."""

    unit = "A"

    def __init__(self, device_id: str, central: CentralSystem) -> None:
        self.device_id = device_id
        self.central = central
        self._answer = ""

    async def prior(self) -> dict[str, str]:
        """Chargers carry no dispatch profile of ours before an event."""
        return {"profile": "none"}

    async def apply(self, value: Decimal, *, until: datetime, now: datetime) -> str:
        """Send the profile; raise :class:`DeviceCommandError` unless accepted."""
        del now
        from ies_agent.ocpp.server import UnknownCharger

        try:
            answer = await self.central.set_dispatch_limit(
                self.device_id, value, unit="A", until=until
            )
        except UnknownCharger:
            raise DeviceCommandError(
                f"{self.device_id}: no such OCPP charger in [ocpp]"
            ) from None
        self._answer = answer
        if answer not in ("Accepted", "Pending"):
            await self.central.clear_dispatch_limit(self.device_id)
            raise DeviceCommandError(
                f"{self.device_id}: the charger answered {answer} to the charging "
                "profile"
            )
        return f"ocpp:SetChargingProfile limit={value} A until event end"

    async def readback(self, value: Decimal) -> tuple[bool, dict[str, str]]:
        """The charger's answer to the profile is all OCPP lets us read back here."""
        del value
        return self._answer == "Accepted", {"status": self._answer or "none"}

    async def restore(
        self, prior: Mapping[str, str], floor_pct: Decimal | None
    ) -> dict[str, str]:
        """Remove the dispatch profile (the CSMS's own profiles stay)."""
        del prior, floor_pct
        answer = await self.central.clear_dispatch_limit(self.device_id)
        return {"command": "ocpp:ClearChargingProfile", "status": answer}


def quantize(value: Decimal, unit: str) -> Decimal:
    """Round a setpoint to what a device takes: whole percent, 0.1 A."""
    step = Decimal(1) if unit == "pct" else Decimal("0.1")
    return value.quantize(step, rounding=ROUND_HALF_EVEN)
