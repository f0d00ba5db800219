"""OBIS codes (IEC 62056-6-1) and the COSEM unit enumeration.

An OBIS code names a quantity in six groups ``A-B:C.D.E.F``: medium (1 electricity),
channel, quantity (1 import active, 32 voltage L1, ...), processing (7 instantaneous,
8 cumulative), tariff and billing period. On the wire it is the six bytes of a
COSEM logical name. We write it ``A-B:C.D.E`` when F is 255 (the usual "current
value") and ``A-B:C.D.E*F`` otherwise, and read both forms plus the dotted
``A.B.C.D.E.F`` that head-ends print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ies_drivers.dlms.errors import ObisError

_TEXT = re.compile(
    r"\s*(\d{1,3})[-.](\d{1,3})[:.](\d{1,3})\.(\d{1,3})\.(\d{1,3})"
    r"(?:[*.&](\d{1,3}))?\s*"
)


@dataclass(frozen=True, slots=True, order=True)
class Obis:
    """One OBIS code; every group is 0..255."""

    a: int
    b: int
    c: int
    d: int
    e: int
    f: int = 255

    def __post_init__(self) -> None:
        for value in (self.a, self.b, self.c, self.d, self.e, self.f):
            if not 0 <= value <= 255:
                raise ObisError(f"OBIS group {value} is outside 0..255 in {self!r}")

    @classmethod
    def parse(cls, text: str) -> Obis:
        """Read ``"1-0:32.7.0"``, ``"1-0:32.7.0*255"``, ``"1-0:32.7.0.255"`` or the
        dotted ``"1.0.32.7.0.255"``; F defaults to 255.

        Raises :class:`ObisError` naming the text when it is none of these.
        """
        match = _TEXT.fullmatch(text)
        if match is None:
            raise ObisError(
                f"{text!r} is not an OBIS code: write it like '1-0:32.7.0' or "
                "'0-0:96.1.0*255'"
            )
        groups = [int(g) for g in match.groups(default="255")]
        return cls(*groups)

    @classmethod
    def from_bytes(cls, data: bytes) -> Obis:
        """Read the six bytes of a logical name; raises :class:`ObisError` otherwise."""
        if len(data) != 6:
            raise ObisError(
                f"a logical name has 6 bytes, not {len(data)} ({data.hex(' ')})"
            )
        return cls(*data)

    def to_bytes(self) -> bytes:
        """Return the six bytes of the logical name."""
        return bytes((self.a, self.b, self.c, self.d, self.e, self.f))

    @property
    def dotted(self) -> str:
        """The six groups joined by dots, as head-ends print them."""
        return f"{self.a}.{self.b}.{self.c}.{self.d}.{self.e}.{self.f}"

    @property
    def full(self) -> str:
        """``A-B:C.D.E*F`` with every group: how readings name their quantity."""
        return f"{self.a}-{self.b}:{self.c}.{self.d}.{self.e}*{self.f}"

    def __str__(self) -> str:
        base = f"{self.a}-{self.b}:{self.c}.{self.d}.{self.e}"
        return base if self.f == 255 else f"{base}*{self.f}"


UNITS: dict[int, str] = {
    1: "a",
    2: "mo",
    3: "wk",
    4: "d",
    5: "h",
    6: "min",
    7: "s",
    8: "°",
    9: "°C",
    10: "currency",
    11: "m",
    12: "m/s",
    13: "m³",
    14: "m³",
    15: "m³/h",
    16: "m³/h",
    17: "m³/d",
    18: "m³/d",
    19: "l",
    20: "kg",
    21: "N",
    22: "Nm",
    23: "Pa",
    24: "bar",
    25: "J",
    26: "J/h",
    27: "W",
    28: "VA",
    29: "var",
    30: "Wh",
    31: "VAh",
    32: "varh",
    33: "A",
    34: "C",
    35: "V",
    36: "V/m",
    37: "F",
    38: "Ω",
    39: "Ωm²/m",
    40: "Wb",
    41: "T",
    42: "A/m",
    43: "H",
    44: "Hz",
    45: "1/(Wh)",
    46: "1/(varh)",
    47: "1/(VAh)",
    48: "V²h",
    49: "A²h",
    50: "kg/s",
    51: "S",
    52: "K",
    53: "1/(V²h)",
    54: "1/(A²h)",
    55: "1/m³",
    56: "%",
    57: "Ah",
    60: "Wh/m³",
    61: "J/m³",
    62: "Mol %",
    63: "g/m³",
    64: "Pa s",
    65: "J/kg",
    70: "dBm",
    71: "dBµV",
    72: "dB",
    253: "",
    254: "",
    255: "",
}
"""COSEM unit enumeration (class 3 scaler_unit) to the unit text our readings carry.

253 is "reserved", 254 "other", 255 "no unit" (a count, a ratio)."""


def unit_text(code: int) -> str:
    """Return the unit text of COSEM unit ``code``; unknown codes become ``unit<N>``."""
    text = UNITS.get(code)
    return text if text is not None else f"unit{code}"
