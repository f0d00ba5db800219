"""A small IS 15959 meter of our own: COSEM objects, an association, and servers.

Used by the tests and by ``ies-agent demo``, so the agent's real DLMS code path has a
peer to read. Three layers, like the client:

* :class:`SimulatedMeter` holds the objects an IS 15959 single-phase meter exposes:
  name plate, clock, instantaneous profile, block load profile, daily load profile,
  billing profile, event logs, each profile with its scaler profile. Values move
  with time and are deterministic: energy is the integral of a daily power curve, so
  the cumulative register always equals the sum of the blocks before it.
* :class:`ServerSession` is one association, without I/O: AARQ with the public
  client (SAP 16, no security), the meter reader (SAP 32, LLS password) and the
  utility settings client (SAP 48, HLS-GMAC), suite 0 ciphering when the AARQ asks
  for it, GET normal / with list / with block transfer, selective access by range
  and by entry, SET of the clock, ACTION for the HLS reply.
* :class:`MeterServer` serves the meter over the TCP wrapper, HDLC over TCP, or HDLC
  on a serial port (a pseudo-terminal in tests), optionally behind the IEC 62056-21
  mode E opening and paced like a real line of ``line_baud`` baud.

Dates use the Indian deviation sign (+330 is IST), as IS 15959 meters do.
Run one by hand: ``python -m ies_drivers.dlms.server --tcp 4059``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import axdr, hdlc, security
from ies_drivers.dlms.apdu import AccessFailure, AccessSelection, GetResult
from ies_drivers.dlms.axdr import CosemDateTime, Data, DataType
from ies_drivers.dlms.errors import DlmsError, SecurityError
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.wrapper import WrapperLink

log = logging.getLogger(__name__)

IST: Final = timezone(timedelta(minutes=330))
OBJECT_UNDEFINED: Final = 4
READ_WRITE_DENIED: Final = 3
TYPE_UNMATCHED: Final = 12
OTHER_REASON: Final = 250
SCOPE_VIOLATED: Final = 13
NO_LONG_GET: Final = 16
BLOCK_NUMBER_INVALID: Final = 19
CLOCK: Final = Obis(0, 0, 1, 0, 0)


def _clock_bytes(moment: datetime) -> bytes:
    return CosemDateTime.from_datetime(
        moment.astimezone(IST), india_deviation_sign=True
    ).to_bytes()


def _dt(moment: datetime) -> Data:
    return axdr.octet_string(_clock_bytes(moment))


# --- COSEM objects ------------------------------------------------------------------


class CosemObject:
    """One interface class instance; subclasses answer their attributes."""

    class_id = 1

    def __init__(self, obis: Obis) -> None:
        self.obis = obis

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        """Return an attribute value; raise :class:`_Refused` with a result code."""
        if attribute == 1:
            return axdr.octet_string(self.obis.to_bytes())
        raise _Refused(OBJECT_UNDEFINED)

    def set(self, attribute: int, value: Data) -> None:
        """Write an attribute; read-only unless a subclass allows it."""
        raise _Refused(READ_WRITE_DENIED)

    def action(self, method: int, parameters: Data | None) -> Data | None:
        """Invoke a method; none unless a subclass has them."""
        raise _Refused(OBJECT_UNDEFINED)


class _Refused(Exception):
    """An attribute or method answered with data-access-result ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class DataObject(CosemObject):
    """Class 1 (Data): attribute 2 is a value."""

    class_id = 1

    def __init__(self, obis: Obis, value: Callable[[], Data]) -> None:
        super().__init__(obis)
        self.value = value

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        if attribute == 2:
            return self.value()
        return super().get(attribute, access)


class RegisterObject(CosemObject):
    """Class 3 (Register): value and scaler_unit."""

    class_id = 3

    def __init__(
        self, obis: Obis, value: Callable[[], Data], scaler: int, unit: int
    ) -> None:
        super().__init__(obis)
        self.value = value
        self.scaler = scaler
        self.unit = unit

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        if attribute == 2:
            return self.value()
        if attribute == 3:
            return axdr.structure((axdr.int8(self.scaler), axdr.enum(self.unit)))
        return super().get(attribute, access)


class DemandRegisterObject(RegisterObject):
    """Class 4 (Extended/Demand register): value, scaler_unit, capture time (5)."""

    class_id = 4

    def __init__(
        self,
        obis: Obis,
        value: Callable[[], Data],
        scaler: int,
        unit: int,
        captured: Callable[[], Data],
    ) -> None:
        super().__init__(obis, value, scaler, unit)
        self.captured = captured

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        if attribute == 5:
            return self.captured()
        return super().get(attribute, access)


class ClockObject(CosemObject):
    """Class 8 (Clock): time (2, settable), time zone (3), status (4)."""

    class_id = 8

    def __init__(self, meter: SimulatedMeter) -> None:
        super().__init__(CLOCK)
        self.meter = meter

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        if attribute == 2:
            return _dt(self.meter.now())
        if attribute == 3:
            return axdr.int16(330)
        if attribute == 4:
            return axdr.uint8(0)
        return super().get(attribute, access)

    def set(self, attribute: int, value: Data) -> None:
        if attribute != 2:
            raise _Refused(READ_WRITE_DENIED)
        try:
            wanted = value.as_datetime().to_datetime(india_deviation_sign=True)
        except DlmsError:
            raise _Refused(TYPE_UNMATCHED) from None
        if wanted is None or wanted.tzinfo is None:
            raise _Refused(TYPE_UNMATCHED)
        self.meter.skew = wanted - datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Capture:
    """One column of a profile: class, logical name, attribute."""

    class_id: int
    obis: Obis
    attribute: int = 2

    def to_data(self) -> Data:
        return axdr.structure(
            (
                axdr.uint16(self.class_id),
                axdr.octet_string(self.obis.to_bytes()),
                axdr.int8(self.attribute),
                axdr.uint16(0),
            )
        )


