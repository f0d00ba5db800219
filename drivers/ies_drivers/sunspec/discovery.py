"""SunSpec discovery: find the ``SunS`` marker, walk the model chain, build a template.

A SunSpec device lays out its data as a chain of models in holding registers: the
marker ``SunS`` (``0x5375 0x6E53``) at a base address (40000, 0 or 50000), then model
after model, each a header ``ID, L`` followed by ``L`` registers, then the end marker
``0xFFFF``. :func:`discover` walks that chain with any :class:`RegisterReader` (the
bus, or a fake answering captured frames), reading two registers per model and never
past the end marker. :func:`template_for` turns the models found into a
:class:`~ies_drivers.modbus.model.DeviceTemplate` with absolute addresses, so the
ordinary Modbus planner and codec poll the device. :func:`decode_model` decodes one
whole model read in one go, with every SunSpec sentinel ("not implemented") honoured.

OBIS codes, units and the cumulative flag come from ``configs/sunspec/obis.toml``
(:func:`load_obis_map`); which models a device kind uses and where to look for the
marker come from its template file (``configs/devices/sunspec-*.toml``,
:func:`load_profile`).

Errors raised here, besides the reader's own (``DeviceTimeout``, ``TransportError``,
...)::

    DeviceError
    └── SunSpecError              the device's SunSpec map cannot be used
        ├── MarkerNotFoundError   no "SunS" at any base address tried
        └── BrokenChainError      a model header that cannot be right, or no end
                                  marker within the bounds of the walk
    DecodeError                   registers given to decode_model do not cover L
    TemplateError                 obis.toml or a SunSpec template file is malformed, or
                                  no selected model was found on the device
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

from ies_drivers.errors import (
    DecodeError,
    DeviceError,
    DeviceTimeout,
    ExceptionResponse,
    TemplateError,
)
from ies_drivers.modbus.codec import PointValue, decode_point, decode_scale_factor
from ies_drivers.modbus.model import DeviceTemplate, PointSpec, PointType
from ies_drivers.reading import ReadingState
from ies_drivers.sunspec.models import (
    HEADER_REGISTERS,
    ModelDef,
    PlacedPoint,
    UnknownModelError,
    model_definition,
)

SUNS_MARKER = (0x5375, 0x6E53)
"""The two registers ``"SunS"`` that open a SunSpec register map."""

END_MODEL_ID = 0xFFFF
"""Model id of the end marker that closes the chain."""

DEFAULT_BASE_ADDRESSES = (40000, 0, 50000)
"""Protocol addresses where SunSpec devices put the marker, in the order tried."""

MAX_MODELS = 100
"""Default bound on the models walked before the chain counts as broken."""

MAX_READ = 125
"""Registers per read request (the Modbus limit for function 3)."""

_ILLEGAL_ADDRESS = 2


class SunSpecError(DeviceError):
    """Raised when a device's SunSpec register map cannot be used."""


class MarkerNotFoundError(SunSpecError):
    """Raised when no base address holds the ``SunS`` marker.

    ``unit`` is the unit id asked; ``attempts`` maps each base address tried to what
    was found there (registers read, or the device's error).
    """

    def __init__(self, unit: int, attempts: Mapping[int, str]) -> None:
        self.unit = unit
        self.attempts = dict(attempts)
        tried = "; ".join(f"{addr}: {what}" for addr, what in self.attempts.items())
        super().__init__(
            f"unit {unit} has no SunSpec marker 'SunS' at any base address ({tried}): "
            "it is not a SunSpec device, the unit id is wrong, or its map starts at "
            "another address (set base_addresses in its template)"
        )


class BrokenChainError(SunSpecError):
    """Raised when the model chain cannot be followed to its end marker.

    ``address`` is where the walk stopped; ``found`` the models walked so far.
    """

    def __init__(
        self, message: str, address: int, found: Sequence[DiscoveredModel]
    ) -> None:
        self.address = address
        self.found = tuple(found)
        walked = ", ".join(f"{m.model_id}@{m.address}" for m in self.found) or "none"
        super().__init__(f"{message} (models walked: {walked})")


class RegisterBlockLike(Protocol):
    """A read result that carries its registers, as the bus's ``RegisterBlock`` does."""

    @property
    def registers(self) -> Sequence[int]:
        """The 16-bit registers read, in address order."""
        ...


