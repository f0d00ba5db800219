"""OCPP sampled values normalised to exact decimals in base units, with OBIS codes.

Chargers write units in many ways (field case FC-11): ``kWh`` next to ``Wh``, no unit
at all, ``Hertz`` for ``Hz``, a power value labelled ``Wh``. :meth:`MeasurandTable.
normalise` turns one ``sampledValue`` (OCPP 1.6 or 2.x) into a :class:`SampledValue`:
the value as an exact decimal string in the base unit (``733.255884 kWh`` becomes
``733255.884`` Wh, never through a float), its OBIS code where one exists, and flags
for what was odd about it. The rules are data in ``configs/ocpp/measurands.toml``:

- OCPP 1.6's default unit ``Wh`` applies to energy measurands only; any other
  measurand without a unit gets its own base unit (``Frequency`` → Hz) and the flag
  ``unit assumed``;
- a unit whose dimension is not the measurand's (``Power.Active.Export`` in ``Wh``)
  keeps the value as sent, gets no OBIS code and is never treated as a register;
- line-to-neutral phases (``L1-N``) share the OBIS code of the phase (``L1``);
- charger-signed data (1.6 ``format: SignedData``, 2.x ``signedMeterValue``) is kept
  byte-exact in :class:`SignedValue`.

Errors::

    MeasurandTableError   the table file is unusable; ``problems`` lists every
                          (file, line, key, message) found
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ies_drivers.ocpp.versions import OcppVersion
from ies_drivers.templates import shipped_configs_dir
from ies_drivers.tomlsource import (
    KeyPath,
    ProblemCollector,
    SourceProblem,
    TomlSourceError,
    load_toml,
)

DEFAULT_MEASURAND = "Energy.Active.Import.Register"
"""The measurand of a sampled value that names none (both versions)."""
FLAG_UNIT_INCONSISTENT = "unit inconsistent with measurand"
FLAG_UNIT_ASSUMED = "unit assumed"
FLAG_UNKNOWN_UNIT = "unknown unit"
FLAG_UNKNOWN_MEASURAND = "unknown measurand"
FLAG_NOT_A_NUMBER = "value is not a number"

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_OBIS = re.compile(r"\d+-\d+:\d+\.\d+\.\d+(\*\d+)?")


class MeasurandTableError(ValueError):
    """The measurand table cannot be used; ``problems`` says where and why."""

    def __init__(self, problems: Sequence[SourceProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """A unit as chargers write it: its dimension, base unit and power of ten."""

    name: str
    dimension: str
    base: str
    exponent: int


@dataclass(frozen=True, slots=True)
class MeasurandSpec:
    """An OCPP measurand: dimension, whether it is a register, OBIS code per phase."""

    name: str
    dimension: str
    cumulative: bool = False
    obis: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SignedValue:
    """Charger-signed meter data, every string exactly as the charger sent it.

    ``encoding`` is ``OCMF`` (or another encoding method) for 2.x, and for 1.6 the
    encoding found inside the ``SignedData`` value when it is the common JSON wrapper,
    else ``""``. ``data`` is the signed blob (2.x ``signedMeterData``; 1.6 the whole
    ``value`` string).
    """

    format: str
    data: str
    encoding: str = ""
    signing_method: str = ""
    public_key: str = ""

    def as_dict(self) -> dict[str, str]:
        """Return the fields for an evidence entry (exact strings, no floats)."""
        out = {"format": self.format, "data": self.data}
        if self.encoding:
            out["encoding"] = self.encoding
        if self.signing_method:
            out["signing_method"] = self.signing_method
        if self.public_key:
            out["public_key"] = self.public_key
        return out


@dataclass(frozen=True, slots=True)
class SampledValue:
    """One normalised sampled value.

    ``value`` is an exact decimal string in ``unit`` (``None`` when the charger sent
    no number, e.g. only signed data); ``obis`` the OBIS code when the measurand,
    phase and unit allow one; ``cumulative`` true for consistent registers.
    """

    measurand: str
    value: str | None
    unit: str
    obis: str | None = None
    cumulative: bool = False
    phase: str | None = None
    location: str | None = None
    context: str | None = None
    flags: tuple[str, ...] = ()
    signed: SignedValue | None = None

    @property
    def quantity(self) -> str:
        """Name of the quantity: measurand, phase and non-default location."""
        name = self.measurand
        if self.phase:
            name += f".{self.phase}"
        if self.location and self.location != "Outlet":
            name += f"@{self.location}"
        return name


@dataclass(frozen=True, slots=True)
class MeasurandTable:
    """Units, measurands and default units, as loaded from the table file."""

    units: Mapping[str, UnitSpec]
    measurands: Mapping[str, MeasurandSpec]
    default_units: Mapping[str, str]

    def normalise(
        self, sampled: Mapping[str, Any], version: OcppVersion
    ) -> SampledValue:
        """Normalise one ``sampledValue`` object of an OCPP ``version`` message.

        Never raises for odd content: what cannot be understood is kept as sent and
        flagged (``flags``), so the evidence shows what the charger said.
        """
        measurand = _text(sampled.get("measurand")) or DEFAULT_MEASURAND
        phase = _text(sampled.get("phase"))
        location = _text(sampled.get("location"))
        context = _text(sampled.get("context"))
        flags: list[str] = []
        spec = self.measurands.get(measurand)
        if spec is None:
            flags.append(f"{FLAG_UNKNOWN_MEASURAND} {measurand!r}")

        # The unit and its power of ten (2.x: multiplier in unitOfMeasure).
        multiplier = 0
        if version.is_16:
            unit_name = _text(sampled.get("unit"))
        else:
            measure = sampled.get("unitOfMeasure")
            measure = measure if isinstance(measure, Mapping) else {}
            unit_name = _text(measure.get("unit"))
            raw_multiplier = measure.get("multiplier", 0)
            if isinstance(raw_multiplier, int) and not isinstance(raw_multiplier, bool):
                multiplier = raw_multiplier
        if unit_name is None:
            if spec is None:
                unit_name = "Wh"
            else:
                unit_name = self.default_units.get(spec.dimension, "")
                if spec.dimension != "energy":
                    flags.append(f"{FLAG_UNIT_ASSUMED}: {unit_name}")

        # Signed data, kept exactly.
        signed = _signed(sampled, version)

        # The number, exact.
        raw_value = sampled.get("value")
        number: Decimal | None = None
        if not (version.is_16 and signed is not None):
            number = _decimal(raw_value)
            if number is None:
                flags.append(f"{FLAG_NOT_A_NUMBER}: {raw_value!r}")

        unit_spec = self.units.get(unit_name)
        if unit_spec is None:
            flags.append(f"{FLAG_UNKNOWN_UNIT} {unit_name!r}")
        consistent = (
            spec is not None
            and unit_spec is not None
            and unit_spec.dimension == spec.dimension
        )
        if spec is not None and unit_spec is not None and not consistent:
            flags.append(
                f"{FLAG_UNIT_INCONSISTENT}: {measurand} is {spec.dimension}, "
                f"{unit_name} is {unit_spec.dimension}"
            )
        if consistent and unit_spec is not None and spec is not None:
            value = _scaled(number, unit_spec.exponent + multiplier)
            return SampledValue(
                measurand=measurand,
                value=value,
                unit=unit_spec.base,
                obis=spec.obis.get(_phase_key(phase)),
                cumulative=spec.cumulative,
                phase=phase,
                location=location,
                context=context,
                flags=tuple(flags),
                signed=signed,
            )
        return SampledValue(
            measurand=measurand,
            value=_scaled(number, multiplier),
            unit=unit_name,
            phase=phase,
            location=location,
            context=context,
            flags=tuple(flags),
            signed=signed,
        )


def load_measurand_table(path: str | Path | None = None) -> MeasurandTable:
    """Load the measurand table (default: the shipped ``configs/ocpp/measurands.toml``).

    Raises :class:`MeasurandTableError` listing every problem with file and line.
    """
    path = Path(path) if path is not None else default_table_path()
    try:
        document = load_toml(path)
    except TomlSourceError as exc:
        raise MeasurandTableError(
            [SourceProblem(exc.path, exc.line, "", exc.reason)]
        ) from None
    check = ProblemCollector(document)
    data = document.data
    check.unknown_keys(data, {"dimensions", "units", "measurands"}, ())
    defaults: dict[str, str] = {}
    for name, unit in (check.table(data, ("dimensions",), required=True) or {}).items():
        if isinstance(unit, str):
            defaults[name] = unit
        else:
            check.add(("dimensions", name), "expected a unit name (a string)")
    units: dict[str, UnitSpec] = {}
    for name, table in (check.table(data, ("units",), required=True) or {}).items():
        at: KeyPath = ("units", name)
        if not isinstance(table, dict):
            check.add(at, "expected a table { dimension, base, exponent }")
            continue
        check.unknown_keys(table, {"dimension", "base", "exponent"}, at)
        dimension = check.string(table, (*at, "dimension"), required=True)
        base = check.string(table, (*at, "base"), required=True)
        exponent = check.integer(table, (*at, "exponent"), default=0, low=-24, high=24)
        if dimension and base is not None and exponent is not None:
            units[name] = UnitSpec(name, dimension, base, exponent)
    measurands: dict[str, MeasurandSpec] = {}
    for name, table in (
        check.table(data, ("measurands",), required=True) or {}
    ).items():
        at = ("measurands", name)
        if not isinstance(table, dict):
            check.add(at, "expected a table { dimension, cumulative, obis }")
            continue
        check.unknown_keys(table, {"dimension", "cumulative", "obis"}, at)
        dimension = check.string(table, (*at, "dimension"), required=True)
        cumulative = check.boolean(table, (*at, "cumulative"), default=False)
        obis = check.table(table, (*at, "obis")) or {}
        codes: dict[str, str] = {}
        for phase, code in obis.items():
            if phase not in ("total", "L1", "L2", "L3", "N"):
                check.add((*at, "obis", phase), "expected total, L1, L2, L3 or N")
            elif not isinstance(code, str) or not _OBIS.fullmatch(code):
                check.add(
                    (*at, "obis", phase), f"{code!r} is not an OBIS code A-B:C.D.E*F"
                )
            else:
                codes[phase] = code
        if dimension is not None and dimension not in defaults:
            check.add(
                (*at, "dimension"),
                f"no default unit for dimension {dimension!r} in [dimensions]",
            )
        if dimension and cumulative is not None:
            measurands[name] = MeasurandSpec(name, dimension, cumulative, codes)
    if check.problems:
        raise MeasurandTableError(check.problems)
    return MeasurandTable(units, measurands, defaults)


def default_table_path() -> Path:
    """Where the shipped measurand table is."""
    return shipped_configs_dir() / "ocpp" / "measurands.toml"


# --- helpers --------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _phase_key(phase: str | None) -> str:
    if phase is None:
        return "total"
    if phase.endswith("-N") and phase[:2] in ("L1", "L2", "L3"):
        return phase[:2]
    return phase


def _decimal(value: Any) -> Decimal | None:
    """Return ``value`` (a numeric string or JSON number) as an exact Decimal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
    else:
        return None
    return number if number.is_finite() else None


