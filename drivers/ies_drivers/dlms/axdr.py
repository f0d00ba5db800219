"""A-XDR encoding of COSEM data (IEC 62056-6-2 / DLMS Blue Book), without I/O.

Every attribute value a meter sends is one :class:`Data`: a type tag and its value,
nested through arrays and structures. :func:`decode` reads a whole encoding and refuses
anything left over; :func:`decode_from` reads one value at an offset. :func:`encode`
writes the bytes back, so ``encode(decode(b)) == b`` for every valid ``b``.

Value by tag (:class:`DataType`):

=====================================  ==============================================
null-data                              ``None``
array, structure                       ``tuple[Data, ...]``
boolean                                ``bool``
bit-string                             :class:`BitString`
integer types, enum, bcd               ``int``
floating-point, float32, float64       ``float``
octet-string                           ``bytes`` (a date-time is often sent as one)
visible-string, utf8-string            ``str``
compact-array                          :class:`CompactArray`
date-time, date, time                  :class:`CosemDateTime`, :class:`CosemDate`,
                                       :class:`CosemTime`
=====================================  ==============================================

Dates and times keep their wire fields (0xFF and 0xFFFF mean "not specified"). The
deviation field is where meters disagree: the Blue Book defines it as minutes from
local time to UTC (CET is -60), while the Indian companion standard IS 15959 sends
minutes from UTC to local time (IST is +330). :meth:`CosemDateTime.to_datetime` takes
``india_deviation_sign`` to say which one a meter follows (field case FC-06); a
deviation of 0x8000 means "not specified" (FC-08) and is never applied as minutes.

Errors: :class:`AxdrError` for data that is truncated, deeper than
:data:`MAX_DEPTH`, longer or shorter than its lengths announce, or of an unknown type;
:class:`DateTimeError` for dates and times with fields out of range.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import IntEnum

from ies_drivers.dlms.errors import AxdrError, DateTimeError

MAX_DEPTH = 16
"""Deepest nesting of arrays and structures we decode; IS 15959 needs 4."""


class DataType(IntEnum):
    """The COSEM data type tags (Blue Book, "Data" CHOICE)."""

    NULL_DATA = 0
    ARRAY = 1
    STRUCTURE = 2
    BOOLEAN = 3
    BIT_STRING = 4
    DOUBLE_LONG = 5
    DOUBLE_LONG_UNSIGNED = 6
    FLOATING_POINT = 7
    OCTET_STRING = 9
    VISIBLE_STRING = 10
    UTF8_STRING = 12
    BCD = 13
    INTEGER = 15
    LONG = 16
    UNSIGNED = 17
    LONG_UNSIGNED = 18
    COMPACT_ARRAY = 19
    LONG64 = 20
    LONG64_UNSIGNED = 21
    ENUM = 22
    FLOAT32 = 23
    FLOAT64 = 24
    DATE_TIME = 25
    DATE = 26
    TIME = 27


_TAGS = {int(t): t for t in DataType}

# Fixed-size integers: tag -> (bytes, signed).
_INTS: dict[int, tuple[int, bool]] = {
    DataType.DOUBLE_LONG: (4, True),
    DataType.DOUBLE_LONG_UNSIGNED: (4, False),
    DataType.BCD: (1, False),
    DataType.INTEGER: (1, True),
    DataType.LONG: (2, True),
    DataType.UNSIGNED: (1, False),
    DataType.LONG_UNSIGNED: (2, False),
    DataType.LONG64: (8, True),
    DataType.LONG64_UNSIGNED: (8, False),
    DataType.ENUM: (1, False),
}
_FLOATS: dict[int, struct.Struct] = {
    DataType.FLOATING_POINT: struct.Struct(">f"),
    DataType.FLOAT32: struct.Struct(">f"),
    DataType.FLOAT64: struct.Struct(">d"),
}
INTEGER_TYPES = frozenset(_INTS)
"""Tags whose value is an ``int``."""


# --- dates and times ----------------------------------------------------------------

NOT_SPECIFIED = 0xFF
YEAR_NOT_SPECIFIED = 0xFFFF
DEVIATION_NOT_SPECIFIED = -0x8000
DST_END = 0xFD
DST_BEGIN = 0xFE

CLOCK_STATUS_BITS = {
    0x01: "invalid value",
    0x02: "doubtful value",
    0x04: "different clock base",
    0x08: "invalid clock status",
    0x80: "daylight saving active",
}


def _check(value: int, low: int, high: int, what: str, *extra: int) -> None:
    """Raise :class:`DateTimeError` unless ``value`` is in range or a special value."""
    if not (low <= value <= high or value in extra):
        special = "".join(f", 0x{x:X}" for x in extra)
        raise DateTimeError(
            f"{what} {value} is invalid (allowed {low}..{high}{special})"
        )


@dataclass(frozen=True, slots=True)
class CosemDate:
    """A COSEM date (5 bytes): year (0xFFFF unspecified), month, day, weekday
    (1 Monday .. 7 Sunday); 0xFF means unspecified, month 0xFD/0xFE and day
    0xFD/0xFE are the DST and "last day" patterns."""

    year: int
    month: int
    day: int
    weekday: int = NOT_SPECIFIED

    def __post_init__(self) -> None:
        _check(self.year, 0, 0xFFFE, "year", YEAR_NOT_SPECIFIED)
        _check(self.month, 1, 12, "month", DST_END, DST_BEGIN, NOT_SPECIFIED)
        _check(self.day, 1, 31, "day of month", DST_END, DST_BEGIN, NOT_SPECIFIED)
        _check(self.weekday, 1, 7, "day of week", NOT_SPECIFIED)

    @classmethod
    def from_bytes(cls, data: bytes) -> CosemDate:
        """Read 5 bytes; raises :class:`DateTimeError` for another length or fields
        out of range."""
        if len(data) != 5:
            raise DateTimeError(f"a COSEM date has 5 bytes, not {len(data)}")
        return cls(int.from_bytes(data[0:2], "big"), data[2], data[3], data[4])

    def to_bytes(self) -> bytes:
        """Return the 5 wire bytes."""
        return self.year.to_bytes(2, "big") + bytes(
            (self.month, self.day, self.weekday)
        )


@dataclass(frozen=True, slots=True)
class CosemTime:
    """A COSEM time (4 bytes): hour, minute, second, hundredths; 0xFF unspecified."""

    hour: int
    minute: int
    second: int
    hundredths: int = 0

    def __post_init__(self) -> None:
        _check(self.hour, 0, 23, "hour", NOT_SPECIFIED)
        _check(self.minute, 0, 59, "minute", NOT_SPECIFIED)
        _check(self.second, 0, 59, "second", NOT_SPECIFIED)
        _check(self.hundredths, 0, 99, "hundredths", NOT_SPECIFIED)

    @classmethod
    def from_bytes(cls, data: bytes) -> CosemTime:
        """Read 4 bytes; raises :class:`DateTimeError` for another length or fields
        out of range."""
        if len(data) != 4:
            raise DateTimeError(f"a COSEM time has 4 bytes, not {len(data)}")
        return cls(data[0], data[1], data[2], data[3])

    def to_bytes(self) -> bytes:
        """Return the 4 wire bytes."""
        return bytes((self.hour, self.minute, self.second, self.hundredths))


@dataclass(frozen=True, slots=True)
class CosemDateTime:
    """A COSEM date-time (12 bytes): date, time, deviation and clock status.

    ``deviation`` is the signed 16-bit field in minutes as sent, ``None`` when the
    meter sent 0x8000 ("not specified"); what its sign means depends on the meter's
    standard (see the module docstring). ``status`` is the clock status byte
    (0xFF: not specified); :data:`CLOCK_STATUS_BITS` names its bits.
    """

    date: CosemDate
    time: CosemTime
    deviation: int | None = None
    status: int = NOT_SPECIFIED

    def __post_init__(self) -> None:
        if self.deviation is not None:
            _check(self.deviation, -720, 720, "deviation (minutes)")
        _check(self.status, 0, 255, "clock status")

    @classmethod
    def from_bytes(cls, data: bytes) -> CosemDateTime:
        """Read 12 bytes; raises :class:`DateTimeError` for another length or fields
        out of range (month 13, minute 60, deviation beyond ±720 minutes, ...)."""
        if len(data) != 12:
            raise DateTimeError(
                f"a COSEM date-time has 12 bytes, not {len(data)} ({data.hex(' ')})"
            )
        deviation: int | None = int.from_bytes(data[9:11], "big", signed=True)
        if deviation == DEVIATION_NOT_SPECIFIED:
            deviation = None
        try:
            return cls(
                CosemDate.from_bytes(data[0:5]),
                CosemTime.from_bytes(data[5:9]),
                deviation,
                data[11],
            )
        except DateTimeError as exc:
            raise DateTimeError(f"date-time {data.hex(' ')}: {exc}") from None

    def to_bytes(self) -> bytes:
        """Return the 12 wire bytes."""
        deviation = (
            DEVIATION_NOT_SPECIFIED if self.deviation is None else self.deviation
        )
        return (
            self.date.to_bytes()
            + self.time.to_bytes()
            + deviation.to_bytes(2, "big", signed=True)
            + bytes((self.status,))
        )

    @property
    def unspecified(self) -> bool:
        """True when date and time are all "not specified": the meter means "no
        timestamp" (an empty capture time), whatever deviation it sent."""
        d, t = self.date, self.time
        return (
            d.year == YEAR_NOT_SPECIFIED
            and d.month == d.day == NOT_SPECIFIED
            and t.hour == t.minute == t.second == NOT_SPECIFIED
        )

    def utc_offset_minutes(self, *, india_deviation_sign: bool) -> int | None:
        """Return the offset of the local time from UTC in minutes (IST +330, CET
        +60), or ``None`` when the deviation is not specified."""
        if self.deviation is None:
            return None
        return self.deviation if india_deviation_sign else -self.deviation

    def to_datetime(
        self, *, india_deviation_sign: bool = False, assumed_tz: tzinfo | None = None
    ) -> datetime | None:
        """Return the point in time this date-time names, or ``None`` for "no
        timestamp" (all fields unspecified).

        With a known deviation the result is aware, at the offset the deviation
        gives under the meter's convention. With deviation 0x8000 the local time is
        placed in ``assumed_tz`` (the site's zone; the caller marks it as assumed) or
        returned naive when there is none. Raises :class:`DateTimeError` for a
        pattern with wildcards (a schedule entry, not a time) or a date that does
        not exist (February 30).
        """
        if self.unspecified:
            return None
        d, t = self.date, self.time
        fields = {
            "year": d.year == YEAR_NOT_SPECIFIED,
            "month": d.month > 12,
            "day": d.day > 31,
            "hour": t.hour == NOT_SPECIFIED,
            "minute": t.minute == NOT_SPECIFIED,
            "second": t.second == NOT_SPECIFIED,
        }
        wild = [name for name, is_wild in fields.items() if is_wild]
        if wild:
            raise DateTimeError(
                f"date-time {self.to_bytes().hex(' ')} leaves {', '.join(wild)} "
                "unspecified: a pattern, not a point in time"
            )
        micro = 0 if t.hundredths == NOT_SPECIFIED else t.hundredths * 10_000
        try:
            naive = datetime(d.year, d.month, d.day, t.hour, t.minute, t.second, micro)
        except ValueError as exc:
            raise DateTimeError(
                f"date-time {self.to_bytes().hex(' ')} is not a real date: {exc}"
            ) from None
        offset = self.utc_offset_minutes(india_deviation_sign=india_deviation_sign)
        if offset is None:
            return naive if assumed_tz is None else naive.replace(tzinfo=assumed_tz)
        return naive.replace(tzinfo=timezone(timedelta(minutes=offset)))

    @classmethod
    def from_datetime(
        cls, moment: datetime, *, india_deviation_sign: bool = False, status: int = 0
    ) -> CosemDateTime:
        """Return the COSEM date-time of an aware ``moment`` at its own UTC offset.

        Raises :class:`DateTimeError` for a naive ``moment`` (its offset is
        unknown) or an offset that is not whole minutes.
        """
        offset = moment.utcoffset()
        if offset is None:
            raise DateTimeError(f"{moment.isoformat()} has no UTC offset")
        minutes, rest = divmod(offset.total_seconds(), 60)
        if rest:
            raise DateTimeError(f"UTC offset {offset} is not whole minutes")
        deviation = int(minutes) if india_deviation_sign else -int(minutes)
        return cls(
            CosemDate(moment.year, moment.month, moment.day, moment.isoweekday()),
            CosemTime(
                moment.hour, moment.minute, moment.second, moment.microsecond // 10_000
            ),
            deviation,
            status,
        )

    @classmethod
    def not_specified(cls, deviation: int | None = None) -> CosemDateTime:
        """Return the "no timestamp" date-time (all date and time fields 0xFF)."""
        return cls(
            CosemDate(YEAR_NOT_SPECIFIED, 0xFF, 0xFF, 0xFF),
            CosemTime(0xFF, 0xFF, 0xFF, 0xFF),
            deviation,
            NOT_SPECIFIED,
        )


