"""IS 15959 objects as data, and profile buffers turned into exact decimal values.

A meter profile (``configs/dlms/<id>.toml``, :func:`load_profile`) names the objects
an Indian meter exposes — name plate, instantaneous profile, block load profile, daily
load profile, billing profile, event logs — with the scaler profile of each, the
quantities' names and units, and the quirks the code must honour
(``india_deviation_sign``).

A profile generic's buffer is rows of values whose meaning is in its capture objects
(attribute 3) and whose scale is in the scaler profile (scaler_unit of each register).
:func:`decode_rows` puts the three together: each numeric cell becomes
``raw × 10^scaler`` as exact decimal text with its unit and OBIS code; the clock
column becomes the row's time under the meter's deviation convention; a clock cell
sent as null-data (compressed, FC-07) is the previous row's time plus the capture
period; a capture time of "all not specified" is no timestamp (FC-06).

The async readers (:func:`read_columns`, :func:`read_scalers`, :func:`read_rows`)
use a connected :class:`~ies_drivers.dlms.transport.DlmsClient`. Errors:
:class:`ProfileError` for a malformed profile file (file, line, key),
:class:`DecodeError` subclasses for buffers that do not match their columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ies_drivers.dlms import axdr
from ies_drivers.dlms.apdu import AccessSelection
from ies_drivers.dlms.axdr import Data, DataType
from ies_drivers.dlms.errors import AxdrError, DlmsError, ObisError, ProfileError
from ies_drivers.dlms.obis import Obis, unit_text

if TYPE_CHECKING:
    from ies_drivers.dlms.transport import DlmsClient

PROFILE_CLASS: Final = 7
CLOCK_CLASS: Final = 8
KINDS: Final = ("snapshot", "interval", "daily", "billing", "event")
QUIRKS: Final = ("india_deviation_sign",)


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An attribute of a COSEM object: class, logical name, attribute."""

    class_id: int
    obis: Obis
    attribute: int = 2

    def __str__(self) -> str:
        return f"{self.obis} (class {self.class_id}, attribute {self.attribute})"


@dataclass(frozen=True, slots=True)
class QuantitySpec:
    """How readings name one OBIS attribute, its fallback unit and whether it is
    cumulative (must never decrease)."""

    obis: Obis
    attribute: int
    name: str
    unit: str
    cumulative: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """One profile generic of a meter profile."""

    key: str
    obis: Obis
    kind: str
    scaler: Obis | None = None
    capture_period: Obis | None = None


@dataclass(frozen=True)
class MeterProfile:
    """A meter profile file: objects, quantities and quirks."""

    id: str
    standard: str
    quirks: frozenset[str]
    clock: Obis
    timezone: str
    name_plate: Mapping[str, ObjectRef]
    profiles: Mapping[str, ProfileSpec]
    quantities: Mapping[tuple[Obis, int], QuantitySpec] = field(repr=False)
    source: str = ""

    @property
    def india_deviation_sign(self) -> bool:
        """Whether date-time deviations follow IS 15959 (+330 is IST)."""
        return "india_deviation_sign" in self.quirks

    @property
    def zone(self) -> tzinfo:
        """The meter's local zone, used when a deviation is not specified."""
        return ZoneInfo(self.timezone)

    def profile(self, key: str) -> ProfileSpec:
        """Return profile ``key``; raises :class:`ProfileError` naming known ones."""
        try:
            return self.profiles[key]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise ProfileError(
                f"meter profile {self.id} has no profile {key!r} (known: {known})"
            ) from None

    def quantity(self, obis: Obis, attribute: int = 2) -> QuantitySpec | None:
        """Return the quantity listed for ``obis``/``attribute``, if any."""
        return self.quantities.get((obis, attribute))


# --- loading ------------------------------------------------------------------------


def profiles_dir() -> Path:
    """Return the shipped ``configs/dlms`` directory."""
    from ies_drivers.templates import shipped_configs_dir

    return shipped_configs_dir() / "dlms"