Row = tuple[datetime | None, tuple[Data, ...]]


class ProfileObject(CosemObject):
    """Class 7 (Profile generic): buffer (2) with selective access by range and by
    entry, capture objects (3), capture period in seconds (4), entries (7, 8).

    ``rows()`` returns the buffer oldest first; the first column is the clock
    when the profile is indexed by time.
    """

    class_id = 7

    def __init__(
        self,
        obis: Obis,
        columns: Sequence[Capture],
        rows: Callable[[], list[Row]],
        period_s: int = 0,
    ) -> None:
        super().__init__(obis)
        self.columns = tuple(columns)
        self.rows = rows
        self.period_s = period_s

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        if attribute == 2:
            return self._buffer(access)
        if attribute == 3:
            return axdr.array(c.to_data() for c in self.columns)
        if attribute == 4:
            return axdr.uint32(self.period_s)
        if attribute == 5:
            return axdr.enum(1)
        if attribute == 6:
            return self.columns[0].to_data() if self.columns else axdr.null()
        if attribute in (7, 8):
            return axdr.uint32(len(self.rows()))
        return super().get(attribute, access)

    def _buffer(self, access: AccessSelection | None) -> Data:
        rows = self.rows()
        first_col, last_col = 1, len(self.columns)
        if access is not None:
            try:
                rows, first_col, last_col = self._select(rows, access)
            except (DlmsError, IndexError, TypeError):
                raise _Refused(OTHER_REASON) from None
        return axdr.array(
            axdr.structure(values[first_col - 1 : last_col]) for _, values in rows
        )

    def _select(
        self, rows: list[Row], access: AccessSelection
    ) -> tuple[list[Row], int, int]:
        params = access.parameters.items
        if access.selector == 1:
            start = params[1].as_datetime().to_datetime(india_deviation_sign=True)
            end = params[2].as_datetime().to_datetime(india_deviation_sign=True)
            if start is None or end is None:
                raise _Refused(OTHER_REASON)
            chosen = [r for r in rows if r[0] is not None and start <= r[0] <= end]
            wanted = params[3].items if len(params) > 3 else ()
            if wanted:
                raise _Refused(OTHER_REASON)  # column selection by object: not served
            return chosen, 1, len(self.columns)
        if access.selector == 2:
            first, last = params[0].as_int(), params[1].as_int()
            first_col, last_col = params[2].as_int(), params[3].as_int()
            last = last or len(rows)
            last_col = last_col or len(self.columns)
            return rows[max(first, 1) - 1 : last], max(first_col, 1), last_col
        raise _Refused(OTHER_REASON)


class AssociationObject(CosemObject):
    """Class 15 (Association LN): method 1 is reply_to_HLS_authentication."""

    class_id = 15

    def __init__(self) -> None:
        super().__init__(Obis(0, 0, 40, 0, 0))
        self.session: ServerSession | None = None

    def get(self, attribute: int, access: AccessSelection | None) -> Data:
        if attribute == 8 and self.session is not None:
            return axdr.enum(2 if self.session.state == "associated" else 1)
        return super().get(attribute, access)

    def action(self, method: int, parameters: Data | None) -> Data | None:
        if method != 1 or self.session is None or parameters is None:
            raise _Refused(OBJECT_UNDEFINED)
        return self.session.verify_hls(parameters)


# --- the simulated meter ------------------------------------------------------------