# --- values -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BitString:
    """A bit-string of ``length`` bits, the first bit in the high bit of byte 0."""

    data: bytes
    length: int

    def __post_init__(self) -> None:
        if len(self.data) != (self.length + 7) // 8:
            raise AxdrError(
                f"a bit-string of {self.length} bits needs {(self.length + 7) // 8} "
                f"bytes, not {len(self.data)}"
            )

    def bits(self) -> str:
        """Return the bits as text, e.g. ``"0110"``."""
        text = "".join(f"{b:08b}" for b in self.data)
        return text[: self.length]


@dataclass(frozen=True, slots=True)
class TypeDescription:
    """The type of compact-array elements: a tag, and for arrays the element count
    and type, for structures the member types."""

    tag: DataType
    count: int = 0
    members: tuple[TypeDescription, ...] = ()


@dataclass(frozen=True, slots=True)
class CompactArray:
    """A compact-array: one type description and untagged elements."""

    description: TypeDescription
    elements: tuple[Data, ...]


Value = (
    None
    | bool
    | int
    | float
    | bytes
    | str
    | tuple["Data", ...]
    | BitString
    | CompactArray
    | CosemDateTime
    | CosemDate
    | CosemTime
)


@dataclass(frozen=True, slots=True)
class Data:
    """One COSEM value: its type tag and the Python value (see the module table)."""

    tag: DataType
    value: Value = None

    @property
    def items(self) -> tuple[Data, ...]:
        """The elements of an array, structure or compact-array.

        Raises :class:`AxdrError` for any other type.
        """
        if isinstance(self.value, tuple):
            return self.value
        if isinstance(self.value, CompactArray):
            return self.value.elements
        raise AxdrError(f"expected an array or structure, got {self.tag.name}")

    def as_int(self) -> int:
        """The value of an integer, enum or bcd; raises :class:`AxdrError` else."""
        if self.tag in INTEGER_TYPES and isinstance(self.value, int):
            return self.value
        raise AxdrError(f"expected an integer, got {self.tag.name}")

    def as_bytes(self) -> bytes:
        """The value of an octet-string; raises :class:`AxdrError` else."""
        if isinstance(self.value, bytes):
            return self.value
        raise AxdrError(f"expected an octet-string, got {self.tag.name}")

    def as_text(self) -> str:
        """A string value as text: visible/utf8 strings as they are, octet-strings
        decoded as ASCII when they are printable (name plates send both)."""
        if isinstance(self.value, str):
            return self.value
        if isinstance(self.value, bytes):
            text = self.value.decode("latin-1")
            if text.isprintable():
                return text
            return self.value.hex()
        if isinstance(self.value, int):
            return str(self.value)
        raise AxdrError(f"expected a string, got {self.tag.name}")

    def as_datetime(self) -> CosemDateTime:
        """The value of a date-time, or of the 12-byte octet-string that carries
        one (the usual encoding in profiles); raises :class:`DateTimeError`."""
        if isinstance(self.value, CosemDateTime):
            return self.value
        if isinstance(self.value, bytes):
            return CosemDateTime.from_bytes(self.value)
        raise DateTimeError(f"expected a date-time, got {self.tag.name}")