class RegisterReader(Protocol):
    """Anything that reads registers of a unit: the bus, an adapter, a test fake.

    ``function`` is ``"holding"`` (FC 3) or ``"input"`` (FC 4). Implementations raise
    :mod:`ies_drivers.errors` types: :class:`~ies_drivers.errors.ExceptionResponse`
    for a Modbus exception, :class:`~ies_drivers.errors.DeviceTimeout` for silence.
    """

    async def read_registers(
        self, unit: int, function: str, address: int, count: int
    ) -> Sequence[int] | RegisterBlockLike:
        """Return ``count`` registers of ``unit`` starting at protocol ``address``."""
        ...


@dataclass(frozen=True, slots=True)
class DiscoveredModel:
    """One model found on the device.

    ``address`` is the protocol address of the model's ``ID`` register, ``length`` its
    ``L`` (registers after the header). ``definition`` is ``None`` for models with no
    shipped definition (vendor models): they are walked past but not decoded.
    ``occurrence`` counts models of the same id in the chain (1 for the first): a
    SolarEdge inverter shows model 1 once for itself and once per attached meter.
    """

    model_id: int
    address: int
    length: int
    definition: ModelDef | None = field(default=None, compare=False)
    occurrence: int = 1

    @property
    def prefix(self) -> str:
        """Name prefix of this model's points: ``"203"``, or ``"1#2"`` for a second."""
        if self.occurrence == 1:
            return str(self.model_id)
        return f"{self.model_id}#{self.occurrence}"

    @property
    def payload_address(self) -> int:
        """Protocol address of the first register after the header."""
        return self.address + HEADER_REGISTERS

    @property
    def end(self) -> int:
        """Protocol address of the next model's header."""
        return self.address + HEADER_REGISTERS + self.length


async def _read(
    reader: RegisterReader, unit: int, address: int, count: int
) -> tuple[int, ...]:
    """Read ``count`` holding registers and check the answer has exactly that many."""
    result = await reader.read_registers(unit, "holding", address, count)
    block = result if isinstance(result, Sequence) else result.registers
    values = tuple(block)
    if len(values) != count:
        raise DeviceError(
            f"unit {unit}: asked {count} registers at {address}, got {len(values)}"
        )
    if any(not 0 <= r <= 0xFFFF for r in values):
        raise DeviceError(f"unit {unit}: register value out of range at {address}")
    return values


async def find_marker(
    reader: RegisterReader,
    unit: int,
    base_addresses: Iterable[int] = DEFAULT_BASE_ADDRESSES,
) -> int:
    """Return the base address at which ``unit`` holds the ``SunS`` marker.

    Each base address is tried in order with one two-register read. A Modbus exception
    or a timeout at one address moves on to the next (devices answer an unmapped
    address either way). Raises :class:`MarkerNotFoundError` when none holds the
    marker, and the last :class:`~ies_drivers.errors.DeviceTimeout` when the device
    never answered at all (it is off line, not "not SunSpec").
    """
    attempts: dict[int, str] = {}
    last_timeout: DeviceTimeout | None = None
    for base in base_addresses:
        try:
            found = await _read(reader, unit, base, 2)
        except ExceptionResponse as exc:
            attempts[base] = f"exception {exc.code} ({exc.NAMES.get(exc.code, '?')})"
            continue
        except DeviceTimeout as exc:
            attempts[base] = "no answer"
            last_timeout = exc
            continue
        if found == SUNS_MARKER:
            return base
        attempts[base] = f"0x{found[0]:04X} 0x{found[1]:04X}"
    if last_timeout is not None and all(v == "no answer" for v in attempts.values()):
        raise last_timeout
    raise MarkerNotFoundError(unit, attempts)


