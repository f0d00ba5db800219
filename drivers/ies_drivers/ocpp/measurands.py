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
  byte-exact in :class:`SignedValue`;
- a number is kept only within bounds (:func:`plain_number`): at most
  :data:`MAX_SIGNIFICANT_DIGITS` digits, magnitude below ``10**MAX_MAGNITUDE_DIGITS``
  and at most :data:`MAX_FRACTION_DIGITS` decimals in the base unit, a 2.x multiplier
  within ``±MAX_MULTIPLIER``. Anything else (``1e100000``) is flagged ``value out of
  range`` and carries no value, so a charger cannot bloat the evidence log nor make
  the arithmetic overflow.

Errors::

    MeasurandTableError   the table file is unusable; ``problems`` lists every
                          (file, line, key, message) found
    NumberError           a charger's number cannot be kept (ValueError)
    ├── NotANumber        not a decimal number at all ("abc", NaN, true)
    └── NumberOutOfRange  a number, but outside the bounds above
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import (
    Context,
    Decimal,
    DecimalException,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    Underflow,
)
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
FLAG_OUT_OF_RANGE = "value out of range"
MAX_SIGNIFICANT_DIGITS = 20
"""Most digits a meter value may carry (a 20-digit register is far beyond any meter)."""
MAX_MAGNITUDE_DIGITS = 15
"""A value in its base unit is below ``10**15`` in magnitude (1 EWh, 1 PV, 1 PA)."""
MAX_FRACTION_DIGITS = 12
"""Most decimals a value keeps in its base unit (pWh, pV: below any meter's class)."""
MAX_MULTIPLIER = 24
"""Largest power of ten a 2.x ``unitOfMeasure.multiplier`` may give, either way."""
_MAX_RAW_EXPONENT = MAX_MAGNITUDE_DIGITS + 2 * MAX_MULTIPLIER
"""A number as sent lies within ``10**±63`` before its unit is applied."""
_MAX_TEXT = 64
"""Longest numeric text parsed at all; longer ones are out of range unread."""
_EXACT = Context(
    prec=60,
    Emin=-999,
    Emax=999,
    traps=[InvalidOperation, Overflow, Underflow, Inexact, Rounded],
)
"""Arithmetic on bounded charger numbers: exact or it raises (never rounds)."""

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_OBIS = re.compile(r"\d+-\d+:\d+\.\d+\.\d+(\*\d+)?")


class NumberError(ValueError):
    """A number from a charger that cannot be kept as a meter value."""


class NotANumber(NumberError):
    """The value is not a decimal number (text, NaN, a boolean, an object)."""


class NumberOutOfRange(NumberError):
    """The value is a number outside the bounds a meter value may have."""


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
            flags.append(f"{FLAG_UNKNOWN_MEASURAND} {_shown(measurand)}")

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
            try:
                number = decimal_number(raw_value)
            except NotANumber:
                flags.append(f"{FLAG_NOT_A_NUMBER}: {_shown(raw_value)}")
            except NumberOutOfRange as exc:
                flags.append(f"{FLAG_OUT_OF_RANGE}: {exc}")

        unit_spec = self.units.get(unit_name)
        if unit_spec is None:
            flags.append(f"{FLAG_UNKNOWN_UNIT} {_shown(unit_name)}")
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
            value = _scaled(number, unit_spec.exponent + multiplier, flags)
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
            value=_scaled(number, multiplier, flags),
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


def decimal_number(value: Any) -> Decimal:
    """Return a charger's number (numeric text or JSON number) as an exact Decimal.

    Raises :class:`NotANumber` for anything that is not a finite decimal number and
    :class:`NumberOutOfRange` for one with more than :data:`MAX_SIGNIFICANT_DIGITS`
    digits or beyond ``10**±63`` (no unit brings that into range; the bounds in
    the base unit are :func:`plain_number`'s).
    Long text is refused before it is parsed, so no input costs more than a glance.
    """
    if isinstance(value, bool):
        raise NotANumber(f"{_shown(value)} is not a number")
    if isinstance(value, int):
        if value.bit_length() > 64:
            raise NumberOutOfRange(f"{_shown(value)} has too many digits")
        number = Decimal(value)
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        if len(value) > _MAX_TEXT:
            raise NumberOutOfRange(
                f"{_shown(value)} is {len(value)} characters, at most {_MAX_TEXT}"
            )
        try:
            number = Decimal(value.strip())
        except DecimalException:
            raise NumberOutOfRange(f"{_shown(value)} is out of range") from None
    else:
        raise NotANumber(f"{_shown(value)} is not a number")
    if not number.is_finite():
        raise NotANumber(f"{_shown(value)} is not a finite number")
    _check_bounds(number, value)
    return number