# Constructors, named after what the Blue Book calls the types.


def null() -> Data:
    """Return null-data."""
    return Data(DataType.NULL_DATA, None)


def array(items: Iterable[Data]) -> Data:
    """Return an array of ``items`` (all of one type, not checked)."""
    return Data(DataType.ARRAY, tuple(items))


def structure(items: Iterable[Data]) -> Data:
    """Return a structure of ``items``."""
    return Data(DataType.STRUCTURE, tuple(items))


def boolean(value: bool) -> Data:
    """Return a boolean."""
    return Data(DataType.BOOLEAN, bool(value))


def octet_string(value: bytes) -> Data:
    """Return an octet-string."""
    return Data(DataType.OCTET_STRING, bytes(value))


def visible_string(value: str) -> Data:
    """Return a visible-string (ASCII)."""
    return Data(DataType.VISIBLE_STRING, value)


def integer(tag: DataType, value: int) -> Data:
    """Return an integer of type ``tag``; range is checked on :func:`encode`."""
    if tag not in INTEGER_TYPES:
        raise AxdrError(f"{tag.name} is not an integer type")
    return Data(tag, int(value))


def int8(value: int) -> Data:
    """Return an integer (signed 8 bits)."""
    return Data(DataType.INTEGER, value)


def int16(value: int) -> Data:
    """Return a long (signed 16 bits)."""
    return Data(DataType.LONG, value)