async def walk_models(
    reader: RegisterReader,
    unit: int,
    start: int,
    *,
    max_models: int = MAX_MODELS,
) -> list[DiscoveredModel]:
    """Walk the model chain from the header at ``start`` to the end marker.

    Reads two registers per model (``ID``, ``L``); the next header is at
    ``address + 2 + L``. Stops at model id 0xFFFF and reads nothing after it. A device
    that answers "illegal data address" (exception 2) exactly where the next header
    would be has ended its map without a marker; that also ends the walk.

    Raises :class:`BrokenChainError` for model id 0 (the walk left the map: a previous
    ``L`` is wrong), for a chain running past register 65535, or for more than
    ``max_models`` models; reader errors other than that exception propagate.
    """
    models: list[DiscoveredModel] = []
    seen: Counter[int] = Counter()
    address = start
    while True:
        # Bounds: the walk ends at the marker, at the top of the address space, or
        # after max_models, whichever comes first.
        if len(models) >= max_models:
            raise BrokenChainError(
                f"unit {unit}: no end marker after {max_models} models", address, models
            )
        if address + HEADER_REGISTERS > 0x10000:
            raise BrokenChainError(
                f"unit {unit}: the model chain runs past register 65535 without an "
                "end marker",
                address,
                models,
            )

        # One header.
        try:
            model_id, length = await _read(reader, unit, address, HEADER_REGISTERS)
        except ExceptionResponse as exc:
            if exc.code == _ILLEGAL_ADDRESS and models:
                return models
            raise BrokenChainError(
                f"unit {unit}: exception {exc.code} reading the model header at "
                f"{address}",
                address,
                models,
            ) from exc
        if model_id == END_MODEL_ID:
            return models
        if model_id == 0:
            raise BrokenChainError(
                f"unit {unit}: model id 0 at {address}: the chain is broken, or the "
                "length of the model before it is wrong",
                address,
                models,
            )

        # Record it and step over it.
        seen[model_id] += 1
        try:
            definition: ModelDef | None = model_definition(model_id)
        except UnknownModelError:
            definition = None
        models.append(
            DiscoveredModel(model_id, address, length, definition, seen[model_id])
        )
        address += HEADER_REGISTERS + length


async def discover(
    reader: RegisterReader,
    unit: int,
    *,
    base_addresses: Iterable[int] = DEFAULT_BASE_ADDRESSES,
    max_models: int = MAX_MODELS,
) -> list[DiscoveredModel]:
    """Return the models of SunSpec device ``unit``, in chain order.

    Finds the marker (:func:`find_marker`) and walks the chain from the header right
    after it (:func:`walk_models`). Raises :class:`MarkerNotFoundError`,
    :class:`BrokenChainError`, and the reader's own errors.
    """
    base = await find_marker(reader, unit, base_addresses)
    return await walk_models(
        reader, unit, base + len(SUNS_MARKER), max_models=max_models
    )


def decode_model(
    model_def: ModelDef,
    base_address: int,
    registers: Sequence[int],
    *,
    length: int | None = None,
) -> dict[str, PointValue]:
    """Decode one whole model from its registers, read in one go.

    ``base_address`` is the protocol address of the model's ``ID`` register;
    ``registers`` are read from ``base_address + 2`` on (the payload, without the
    header). ``length`` is the model's ``L`` from discovery (default: all registers
    given); registers past it are ignored, and points past it are absent from the
    result (a shorter, older revision of the model). Keys are point names inside the
    model (``"W"``, ``"module[1].DCA"``), values in model units with the scale factor
    applied (``PF`` of model 203 in percent).

    Every SunSpec sentinel gives state NOT_IMPLEMENTED and no value, also for a point
    whose scale factor is 0x8000. A point that cannot be decoded (a scale factor
    outside -10..10, unprintable text) gets state ERROR with the reason in ``note``;
    the other points still decode. Raises :class:`~ies_drivers.errors.DecodeError`
    only when ``length`` exceeds the registers given.
    """
    size = len(registers) if length is None else length
    if size > len(registers):
        raise DecodeError(
            f"model {model_def.id} at {base_address}: L = {size} but only "
            f"{len(registers)} registers were given"
        )
    placed = model_def.layout(size)
    specs = [
        (p, _point_spec(p, p.name, base_address, scale_factor=p.scale_factor))
        for p in placed
    ]

    def registers_of(spec: PointSpec) -> Sequence[int]:
        start = spec.address - base_address - HEADER_REGISTERS
        return registers[start : start + spec.count]

    # Scale factors first: every other point needs them.
    factors: dict[str, int | None] = {}
    broken: dict[str, str] = {}
    for placed_point, spec in specs:
        if spec.type is PointType.SUNSSF:
            try:
                factors[placed_point.name] = decode_scale_factor(
                    spec, registers_of(spec)
                )
            except DecodeError as exc:
                broken[placed_point.name] = str(exc)

    # Then every point, each on its own: one bad point does not hide the others.
    values: dict[str, PointValue] = {}
    for placed_point, spec in specs:
        sf = placed_point.scale_factor
        if placed_point.name in broken:
            values[placed_point.name] = PointValue(
                None, ReadingState.ERROR, broken[placed_point.name]
            )
        elif isinstance(sf, str) and sf in broken:
            values[placed_point.name] = PointValue(
                None, ReadingState.ERROR, f"scale factor {sf}: {broken[sf]}"
            )
        else:
            try:
                values[placed_point.name] = decode_point(
                    spec, registers_of(spec), sunspec=True, scale_factors=factors
                )
            except DecodeError as exc:
                values[placed_point.name] = PointValue(
                    None, ReadingState.ERROR, str(exc)
                )
    return values