BLOCK_S: Final = 900
DAY_BLOCKS: Final = 86400 // BLOCK_S
EPOCH: Final = datetime(2024, 1, 1, tzinfo=IST)
_CURVE: Final = tuple(
    int(350 + 250 * max(0.0, math.sin(math.pi * (k - 24) / 60)) + 40 * (k % 7))
    for k in range(DAY_BLOCKS)
)
"""Mean import power in W of each 15-minute block of a day (deterministic)."""
_DAY_WH: Final = sum(p * BLOCK_S // 3600 for p in _CURVE)
_PREFIX_WH: Final = tuple(
    sum(p * BLOCK_S // 3600 for p in _CURVE[:k]) for k in range(DAY_BLOCKS + 1)
)
EXPORT_PERCENT: Final = 10


def _o(text: str) -> Obis:
    return Obis.parse(text)


@dataclass
class SimulatedMeter:
    """An IS 15959 single-phase meter whose values follow the clock.

    ``skew`` is how far the meter's clock is from true time (SET the clock to
    change it); ``history_days`` how many days of block load profile it keeps;
    ``serial`` its serial number (name plate).
    """

    serial: str = "IES0000001"
    skew: timedelta = timedelta(0)
    history_days: int = 2
    manufacturer: str = "IES Simulated Meters"
    firmware: str = "SIM-1.0"
    objects: dict[tuple[int, Obis], CosemObject] = field(default_factory=dict)
    association: AssociationObject = field(default_factory=AssociationObject)

    def __post_init__(self) -> None:
        self._build()

    def now(self) -> datetime:
        """The meter's own time (true time plus ``skew``), in IST."""
        return (datetime.now(UTC) + self.skew).astimezone(IST)

    # -- energy model

    @staticmethod
    def block_power_w(index: int) -> int:
        """Mean import power of 15-minute block ``index`` since :data:`EPOCH`."""
        return _CURVE[index % DAY_BLOCKS]

    @staticmethod
    def energy_wh_at_block(index: int) -> int:
        """Import energy in Wh accumulated before block ``index`` starts."""
        days, within = divmod(index, DAY_BLOCKS)
        return 1_000_000 + days * _DAY_WH + _PREFIX_WH[within]

    def _block_index(self, moment: datetime) -> tuple[int, float]:
        elapsed = (moment - EPOCH).total_seconds()
        index = int(elapsed // BLOCK_S)
        return index, elapsed - index * BLOCK_S

    def energy_wh(self) -> int:
        """Import energy now, in Wh (the block sum plus the running block)."""
        index, into = self._block_index(self.now())
        return self.energy_wh_at_block(index) + int(
            self.block_power_w(index) * into / 3600
        )

    def voltage_cv(self) -> int:
        """Voltage now in centivolts (230 V ± a few volts)."""
        t = self.now().timestamp()
        return 23000 + int(400 * math.sin(t / 97.0))

    def power_w(self) -> int:
        """Active import power now, in W."""
        index, _ = self._block_index(self.now())
        t = self.now().timestamp()
        return self.block_power_w(index) + int(20 * math.sin(t / 13.0))

    # -- objects

    def find(self, class_id: int, obis: Obis) -> CosemObject | None:
        """Return the object of ``class_id`` at ``obis``, if the meter has it."""
        return self.objects.get((class_id, obis))

    def _add(self, obj: CosemObject) -> CosemObject:
        self.objects[(obj.class_id, obj.obis)] = obj
        return obj

    def _build(self) -> None:
        add = self._add
        add(ClockObject(self))
        add(self.association)
        # Name plate.
        plate = [
            DataObject(
                _o("0-0:96.1.0"), lambda: axdr.octet_string(self.serial.encode())
            ),
            DataObject(
                _o("0-0:96.1.1"), lambda: axdr.octet_string(self.manufacturer.encode())
            ),
            DataObject(
                _o("1-0:0.2.0"), lambda: axdr.octet_string(self.firmware.encode())
            ),
            DataObject(_o("0-0:94.91.9"), lambda: axdr.uint8(5)),
            DataObject(_o("0-0:94.91.11"), lambda: axdr.octet_string(b"C1")),
            DataObject(_o("0-0:94.91.12"), lambda: axdr.octet_string(b"5-30A")),
            DataObject(_o("0-0:96.1.4"), lambda: axdr.uint16(2025)),
        ]
        for obj in plate:
            add(obj)
        add(
            ProfileObject(
                _o("0-0:94.91.10"),
                [Capture(1, o.obis) for o in plate],
                lambda: [(None, tuple(o.get(2, None) for o in plate))],
            )
        )
        self._build_instantaneous()
        self._build_block_load()
        self._build_daily_and_billing()
        self._build_events()

    def _build_instantaneous(self) -> None:
        add = self._add
        no_time = lambda: axdr.octet_string(  # noqa: E731
            CosemDateTime.not_specified(330).to_bytes()
        )
        regs: list[RegisterObject] = [
            RegisterObject(
                _o("1-0:12.7.0"), lambda: axdr.uint16(self.voltage_cv()), -2, 35
            ),
            RegisterObject(
                _o("1-0:11.7.0"),
                lambda: axdr.uint16(self.power_w() * 10000 // self.voltage_cv()),
                -2,
                33,
            ),
            RegisterObject(
                _o("1-0:91.7.0"),
                lambda: axdr.uint16(self.power_w() * 10000 // self.voltage_cv()),
                -2,
                33,
            ),
            RegisterObject(_o("1-0:13.7.0"), lambda: axdr.int8(95), -2, 255),
            RegisterObject(_o("1-0:14.7.0"), lambda: axdr.uint16(500), -1, 44),
            RegisterObject(
                _o("1-0:9.7.0"), lambda: axdr.uint32(self.power_w() * 100 // 95), 0, 28
            ),
            RegisterObject(_o("1-0:1.7.0"), lambda: axdr.uint32(self.power_w()), 0, 27),
            RegisterObject(
                _o("1-0:1.8.0"), lambda: axdr.uint32(self.energy_wh() // 10), 1, 30
            ),
            RegisterObject(
                _o("1-0:9.8.0"),
                lambda: axdr.uint32(self.energy_wh() * 100 // 95 // 10),
                1,
                31,
            ),
            DemandRegisterObject(
                _o("1-0:1.6.0"), lambda: axdr.uint16(max(_CURVE)), 0, 27, no_time
            ),
            DemandRegisterObject(
                _o("1-0:9.6.0"),
                lambda: axdr.uint16(max(_CURVE) * 100 // 95),
                0,
                28,
                no_time,
            ),
            RegisterObject(
                _o("0-0:94.91.14"),
                lambda: axdr.uint32(int((self.now() - EPOCH).total_seconds() // 60)),
                0,
                6,
            ),
            RegisterObject(
                _o("1-0:2.8.0"),
                lambda: axdr.uint32(self.energy_wh() * EXPORT_PERCENT // 100 // 10),
                1,
                30,
            ),
        ]
        counters = [
            DataObject(_o("0-0:94.91.0"), lambda: axdr.uint32(23)),
            DataObject(_o("0-0:0.1.0"), lambda: axdr.uint32(29)),
            DataObject(_o("0-0:96.2.0"), lambda: axdr.uint8(155)),
        ]
        for obj in (*regs, *counters):
            add(obj)
        columns = [Capture(8, CLOCK)]
        columns += [Capture(r.class_id, r.obis) for r in regs]
        columns.insert(11, Capture(4, _o("1-0:1.6.0"), 5))
        columns += [Capture(1, c.obis) for c in counters]
        clock = self.objects[(8, CLOCK)]

        def row() -> list[Row]:
            values = []
            for col in columns:
                obj = self.objects[(col.class_id, col.obis)]
                values.append(obj.get(col.attribute, None))
            return [(self.now(), tuple(values))]

        del clock
        add(ProfileObject(_o("1-0:94.91.0"), columns, row))
        self._scaler_profile(_o("1-0:94.91.3"), regs)

    def _scaler_profile(self, obis: Obis, regs: Sequence[RegisterObject]) -> None:
        cols = [Capture(r.class_id, r.obis, 3) for r in regs]
        self._add(
            ProfileObject(
                obis, cols, lambda: [(None, tuple(r.get(3, None) for r in regs))]
            )
        )

    def _build_block_load(self) -> None:
        add = self._add
        regs = [
            RegisterObject(_o("1-0:12.27.0"), lambda: axdr.uint16(0), -2, 35),
            RegisterObject(_o("1-0:1.29.0"), lambda: axdr.uint32(0), 0, 30),
            RegisterObject(_o("1-0:9.29.0"), lambda: axdr.uint32(0), 0, 31),
            RegisterObject(_o("1-0:2.29.0"), lambda: axdr.uint32(0), 0, 30),
        ]
        for reg in regs:
            add(reg)
        columns = [Capture(8, CLOCK), *(Capture(3, r.obis) for r in regs)]

        def rows() -> list[Row]:
            last, _ = self._block_index(self.now())
            first = max(0, last - self.history_days * DAY_BLOCKS)
            out: list[Row] = []
            for index in range(first, last):
                start = EPOCH + timedelta(seconds=index * BLOCK_S)
                wh = self.block_power_w(index) * BLOCK_S // 3600
                volts = 23000 + (index * 37) % 600 - 300
                out.append(
                    (
                        start,
                        (
                            _dt(start),
                            axdr.uint16(volts),
                            axdr.uint32(wh),
                            axdr.uint32(wh * 100 // 95),
                            axdr.uint32(wh * EXPORT_PERCENT // 100),
                        ),
                    )
                )
            return out

        add(ProfileObject(_o("1-0:99.1.0"), columns, rows, BLOCK_S))
        add(DataObject(_o("1-0:0.8.4"), lambda: axdr.uint32(BLOCK_S)))
        self._scaler_profile(_o("1-0:94.91.4"), regs)

    def _build_daily_and_billing(self) -> None:
        add = self._add
        imp = self.objects[(3, _o("1-0:1.8.0"))]
        kvah = self.objects[(3, _o("1-0:9.8.0"))]
        exp = self.objects[(3, _o("1-0:2.8.0"))]
        assert isinstance(imp, RegisterObject) and isinstance(kvah, RegisterObject)
        assert isinstance(exp, RegisterObject)
        regs = [imp, kvah, exp]

        def daily() -> list[Row]:
            today, _ = self._block_index(self.now())
            last_day = today // DAY_BLOCKS
            out: list[Row] = []
            for day in range(max(0, last_day - self.history_days), last_day + 1):
                start = EPOCH + timedelta(days=day)
                wh = self.energy_wh_at_block(day * DAY_BLOCKS)
                out.append(
                    (
                        start,
                        (
                            _dt(start),
                            axdr.uint32(wh // 10),
                            axdr.uint32(wh * 100 // 95 // 10),
                            axdr.uint32(wh * EXPORT_PERCENT // 100 // 10),
                        ),
                    )
                )
            return out

        columns = [Capture(8, CLOCK), *(Capture(3, r.obis) for r in regs)]
        add(ProfileObject(_o("1-0:99.2.0"), columns, daily, 86400))
        self._scaler_profile(_o("1-0:94.91.5"), regs)

        def billing() -> list[Row]:
            now = self.now()
            out: list[Row] = []
            for back in (2, 1):
                month = (now.month - back - 1) % 12 + 1
                year = now.year - (1 if now.month - back < 1 else 0)
                start = datetime(year, month, 1, tzinfo=IST)
                index, _ = self._block_index(start)
                wh = self.energy_wh_at_block(max(index, 0))
                out.append(
                    (
                        start,
                        (
                            _dt(start),
                            axdr.int8(95),
                            axdr.uint32(wh // 10),
                            axdr.uint32(wh * 100 // 95 // 10),
                            axdr.uint16(max(_CURVE)),
                            _dt(start - timedelta(days=10, hours=5)),
                        ),
                    )
                )
            return out

        pf = RegisterObject(_o("1-0:13.0.0"), lambda: axdr.int8(95), -2, 255)
        add(pf)
        add(DataObject(_o("0-0:0.1.2"), lambda: _dt(self.now())))
        bill_cols = [
            Capture(1, _o("0-0:0.1.2")),
            Capture(3, pf.obis),
            Capture(3, imp.obis),
            Capture(3, kvah.obis),
            Capture(4, _o("1-0:1.6.0")),
            Capture(4, _o("1-0:1.6.0"), 5),
        ]
        add(ProfileObject(_o("1-0:98.1.0"), bill_cols, billing))
        md = self.objects[(4, _o("1-0:1.6.0"))]
        assert isinstance(md, RegisterObject)
        self._scaler_profile(_o("1-0:94.91.6"), [pf, imp, kvah, md])

    def _build_events(self) -> None:
        add = self._add
        code = DataObject(_o("0-0:96.11.0"), lambda: axdr.uint16(0))
        add(code)
        volts = self.objects[(3, _o("1-0:12.7.0"))]
        amps = self.objects[(3, _o("1-0:11.7.0"))]
        imp = self.objects[(3, _o("1-0:1.8.0"))]
        assert isinstance(volts, RegisterObject) and isinstance(amps, RegisterObject)
        assert isinstance(imp, RegisterObject)
        columns = [
            Capture(8, CLOCK),
            Capture(1, code.obis),
            Capture(3, amps.obis),
            Capture(3, volts.obis),
            Capture(3, imp.obis),
        ]
        events = {0: (1, 2), 1: (51, 52), 2: (), 3: (151,), 4: (101, 102), 5: (), 6: ()}
        for log_id, codes in events.items():

            def rows(codes: tuple[int, ...] = codes) -> list[Row]:
                base = self.now().replace(hour=0, minute=0, second=0, microsecond=0)
                out: list[Row] = []
                for n, event in enumerate(codes):
                    when = base - timedelta(days=1, hours=-n - 3)
                    out.append(
                        (
                            when,
                            (
                                _dt(when),
                                axdr.uint16(event),
                                axdr.uint16(512),
                                axdr.uint16(24810 if event % 2 else 17950),
                                axdr.uint32(100_000 + 7 * event),
                            ),
                        )
                    )
                return out

            add(ProfileObject(Obis(0, 0, 99, 98, log_id), columns, rows))
        self._scaler_profile(_o("1-0:94.91.7"), [amps, volts, imp])


# --- one association ----------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """Who may associate and how.

    ``clients`` maps a client SAP to ``"none"``, ``"low"`` or ``"high-gmac"``;
    ``password`` is the LLS secret; ``keys`` the meter's block cipher and
    authentication keys and its own system title (needed for HLS and ciphering).
    """

    clients: dict[int, str] = field(
        default_factory=lambda: {16: "none", 32: "low", 48: "high-gmac"}
    )
    password: bytes = b"ABCDEFGH"
    keys: security.SecurityKeys | None = None
    max_pdu: int = 1024
    conformance: int = int(ap.CLIENT_CONFORMANCE)


class ServerSession:
    """One association of one client with the meter, without I/O.

    :meth:`handle` takes a request APDU and returns the response APDU, or
    ``None`` when the request deserves no answer.
    """

    def __init__(
        self, meter: SimulatedMeter, policy: ServerSecurity, client_sap: int
    ) -> None:
        self.meter = meter
        self.policy = policy
        self.client_sap = client_sap
        self.state = "idle"
        self.client_title: bytes | None = None
        self.client_max_pdu = 0xFFFF
        self.ciphered = False
        self.security_control = 0
        self._client_counter = -1
        self._counter = 1
        self._challenge = b""
        self._client_challenge = b""
        self._blocks: list[bytes] = []
        self._block_invoke = 0
        self.requests = 0

    # -- entry point

    def handle(self, request: bytes) -> bytes | None:
        """Answer one request APDU."""
        self.requests += 1
        try:
            message = ap.decode_apdu(request)
        except DlmsError:
            return ap.ExceptionResponse(2, 2).to_bytes()
        if isinstance(message, ap.Aarq):
            return self._on_aarq(message)
        if isinstance(message, ap.ReleaseRequest):
            self.state = "idle"
            return ap.ReleaseResponse(0).to_bytes()
        if self.state == "idle":
            return ap.ExceptionResponse(1, 1).to_bytes()
        if isinstance(message, ap.CipheredApdu):
            try:
                request = self._decipher(message)
                message = ap.decode_apdu(request)
            except DlmsError:
                return ap.ExceptionResponse(1, 5).to_bytes()
        elif self.ciphered:
            return ap.ExceptionResponse(1, 5).to_bytes()
        if self.state == "hls-pending" and not (
            isinstance(message, ap.ActionRequestNormal)
            and message.method.instance == self.meter.association.obis
        ):
            return ap.ExceptionResponse(1, 1).to_bytes()
        response = self._service(message)
        if response is None:
            return None
        return self._protect(response)

    # -- association

    def _on_aarq(self, aarq: ap.Aarq) -> bytes:
        self.state = "idle"
        level = self.policy.clients.get(self.client_sap)
        keys = self.policy.keys
        if level is None:
            return self._reject(1, "client SAP not known")
        ciphered = aarq.context == ap.CONTEXT_LN_CIPHERED
        if aarq.context not in (ap.CONTEXT_LN, ap.CONTEXT_LN_CIPHERED) or (
            ciphered and keys is None
        ):
            return self._reject(2, "context")
        wanted = {"none": None, "low": ap.MECHANISM_LLS, "high-gmac": 5}[level]
        if aarq.mechanism != wanted:
            return self._reject(11 if aarq.mechanism else 12, "mechanism")
        if level == "low" and aarq.authentication_value != self.policy.password:
            return self._reject(13, "password")
        if level == "high-gmac" and (
            keys is None or not aarq.calling_ap_title or not aarq.authentication_value
        ):
            return self._reject(13, "HLS without title or challenge")
        self.client_title = aarq.calling_ap_title
        self._client_counter = -1
        user = aarq.user_information
        self.ciphered = ciphered
        try:
            if ciphered:
                ciphered_apdu = ap.decode_apdu(user)
                if not isinstance(ciphered_apdu, ap.CipheredApdu):
                    return self._reject(1, "initiate not ciphered")
                user = self._decipher(ciphered_apdu)
                self.security_control = ciphered_apdu.security_control
            initiate = ap.InitiateRequest.from_bytes(user)
        except DlmsError:
            return self._reject(1, "bad initiate")
        self.client_max_pdu = initiate.max_receive_pdu
        response = ap.InitiateResponse(
            initiate.conformance & self.policy.conformance, self.policy.max_pdu
        ).to_bytes()
        if ciphered:
            response = self._cipher(response)
        challenge = None
        if level == "high-gmac":
            self._client_challenge = aarq.authentication_value or b""
            self._challenge = security.new_challenge(16)
            challenge = self._challenge
            self.state = "hls-pending"
        else:
            self.state = "associated"
        title = (
            keys.system_title if keys is not None and (ciphered or challenge) else None
        )
        return ap.Aare(
            0,
            0,
            "user",
            response,
            aarq.context,
            title,
            wanted,
            challenge,
        ).to_bytes()

    def _reject(self, diagnostic: int, why: str) -> bytes:
        log.debug("association rejected: %s", why)
        return ap.Aare(1, diagnostic, "user", b"", ap.CONTEXT_LN).to_bytes()

    def verify_hls(self, parameters: Data) -> Data:
        """Check the client's HLS reply and return ours (method 1 of class 15)."""
        keys = self.policy.keys
        if self.state != "hls-pending" or keys is None or self.client_title is None:
            raise _Refused(READ_WRITE_DENIED)
        try:
            security.check_hls_reply(
                parameters.as_bytes(),
                self.client_title,
                keys.block_cipher_key,
                keys.authentication_key,
                self._challenge,
            )
        except DlmsError:
            self.state = "idle"
            raise _Refused(OTHER_REASON) from None
        self.state = "associated"
        counter = self._counter
        self._counter += 1
        return axdr.octet_string(
            security.hls_reply(keys, counter, self._client_challenge)
        )

    # -- ciphering

    def _decipher(self, message: ap.CipheredApdu) -> bytes:
        keys = self.policy.keys
        title = message.system_title or self.client_title
        if keys is None or title is None:
            raise SecurityError("no keys or client system title")
        if message.invocation_counter <= self._client_counter:
            raise SecurityError("client invocation counter does not grow")
        plain = security.decrypt(
            message.security_control,
            title,
            message.invocation_counter,
            keys.block_cipher_key,
            keys.authentication_key,
            message.payload,
        )
        self._client_counter = message.invocation_counter
        self.security_control = message.security_control
        return plain

    def _cipher(self, plain: bytes) -> bytes:
        keys = self.policy.keys
        assert keys is not None
        control = self.security_control or security.AUTHENTICATED_ENCRYPTED
        counter = self._counter
        self._counter += 1
        payload = security.encrypt(
            control,
            keys.system_title,
            counter,
            keys.block_cipher_key,
            keys.authentication_key,
            plain,
        )
        return ap.CipheredApdu(
            ap.GLO_TAGS[ap.Tag(plain[0])], control, counter, payload
        ).to_bytes()

    def _protect(self, plain: bytes) -> bytes:
        return self._cipher(plain) if self.ciphered else plain

    # -- services

    def _limit(self) -> int:
        limit = min(self.client_max_pdu or 0xFFFF, self.policy.max_pdu)
        return limit - (30 if self.ciphered else 0)

    def _read(
        self, descriptor: ap.AttributeDescriptor, access: AccessSelection | None
    ) -> GetResult:
        obj = self.meter.find(descriptor.class_id, descriptor.instance)
        if obj is None:
            return AccessFailure(OBJECT_UNDEFINED)
        if isinstance(obj, AssociationObject):
            obj.session = self
        try:
            return obj.get(descriptor.attribute, access)
        except _Refused as refused:
            return AccessFailure(refused.code)

    def _service(self, message: ap.Apdu) -> bytes | None:
        if isinstance(message, ap.GetRequestNormal):
            result = self._read(message.descriptor, message.access)
            plain = ap.GetResponseNormal(result, message.invoke).to_bytes()
            if len(plain) <= self._limit() or isinstance(result, AccessFailure):
                return plain
            return self._start_blocks(axdr.encode(result), message.invoke)
        if isinstance(message, ap.GetRequestWithList):
            results = tuple(self._read(d, a) for d, a in message.items)
            plain = ap.GetResponseWithList(results, message.invoke).to_bytes()
            if len(plain) <= self._limit():
                return plain
            return self._start_blocks(plain[3:], message.invoke)
        if isinstance(message, ap.GetRequestNext):
            return self._next_block(message)
        if isinstance(message, ap.SetRequestNormal):
            obj = self.meter.find(
                message.descriptor.class_id, message.descriptor.instance
            )
            code = 0
            if obj is None:
                code = OBJECT_UNDEFINED
            else:
                try:
                    obj.set(message.descriptor.attribute, message.value)
                except _Refused as refused:
                    code = refused.code
            return ap.SetResponseNormal(code, message.invoke).to_bytes()
        if isinstance(message, ap.ActionRequestNormal):
            obj = self.meter.find(message.method.class_id, message.method.instance)
            if obj is None:
                return ap.ActionResponseNormal(
                    OBJECT_UNDEFINED, None, message.invoke
                ).to_bytes()
            if isinstance(obj, AssociationObject):
                obj.session = self
            try:
                value = obj.action(message.method.method, message.parameters)
            except _Refused as refused:
                return ap.ActionResponseNormal(
                    refused.code, None, message.invoke
                ).to_bytes()
            return ap.ActionResponseNormal(0, value, message.invoke).to_bytes()
        return ap.ExceptionResponse(2, 2).to_bytes()

    def _start_blocks(self, raw: bytes, invoke: int) -> bytes:
        size = max(self._limit() - 16, 16)
        self._blocks = [raw[i : i + size] for i in range(0, len(raw), size)]
        self._block_invoke = invoke
        return ap.GetResponseBlock(
            1, len(self._blocks) == 1, self._blocks[0], None, invoke
        ).to_bytes()

    def _next_block(self, message: ap.GetRequestNext) -> bytes:
        number = message.block_number + 1
        if not self._blocks:
            return ap.GetResponseBlock(
                number, True, b"", AccessFailure(NO_LONG_GET), message.invoke
            ).to_bytes()
        if not 2 <= number <= len(self._blocks):
            return ap.GetResponseBlock(
                number, True, b"", AccessFailure(BLOCK_NUMBER_INVALID), message.invoke
            ).to_bytes()
        last = number == len(self._blocks)
        chunk = self._blocks[number - 1]
        if last:
            self._blocks = []
        return ap.GetResponseBlock(number, last, chunk, None, message.invoke).to_bytes()


# --- serving ------------------------------------------------------------------------


@dataclass
class ServerStats:
    """What a server has seen, for tests and the benchmark."""

    connections: int = 0
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sessions: list[ServerSession] = field(default_factory=list)


class _Port:
    """Where a connection's bytes go: a TCP transport or a serial file descriptor."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write


class _Connection:
    """One client connection: link (HDLC or wrapper), session, pacing."""

    def __init__(self, server: MeterServer, hdlc_mode: bool, port: _Port) -> None:
        self.server = server
        self.port = port
        self.hdlc_mode = hdlc_mode
        self.link: hdlc.HdlcLink | WrapperLink
        if hdlc_mode:
            self.link = hdlc.HdlcLink(
                server.server_address,
                hdlc.HdlcAddress.client(16),
                role="server",
                params=hdlc.HdlcParameters(server.max_info, server.max_info),
            )
        else:
            self.link = WrapperLink(server.logical_device, 16, role="server")
            self.link.connect()
        self.session: ServerSession | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self._task: asyncio.Task[None] | None = None
        self.iec_pending = server.mode_e and hdlc_mode
        self._iec_buffer = b""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="dlms-server-connection"
        )
        self.server.tasks.add(self._task)
        self._task.add_done_callback(self.server.tasks.discard)

    def received(self, data: bytes) -> None:
        self.server.stats.bytes_in += len(data)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(data)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _send(self, data: bytes, request_bytes: int) -> None:
        if not data:
            return
        baud = self.server.line_baud
        if baud:
            await asyncio.sleep((len(data) + request_bytes) * 10 / baud)
        self.server.stats.bytes_out += len(data)
        self.port.write(data)

    async def _run(self) -> None:
        while True:
            data = await self._queue.get()
            if self.iec_pending:
                await self._iec(data)
                continue
            self.link.receive_data(data)
            await self._drain(len(data))

    async def _iec(self, data: bytes) -> None:
        self._iec_buffer += data
        if b"\r\n" not in self._iec_buffer:
            return
        line, _, rest = self._iec_buffer.partition(b"\r\n")
        self._iec_buffer = rest
        if line.startswith(b"/?"):
            await self._send(
                b"/IES5\\2" + self.server.meter.serial.encode() + b"\r\n", 0
            )
        elif line.startswith(b"\x06"):
            self.iec_pending = False
            if rest:
                self.link.receive_data(rest)
                await self._drain(len(rest))

    async def _drain(self, received: int) -> None:
        link = self.link
        while True:
            try:
                event = link.next_event()
            except DlmsError as exc:
                log.debug("server dropped a frame: %s", exc)
                continue
            if event is hdlc.NEED_DATA:
                await self._send(link.data_to_send(), received)
                return
            if isinstance(event, hdlc.Connected):
                self._new_session()
            elif isinstance(event, hdlc.Disconnected):
                self.session = None
            elif isinstance(event, hdlc.ApduReceived):
                if self.session is None:
                    self._new_session()
                assert self.session is not None
                response = self.session.handle(event.apdu)
                self.server.stats.requests += 1
                if response is not None:
                    link.send(response)
            await self._send(link.data_to_send(), received)
            received = 0

    def _new_session(self) -> None:
        remote = self.link.remote
        sap = remote.upper if isinstance(remote, hdlc.HdlcAddress) else int(remote)
        self.session = ServerSession(self.server.meter, self.server.policy, sap)
        self.server.stats.sessions.append(self.session)


class _TcpProtocol(asyncio.Protocol):
    def __init__(self, server: MeterServer) -> None:
        self.server = server
        self.connection: _Connection | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.stats.connections += 1
        self.connection = _Connection(
            self.server, self.server.hdlc_over_tcp, _Port(self._write)
        )
        self.connection.start()
        self.server.connections.add(self)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.connection is not None:
            self.connection.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.connection.stop()
        self.server.connections.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class MeterServer:
    """Serve a :class:`SimulatedMeter` over TCP (wrapper or HDLC) or a serial port.

    ``server_address`` is the meter's HDLC address (logical 1, physical 17 by
    default), ``logical_device`` its wrapper wPort. ``line_baud`` paces every
    answer by the time request and answer take on a line of that speed.
    """

    def __init__(
        self,
        meter: SimulatedMeter | None = None,
        policy: ServerSecurity | None = None,
        *,
        server_address: hdlc.HdlcAddress | None = None,
        logical_device: int = 1,
        hdlc_over_tcp: bool = False,
        mode_e: bool = False,
        line_baud: int | None = None,
        max_info: int = 128,
    ) -> None:
        self.meter = meter or SimulatedMeter()
        self.policy = policy or ServerSecurity()
        self.server_address = server_address or hdlc.HdlcAddress.server(1, 17, 4)
        self.logical_device = logical_device
        self.hdlc_over_tcp = hdlc_over_tcp
        self.mode_e = mode_e
        self.line_baud = line_baud
        self.max_info = max_info
        self.stats = ServerStats()
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections: set[_TcpProtocol] = set()
        self._tcp: asyncio.Server | None = None
        self._serial_fd = -1
        self._serial_conn: _Connection | None = None
        self.port = 0

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = a free port); return the port."""
        loop = asyncio.get_running_loop()
        self._tcp = await loop.create_server(lambda: _TcpProtocol(self), host, port)
        self.port = int(self._tcp.sockets[0].getsockname()[1])
        return self.port

    async def start_serial(self, path: str) -> None:
        """Serve HDLC on the serial port or pty at ``path``."""
        import termios
        import tty

        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        with contextlib.suppress(termios.error):
            tty.setraw(fd)
        self._serial_fd = fd
        self.stats.connections += 1
        self._serial_conn = _Connection(self, True, _Port(self._serial_write))
        self._serial_conn.start()
        asyncio.get_running_loop().add_reader(fd, self._serial_readable)

    def _serial_readable(self) -> None:
        try:
            data = os.read(self._serial_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            asyncio.get_running_loop().remove_reader(self._serial_fd)
            return
        if data and self._serial_conn is not None:
            self._serial_conn.received(data)

    def _serial_write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._serial_fd, view)
            except BlockingIOError:
                continue
            view = view[written:]

    async def close(self) -> None:
        """Stop listening, drop connections and release the serial port."""
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self.connections):
                conn.close()
            await self._tcp.wait_closed()
            self._tcp = None
        if self._serial_fd >= 0:
            asyncio.get_running_loop().remove_reader(self._serial_fd)
            os.close(self._serial_fd)
            self._serial_fd = -1
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def demo_keys() -> security.SecurityKeys:
    """The meter-side keys of the simulated meter (Green Book example keys, with
    the meter's own system title): for demos and tests only."""
    return security.SecurityKeys(
        bytes.fromhex("000102030405060708090A0B0C0D0E0F"),
        bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"),
        bytes.fromhex("4D4D4D0000BC614E"),
    )


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="simulated IS 15959 DLMS meter")
    parser.add_argument("--tcp", type=int, help="serve on this TCP port (wrapper)")
    parser.add_argument("--hdlc-over-tcp", action="store_true")
    parser.add_argument("--serial", help="serve HDLC on this serial port or pty")
    parser.add_argument("--mode-e", action="store_true", help="IEC 62056-21 opening")
    parser.add_argument("--baud", type=int, help="pace answers like this line speed")
    parser.add_argument("--max-pdu", type=int, default=1024)
    parser.add_argument("--history-days", type=int, default=2)
    args = parser.parse_args(argv)
    server = MeterServer(
        SimulatedMeter(history_days=args.history_days),
        policy=ServerSecurity(keys=demo_keys(), max_pdu=args.max_pdu),
        hdlc_over_tcp=args.hdlc_over_tcp,
        mode_e=args.mode_e,
        line_baud=args.baud,
    )
    if args.serial:
        await server.start_serial(args.serial)
        print(f"serving HDLC on {args.serial}", flush=True)
    if args.tcp is not None:
        port = await server.start_tcp("127.0.0.1", args.tcp)
        print(f"serving on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


if __name__ == "__main__":  # pragma: no cover - manual use
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())


__all__ = [
    "DataType",
    "MeterServer",
    "ServerSecurity",
    "ServerSession",
    "SimulatedMeter",
    "demo_keys",
]