def int32(value: int) -> Data:
    """Return a double-long (signed 32 bits)."""
    return Data(DataType.DOUBLE_LONG, value)


def int64(value: int) -> Data:
    """Return a long64 (signed 64 bits)."""
    return Data(DataType.LONG64, value)


def uint8(value: int) -> Data:
    """Return an unsigned (8 bits)."""
    return Data(DataType.UNSIGNED, value)


def uint16(value: int) -> Data:
    """Return a long-unsigned (16 bits)."""
    return Data(DataType.LONG_UNSIGNED, value)


def uint32(value: int) -> Data:
    """Return a double-long-unsigned (32 bits)."""
    return Data(DataType.DOUBLE_LONG_UNSIGNED, value)


def uint64(value: int) -> Data:
    """Return a long64-unsigned (64 bits)."""
    return Data(DataType.LONG64_UNSIGNED, value)


def enum(value: int) -> Data:
    """Return an enum (8 bits)."""
    return Data(DataType.ENUM, value)


def float32(value: float) -> Data:
    """Return a float32."""
    return Data(DataType.FLOAT32, float(value))


def float64(value: float) -> Data:
    """Return a float64."""
    return Data(DataType.FLOAT64, float(value))


def date_time_string(value: CosemDateTime) -> Data:
    """Return a date-time as the 12-byte octet-string profiles and clocks use."""
    return Data(DataType.OCTET_STRING, value.to_bytes())