def load_profile(name: str | Path = "is15959") -> MeterProfile:
    """Load a meter profile by id (``configs/dlms/<id>.toml``) or path.

    Raises :class:`ProfileError` with file, line and key for a missing file, bad
    TOML, unknown keys, a bad OBIS code, an unknown kind or quirk.
    """
    from ies_drivers.tomlsource import TomlSourceError, load_toml

    path = Path(name)
    if path.suffix != ".toml":
        path = profiles_dir() / f"{name}.toml"
    try:
        doc = load_toml(path)
    except TomlSourceError as exc:
        raise ProfileError(str(exc)) from None

    def fail(where: Sequence[str | int], message: str) -> ProfileError:
        line = doc.line_of(where)
        key = ".".join(str(p) for p in where)
        at = f"{path}:{line}" if line else str(path)
        return ProfileError(f"{at}: {key}: {message}")

    def obis(value: Any, where: Sequence[str | int]) -> Obis:
        if not isinstance(value, str):
            raise fail(where, "an OBIS code is a string like '1-0:1.8.0.255'")
        try:
            return Obis.parse(value)
        except ObisError as exc:
            raise fail(where, str(exc)) from None

    def check_keys(table: Any, allowed: set[str], where: Sequence[str | int]) -> None:
        if not isinstance(table, dict):
            raise fail(where, "expected a table")
        unknown = set(table) - allowed
        if unknown:
            raise fail(
                [*where, sorted(unknown)[0]],
                f"unknown key (allowed: {', '.join(sorted(allowed))})",
            )

    data = doc.data
    check_keys(data, {"profile", "name_plate", "profiles", "quantities"}, [])
    head = data.get("profile")
    check_keys(head, {"id", "standard", "quirks", "clock", "timezone"}, ["profile"])
    assert isinstance(head, dict)
    quirks = head.get("quirks", [])
    if not isinstance(quirks, list) or any(q not in QUIRKS for q in quirks):
        raise fail(["profile", "quirks"], f"quirks are a list of {QUIRKS}")
    timezone = head.get("timezone", "Asia/Kolkata")
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise fail(
            ["profile", "timezone"], f"{timezone!r} is not an IANA zone"
        ) from None

    plate: dict[str, ObjectRef] = {}
    for key, entry in (data.get("name_plate") or {}).items():
        where = ["name_plate", key]
        check_keys(entry, {"obis", "class", "attribute"}, where)
        plate[key] = ObjectRef(
            int(entry.get("class", 1)),
            obis(entry.get("obis"), where),
            int(entry.get("attribute", 2)),
        )

    profiles: dict[str, ProfileSpec] = {}
    for key, entry in (data.get("profiles") or {}).items():
        where = ["profiles", key]
        check_keys(entry, {"obis", "scaler", "kind", "capture_period"}, where)
        kind = entry.get("kind")
        if kind not in KINDS:
            raise fail([*where, "kind"], f"kind is one of {KINDS}")
        profiles[key] = ProfileSpec(
            key,
            obis(entry.get("obis"), [*where, "obis"]),
            kind,
            obis(entry["scaler"], [*where, "scaler"]) if "scaler" in entry else None,
            obis(entry["capture_period"], [*where, "capture_period"])
            if "capture_period" in entry
            else None,
        )

    quantities: dict[tuple[Obis, int], QuantitySpec] = {}
    for index, entry in enumerate(data.get("quantities") or []):
        where = ["quantities", index]
        check_keys(
            entry,
            {"obis", "attribute", "name", "unit", "cumulative", "description"},
            where,
        )
        code = obis(entry.get("obis"), [*where, "obis"])
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise fail([*where, "name"], "every quantity needs a name")
        attribute = int(entry.get("attribute", 2))
        quantities[(code, attribute)] = QuantitySpec(
            code,
            attribute,
            name,
            str(entry.get("unit", "")),
            bool(entry.get("cumulative", False)),
            str(entry.get("description", "")),
        )
    return MeterProfile(
        id=str(head.get("id", path.stem)),
        standard=str(head.get("standard", "")),
        quirks=frozenset(quirks),
        clock=obis(head.get("clock", "0-0:1.0.0.255"), ["profile", "clock"]),
        timezone=str(timezone),
        name_plate=plate,
        profiles=profiles,
        quantities=quantities,
        source=str(path),
    )


