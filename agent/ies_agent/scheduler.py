"""The site's heartbeat: poll devices, read registers at interval boundaries, log them.

Two kinds of work run for every device:

* **live polling** every ``poll_s`` seconds keeps the latest values in the agent state
  for the status page and telemetry; these values are not written to the evidence log;
* **interval reads** at every boundary of the site's interval grid (wall clock, site
  time zone) read every point of every device — cumulative registers above all — and
  append each value to the evidence log; after the last device a checkpoint is signed.

A device that fails is counted, its error recorded in the evidence log where it
explains a missing slot, and retried at the next turn; it never stops the others, and
the bus driver's back-off keeps a dead device from stalling its line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from ies_agent.clock import Clock
from ies_agent.devices import SiteDevice
from ies_agent.intervals import next_boundary_ms
from ies_agent.state import AgentState
from ies_drivers.errors import DeviceBackedOff, DriverError
from ies_drivers.reading import Reading

if TYPE_CHECKING:
    from ies_agent.systemd import Watchdog

log = logging.getLogger(__name__)

READ_GRACE_S = 300.0
"""Longest a turn's reads may take before its loop counts as hung (watchdog)."""


class EvidenceSink(Protocol):
    """What the scheduler needs of the evidence log."""

    def append_reading(self, reading: Reading) -> int:
        """Append one reading; return its ``seq``."""
        ...

    def append_event(
        self,
        ev: str,
        fields: dict[str, object] | None = None,
        *,
        src: str | None = None,
    ) -> int:
        """Append one event; return its ``seq``."""
        ...

    def checkpoint(self) -> str:
        """Sign a checkpoint over the whole log; return the note."""
        ...