# --- lengths ------------------------------------------------------------------------


def encode_length(length: int) -> bytes:
    """Return the A-XDR length: one byte below 128, else 0x80|n and n bytes.

    Raises :class:`AxdrError` for a negative length or one beyond 32 bits.
    """
    if length < 0 or length > 0xFFFFFFFF:
        raise AxdrError(f"length {length} cannot be encoded")
    if length < 0x80:
        return bytes((length,))
    size = (length.bit_length() + 7) // 8
    return bytes((0x80 | size,)) + length.to_bytes(size, "big")


def decode_length(data: bytes, pos: int) -> tuple[int, int]:
    """Read an A-XDR length at ``pos``; return it and the position after it.

    Raises :class:`AxdrError` when the bytes end first or the length has more than
    four bytes.
    """
    if pos >= len(data):
        raise AxdrError(f"data ends at byte {pos} where a length was expected")
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    size = first & 0x7F
    if not 1 <= size <= 4:
        raise AxdrError(f"length of {size} bytes at byte {pos} is not supported")
    end = pos + 1 + size
    if end > len(data):
        raise AxdrError(f"data ends inside a {size}-byte length at byte {pos}")
    return int.from_bytes(data[pos + 1 : end], "big"), end


# --- decoding -----------------------------------------------------------------------


def decode(data: bytes) -> Data:
    """Decode exactly one value from ``data``.

    Raises :class:`AxdrError` when ``data`` is truncated, has bytes after the value
    (longer than announced), nests deeper than :data:`MAX_DEPTH` or holds an unknown
    tag, and :class:`DateTimeError` for a date or time with invalid fields.
    """
    value, end = decode_from(data, 0)
    if end != len(data):
        raise AxdrError(
            f"{len(data) - end} bytes follow the value at byte {end}: the data is "
            "longer than its structure announces"
        )
    return value


def decode_from(data: bytes, pos: int) -> tuple[Data, int]:
    """Decode one value at ``pos``; return it and the position after it.

    Raises like :func:`decode`, except for bytes left after the value.
    """
    return _decode(bytes(data), pos, 0)


def _need(data: bytes, pos: int, size: int, what: str) -> int:
    """Return ``pos + size`` or raise :class:`AxdrError` when ``data`` is too short."""
    end = pos + size
    if end > len(data):
        raise AxdrError(
            f"{what} at byte {pos} needs {size} bytes but only {len(data) - pos} "
            "remain: the data is shorter than announced"
        )
    return end