METER_MODELS = frozenset({201, 202, 203, 204, 211, 212, 213, 214})
"""SunSpec AC meter models (integer and float), whose totals are sums of phases."""

SUM_TOLERANCE = Decimal("0.01")
"""Relative difference between a total and the sum of its phases that is flagged."""

_PHASE_SUMS = (
    ("W", ("WphA", "WphB", "WphC"), False),
    *(
        (total, tuple(f"{total}Ph{p}" for p in "ABC"), True)
        for total in ("TotWhImp", "TotWhExp", "TotVAhImp", "TotVAhExp")
    ),
)
"""(total, its phases, whether it is an accumulator that no phase may exceed)."""


def plausibility_flags(model_id: int, values: Mapping[str, PointValue]) -> list[str]:
    """Return what looks implausible in a decoded meter model; change nothing.

    For meter models (201-204, 211-214): a per-phase energy larger than its total, and
    a total that differs from the sum of its three phases by more than
    :data:`SUM_TOLERANCE` (checked only when all three phases have values). These are
    the meter's numbers; the flags tell the installer, the values stay as read.
    Returns an empty list for other models.
    """
    if model_id not in METER_MODELS:
        return []
    flags: list[str] = []
    for total_name, phase_names, accumulator in _PHASE_SUMS:
        total = _number(values.get(total_name))
        if total is None:
            continue
        phases = {name: _number(values.get(name)) for name in phase_names}
        if accumulator:
            for name, phase in phases.items():
                if phase is not None and phase > total:
                    flags.append(
                        f"{name} = {phase} is larger than {total_name} = {total}"
                    )
        present = [v for v in phases.values() if v is not None]
        if len(present) == len(phase_names):
            phase_sum = sum(present, Decimal(0))
            scale = max(abs(total), sum((abs(v) for v in present), Decimal(0)))
            if abs(phase_sum - total) > SUM_TOLERANCE * scale:
                flags.append(
                    f"{' + '.join(phase_names)} = {phase_sum} differs from "
                    f"{total_name} = {total}"
                )
    return flags


def _number(value: PointValue | None) -> Decimal | None:
    """Return the decimal of a decoded point that has a value, else ``None``."""
    if value is None or value.state is not ReadingState.OK or value.value is None:
        return None
    return Decimal(value.value)


async def read_model(
    reader: RegisterReader, unit: int, model: DiscoveredModel
) -> dict[str, PointValue]:
    """Read one discovered model whole and decode it (see :func:`decode_model`).

    Reads the payload in requests of at most 125 registers. Raises
    :class:`~ies_drivers.sunspec.models.UnknownModelError` for a model without a
    definition, and the reader's errors.
    """
    if model.definition is None:
        raise UnknownModelError(model.model_id, f"at {model.address}")
    registers: list[int] = []
    address = model.payload_address
    while len(registers) < model.length:
        count = min(MAX_READ, model.length - len(registers))
        registers.extend(await _read(reader, unit, address, count))
        address += count
    return decode_model(model.definition, model.address, registers)


# --- OBIS map -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointMapping:
    """What ``obis.toml`` says about one SunSpec point.

    ``unit`` replaces the model's unit when not ``None``; ``scale`` multiplies the
    value after the SunSpec scale factor (percent power factor to ratio).
    """

    obis: str | None = None
    unit: str | None = None
    scale: Decimal = Decimal(1)
    cumulative: bool = False


