"""Register images to exact decimal values, with word order, scale and sentinels.

Pure functions: registers (16-bit integers as read from the wire) in, decimal strings
out. Floats from ``f32``/``f64`` registers are written as the shortest decimal that
reads back
to the same bits, so ``0x4365FD71`` is ``"229.99"`` rather than ``229.99000549316406``.

SunSpec sentinels ("not implemented") are applied for SunSpec devices and for the
SunSpec-only types (``sunssf``, ``acc32``, ``acc64``) everywhere; a template may name a
further sentinel per point with ``not_implemented``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from ies_drivers.errors import DecodeError
from ies_drivers.modbus.model import PointSpec, PointType, WordOrder
from ies_drivers.reading import ReadingState

# Raw values that mean "not implemented" in the SunSpec information model.
SUNSPEC_SENTINELS: dict[PointType, int] = {
    PointType.S16: 0x8000,
    PointType.U16: 0xFFFF,
    PointType.SUNSSF: 0x8000,
    PointType.ENUM16: 0xFFFF,
    PointType.BITFIELD16: 0xFFFF,
    PointType.S32: 0x80000000,
    PointType.U32: 0xFFFFFFFF,
    PointType.ENUM32: 0xFFFFFFFF,
    PointType.BITFIELD32: 0xFFFFFFFF,
    PointType.ACC32: 0,
    PointType.S64: 0x8000000000000000,
    PointType.U64: 0xFFFFFFFFFFFFFFFF,
    PointType.ACC64: 0,
}
_ALWAYS_SENTINEL = {PointType.SUNSSF, PointType.ACC32, PointType.ACC64}
_SIGNED = {PointType.S16, PointType.S32, PointType.S64, PointType.SUNSSF}
_FLOATS = {PointType.F32, PointType.F64}


@dataclass(frozen=True, slots=True)
class PointValue:
    """A decoded point: exact decimal ``value`` (``None`` unless ``state`` is OK)."""

    value: str | None
    state: ReadingState
    note: str | None = None


def registers_to_bytes(registers: Sequence[int]) -> bytes:
    """Return the wire bytes of ``registers`` (each register big-endian, in order)."""
    try:
        return b"".join(r.to_bytes(2, "big") for r in registers)
    except OverflowError as exc:
        raise DecodeError(f"register value out of 16-bit range: {exc}") from None


def ordered_bytes(data: bytes, order: WordOrder) -> bytes:
    """Reorder the bytes of a multi-register value into big-endian ``ABCD`` order.

    ``data`` is what the registers hold in wire order; the result is what
    ``struct``/``int.from_bytes`` read as big-endian.
    """
    if order == "ABCD":
        return data
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if order == "CDAB":
        return b"".join(reversed(words))
    if order == "BADC":
        return b"".join(w[::-1] for w in words)
    if order == "DCBA":
        return data[::-1]
    raise DecodeError(
        f"unknown word order {order!r}: expected ABCD, CDAB, BADC or DCBA"
    )


def shortest_float_text(value: float, width: int) -> str:
    """Return the shortest decimal text that reads back to the same ``width``-bit float.

    ``width`` is 32 or 64. Raises :class:`DecodeError` for NaN or infinity.
    """
    if math.isnan(value) or math.isinf(value):
        raise DecodeError(f"register holds {value}, not a number")
    fmt, max_digits = (">f", 9) if width == 32 else (">d", 17)
    target = struct.pack(fmt, value)
    text = repr(value)
    for digits in range(1, max_digits + 1):
        candidate = f"{value:.{digits}g}"
        if struct.pack(fmt, float(candidate)) == target:
            text = candidate
            break
    return format(Decimal(text), "f")


def decode_raw_integer(spec: PointSpec, registers: Sequence[int]) -> int:
    """Return the integer an integer point holds (signed if its type is)."""
    data = ordered_bytes(registers_to_bytes(registers), spec.order)
    return int.from_bytes(data, "big", signed=spec.type in _SIGNED)


def _sentinel_hit(spec: PointSpec, registers: Sequence[int], sunspec: bool) -> bool:
    """Tell whether the point's raw registers hold a "not implemented" sentinel."""
    unsigned = int.from_bytes(
        ordered_bytes(registers_to_bytes(registers), spec.order), "big"
    )
    if spec.not_implemented is not None and unsigned == spec.not_implemented:
        return True
    if sunspec or spec.type in _ALWAYS_SENTINEL:
        sentinel = SUNSPEC_SENTINELS.get(spec.type)
        if sentinel is not None and unsigned == sentinel:
            return True
    return False


