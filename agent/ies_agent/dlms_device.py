"""A DLMS/COSEM meter (IS 15959) as a site device the scheduler can open and read.

:class:`DlmsDevice` keeps one association with its meter open between reads and
serialises every use of it. ``open()`` associates, reads the name plate and the
meter's clock; ``read()`` reads the instantaneous profile (capture objects and
scalers once, cached) and returns one reading per value, each keeping the plain
response APDU it came in (``raw = "dlms:<hex>"``); :meth:`DlmsDevice.catch_up`
reads the block load profile by time range after the agent was offline and marks
those readings ``LATE`` (their ``raw`` is the row's A-XDR, ``dlms-row:<hex>``, as
one response holds many rows). Every read also records how far the meter's clock is
from the gateway's (quantity ``clock_deviation``, seconds, meter minus gateway).

A failure releases the association (the next use associates afresh) and backs the
meter off: 1 s after the first failure, doubling up to ``backoff_max_s``, with
jitter; while backed off, calls raise :class:`DeviceBackedOff` at once, so a dead
meter never holds up the scheduler or other devices.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from ies_agent.clock import Clock, SystemClock, Timestamp
from ies_drivers.dlms.apdu import range_access
from ies_drivers.dlms.axdr import CosemDateTime, date_time_string
from ies_drivers.dlms.client import ClientSettings
from ies_drivers.dlms.errors import DataAccessError, DlmsError
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.profiles import (
    CLOCK_CLASS,
    PROFILE_CLASS,
    MeterProfile,
    ObjectRef,
    ProfileSpec,
    Row,
    Scale,
    decode_rows,
    load_profile,
    name_plate_text,
    parse_columns,
    parse_scalers,
)
from ies_drivers.dlms.transport import DlmsClient, LinkSettings
from ies_drivers.errors import DeviceBackedOff, DriverError
from ies_drivers.reading import Reading, ReadingState

log = logging.getLogger(__name__)
T = TypeVar("T")


class DlmsDevice:
    """A DLMS/COSEM meter on a serial line or TCP, read through a meter profile.

    ``link`` says where the meter is (transport, port or host, HDLC addresses,
    deadline); ``client`` how to associate (client SAP, authentication, password
    or keys, ciphering); ``profile`` the meter profile id or object
    (``"is15959"``). ``poll_s`` is the live polling cadence the scheduler uses.
    """

    protocol = "dlms"

    def __init__(
        self,
        device_id: str,
        link: LinkSettings,
        client: ClientSettings,
        *,
        profile: MeterProfile | str = "is15959",
        kind: str = "meter",
        poll_s: float = 10.0,
        backoff_max_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.id = device_id
        self.kind = kind
        self.poll_s = poll_s
        self.link = link
        self.client_settings = client
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()
        self._client: DlmsClient | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._columns: dict[str, tuple[ObjectRef, ...]] = {}
        self._scales: dict[str, dict[Obis, Scale]] = {}
        self._periods: dict[str, int] = {}
        self.identity: dict[str, str] = {}
        self.clock_deviation_s: Decimal | None = None
        self.associations = 0

    # -- the SiteDevice protocol

    async def open(self) -> dict[str, str]:
        """Associate, read the name plate and the meter clock; return the identity.

        The identity has ``protocol = "dlms"``, where the meter is (``bus``), the
        meter profile, the name plate values found (``ser``, ``mfr``, ``fw``, ...)
        and the clock deviation from the gateway in seconds (``clock_dev_s``).
        Raises :class:`DriverError` subclasses; the scheduler retries at the next
        read.
        """
        return await self._guarded(self._open)

    async def read(self, clock: Clock) -> list[Reading]:
        """Read the instantaneous profile once; stamp readings with gateway time."""
        return await self._guarded(lambda client: self._read(client, clock))

    async def catch_up(
        self, since_ms: int, clock: Clock | None = None
    ) -> list[Reading]:
        """Read the block load profile from ``since_ms`` (UTC milliseconds) to now,
        from the meter's own memory, as readings in state ``LATE``.

        Each row's interval time is kept as ``device_time``; rows before
        ``since_ms`` are dropped. Raises like :meth:`read`.
        """
        clock = clock or SystemClock()
        return await self._guarded(
            lambda client: self._catch_up(client, since_ms, clock)
        )

    async def sync_clock(self, clock: Clock | None = None) -> Decimal:
        """Set the meter's clock to gateway time; return the deviation (seconds,
        meter minus gateway) measured just before. Raises :class:`DataAccessError`
        when the meter refuses the write (a client without the right)."""
        clock = clock or SystemClock()
        return await self._guarded(lambda client: self._sync_clock(client, clock))

    async def close(self) -> None:
        """Release the association and close the line."""
        async with self._lock:
            client, self._client = self._client, None
            if client is not None:
                await client.release()

    # -- session handling: one place for release, retry and back-off

    async def _guarded(self, action: Callable[[DlmsClient], Awaitable[T]]) -> T:
        async with self._lock:
            now = time.monotonic()
            if now < self._retry_at:
                raise DeviceBackedOff(
                    f"device {self.id}: backed off for {self._retry_at - now:.1f} s "
                    f"after {self._failures} failures"
                )
            try:
                client = await self._session()
                result = await action(client)
            except DriverError as exc:
                await self._fail(exc)
                raise
            self._failures = 0
            self._retry_at = 0.0
            return result

    async def _session(self) -> DlmsClient:
        client = self._client
        if client is not None and client.is_open:
            return client
        if client is not None:
            await client.release()
        client = DlmsClient(self.link, self.client_settings)
        await client.connect()
        self._client = client
        self.associations += 1
        return client

    async def _fail(self, exc: DriverError) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.release()
        self._failures += 1
        delay = min(self.backoff_max_s, 2.0 ** (self._failures - 1))
        delay *= 0.5 + self._rng.random() / 2
        self._retry_at = time.monotonic() + delay
        log.debug(
            "dlms session released",
            extra={
                "kv": {"device": self.id, "error": type(exc).__name__, "retry_s": delay}
            },
        )

    # -- what each operation does

    async def _open(self, client: DlmsClient) -> dict[str, str]:
        identity = {
            "protocol": "dlms",
            "bus": f"{self.link.label}:{self.client_settings.client_sap}/"
            f"{self.link.server_logical}/{self.link.server_physical}",
            "kind": self.kind,
            "profile": self.profile.id,
            "auth": self.client_settings.authentication,
        }
        for key, ref in self.profile.name_plate.items():
            try:
                value = await client.get(ref.class_id, ref.obis, ref.attribute)
            except DataAccessError:
                continue  # a meter without this name plate item
            identity[key] = name_plate_text(value)
        deviation = await self._clock_deviation(client, SystemClock())
        if deviation is not None:
            identity["clock_dev_s"] = str(deviation)
        self.identity = identity
        return identity

    async def _clock_deviation(
        self, client: DlmsClient, clock: Clock
    ) -> Decimal | None:
        value = await client.get(CLOCK_CLASS, self.profile.clock, 2)
        now = clock.now()
        meter = value.as_datetime().to_datetime(
            india_deviation_sign=self.profile.india_deviation_sign,
            assumed_tz=self.profile.zone,
        )
        if meter is None:
            return None
        self.clock_deviation_s = _deviation_s(meter, now)
        return self.clock_deviation_s

    async def _table(
        self, client: DlmsClient, spec: ProfileSpec
    ) -> tuple[tuple[ObjectRef, ...], dict[Obis, Scale]]:
        """Capture objects and scalers of ``spec``, read once per device."""
        if spec.key not in self._columns:
            self._columns[spec.key] = parse_columns(
                await client.get(PROFILE_CLASS, spec.obis, 3)
            )
            scales: dict[Obis, Scale] = {}
            if spec.scaler is not None:
                scaler_columns = parse_columns(
                    await client.get(PROFILE_CLASS, spec.scaler, 3)
                )
                buffer = await client.get(PROFILE_CLASS, spec.scaler, 2)
                scales = parse_scalers(scaler_columns, buffer)
            self._scales[spec.key] = scales
        return self._columns[spec.key], self._scales[spec.key]

    async def _read(self, client: DlmsClient, clock: Clock) -> list[Reading]:
        spec = self.profile.profile("instantaneous")
        columns, scales = await self._table(client, spec)
        buffer, responses = await client.get_with_raw(PROFILE_CLASS, spec.obis, 2)
        now = clock.now()
        rows = decode_rows(columns, buffer, self.profile, scales)
        raw = "dlms:" + "".join(r.hex() for r in responses)
        readings: list[Reading] = []
        for row in rows:
            readings += self._row_readings(row, raw, now, ReadingState.OK, prefix="")
            if row.time is not None:
                deviation = _deviation_s(row.time, now)
                self.clock_deviation_s = deviation
                readings.append(
                    Reading(
                        source=self.id,
                        quantity="clock_deviation",
                        obis=None,
                        value=str(deviation),
                        unit="s",
                        state=ReadingState.OK,
                        raw=raw,
                        t_ms=now.t_ms,
                        tq=now.tq,
                        mono_ns=now.mono_ns,
                        device_time=row.time.isoformat(),
                        note="meter clock minus gateway clock",
                    )
                )
        return readings

    def _row_readings(
        self, row: Row, raw: str, now: Timestamp, state: ReadingState, *, prefix: str
    ) -> list[Reading]:
        note = None
        if row.offset_assumed:
            note = f"meter sent no UTC offset; {self.profile.timezone} assumed"
        readings = []
        for cell in row.cells:
            if cell.value is None:
                continue
            stamp = cell.captured or row.time
            readings.append(
                Reading(
                    source=self.id,
                    quantity=prefix + cell.name,
                    obis=cell.column.obis.full,
                    value=cell.value,
                    unit=cell.unit,
                    state=state,
                    raw=raw,
                    t_ms=now.t_ms,
                    tq=now.tq,
                    mono_ns=now.mono_ns,
                    device_time=stamp.isoformat() if stamp is not None else None,
                    cumulative=cell.cumulative,
                    note=note,
                )
            )
        return readings

    async def _period(self, client: DlmsClient, spec: ProfileSpec) -> int:
        if spec.key not in self._periods:
            value = await client.get(PROFILE_CLASS, spec.obis, 4)
            self._periods[spec.key] = value.as_int()
        return self._periods[spec.key]

    async def _catch_up(
        self, client: DlmsClient, since_ms: int, clock: Clock
    ) -> list[Reading]:
        spec = self.profile.profile("block_load")
        columns, scales = await self._table(client, spec)
        period = await self._period(client, spec)
        meter_now = (await client.get(CLOCK_CLASS, self.profile.clock, 2)).as_datetime()
        india = self.profile.india_deviation_sign
        end = meter_now.to_datetime(
            india_deviation_sign=india, assumed_tz=self.profile.zone
        )
        if end is None or end.tzinfo is None:
            raise DlmsError(f"device {self.id}: meter clock has no usable time")
        since = datetime.fromtimestamp(since_ms / 1000, UTC)
        start = since.astimezone(end.tzinfo)
        access = range_access(
            self.profile.clock,
            _cosem(start, india),
            _cosem(end, india),
        )
        buffer, _ = await client.get_with_raw(PROFILE_CLASS, spec.obis, 2, access)
        now = clock.now()
        rows = decode_rows(columns, buffer, self.profile, scales, period_s=period)
        readings: list[Reading] = []
        for row in rows:
            if row.time is not None and row.time < since:
                continue
            raw = "dlms-row:" + row.raw.hex()
            readings += self._row_readings(
                row, raw, now, ReadingState.LATE, prefix=f"{spec.key}."
            )
        return readings

    async def _sync_clock(self, client: DlmsClient, clock: Clock) -> Decimal:
        before = await self._clock_deviation(client, clock)
        zone_now = datetime.now(UTC).astimezone(self.profile.zone)
        moment = datetime.fromtimestamp(clock.now().t_ms / 1000, UTC).astimezone(
            zone_now.tzinfo
        )
        stamp = CosemDateTime.from_datetime(
            moment, india_deviation_sign=self.profile.india_deviation_sign
        )
        await client.set(CLOCK_CLASS, self.profile.clock, 2, date_time_string(stamp))
        return before if before is not None else Decimal(0)


def _cosem(moment: datetime, india: bool) -> bytes:
    """Return the 12 wire bytes of ``moment`` under the meter's sign convention."""
    return CosemDateTime.from_datetime(moment, india_deviation_sign=india).to_bytes()


def _deviation_s(meter: datetime, now: Timestamp) -> Decimal:
    """Meter time minus gateway time in seconds, to the millisecond."""
    if meter.tzinfo is None:
        meter = meter.replace(tzinfo=UTC)
    gateway = datetime.fromtimestamp(now.t_ms / 1000, UTC)
    delta: timedelta = meter - gateway
    millis = round(delta.total_seconds() * 1000)
    return (Decimal(millis) / 1000).quantize(Decimal("0.001"))


__all__ = ["ClientSettings", "DlmsDevice", "LinkSettings"]