@dataclass(frozen=True, slots=True)
class ObisMap:
    """SunSpec points to OBIS codes, units and the cumulative flag (``obis.toml``)."""

    units: Mapping[str, str] = field(default_factory=dict)
    points: Mapping[tuple[int, str], PointMapping] = field(default_factory=dict)

    def unit_for(self, sunspec_unit: str) -> str:
        """Return the reading unit for a unit text of the SunSpec model files."""
        return self.units.get(sunspec_unit, sunspec_unit)

    def get(self, model_id: int, key: str) -> PointMapping | None:
        """Return the mapping of point ``key`` (``"W"``, ``"module.DCWH"``), if any."""
        return self.points.get((model_id, key))


_OBIS = re.compile(r"^\d{1,3}-\d{1,3}:\d{1,3}\.\d{1,3}\.\d{1,3}(\*\d{1,3})?$")


def load_obis_map(path: Path | None = None) -> ObisMap:
    """Read the OBIS map, by default ``configs/sunspec/obis.toml`` of the installation.

    Raises :class:`~ies_drivers.errors.TemplateError` naming the file, line and key
    when the file is missing or malformed.
    """
    file = path if path is not None else config_path("sunspec", "obis.toml")
    text, document = _read_toml(file)
    where = _Where(file, text)
    units = document.get("units", {})
    if not isinstance(units, dict) or not all(
        isinstance(v, str) for v in units.values()
    ):
        raise where.error("units", "a table of unit names to unit strings")
    entries = document.get("models", [])
    if not isinstance(entries, list):
        raise where.error("models", "an array of [[models]] tables")
    points: dict[tuple[int, str], PointMapping] = {}
    for index, entry in enumerate(entries):
        ids = entry.get("ids") if isinstance(entry, dict) else None
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise where.error(f"models[{index}].ids", "a list of model ids")
        table = entry.get("points", {})
        if not isinstance(table, dict):
            raise where.error(f"models[{index}].points", "a table of points")
        for name, raw in table.items():
            mapping = _point_mapping(raw, where, f"models[{index}].points.{name}")
            for model_id in ids:
                points[(model_id, name)] = mapping
    return ObisMap(units=dict(units), points=points)


def _point_mapping(raw: object, where: _Where, key: str) -> PointMapping:
    """Parse one ``{ obis, unit, scale, cumulative }`` entry of the OBIS map."""
    if not isinstance(raw, dict):
        raise where.error(key, "an inline table { obis, unit, scale, cumulative }")
    unknown = set(raw) - {"obis", "unit", "scale", "cumulative"}
    if unknown:
        raise where.error(
            key,
            f"only obis, unit, scale, cumulative (not {', '.join(sorted(unknown))})",
        )
    obis = raw.get("obis")
    if obis is not None and (not isinstance(obis, str) or not _OBIS.match(obis)):
        raise where.error(f"{key}.obis", 'an OBIS code like "1-0:1.8.0*255"')
    unit = raw.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise where.error(f"{key}.unit", "a string")
    scale_text = raw.get("scale", "1")
    try:
        scale = Decimal(scale_text) if isinstance(scale_text, str) else None
    except InvalidOperation:
        scale = None
    if scale is None or not scale.is_finite() or scale == 0:
        raise where.error(f"{key}.scale", 'a non-zero decimal in quotes, like "0.01"')
    cumulative = raw.get("cumulative", False)
    if not isinstance(cumulative, bool):
        raise where.error(f"{key}.cumulative", "true or false")
    return PointMapping(obis=obis, unit=unit, scale=scale, cumulative=cumulative)


# --- SunSpec templates ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SunSpecProfile:
    """A SunSpec device template (``configs/devices/sunspec-*.toml``).

    Says who the device is and which of its models to decode; the register map itself
    comes from discovery. ``models`` filters the discovered ones; ``base_addresses``
    are tried in order for the marker.
    """

    id: str
    manufacturer: str
    model: str
    kind: str
    models: tuple[int, ...]
    base_addresses: tuple[int, ...] = DEFAULT_BASE_ADDRESSES
    max_models: int = MAX_MODELS
    source: str = ""