def _decode(data: bytes, pos: int, depth: int) -> tuple[Data, int]:
    """Decode one tagged value (recursive, bounded by :data:`MAX_DEPTH`)."""
    if pos >= len(data):
        raise AxdrError(
            f"data ends at byte {pos} where a value was expected: shorter than "
            "announced"
        )
    tag_byte = data[pos]
    tag = _TAGS.get(tag_byte)
    if tag is None:
        raise AxdrError(f"unknown data type tag 0x{tag_byte:02X} at byte {pos}")
    return _decode_body(data, pos + 1, tag, depth)


def _decode_body(data: bytes, pos: int, tag: DataType, depth: int) -> tuple[Data, int]:
    """Decode the value of type ``tag`` that starts at ``pos`` (after the tag)."""
    fixed = _INTS.get(tag)
    if fixed is not None:
        size, signed = fixed
        end = _need(data, pos, size, tag.name)
        return Data(tag, int.from_bytes(data[pos:end], "big", signed=signed)), end
    if tag is DataType.OCTET_STRING or tag is DataType.VISIBLE_STRING:
        length, pos = decode_length(data, pos)
        end = _need(data, pos, length, tag.name)
        raw = data[pos:end]
        if tag is DataType.OCTET_STRING:
            return Data(tag, raw), end
        return Data(tag, raw.decode("latin-1")), end
    if tag is DataType.STRUCTURE or tag is DataType.ARRAY:
        if depth >= MAX_DEPTH:
            raise AxdrError(
                f"data nests deeper than {MAX_DEPTH} levels at byte {pos}: refused"
            )
        count, pos = decode_length(data, pos)
        if count > len(data) - pos:
            raise AxdrError(
                f"{tag.name.lower()} at byte {pos} announces {count} elements but "
                f"only {len(data) - pos} bytes remain: shorter than announced"
            )
        items = []
        for _ in range(count):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return Data(tag, tuple(items)), pos
    if tag is DataType.NULL_DATA:
        return Data(tag, None), pos
    if tag is DataType.BOOLEAN:
        end = _need(data, pos, 1, "boolean")
        return Data(tag, data[pos] != 0), end
    floater = _FLOATS.get(tag)
    if floater is not None:
        end = _need(data, pos, floater.size, tag.name)
        return Data(tag, floater.unpack_from(data, pos)[0]), end
    if tag is DataType.UTF8_STRING:
        length, pos = decode_length(data, pos)
        end = _need(data, pos, length, "utf8-string")
        try:
            return Data(tag, data[pos:end].decode("utf-8")), end
        except UnicodeDecodeError as exc:
            raise AxdrError(f"utf8-string at byte {pos} is not UTF-8: {exc}") from None
    if tag is DataType.BIT_STRING:
        bits, pos = decode_length(data, pos)
        end = _need(data, pos, (bits + 7) // 8, "bit-string")
        return Data(tag, BitString(data[pos:end], bits)), end
    if tag is DataType.DATE_TIME:
        end = _need(data, pos, 12, "date-time")
        return Data(tag, CosemDateTime.from_bytes(data[pos:end])), end
    if tag is DataType.DATE:
        end = _need(data, pos, 5, "date")
        return Data(tag, CosemDate.from_bytes(data[pos:end])), end
    if tag is DataType.TIME:
        end = _need(data, pos, 4, "time")
        return Data(tag, CosemTime.from_bytes(data[pos:end])), end
    if tag is DataType.COMPACT_ARRAY:
        return _decode_compact(data, pos, depth)
    raise AxdrError(f"data type {tag.name} cannot be decoded")  # pragma: no cover


def _decode_type(data: bytes, pos: int, depth: int) -> tuple[TypeDescription, int]:
    """Read a compact-array type description at ``pos``."""
    if depth >= MAX_DEPTH:
        raise AxdrError(f"type description nests deeper than {MAX_DEPTH} levels")
    _need(data, pos, 1, "type description")
    tag = _TAGS.get(data[pos])
    if tag is None or tag is DataType.COMPACT_ARRAY:
        raise AxdrError(
            f"type description tag 0x{data[pos]:02X} at byte {pos} is not allowed"
        )
    pos += 1
    if tag is DataType.ARRAY:
        end = _need(data, pos, 2, "array type description")
        count = int.from_bytes(data[pos:end], "big")
        element, pos = _decode_type(data, end, depth + 1)
        return TypeDescription(tag, count, (element,)), pos
    if tag is DataType.STRUCTURE:
        count, pos = decode_length(data, pos)
        if count > len(data) - pos:
            raise AxdrError(
                f"structure type at byte {pos} announces {count} members but only "
                f"{len(data) - pos} bytes remain"
            )
        members = []
        for _ in range(count):
            member, pos = _decode_type(data, pos, depth + 1)
            members.append(member)
        return TypeDescription(tag, len(members), tuple(members)), pos
    return TypeDescription(tag), pos


def _decode_untagged(
    data: bytes, pos: int, description: TypeDescription, depth: int
) -> tuple[Data, int]:
    """Read one compact-array element of type ``description`` (no tags on the wire)."""
    tag = description.tag
    if tag is DataType.STRUCTURE:
        items = []
        for member in description.members:
            item, pos = _decode_untagged(data, pos, member, depth + 1)
            items.append(item)
        return Data(tag, tuple(items)), pos
    if tag is DataType.ARRAY:
        items = []
        for _ in range(description.count):
            item, pos = _decode_untagged(data, pos, description.members[0], depth + 1)
            items.append(item)
        return Data(tag, tuple(items)), pos
    return _decode_body(data, pos, tag, depth)


def _decode_compact(data: bytes, pos: int, depth: int) -> tuple[Data, int]:
    """Read a compact-array: type description, then length and untagged contents."""
    description, pos = _decode_type(data, pos, depth + 1)
    length, pos = decode_length(data, pos)
    end = _need(data, pos, length, "compact-array contents")
    contents = data[:end]
    elements = []
    while pos < end:
        before = pos
        element, pos = _decode_untagged(contents, pos, description, depth + 1)
        if pos == before:
            raise AxdrError("compact-array element of no bytes: refused")
        elements.append(element)
    return Data(DataType.COMPACT_ARRAY, CompactArray(description, tuple(elements))), end


# --- encoding -----------------------------------------------------------------------


def encode(value: Data) -> bytes:
    """Return the A-XDR bytes of ``value``.

    Raises :class:`AxdrError` for a value that does not fit its type (an unsigned
    of 300, a Python value of the wrong kind) and :class:`DateTimeError` for an
    invalid date or time.
    """
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value: Data, out: bytearray, depth: int) -> None:
    """Append the tagged encoding of ``value`` to ``out``."""
    out.append(int(value.tag))
    _encode_body(value, out, depth)


