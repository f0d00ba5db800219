"""Build SunSpec register images for simulators and tests.

A :class:`SunSpecImage` is the holding-register content of a SunSpec device: the
``SunS`` marker at a base address, the models added in order (header ``ID, L`` and
payload), and the end marker ``0xFFFF 0x0000``. Points are given raw, as the device
would hold them (``W = -58``, ``W_SF = 0``, ``Mn = "SolarEdge"``); points not given
hold their "not implemented" value, so a simulator serves only what it means to.

The image is plain data: a list of registers from :attr:`SunSpecImage.base_address` on,
which a pymodbus server (or anything else) serves as it likes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ies_drivers.modbus.codec import SUNSPEC_SENTINELS
from ies_drivers.modbus.model import PointType
from ies_drivers.sunspec.discovery import END_MODEL_ID, SUNS_MARKER
from ies_drivers.sunspec.models import (
    HEADER_REGISTERS,
    ModelDef,
    ModelPoint,
    PlacedPoint,
    model_definition,
)

RawValue = int | float | str
"""A raw point value: an integer as the registers hold it (negative for signed types),
a float for ``float32``/``float64`` points, text for strings."""

_PAD = 0x8000


@dataclass(slots=True)
class _Model:
    """One model in the image: where its header is and what its payload holds."""

    model_id: int
    address: int
    payload: list[int]
    definition: ModelDef | None
    occurrence: int


class SunSpecImage:
    """A SunSpec register map under construction, starting at ``base_address``.

    Models are placed one after another in the order added. Raises ``ValueError`` for
    a base address where the marker cannot sit, and (from the methods) for unknown
    points, values that do not fit their type, and images past register 65535.
    """

    def __init__(self, base_address: int = 40000) -> None:
        if not 0 <= base_address <= 0xFFFF - 4:
            raise ValueError(f"base address {base_address} leaves no room for SunS")
        self.base_address = base_address
        self._models: list[_Model] = []

    def add_model(
        self,
        model_id: int,
        values: Mapping[str, RawValue] | None = None,
        *,
        repeats: int = 0,
        length: int | None = None,
    ) -> int:
        """Append model ``model_id`` and return the address of its ``ID`` register.

        ``values`` maps point names (``"W"``, ``"module[1].DCA"``) to raw values;
        every other point holds its sentinel ("not implemented"), padding 0x8000.
        ``repeats`` is the number of repeating-group instances (model 160's modules);
        a ``count`` point left out is set to it. ``length`` overrides ``L`` to mimic a
        shorter, older model revision or a longer one (extra registers are 0).
        Raises ``ValueError`` for an unknown point or a value that does not fit, and
        :class:`~ies_drivers.sunspec.models.UnknownModelError` for an unknown model.
        """
        definition = model_definition(model_id)
        natural = definition.length
        if definition.repeating is not None:
            natural += repeats * definition.repeating.length
        elif repeats:
            raise ValueError(f"model {model_id} has no repeating group")
        size = natural if length is None else length
        payload = [0] * size
        placed = _payload_points(definition, size)
        given = dict(values or {})
        unknown = {n for n in given if n not in placed or placed[n].point.type is None}
        if unknown:
            raise ValueError(
                f"model {model_id} (L = {size}) has no point "
                + ", ".join(sorted(unknown))
            )

        # Sentinels and padding everywhere first, then the values given.
        for point in placed.values():
            _put(payload, point.offset, _sentinel(point.point, repeats))
        for name, value in given.items():
            _put(payload, placed[name].offset, _encode(placed[name], value))

        address = self._next_address()
        occurrence = 1 + sum(1 for m in self._models if m.model_id == model_id)
        self._models.append(_Model(model_id, address, payload, definition, occurrence))
        self._check_size()
        return address

    def add_raw_model(self, model_id: int, payload: Sequence[int]) -> int:
        """Append a model given as raw payload registers (a vendor model, say).

        Returns the address of its ``ID`` register. Raises ``ValueError`` for an id
        that is not a model id or registers outside 0..0xFFFF.
        """
        if not 1 <= model_id < END_MODEL_ID:
            raise ValueError(f"{model_id} is not a model id")
        if any(not 0 <= r <= 0xFFFF for r in payload):
            raise ValueError("payload registers must be 0..0xFFFF")
        address = self._next_address()
        occurrence = 1 + sum(1 for m in self._models if m.model_id == model_id)
        self._models.append(_Model(model_id, address, list(payload), None, occurrence))
        self._check_size()
        return address

    def set(
        self, model_id: int, point: str, value: RawValue, *, occurrence: int = 1
    ) -> None:
        """Change one point's raw value (a simulator moving its readings).

        Raises ``ValueError`` for an unknown model or point, or a value that does not
        fit.
        """
        model = self._model(model_id, occurrence)
        placed = self._placed(model, point)
        _put(
            model.payload,
            placed.offset,
            _encode(placed, value),
        )

    def address_of(self, model_id: int, point: str, *, occurrence: int = 1) -> int:
        """Return the protocol address of ``point`` of the ``occurrence``-th model.

        Raises ``ValueError`` when the image has no such model or point.
        """
        model = self._model(model_id, occurrence)
        return model.address + HEADER_REGISTERS + self._placed(model, point).offset

    def model_address(self, model_id: int, *, occurrence: int = 1) -> int:
        """Return the address of the ``ID`` register of a model in the image."""
        return self._model(model_id, occurrence).address

    def registers(self) -> list[int]:
        """Return the whole image from :attr:`base_address` on, end marker included."""
        out = list(SUNS_MARKER)
        for model in self._models:
            out += [model.model_id, len(model.payload), *model.payload]
        out += [END_MODEL_ID, 0]
        return out

    def _next_address(self) -> int:
        return self.base_address + len(self.registers()) - HEADER_REGISTERS

    def _check_size(self) -> None:
        end = self.base_address + len(self.registers())
        if end > 0x10000:
            self._models.pop()
            raise ValueError(f"the image would end at {end}, past register 65535")

    def _model(self, model_id: int, occurrence: int) -> _Model:
        for model in self._models:
            if model.model_id == model_id and model.occurrence == occurrence:
                return model
        raise ValueError(f"the image has no model {model_id} (occurrence {occurrence})")

    def _placed(self, model: _Model, point: str) -> PlacedPoint:
        if model.definition is None:
            raise ValueError(f"model {model.model_id} was added raw; it has no points")
        placed = _payload_points(model.definition, len(model.payload)).get(point)
        if placed is None or placed.point.type is None:
            raise ValueError(f"model {model.model_id} has no point {point}")
        return placed


def _payload_points(definition: ModelDef, size: int) -> dict[str, PlacedPoint]:
    """Return the model's points with offsets counted in the payload, padding too."""
    return {
        p.name: PlacedPoint(
            p.name, p.key, p.offset - HEADER_REGISTERS, p.point, p.scale_factor
        )
        for p in definition.layout(size, padding=True)
    }


def _put(payload: list[int], offset: int, registers: Sequence[int]) -> None:
    payload[offset : offset + len(registers)] = registers


def _sentinel(point: ModelPoint, repeats: int) -> list[int]:
    """Return the registers meaning "not implemented" for ``point``."""
    if point.sunspec_type == "count":
        return [repeats]
    if point.type is None:
        fill = _PAD if point.sunspec_type == "pad" else 0
        return [fill] * point.size
    if point.type is PointType.STRING:
        return [0] * point.size
    raw = point.not_implemented
    if raw is None:
        raw = SUNSPEC_SENTINELS.get(point.type, 0)
    return _split(raw, point.size)


def _encode(placed: PlacedPoint, value: RawValue) -> list[int]:
    """Return the registers that hold ``value`` in ``placed``'s point."""
    point = placed.point
    name = placed.name
    if point.type is PointType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"{name} is a string point, got {value!r}")
        data = value.encode("ascii", errors="strict")
        if len(data) > 2 * point.size:
            raise ValueError(f"{name} holds {2 * point.size} characters, got {value!r}")
        data = data.ljust(2 * point.size, b"\x00")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if isinstance(value, float):
        if point.type is PointType.F32:
            return _split(int.from_bytes(struct.pack(">f", value), "big"), 2)
        if point.type is PointType.F64:
            return _split(int.from_bytes(struct.pack(">d", value), "big"), 4)
        raise ValueError(f"{name} is {point.sunspec_type}; give an integer")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} is {point.sunspec_type}; got {value!r}")
    bits = 16 * point.size
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise ValueError(f"{name}: {value} does not fit {bits} bits")
    return _split(value & ((1 << bits) - 1), point.size)


def _split(raw: int, size: int) -> list[int]:
    """Return ``raw`` as ``size`` big-endian registers."""
    return [(raw >> (16 * (size - 1 - i))) & 0xFFFF for i in range(size)]
