"""The Reading: one value of one quantity of one device at one time.

Values are exact decimal strings, never floats, so what a meter said is what the
evidence log keeps. A Reading names its quantity by OBIS code where one exists
(DESIGN section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ReadingState(StrEnum):
    """State of a reading, as the one-letter code kept in the evidence log (``st``)."""

    OK = "G"
    """Good: the device answered and the value decoded."""
    NOT_IMPLEMENTED = "N"
    """The device answered with the value that means "not implemented"; no value."""
    TIMEOUT = "T"
    """The device did not answer in time; no value."""
    ERROR = "E"
    """The device answered with an error or garbage; no value."""
    SUBSTITUTE = "S"
    """A substitute value (estimated or copied), never a measured one."""
    LATE = "L"
    """Read later than its interval from the device's own profile (catch-up)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one quantity of one device.

    ``value`` is an exact decimal string (``"12345.678"``) or ``None`` when the state
    is not OK. ``raw`` names where the value came from and holds its bytes, e.g.
    ``modbus:fc03:0x5000:0000000000bc614e`` (function, first register, register bytes
    in hex). ``t_ms`` is gateway time in UTC milliseconds, ``tq`` its quality (``S``
    synced, ``I`` informative, ``U`` unknown), ``mono_ns`` the monotonic clock in
    nanoseconds when the answer arrived.
    """

    source: str
    quantity: str
    obis: str | None
    value: str | None
    unit: str
    state: ReadingState
    raw: str
    t_ms: int = 0
    tq: str = "U"
    mono_ns: int = 0
    device_time: str | None = None
    cumulative: bool = False
    note: str | None = None