def _wrong(value: Data) -> AxdrError:
    """Return the error for a Python value that does not match its tag."""
    return AxdrError(f"{value.tag.name} cannot hold the Python value {value.value!r}")


def _encode_body(value: Data, out: bytearray, depth: int) -> None:
    """Append the encoding of ``value`` without its tag."""
    if depth > MAX_DEPTH:
        raise AxdrError(f"data nests deeper than {MAX_DEPTH} levels: refused")
    tag, raw = value.tag, value.value
    fixed = _INTS.get(tag)
    if fixed is not None:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _wrong(value)
        size, signed = fixed
        try:
            out += raw.to_bytes(size, "big", signed=signed)
        except OverflowError:
            raise AxdrError(f"{raw} does not fit a {tag.name}") from None
        return
    if tag in (DataType.ARRAY, DataType.STRUCTURE):
        if not isinstance(raw, tuple):
            raise _wrong(value)
        out += encode_length(len(raw))
        for item in raw:
            _encode(item, out, depth + 1)
        return
    if tag is DataType.OCTET_STRING:
        if not isinstance(raw, bytes):
            raise _wrong(value)
        out += encode_length(len(raw)) + raw
        return
    if tag in (DataType.VISIBLE_STRING, DataType.UTF8_STRING):
        if not isinstance(raw, str):
            raise _wrong(value)
        codec = "latin-1" if tag is DataType.VISIBLE_STRING else "utf-8"
        try:
            encoded = raw.encode(codec)
        except UnicodeEncodeError as exc:
            raise AxdrError(f"{tag.name} cannot hold {raw!r}: {exc}") from None
        out += encode_length(len(encoded)) + encoded
        return
    if tag is DataType.NULL_DATA:
        return
    if tag is DataType.BOOLEAN:
        if not isinstance(raw, bool):
            raise _wrong(value)
        out.append(0xFF if raw else 0x00)
        return
    floater = _FLOATS.get(tag)
    if floater is not None:
        if not isinstance(raw, float | int) or isinstance(raw, bool):
            raise _wrong(value)
        try:
            out += floater.pack(raw)
        except (OverflowError, struct.error):
            raise AxdrError(f"{raw} does not fit a {tag.name}") from None
        return
    if tag is DataType.BIT_STRING:
        if not isinstance(raw, BitString):
            raise _wrong(value)
        out += encode_length(raw.length) + raw.data
        return
    if tag in (DataType.DATE_TIME, DataType.DATE, DataType.TIME):
        if not isinstance(raw, CosemDateTime | CosemDate | CosemTime):
            raise _wrong(value)
        expected = {
            DataType.DATE_TIME: CosemDateTime,
            DataType.DATE: CosemDate,
            DataType.TIME: CosemTime,
        }[tag]
        if not isinstance(raw, expected):
            raise _wrong(value)
        out += raw.to_bytes()
        return
    if tag is DataType.COMPACT_ARRAY:
        if not isinstance(raw, CompactArray):
            raise _wrong(value)
        _encode_type(raw.description, out)
        contents = bytearray()
        for element in raw.elements:
            _encode_untagged(element, raw.description, contents, depth + 1)
        out += encode_length(len(contents)) + contents
        return
    raise _wrong(value)  # pragma: no cover


