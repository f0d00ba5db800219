"""Register maps as data: what a device template says about each Modbus point.

A template (``configs/devices/*.toml``) becomes a :class:`DeviceTemplate` holding
:class:`PointSpec` entries. Nothing here does I/O; the codec turns registers into values
using these specs, the planner turns them into read requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Literal

RegisterFunction = Literal["holding", "input"]
"""Which register table a point lives in: holding (FC 3) or input (FC 4)."""

WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
"""Byte order of a multi-register value, written for a 32-bit value ``A B C D``.

``ABCD`` big-endian words, big-endian bytes (Modbus default); ``CDAB`` low word first
(word swap); ``BADC`` byte swap inside each word; ``DCBA`` fully little-endian. For
64-bit values the same rule extends over four words.
"""


class PointType(StrEnum):
    """Register encodings a template may name."""

    U16 = "u16"
    S16 = "s16"
    U32 = "u32"
    S32 = "s32"
    U64 = "u64"
    S64 = "s64"
    F32 = "f32"
    F64 = "f64"
    STRING = "string"
    SUNSSF = "sunssf"
    """SunSpec scale factor: a signed 16-bit power of ten; 0x8000 = not implemented."""
    ACC32 = "acc32"
    """SunSpec 32-bit accumulator (unsigned); 0 = not implemented."""
    ACC64 = "acc64"
    ENUM16 = "enum16"
    ENUM32 = "enum32"
    BITFIELD16 = "bitfield16"
    BITFIELD32 = "bitfield32"

    @property
    def registers(self) -> int:
        """Registers (16-bit words) of this type; 0 for strings (see ``length``)."""
        return _REGISTERS[self]


_REGISTERS = {
    PointType.U16: 1,
    PointType.S16: 1,
    PointType.SUNSSF: 1,
    PointType.ENUM16: 1,
    PointType.BITFIELD16: 1,
    PointType.U32: 2,
    PointType.S32: 2,
    PointType.F32: 2,
    PointType.ACC32: 2,
    PointType.ENUM32: 2,
    PointType.BITFIELD32: 2,
    PointType.U64: 4,
    PointType.S64: 4,
    PointType.F64: 4,
    PointType.ACC64: 4,
    PointType.STRING: 0,
}


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One quantity of a Modbus device.

    ``address`` is the protocol address (0-based, as sent on the wire). ``length`` is
    the
    register count, needed only for strings. The value shown is ``raw × scale ×
    10^scale_factor`` where ``scale_factor`` names a ``sunssf`` point of the same
    device.
    ``not_implemented`` is the raw integer that means "no value" in addition to the
    type's own SunSpec sentinels. ``cumulative`` marks an energy register that is read
    at every interval boundary and must never decrease.
    """

    name: str
    address: int
    type: PointType
    function: RegisterFunction = "holding"
    order: WordOrder = "ABCD"
    length: int = 0
    unit: str = ""
    obis: str | None = None
    scale: Decimal = Decimal(1)
    scale_factor: str | None = None
    not_implemented: int | None = None
    cumulative: bool = False
    description: str = ""

    @property
    def count(self) -> int:
        """Registers this point occupies on the wire."""
        return self.length if self.type is PointType.STRING else self.type.registers

    @property
    def end(self) -> int:
        """First register address after this point."""
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class DeviceTemplate:
    """A device model described as data (one file in ``configs/devices/``).

    ``quirks`` are named flags for behaviour that cannot be described as data, e.g.
    ``"max_block_60"``; the driver code that honours each flag names it.
    """

    id: str
    manufacturer: str
    model: str
    kind: str
    points: tuple[PointSpec, ...]
    sunspec: bool = False
    max_block: int = 125
    quirks: frozenset[str] = field(default_factory=frozenset)
    source: str = ""
    """Where the register map comes from (vendor document, field case)."""

    def point(self, name: str) -> PointSpec:
        """Return the point called ``name``; raise ``KeyError`` if there is none."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)
