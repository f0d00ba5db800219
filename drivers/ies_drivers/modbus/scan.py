"""Finding the unit ids that answer on a bus, for ``ies-agent scan``.

A unit is there when it answers at all: with registers, or with an exception response
such as 2 (illegal data address) for a register it does not have. Exceptions 10 and 11
come from a gateway saying that nothing answered behind it, so they prove nothing.
Probes neither honour nor start a unit's back-off, so scanning empty ids does not
disturb the devices being polled on the same bus.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ies_drivers.errors import (
    DeviceTimeout,
    ExceptionResponse,
    FrameError,
    WrongUnitError,
)
from ies_drivers.modbus.bus import GATEWAY_EXCEPTIONS, ModbusBus

log = logging.getLogger(__name__)


async def scan_units(
    bus: ModbusBus,
    units: Iterable[int],
    *,
    function: str | int = "holding",
    address: int = 0,
    timeout_s: float = 0.5,
) -> list[int]:
    """Return the unit ids among ``units`` that answer a one-register read.

    Each id is asked once, in the given order, for one register at ``address`` with
    ``function`` (``"holding"``/3 or ``"input"``/4), waiting ``timeout_s`` seconds.
    Silence, garbled answers and answers from another unit id mean "not there" (the
    latter two are logged). Raises :class:`TransportError` when the bus itself is
    unreachable and :class:`ValueError` for a unit id the bus cannot address.
    """
    found: list[int] = []
    for unit in units:
        try:
            await bus.read_registers(
                unit, function, address, 1, timeout_s=timeout_s, probe=True
            )
        except ExceptionResponse as exc:
            if exc.code not in GATEWAY_EXCEPTIONS:
                found.append(unit)
        except DeviceTimeout:
            continue
        except (FrameError, WrongUnitError) as exc:
            log.info(
                "garbled answer while scanning",
                extra={"kv": {"bus": bus.spec.name, "unit": unit, "error": str(exc)}},
            )
        else:
            found.append(unit)
    return found