def _encode_type(description: TypeDescription, out: bytearray) -> None:
    """Append a compact-array type description."""
    out.append(int(description.tag))
    if description.tag is DataType.ARRAY:
        out += description.count.to_bytes(2, "big")
        _encode_type(description.members[0], out)
    elif description.tag is DataType.STRUCTURE:
        out += encode_length(len(description.members))
        for member in description.members:
            _encode_type(member, out)


def _encode_untagged(
    value: Data, description: TypeDescription, out: bytearray, depth: int
) -> None:
    """Append a compact-array element without tags, checking it fits the type."""
    if value.tag is not description.tag:
        raise AxdrError(
            f"compact-array element is {value.tag.name}, its type says "
            f"{description.tag.name}"
        )
    if description.tag is DataType.STRUCTURE:
        items = value.items
        if len(items) != len(description.members):
            raise AxdrError("compact-array structure has the wrong member count")
        for item, member in zip(items, description.members, strict=True):
            _encode_untagged(item, member, out, depth + 1)
    elif description.tag is DataType.ARRAY:
        items = value.items
        if len(items) != description.count:
            raise AxdrError("compact-array array has the wrong element count")
        for item in items:
            _encode_untagged(item, description.members[0], out, depth + 1)
    else:
        _encode_body(value, out, depth)


# --- values as exact decimals -------------------------------------------------------


def float_text(value: float, *, single: bool) -> str:
    """Return the shortest decimal that reads back to the same float32 (``single``)
    or float64, without an exponent. Raises :class:`AxdrError` for NaN or infinity."""
    if math.isnan(value) or math.isinf(value):
        raise AxdrError(f"{value} is not a number a reading can carry")
    if not single:
        return _plain(Decimal(repr(value)))
    bits = struct.pack(">f", value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack(">f", float(text)) == bits:
            return _plain(Decimal(text))
    return _plain(Decimal(repr(value)))  # pragma: no cover


def _plain(number: Decimal) -> str:
    """Return ``number`` as plain decimal text (no exponent, no ``-0``)."""
    text = format(number, "f")
    return "0" if text in ("-0", "-0.0") else text


def scaled_text(value: int, scaler: int) -> str:
    """Return ``value × 10^scaler`` as exact decimal text: ``(22999, -2)`` gives
    ``"229.99"``, ``(100, -2)`` gives ``"1.00"``, ``(95, 1)`` gives ``"950"``."""
    return _plain(Decimal(value).scaleb(scaler))


def numeric_text(value: Data, scaler: int = 0) -> str:
    """Return a numeric value (integer or float) scaled by ``10^scaler`` as exact
    decimal text. Raises :class:`AxdrError` for a value that is not a number."""
    raw = value.value
    if value.tag in INTEGER_TYPES and isinstance(raw, int):
        return scaled_text(raw, scaler)
    if isinstance(raw, float):
        single = value.tag is not DataType.FLOAT64
        text = float_text(raw, single=single)
        return _plain(Decimal(text).scaleb(scaler)) if scaler else text
    raise AxdrError(f"{value.tag.name} is not a number")


def is_number(value: Data) -> bool:
    """Tell whether ``value`` is an integer or float type."""
    return value.tag in INTEGER_TYPES or value.tag in _FLOATS


def data_sequence(values: Sequence[Data]) -> Data:
    """Return ``values`` as a structure (a convenience for profile rows)."""
    return structure(values)
