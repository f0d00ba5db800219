"""Turn an event's per-interval targets into setpoints per device.

A site names the devices dispatch may act on (``[[dispatch.devices]]``): SunSpec
inverters (an active-power limit in percent of rated power, written to model 123 or
704) and OCPP chargers (a current limit in A, sent as a charging profile). An event
targets device ids or ``group:<name>``. For each interval:

- ``limit_pct`` goes to every targeted inverter as is;
- ``charge_a`` goes to every targeted charger as is;
- ``capacity_kw`` (flexibility asked for) is shared evenly among targeted chargers
  as a reduction from their ``max_a`` at ``voltage_v`` and ``phases``; a charger
  limit asked for explicitly wins.

The policy pack then clamps, excludes or refuses (:mod:`ies_agent.dispatch.policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal

from ies_agent.dispatch.errors import EventRejectedError
from ies_agent.dispatch.model import DispatchEvent
from ies_agent.dispatch.policy import DeviceSetpoints

KIND_INVERTER = "sunspec-inverter"
KIND_CHARGER = "ocpp-charger"


@dataclass(frozen=True)
class DispatchDevice:
    """A device dispatch may act on.

    ``device_id`` is a ``[[devices]]`` id (inverters) or an OCPP charger id;
    ``max_a`` (A), ``voltage_v`` (V) and ``phases`` describe a charger's full power.
    """

    device_id: str
    kind: str
    groups: tuple[str, ...] = ()
    max_a: Decimal = Decimal(32)
    voltage_v: Decimal = Decimal(230)
    phases: int = 1


def resolve_targets(
    event: DispatchEvent, devices: Sequence[DispatchDevice]
) -> list[DispatchDevice]:
    """The devices ``event`` names, in site order.

    Raises :class:`EventRejectedError` (``no_target``) when it names none of them.
    """
    chosen = []
    for device in devices:
        for target in event.targets:
            if target == device.device_id or (
                target.startswith("group:") and target[6:] in device.groups
            ):
                chosen.append(device)
                break
    if not chosen:
        raise EventRejectedError(
            "no_target",
            f"event {event.event_id} targets {', '.join(event.targets)}; this site "
            "has no such dispatchable device",
        )
    return chosen


def plan(
    event: DispatchEvent, devices: Sequence[DispatchDevice]
) -> list[DeviceSetpoints]:
    """Return the raw setpoints (before the policy pack) for every targeted device."""
    chosen = resolve_targets(event, devices)
    chargers = [d for d in chosen if d.kind == KIND_CHARGER]
    out: list[DeviceSetpoints] = []
    for device in chosen:
        if device.kind == KIND_INVERTER:
            values = [t.limit_pct for t in event.intervals]
            out.append(DeviceSetpoints(device.device_id, device.kind, "pct", values))
            continue
        amps: list[Decimal | None] = []
        for target in event.intervals:
            if target.charge_a is not None:
                amps.append(min(target.charge_a, device.max_a))
            elif target.capacity_kw is not None:
                share_w = target.capacity_kw * 1000 / len(chargers)
                cut_a = share_w / (device.voltage_v * device.phases)
                limit = max(device.max_a - cut_a, Decimal(0))
                amps.append(limit.quantize(Decimal("0.1"), rounding=ROUND_DOWN))
            else:
                amps.append(None)
        out.append(DeviceSetpoints(device.device_id, device.kind, "A", amps))
    return out


def offered_kw(
    setpoints: Sequence[DeviceSetpoints], devices: Sequence[DispatchDevice], index: int
) -> Decimal:
    """The flexibility (kW) the decided plan delivers in interval ``index``.

    Only chargers count: their reduction from full power. This is the commitment a
    site answers a Beckn ``DemandFlexNeed`` with.
    """
    by_id = {d.device_id: d for d in devices}
    total = Decimal(0)
    for item in setpoints:
        device = by_id.get(item.device_id)
        value = item.values[index]
        if device is None or device.kind != KIND_CHARGER or value is None:
            continue
        total += (device.max_a - value) * device.voltage_v * device.phases / 1000
    return total.quantize(Decimal("0.001"))