# --- decoding buffers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scale:
    """scaler_unit of a register: value × 10^scaler, in ``unit`` (COSEM enum)."""

    scaler: int
    unit: int

    @property
    def unit_text(self) -> str:
        return unit_text(self.unit)


@dataclass(frozen=True, slots=True)
class Cell:
    """One value of a row: its column, name, exact decimal text (``None`` for a
    value that is not a number), unit, and the raw COSEM value."""

    column: ObjectRef
    name: str
    value: str | None
    unit: str
    cumulative: bool
    raw: Data
    captured: datetime | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One profile entry: its time (``None`` without a clock column or timestamp),
    whether that time's UTC offset was assumed (deviation not specified), the
    cells, and the row's A-XDR encoding."""

    time: datetime | None
    offset_assumed: bool
    cells: tuple[Cell, ...]
    raw: bytes


def parse_columns(value: Data) -> tuple[ObjectRef, ...]:
    """Read capture objects (attribute 3): an array of structures
    ``{class-id, logical-name, attribute, data-index}``.

    Raises :class:`AxdrError` when the structure is not that.
    """
    columns = []
    for item in value.items:
        parts = item.items
        if len(parts) < 3:
            raise AxdrError(f"capture object has {len(parts)} fields, expected 4")
        try:
            columns.append(
                ObjectRef(
                    parts[0].as_int(),
                    Obis.from_bytes(parts[1].as_bytes()),
                    parts[2].as_int(),
                )
            )
        except ObisError as exc:
            raise AxdrError(f"capture object: {exc}") from None
    return tuple(columns)


def parse_scalers(columns: Sequence[ObjectRef], buffer: Data) -> dict[Obis, Scale]:
    """Read a scaler profile: its columns are registers' attribute 3 and its single
    row holds ``{scaler, unit}`` for each. Returns OBIS -> :class:`Scale`.

    Raises :class:`AxdrError` when the row does not match the columns.
    """
    rows = buffer.items
    if not rows:
        return {}
    cells = rows[-1].items
    if len(cells) != len(columns):
        raise AxdrError(
            f"scaler profile row has {len(cells)} values for {len(columns)} columns"
        )
    scales: dict[Obis, Scale] = {}
    for column, cell in zip(columns, cells, strict=True):
        if cell.tag is not DataType.STRUCTURE:
            continue
        pair = cell.items
        if len(pair) != 2:
            raise AxdrError(
                f"scaler_unit of {column.obis} has {len(pair)} values, not 2"
            )
        scales[column.obis] = Scale(pair[0].as_int(), pair[1].as_int())
    return scales


def _datetime_of(
    value: Data, profile: MeterProfile, assumed_tz: tzinfo | None
) -> tuple[datetime | None, bool]:
    stamp = value.as_datetime()
    moment = stamp.to_datetime(
        india_deviation_sign=profile.india_deviation_sign,
        assumed_tz=assumed_tz or profile.zone,
    )
    return moment, stamp.deviation is None


def _is_datetime(value: Data) -> bool:
    return value.tag is DataType.DATE_TIME or (
        value.tag is DataType.OCTET_STRING
        and isinstance(value.value, bytes)
        and len(value.value) == 12
    )