def load_profile(path: Path) -> SunSpecProfile:
    """Read a SunSpec device template file.

    Raises :class:`~ies_drivers.errors.TemplateError` naming the file, line and key
    when it is missing, is not TOML, or lacks a valid ``[template]`` / ``[sunspec]``.
    """
    text, document = _read_toml(path)
    return parse_profile(document, source=str(path), text=text)


def parse_profile(
    document: Mapping[str, Any], *, source: str = "template", text: str = ""
) -> SunSpecProfile:
    """Return the :class:`SunSpecProfile` of a parsed template document.

    ``source`` names the file in error messages, ``text`` (its content, if known) lets
    them name the line. Raises :class:`~ies_drivers.errors.TemplateError`.
    """
    where = _Where(Path(source), text)
    head = document.get("template")
    if not isinstance(head, dict):
        raise where.error("template", "a [template] table")
    strings: dict[str, str] = {}
    for key in ("id", "manufacturer", "model", "kind"):
        value = head.get(key)
        if not isinstance(value, str) or not value:
            raise where.error(f"template.{key}", "a non-empty string")
        strings[key] = value
    source_text = head.get("source", "")
    if not isinstance(source_text, str):
        raise where.error("template.source", "a string")
    if head.get("protocol", "modbus") != "modbus":
        raise where.error("template.protocol", '"modbus" for a SunSpec device')
    if head.get("sunspec") is not True:
        raise where.error("template.sunspec", "true")

    body = document.get("sunspec")
    if not isinstance(body, dict):
        raise where.error("sunspec", "a [sunspec] table with models = [...]")
    unknown = set(body) - {"models", "base_addresses", "max_models"}
    if unknown:
        raise where.error(
            f"sunspec.{sorted(unknown)[0]}", "only models, base_addresses, max_models"
        )
    models = _int_list(body.get("models"), 1, 0xFFFE, where, "sunspec.models")
    bases = _int_list(
        body.get("base_addresses", list(DEFAULT_BASE_ADDRESSES)),
        0,
        0xFFFD,
        where,
        "sunspec.base_addresses",
    )
    max_models = body.get("max_models", MAX_MODELS)
    if (
        not isinstance(max_models, int)
        or isinstance(max_models, bool)
        or not (1 <= max_models <= 1000)
    ):
        raise where.error("sunspec.max_models", "an integer from 1 to 1000")
    return SunSpecProfile(
        id=strings["id"],
        manufacturer=strings["manufacturer"],
        model=strings["model"],
        kind=strings["kind"],
        models=models,
        base_addresses=bases,
        max_models=max_models,
        source=source_text,
    )


def template_for(
    models: Sequence[DiscoveredModel],
    *,
    select: Collection[int] | None = None,
    profile: SunSpecProfile | None = None,
    obis: ObisMap | None = None,
) -> DeviceTemplate:
    """Return a device template for the models discovered on one device.

    Points are named ``"<model>.<point>"`` (``"103.W"``, ``"1.Mn"``, ``"1#2.Mn"`` for
    a second model 1, ``"160.module[2].DCA"``), at absolute protocol addresses, with
    their scale-factor points named the same way, decoded with every SunSpec
    sentinel. ``select`` keeps only models with these ids (default: the profile's
    ``models``, else every model with a definition); models without a definition are
    skipped. OBIS codes, units and cumulative flags come from ``obis`` (default: the
    installed ``obis.toml``). Raises :class:`~ies_drivers.errors.TemplateError` when
    no selected model is on the device.
    """
    wanted = select if select is not None else (profile.models if profile else None)
    mapping = obis if obis is not None else load_obis_map()
    points: list[PointSpec] = []
    for model in models:
        if model.definition is None:
            continue
        if wanted is not None and model.model_id not in wanted:
            continue
        for placed in model.definition.layout(model.length):
            entry = mapping.get(model.model_id, placed.key)
            sf = placed.scale_factor
            points.append(
                _point_spec(
                    placed,
                    f"{model.prefix}.{placed.name}",
                    model.address,
                    scale_factor=f"{model.prefix}.{sf}" if isinstance(sf, str) else sf,
                    mapping=entry,
                    unit=mapping.unit_for(placed.point.units),
                )
            )
    if not points:
        offered = sorted({m.model_id for m in models})
        raise TemplateError(
            f"template {profile.id if profile else 'sunspec'}: the device offers "
            f"models {offered}, none of the selected {sorted(wanted or [])} with a "
            "definition"
        )
    return DeviceTemplate(
        id=profile.id if profile else "sunspec",
        manufacturer=profile.manufacturer if profile else "",
        model=profile.model if profile else "",
        kind=profile.kind if profile else "sunspec",
        points=tuple(points),
        sunspec=True,
        source=(profile.source if profile else "") or "SunSpec discovery",
    )