def decode_scale_factor(spec: PointSpec, registers: Sequence[int]) -> int | None:
    """Return the power of ten a ``sunssf`` point holds, or ``None`` if not implemented.

    Raises :class:`DecodeError` for a scale factor outside -10..10, which SunSpec
    forbids and which in practice means the wrong register was read.
    """
    if _sentinel_hit(spec, registers, True):
        return None
    value = decode_raw_integer(spec, registers)
    if not -10 <= value <= 10:
        raise DecodeError(
            f"scale factor {spec.name} = {value} is outside -10..10: "
            "check the register address"
        )
    return value


def decode_point(
    spec: PointSpec,
    registers: Sequence[int],
    *,
    sunspec: bool = False,
    scale_factors: Mapping[str, int | None] | None = None,
) -> PointValue:
    """Decode one point from exactly its registers.

    ``scale_factors`` maps the names of ``sunssf`` points of the same device to their
    decoded powers of ten (``None`` = not implemented). Raises :class:`DecodeError` when
    the registers cannot hold a value of this type (wrong count, a float that is
    denormal — usually a wrong word order —, NaN or infinity).
    """
    if len(registers) != spec.count:
        raise DecodeError(
            f"{spec.name}: expected {spec.count} registers, got {len(registers)}"
        )
    if spec.type is PointType.STRING:
        return _decode_string(spec, registers)
    if _sentinel_hit(spec, registers, sunspec):
        return PointValue(None, ReadingState.NOT_IMPLEMENTED, "sentinel")

    # The raw number, as an exact decimal.
    data = ordered_bytes(registers_to_bytes(registers), spec.order)
    if spec.type in _FLOATS:
        if sunspec and _is_nan(data):  # SunSpec float32/64: NaN = not implemented
            return PointValue(None, ReadingState.NOT_IMPLEMENTED, "sentinel")
        number = _decode_float(spec, data)
    else:
        number = Decimal(int.from_bytes(data, "big", signed=spec.type in _SIGNED))

    # Scale: a fixed multiplier and/or a SunSpec scale-factor register.
    if spec.scale_factor is not None:
        if scale_factors is None or spec.scale_factor not in scale_factors:
            raise DecodeError(
                f"{spec.name}: scale factor {spec.scale_factor} was not read"
            )
        exponent = scale_factors[spec.scale_factor]
        if exponent is None:
            return PointValue(
                None,
                ReadingState.NOT_IMPLEMENTED,
                f"{spec.scale_factor} not implemented",
            )
        number = number.scaleb(exponent)
    if spec.scale != 1:
        number = number * spec.scale
    return PointValue(format(number, "f"), ReadingState.OK)


def _is_nan(data: bytes) -> bool:
    """Tell whether big-endian float ``data`` (4 or 8 bytes) is a NaN."""
    (value,) = struct.unpack(">f" if len(data) == 4 else ">d", data)
    return math.isnan(value)