def plain_number(value: Any, exponent: int = 0) -> str:
    """Return ``value * 10**exponent`` as a plain decimal string (no exponent).

    ``value`` is checked by :func:`decimal_number`; the scaled result must also lie
    within the bounds (magnitude, :data:`MAX_FRACTION_DIGITS` decimals). Raises
    :class:`NotANumber` or :class:`NumberOutOfRange`; never an arithmetic error.
    """
    return _plain(decimal_number(value), exponent, value)


def _check_bounds(number: Decimal, shown: Any) -> None:
    digits = number.as_tuple().digits
    significant = len(digits) - next(
        (i for i, d in enumerate(digits) if d), len(digits)
    )
    if significant > MAX_SIGNIFICANT_DIGITS:
        raise NumberOutOfRange(
            f"{_shown(shown)} has {significant} significant digits, "
            f"at most {MAX_SIGNIFICANT_DIGITS}"
        )
    if number and abs(number.adjusted()) >= _MAX_RAW_EXPONENT:
        raise NumberOutOfRange(
            f"{_shown(shown)} is beyond 10^±{_MAX_RAW_EXPONENT} in any unit"
        )


def _plain(number: Decimal, exponent: int, shown: Any) -> str:
    """``number * 10**exponent`` as plain text, bounds checked; see plain_number."""
    if abs(exponent) > 2 * MAX_MULTIPLIER:
        raise NumberOutOfRange(f"power of ten {exponent} is out of range")
    if _exponent(number) < -(_MAX_TEXT + 2 * MAX_MULTIPLIER):
        raise NumberOutOfRange(f"{_shown(shown)} has too many decimals")
    try:
        scaled = number.scaleb(exponent, context=_EXACT)
        if _exponent(scaled) < -MAX_FRACTION_DIGITS:
            # Trailing zeros of the fraction are no information: drop them.
            scaled = scaled.normalize(context=_EXACT)
    except DecimalException:
        raise NumberOutOfRange(f"{_shown(shown)} cannot be scaled exactly") from None
    if _exponent(scaled) < -MAX_FRACTION_DIGITS:
        raise NumberOutOfRange(
            f"{_shown(shown)} has more than {MAX_FRACTION_DIGITS} decimals "
            "in the base unit"
        )
    if scaled and scaled.adjusted() >= MAX_MAGNITUDE_DIGITS:
        raise NumberOutOfRange(
            f"{_shown(shown)} is 10^{MAX_MAGNITUDE_DIGITS} or more in the base unit"
        )
    text = format(scaled, "f")
    return "0" if text == "-0" else text


def _exponent(number: Decimal) -> int:
    """The exponent of a finite Decimal (``1.25`` → -2)."""
    exponent = number.as_tuple().exponent
    return exponent if isinstance(exponent, int) else 0


def _scaled(number: Decimal | None, exponent: int, flags: list[str]) -> str | None:
    """Return ``number * 10^exponent`` as plain text; a bound broken is flagged."""
    if number is None:
        return None
    try:
        return _plain(number, exponent, number)
    except NumberOutOfRange as exc:
        flags.append(f"{FLAG_OUT_OF_RANGE}: {exc}")
        return None


def _shown(value: Any) -> str:
    """``repr`` of a charger's value, cut so that a note stays short."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value.bit_length() > 64
    ):
        return f"<integer of {value.bit_length()} bits>"
    text = str(value) if isinstance(value, Decimal) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