class Scheduler:
    """Drive the site's devices on their cadences and record what they say."""

    def __init__(
        self,
        devices: Sequence[SiteDevice],
        evidence: EvidenceSink,
        state: AgentState,
        clock: Clock,
        *,
        interval_s: int,
        tz: ZoneInfo,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.devices = list(devices)
        self.watchdog = watchdog
        self.evidence = evidence
        self.state = state
        self.clock = clock
        self.interval_s = interval_s
        self.tz = tz
        self.intervals_done = 0
        self._opened: set[str] = set()
        self._open_locks: dict[str, asyncio.Lock] = {}
        self._outage: dict[str, str] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; every task is named and ends with this call."""
        if self.watchdog is not None:
            for device in self.devices:
                self.watchdog.expect(f"poll:{device.id}", device.poll_s + READ_GRACE_S)
            self.watchdog.expect("intervals", READ_GRACE_S)
        async with asyncio.TaskGroup() as group:
            for device in self.devices:
                group.create_task(
                    self._live_loop(device, stop), name=f"poll:{device.id}"
                )
            group.create_task(self._interval_loop(stop), name="intervals")

    # -- device identity -------------------------------------------------------------

    async def _open_device(
        self, device: SiteDevice, slot_ms: int | None = None
    ) -> bool:
        """Identify the device once; record it as a ``source`` event; catch up.

        Called before every read until it succeeds, so a device that is offline when
        the agent starts is identified when it first answers. A device that keeps
        its own interval profile (a DLMS meter) is then asked for the intervals it
        recorded since its last reading in the log; those come in as ``L`` (late).
        """
        if device.id in self._opened:
            return True
        lock = self._open_locks.setdefault(device.id, asyncio.Lock())
        async with lock:
            if device.id in self._opened:
                return True
            ds = self.state.device(device.id)
            ds.kind, ds.protocol = device.kind, device.protocol
            try:
                identity = await device.open()
            except DriverError as exc:
                self._record_fault(device.id, exc, slot_ms=slot_ms, during="identify")
                return False
            ds.identity = identity
            self.evidence.append_event("source", {"dev": identity}, src=device.id)
            self._opened.add(device.id)
            await self._catch_up(device)
            return True

    async def _catch_up(self, device: SiteDevice) -> None:
        """Log what the device recorded while the agent was away, marked late."""
        catch_up = getattr(device, "catch_up", None)
        last_reading_ms = getattr(self.evidence, "last_reading_ms", None)
        if catch_up is None or last_reading_ms is None:
            return
        since_ms = last_reading_ms(device.id)
        if since_ms is None:
            return
        try:
            readings: list[Reading] = await catch_up(since_ms, self.clock)
        except DriverError as exc:
            self._record_fault(device.id, exc, during="catch_up")
            return
        for reading in readings:
            self.evidence.append_reading(reading)
        if readings:
            log.info(
                "caught up from the device's own profile",
                extra={"kv": {"device": device.id, "readings": len(readings)}},
            )

    # -- live values -----------------------------------------------------------------

    async def _live_loop(self, device: SiteDevice, stop: asyncio.Event) -> None:
        """Poll ``device`` every ``poll_s`` seconds until ``stop`` is set."""
        period = device.poll_s
        next_at = time.monotonic()
        while not stop.is_set():
            self._beat(f"poll:{device.id}", period + READ_GRACE_S)
            await self._read(device, live=True)
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:  # a slow bus: skip missed turns instead of bunching up
                next_at = time.monotonic()
                delay = 0
            await _wait(stop, delay)

    # -- interval boundaries ---------------------------------------------------------

    async def _interval_loop(self, stop: asyncio.Event) -> None:
        """At every boundary read every device, log the values, sign a checkpoint."""
        while not stop.is_set():
            now = self.clock.now()
            boundary = next_boundary_ms(now.t_ms, self.interval_s, self.tz)
            self._beat("intervals", (boundary - now.t_ms) / 1000 + READ_GRACE_S)
            await _wait(stop, (boundary - now.t_ms) / 1000)
            if stop.is_set():
                return
            results = await asyncio.gather(
                *(self._read(d, live=False, slot_ms=boundary) for d in self.devices)
            )
            for readings in results:
                for reading in readings:
                    self.evidence.append_reading(reading)
            self.evidence.checkpoint()
            self.intervals_done += 1

    def _beat(self, loop: str, within_s: float) -> None:
        """Tell the watchdog ``loop`` is alive; its next beat is due within_s later."""
        if self.watchdog is not None:
            self.watchdog.healthy(loop, within_s)

    # -- one read ----------------------------------------------------------------------

    async def _read(
        self, device: SiteDevice, *, live: bool, slot_ms: int | None = None
    ) -> list[Reading]:
        """Read ``device`` once; on failure count it and, for a slot, log it."""
        if not await self._open_device(device, slot_ms):
            return []
        ds = self.state.device(device.id)
        started = time.monotonic()
        try:
            readings = await device.read(self.clock)
        except DriverError as exc:
            self._record_fault(device.id, exc, slot_ms=slot_ms)
            return []
        ds.last_latency_s = time.monotonic() - started
        ds.reads += 1
        ds.online = True
        for reading in readings:
            ds.values[reading.quantity] = reading
        if readings:
            ds.last_read_ms = readings[0].t_ms
        if device.id in self._outage:
            log.info(
                "device answers again",
                extra={"kv": {"device": device.id, "was": self._outage.pop(device.id)}},
            )
        return readings

    def _record_fault(
        self,
        device_id: str,
        exc: DriverError,
        *,
        slot_ms: int | None = None,
        during: str = "read",
    ) -> None:
        """Count a fault, log an outage once, record it where it explains a gap."""
        ds = self.state.device(device_id)
        kind = type(exc).__name__
        ds.faults[kind] += 1
        ds.last_error = str(exc)
        ds.online = False
        if device_id not in self._outage and not isinstance(exc, DeviceBackedOff):
            self._outage[device_id] = kind
            log.warning(
                "device does not answer",
                extra={"kv": {"device": device_id, "error": kind, "detail": str(exc)}},
            )
        if slot_ms is not None or during == "catch_up":
            fields: dict[str, object] = {"error": kind, "msg": str(exc)[:300]}
            if slot_ms is not None:
                fields["slot"] = _iso(slot_ms)
            fields["during"] = during
            self.evidence.append_event("read_error", fields, src=device_id)


def _iso(t_ms: int) -> str:
    """Return ``t_ms`` as the log's UTC time text ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    seconds, ms = divmod(t_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


async def _wait(stop: asyncio.Event, delay_s: float) -> None:
    """Sleep ``delay_s`` seconds or until ``stop`` is set, whichever comes first."""
    if delay_s <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