def _point_spec(
    placed: PlacedPoint,
    name: str,
    base_address: int,
    *,
    scale_factor: str | int | None,
    mapping: PointMapping | None = None,
    unit: str | None = None,
) -> PointSpec:
    """Return the :class:`PointSpec` of a placed point of the model at ``base_address``.

    ``unit`` is the reading unit unless the mapping names one; a fixed integer
    ``scale_factor`` becomes part of ``scale``.
    """
    point = placed.point
    if point.type is None:
        raise TemplateError(f"{name}: a {point.sunspec_type} point carries no value")
    scale = Decimal(1)
    if isinstance(scale_factor, int):
        scale = scale.scaleb(scale_factor)
        scale_factor = None
    obis: str | None = None
    cumulative = False
    if mapping is not None:
        scale *= mapping.scale
        obis, cumulative = mapping.obis, mapping.cumulative
        if mapping.unit is not None:
            unit = mapping.unit
    text = point.type is PointType.STRING
    return PointSpec(
        name=name,
        address=base_address + placed.offset,
        type=point.type,
        function="holding",
        order="ABCD",
        length=point.size if text else 0,
        unit="" if text else (point.units if unit is None else unit),
        obis=obis,
        scale=scale,
        scale_factor=scale_factor,
        not_implemented=point.not_implemented,
        cumulative=cumulative,
        description=point.label,
    )


# --- files ----------------------------------------------------------------------------


def config_path(*parts: str) -> Path:
    """Return the path of a shipped configuration file, e.g. ``sunspec/obis.toml``.

    Looks in the source tree's ``configs/`` first, then in the ``_configs/`` folder the
    wheel installs beside the agent package. Raises
    :class:`~ies_drivers.errors.TemplateError` when neither holds the file.
    """
    here = Path(__file__).resolve()
    candidates = (
        here.parents[3].joinpath("configs", *parts),
        here.parents[2].joinpath("ies_agent", "_configs", *parts),
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise TemplateError(
        f"configuration file {'/'.join(parts)} not found in "
        + " or ".join(str(c.parent) for c in candidates)
        + ": the installation is incomplete"
    )


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """Return the text and parsed content of a TOML file, or raise TemplateError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from exc


class _Where:
    """Names file, line and key in template errors."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def error(self, key: str, expected: str) -> TemplateError:
        line = self.line_of(key)
        at = f":{line}" if line else ""
        return TemplateError(f"{self.path}{at}: key {key}: expected {expected}")

    def line_of(self, key: str) -> int | None:
        """Return the 1-based line that sets ``key`` (or its nearest parent), if found.

        ``key`` is dotted, with ``[n]`` for the n-th table of an array of tables
        (``models[3].points.W.obis``). The search starts at the table's header.
        """
        parts = key.split(".")
        start = 0
        head = re.match(r"^([\w-]+)(?:\[(\d+)\])?$", parts[0])
        if head is not None:
            name, index = head.group(1), head.group(2)
            header = (
                rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]"
                if index is not None
                else rf"^\s*\[\s*{re.escape(name)}\s*\]"
            )
            found = [n for n, t in enumerate(self.lines) if re.match(header, t)]
            position = int(index) if index is not None else 0
            if position < len(found):
                start = found[position]
        for part in reversed([re.sub(r"\[\d+\]", "", p) for p in parts]):
            setting = re.compile(
                rf'^\s*"?{re.escape(part)}"?\s*=|^\s*\[+[^\]]*\b{re.escape(part)}\s*\]'
            )
            for number in range(start, len(self.lines)):
                if setting.match(self.lines[number]):
                    return number + 1
        return None


def _int_list(
    value: object, low: int, high: int, where: _Where, key: str
) -> tuple[int, ...]:
    """Return ``value`` as a non-empty tuple of integers in ``low..high``."""
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
            for v in value
        )
    ):
        raise where.error(key, f"a non-empty list of integers from {low} to {high}")
    return tuple(value)