def _decode_float(spec: PointSpec, data: bytes) -> Decimal:
    """Return the exact decimal of an IEEE 754 float held in ``data`` (big-endian)."""
    width = 32 if spec.type is PointType.F32 else 64
    (value,) = struct.unpack(">f" if width == 32 else ">d", data)
    if math.isnan(value):
        raise DecodeError(f"{spec.name}: register holds NaN")
    tiny = 1.1754943508222875e-38 if width == 32 else 2.2250738585072014e-308
    if value != 0.0 and abs(value) < tiny:
        raise DecodeError(
            f"{spec.name}: {value!r} is a denormal float; the word order "
            f"{spec.order} is probably wrong for this device"
        )
    return Decimal(shortest_float_text(value, width))


def _decode_string(spec: PointSpec, registers: Sequence[int]) -> PointValue:
    """Decode a NUL- or space-padded ASCII string point; empty = not implemented."""
    data = registers_to_bytes(registers)
    if spec.order in ("BADC", "DCBA"):
        data = ordered_bytes(data, "BADC")
    text = data.split(b"\x00", 1)[0].decode("latin-1").strip()
    if not text:
        return PointValue(None, ReadingState.NOT_IMPLEMENTED, "empty string")
    if not text.isprintable():
        raise DecodeError(f"{spec.name}: string holds unprintable bytes {data.hex()}")
    return PointValue(text, ReadingState.OK)


def raw_text(function: int, address: int, registers: Sequence[int]) -> str:
    """Return the evidence ``raw`` field for registers read from ``address``.

    Format ``modbus:fc03:0x5000:<register bytes in hex>`` as in the evidence example.
    """
    return (
        f"modbus:fc{function:02d}:0x{address:04x}:{registers_to_bytes(registers).hex()}"
    )


def encode_point(
    spec: PointSpec,
    value: Decimal | int | str | None,
    *,
    scale_factor: int = 0,
) -> list[int]:
    """Return the registers that hold ``value`` for ``spec`` (inverse of decode_point).

    Used by simulators and by writes (setpoints). ``value`` is in the point's unit;
    it is divided by the point's ``scale`` and by ``10**scale_factor`` and rounded to
    the nearest integer for integer types. ``None`` encodes "not implemented" (the
    point's own sentinel, else the SunSpec one). Raises :class:`DecodeError` when the
    value does not fit the type.
    """
    if spec.type is PointType.STRING:
        text = "" if value is None else str(value)
        data = text.encode("latin-1").ljust(spec.count * 2, b"\x00")
        if len(data) > spec.count * 2:
            raise DecodeError(f"{spec.name}: {text!r} is longer than {spec.count * 2}")
        if spec.order in ("BADC", "DCBA"):
            data = ordered_bytes(data, "BADC")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]

    width = spec.count * 2
    if value is None:
        if spec.not_implemented is not None:
            raw_unsigned = spec.not_implemented
        elif spec.type in SUNSPEC_SENTINELS:
            raw_unsigned = SUNSPEC_SENTINELS[spec.type]
        elif spec.type in _FLOATS:
            data = struct.pack(">f" if width == 4 else ">d", math.nan)
            return _to_registers(data, spec.order)
        else:
            raise DecodeError(f"{spec.name}: type {spec.type.value} has no sentinel")
        return _to_registers(raw_unsigned.to_bytes(width, "big"), spec.order)

    number = Decimal(str(value)) / spec.scale
    if spec.scale_factor is not None:
        number = number.scaleb(-scale_factor)
    if spec.type in _FLOATS:
        data = struct.pack(">f" if width == 4 else ">d", float(number))
        return _to_registers(data, spec.order)
    integer = int(number.to_integral_value())
    signed = spec.type in _SIGNED
    try:
        data = integer.to_bytes(width, "big", signed=signed)
    except OverflowError:
        raise DecodeError(
            f"{spec.name}: {value} does not fit {spec.type.value}"
        ) from None
    return _to_registers(data, spec.order)


def _to_registers(data: bytes, order: WordOrder) -> list[int]:
    """Split big-endian ``data`` into registers in the device's word order."""
    wire = ordered_bytes(data, order)  # each order is its own inverse
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]