def _scaled(number: Decimal | None, exponent: int) -> str | None:
    """Return ``number * 10^exponent`` as a plain decimal string (no exponent)."""
    if number is None:
        return None
    text = format(number.scaleb(exponent), "f")
    return "0" if text == "-0" else text


def _signed(sampled: Mapping[str, Any], version: OcppVersion) -> SignedValue | None:
    """Return the charger-signed data of a sampled value, exactly as sent."""
    if version.is_16:
        if sampled.get("format") != "SignedData" or not isinstance(
            sampled.get("value"), str
        ):
            return None
        blob: str = sampled["value"]
        encoding = ""
        try:
            from ies_drivers.ocpp.rpc import loads

            inner = loads(blob)
            if isinstance(inner, dict) and isinstance(inner.get("encodingMethod"), str):
                encoding = inner["encodingMethod"]
        except ValueError:
            pass
        return SignedValue(format="SignedData", data=blob, encoding=encoding)
    signed = sampled.get("signedMeterValue")
    if not isinstance(signed, Mapping) or not isinstance(
        signed.get("signedMeterData"), str
    ):
        return None
    return SignedValue(
        format="signedMeterValue",
        data=signed["signedMeterData"],
        encoding=_text(signed.get("encodingMethod")) or "",
        signing_method=_text(signed.get("signingMethod")) or "",
        public_key=_text(signed.get("publicKey")) or "",
    )