def decode_rows(
    columns: Sequence[ObjectRef],
    buffer: Data,
    profile: MeterProfile,
    scales: Mapping[Obis, Scale] | None = None,
    *,
    period_s: int = 0,
    assumed_tz: tzinfo | None = None,
) -> list[Row]:
    """Turn a profile buffer into rows of exact decimal cells.

    ``period_s`` (capture period, seconds) fills clock cells sent as null-data.
    Raises :class:`AxdrError` for a row whose width differs from the columns and
    :class:`DateTimeError` for a clock cell with invalid fields.
    """
    scales = scales or {}
    rows: list[Row] = []
    previous: datetime | None = None
    for entry in buffer.items:
        values = entry.items
        if len(values) != len(columns):
            raise AxdrError(
                f"profile row has {len(values)} values for {len(columns)} capture "
                "objects"
            )
        time: datetime | None = None
        assumed = False
        cells: list[Cell] = []
        for column, value in zip(columns, values, strict=True):
            if column.class_id == CLOCK_CLASS and column.attribute == 2:
                if value.tag is DataType.NULL_DATA:
                    if previous is None or not period_s:
                        raise AxdrError(
                            "clock cell is null-data but there is no previous row "
                            "or capture period to infer it from"
                        )
                    time = previous + timedelta(seconds=period_s)
                else:
                    time, assumed = _datetime_of(value, profile, assumed_tz)
                continue
            cells.append(_cell(column, value, profile, scales, assumed_tz, cells))
        previous = time if time is not None else previous
        rows.append(
            Row(time, assumed, tuple(c for c in cells if c.name), axdr.encode(entry))
        )
    return rows


def _cell(
    column: ObjectRef,
    value: Data,
    profile: MeterProfile,
    scales: Mapping[Obis, Scale],
    assumed_tz: tzinfo | None,
    before: list[Cell],
) -> Cell:
    """Build one cell; a capture time (class 4 attribute 5) is attached to the
    value of the same register instead of becoming a cell of its own."""
    spec = profile.quantity(column.obis, column.attribute)
    if column.class_id == 4 and column.attribute == 5 and _is_datetime(value):
        captured, _ = _datetime_of(value, profile, assumed_tz)
        for index, cell in enumerate(before):
            if cell.column.obis == column.obis and cell.captured is None:
                before[index] = Cell(
                    cell.column,
                    cell.name,
                    cell.value,
                    cell.unit,
                    cell.cumulative,
                    cell.raw,
                    captured,
                )
        return Cell(column, "", None, "", False, value)
    scale = scales.get(column.obis)
    unit = scale.unit_text if scale is not None and scale.unit not in (0, 255) else ""
    if not unit and spec is not None:
        unit = spec.unit
    name = spec.name if spec is not None else str(column.obis)
    text: str | None = None
    if axdr.is_number(value):
        text = axdr.numeric_text(value, scale.scaler if scale is not None else 0)
    elif value.tag is DataType.BOOLEAN:
        text = "1" if value.value else "0"
    return Cell(column, name, text, unit, spec.cumulative if spec else False, value)


# --- reading from a meter -----------------------------------------------------------


async def read_columns(client: DlmsClient, obis: Obis) -> tuple[ObjectRef, ...]:
    """Read the capture objects of profile ``obis``."""
    return parse_columns(await client.get(PROFILE_CLASS, obis, 3))


async def read_scalers(client: DlmsClient, obis: Obis) -> dict[Obis, Scale]:
    """Read scaler profile ``obis`` (its columns, then its one row)."""
    columns = await read_columns(client, obis)
    return parse_scalers(columns, await client.get(PROFILE_CLASS, obis, 2))


@dataclass(frozen=True, slots=True)
class ProfileRead:
    """What one profile read returned: rows and the plain response APDUs."""

    rows: list[Row]
    responses: tuple[bytes, ...]


async def read_rows(
    client: DlmsClient,
    spec: ProfileSpec,
    profile: MeterProfile,
    *,
    columns: Sequence[ObjectRef],
    scales: Mapping[Obis, Scale],
    access: AccessSelection | None = None,
    period_s: int = 0,
) -> ProfileRead:
    """Read the buffer of ``spec`` (optionally a selection) and decode its rows."""
    buffer, responses = await client.get_with_raw(PROFILE_CLASS, spec.obis, 2, access)
    rows = decode_rows(columns, buffer, profile, scales, period_s=period_s)
    return ProfileRead(rows, responses)


def name_plate_text(value: Data) -> str:
    """Return a name plate value as text (strings as they are, numbers in decimal)."""
    try:
        if axdr.is_number(value):
            return axdr.numeric_text(value)
        return value.as_text()
    except DlmsError:
        return axdr.encode(value).hex()
