"""Gateway time with its quality, and the monotonic clock beside it.

Every entry of the evidence log carries gateway time (UTC milliseconds), its quality
(``S`` synchronised, ``I`` informative — set by hand or from a device —,
``U`` unknown) and
the monotonic clock, so a verifier can tell a clock step from a gap. Time quality comes
from the kernel: ``adjtimex(2)`` reports ``TIME_ERROR`` while no time service (NTP,
chrony, systemd-timesyncd) disciplines the clock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Protocol

TIME_ERROR = 5  # adjtimex return value: the clock is not synchronised


@dataclass(frozen=True, slots=True)
class Timestamp:
    """One reading of the clocks: UTC ms, time quality, monotonic ns."""

    t_ms: int
    tq: str
    mono_ns: int


class Clock(Protocol):
    """What the agent asks of a clock; tests pass one that steps or runs fast."""

    def now(self) -> Timestamp:
        """Return the current time with its quality."""
        ...


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux, 64-bit); only the leading fields are
    # read, the padding covers the rest of the kernel structure.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def kernel_time_synced() -> bool | None:
    """Tell whether the kernel clock is disciplined by a time service.

    Returns ``None`` when the kernel cannot be asked (no libc ``adjtimex``).
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != TIME_ERROR)


class SystemClock:
    """The gateway's own clock; time quality is re-checked at most every 60 s."""

    RECHECK_NS = 60 * 1_000_000_000

    def __init__(self) -> None:
        self._tq = "U"
        self._checked_ns: int | None = None

    def now(self) -> Timestamp:
        """Return the current time with its quality."""
        mono = time.monotonic_ns()
        if self._checked_ns is None or mono - self._checked_ns > self.RECHECK_NS:
            synced = kernel_time_synced()
            self._tq = "S" if synced else "U"
            self._checked_ns = mono
        return Timestamp(time.time_ns() // 1_000_000, self._tq, mono)


class OffsetClock:
    """The system clock shifted by ``offset_ms``; tests use it to step time."""

    def __init__(self, offset_ms: int = 0, tq: str = "S") -> None:
        self.offset_ms = offset_ms
        self.tq = tq

    def now(self) -> Timestamp:
        """Return the shifted current time."""
        return Timestamp(
            time.time_ns() // 1_000_000 + self.offset_ms, self.tq, time.monotonic_ns()
        )
