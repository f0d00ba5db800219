"""Payload checks against the official OCPP JSON schemas, tolerant where it is safe.

Real chargers break the schemas. Some breaks leave the data meaningful — a serial
number longer than 25 characters (field case FC-09), an extra vendor field, a unit
spelled ``Hertz`` — and refusing them leaves a charger unable to boot. Others make it
meaningless — a connector id that is a string, a missing ``idTag`` — and must be
answered with a CALLERROR. :func:`check_payload` sorts every schema violation into one
of the two: tolerated ones come back as warnings, the first refused one raises
:class:`PayloadError` with the OCPP error code to answer with.

Which breaks are tolerated is per charger (:class:`Quirks`, from the site config).
The default tolerates every known harmless break; ``strict`` tolerates only those
named. The schemas are the ones shipped with the ``ocpp`` package (1.6, 2.0.1, 2.1).

Errors (``ies_drivers.ocpp.rpc.RpcError`` subclasses)::

    PayloadError            the payload breaks its schema in a way that matters;
    │                       ``code`` is the CALLERROR code, ``violations`` all found
    └── UnknownActionError  no such action in this version (NotSupported) or no
                            schema for it (NotImplemented)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

from ies_drivers.ocpp.rpc import ErrorCode, FrameQuirks, RpcError
from ies_drivers.ocpp.versions import OcppVersion

QUIRK_NAMES: dict[str, str] = {
    "numeric_message_ids": "message ids sent as JSON numbers",
    "result_with_action": "CALLRESULT frames with an action name (4 elements)",
    "null_payload": "null instead of {} as a payload",
    "long_message_ids": "message ids longer than 36 characters",
    "over_length_strings": "strings longer than the schema allows (FC-09)",
    "unknown_fields": "fields the schema does not define",
    "sampled_value_enums": "unknown units, measurands, phases in sampled values",
    "numeric_sampled_values": "OCPP 1.6 sampled values sent as numbers, not strings",
    "no_subprotocol": "no WebSocket subprotocol offered: OCPP 1.6 assumed",
}
"""Every quirk flag a charger can be given, with what it tolerates."""


class PayloadError(RpcError):
    """A payload breaks its schema in a way that makes it meaningless.

    ``code`` is the CALLERROR code to answer with; ``violations`` every violation
    found (tolerated ones included), each as ``path: message``.
    """

    def __init__(
        self, code: ErrorCode, message: str, violations: Iterable[str]
    ) -> None:
        self.code = code
        self.violations = tuple(violations)
        super().__init__(message)


class UnknownActionError(PayloadError):
    """The action does not exist in the version, or the agent has no schema for it."""


@dataclass(frozen=True, slots=True)
class Quirks:
    """What one charger may get wrong and still be understood.

    ``tolerated`` names flags of :data:`QUIRK_NAMES`. Built with :meth:`default`
    (every flag) or :meth:`strict` (only the named ones).
    """

    tolerated: frozenset[str]

    @classmethod
    def default(cls) -> Quirks:
        """Tolerate every known harmless break."""
        return cls(frozenset(QUIRK_NAMES))

    @classmethod
    def strict(cls, allowed: Iterable[str] = ()) -> Quirks:
        """Tolerate only ``allowed``. Raises ``ValueError`` for an unknown name."""
        names = frozenset(allowed)
        unknown = names - set(QUIRK_NAMES)
        if unknown:
            raise ValueError(
                f"unknown quirk flag(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(QUIRK_NAMES)})"
            )
        return cls(names)

    def allows(self, name: str) -> bool:
        """Whether the break named ``name`` is tolerated."""
        return name in self.tolerated

    def frames(self) -> FrameQuirks:
        """The frame-level part, for :func:`ies_drivers.ocpp.rpc.parse_frame`."""
        return FrameQuirks(
            numeric_ids=self.allows("numeric_message_ids"),
            result_with_action=self.allows("result_with_action"),
            null_payload=self.allows("null_payload"),
            long_ids=self.allows("long_message_ids"),
        )


@dataclass(frozen=True, slots=True)
class Checked:
    """A payload that passed: the tolerated violations, one line each."""

    warnings: tuple[str, ...] = ()


def schema_name(version: OcppVersion, action: str, response: bool) -> str:
    """Return the schema file's stem for ``action`` (request or response)."""
    if response:
        return f"{action}Response"
    return action if version.is_16 else f"{action}Request"


def has_schema(version: OcppVersion, action: str, response: bool = False) -> bool:
    """Whether the ``ocpp`` package ships a schema for this message."""
    return _validator(version, schema_name(version, action, response)) is not None


def actions(version: OcppVersion) -> frozenset[str]:
    """Every action the schemas of ``version`` define."""
    return _actions(version)


def check_payload(
    version: OcppVersion,
    action: str,
    payload: Mapping[str, Any],
    *,
    response: bool = False,
    quirks: Quirks | None = None,
) -> Checked:
    """Check ``payload`` of ``action`` (a request, or its ``response``).

    Returns the tolerated violations. Raises :class:`UnknownActionError` when
    ``version`` has no such action, :class:`PayloadError` when a violation is not
    tolerated: type (TypeConstraintViolation), missing field
    (OccurrenceConstraintViolation), value out of range or enumeration
    (PropertyConstraintViolation), anything else (FormatViolation).
    """
    quirks = quirks or Quirks.default()
    validator = _validator(version, schema_name(version, action, response))
    if validator is None:
        if action in _actions(version):
            code = ErrorCode.NOT_IMPLEMENTED
            text = f"{action} has no schema in OCPP {version.value}"
        else:
            code = ErrorCode.NOT_SUPPORTED
            text = f"{action} is not an OCPP {version.value} action"
        raise UnknownActionError(code, text, ())
    warnings: list[str] = []
    refused: list[tuple[ErrorCode, str]] = []
    for error in validator.iter_errors(payload):
        where = _path(error.absolute_path)
        line = f"{action}{'Response' if response else ''}{where}: {error.message}"
        tolerated = _tolerated(
            error.validator, list(error.absolute_path), error, quirks, version
        )
        if tolerated:
            warnings.append(f"{line} (tolerated: {tolerated})")
        else:
            refused.append((_code_for(error.validator), line))
    if refused:
        code, first = refused[0]
        raise PayloadError(code, first, warnings + [line for _, line in refused])
    return Checked(tuple(warnings))


# --- classification -------------------------------------------------------------------


def _tolerated(
    keyword: str,
    path: list[Any],
    error: Any,
    quirks: Quirks,
    version: OcppVersion,
) -> str | None:
    """Return the quirk that tolerates this violation, or ``None``."""
    in_sampled_value = "sampledValue" in path
    if keyword == "maxLength" and quirks.allows("over_length_strings"):
        return "over_length_strings"
    if keyword == "additionalProperties" and quirks.allows("unknown_fields"):
        return "unknown_fields"
    if keyword == "enum" and in_sampled_value and quirks.allows("sampled_value_enums"):
        return "sampled_value_enums"
    if (
        keyword == "type"
        and version.is_16
        and in_sampled_value
        and path[-1:] == ["value"]
        and isinstance(error.instance, int | Decimal)
        and not isinstance(error.instance, bool)
        and quirks.allows("numeric_sampled_values")
    ):
        return "numeric_sampled_values"
    return None


def _code_for(keyword: str) -> ErrorCode:
    if keyword == "type":
        return ErrorCode.TYPE_CONSTRAINT_VIOLATION
    if keyword == "required":
        return ErrorCode.OCCURRENCE_CONSTRAINT_VIOLATION
    if keyword in (
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "maxLength",
        "minLength",
        "multipleOf",
        "minItems",
        "maxItems",
        "pattern",
        "const",
    ):
        return ErrorCode.PROPERTY_CONSTRAINT_VIOLATION
    return ErrorCode.FORMAT_VIOLATION


def _path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


# --- schemas --------------------------------------------------------------------------


def _schema_dir(version: OcppVersion) -> Any:
    return resources.files("ocpp").joinpath(
        "v" + version.value.replace(".", ""), "schemas"
    )


@cache
def _actions(version: OcppVersion) -> frozenset[str]:
    names = set()
    for entry in _schema_dir(version).iterdir():
        stem = entry.name.removesuffix(".json")
        if stem.endswith("Response"):
            names.add(stem.removesuffix("Response"))
    return frozenset(names)


@cache
def _validator(version: OcppVersion, name: str) -> Any | None:
    """Return a jsonschema validator for the schema ``name``, or ``None``."""
    path = _schema_dir(version).joinpath(f"{name}.json")
    if not path.is_file():
        return None
    from jsonschema import validators  # loaded with the first charger, not at start

    schema = json.loads(path.read_text(encoding="utf-8-sig"), parse_float=Decimal)
    cls = validators.validator_for(schema)
    return cls(schema)
