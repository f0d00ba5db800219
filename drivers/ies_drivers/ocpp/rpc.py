"""OCPP-J RPC frames: parse what a peer sent, serialise what we send.

Three frames exist, each a JSON array::

    CALL        [2, "<id>", "<Action>", {payload}]
    CALLRESULT  [3, "<id>", {payload}]
    CALLERROR   [4, "<id>", "<ErrorCode>", "<description>", {details}]

:func:`parse_frame` turns text into a :data:`Message` and tolerates what real peers
get wrong where the meaning stays clear (a numeric message id, a CALLRESULT with the
action name as an extra element, a ``null`` payload), returning a warning for each.
Anything else raises :class:`FrameError`, which says whether a CALLERROR can be
answered and with which message id. :func:`serialise` always writes string ids and
three-element CALLRESULTs (field case FC-10 shows a central system that did not).

JSON numbers are parsed as :class:`~decimal.Decimal` and written back with exactly
the digits they had, so a meter value is never passed through a binary float.

Errors::

    RpcError                 base of everything raised here
    ├── FrameError           the peer sent a frame we cannot use; ``code`` is the
    │                        OCPP error to answer with, ``unique_id`` the id to
    │                        answer to (None: the frame was a response, not answered)
    └── EncodeError          we tried to send a value JSON cannot hold (our bug)
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from ies_drivers.ocpp.versions import OcppVersion

CALL = 2
CALL_RESULT = 3
CALL_ERROR = 4
MAX_MESSAGE_ID_LENGTH = 36
"""OCPP-J limit for a message id (a UUID string)."""
UNKNOWN_ID = "-1"
"""Message id of a CALLERROR answering a frame whose id could not be read."""


class ErrorCode(StrEnum):
    """CALLERROR codes by meaning; :meth:`spelling` gives each version's word."""

    NOT_IMPLEMENTED = "NotImplemented"
    NOT_SUPPORTED = "NotSupported"
    INTERNAL_ERROR = "InternalError"
    PROTOCOL_ERROR = "ProtocolError"
    SECURITY_ERROR = "SecurityError"
    FORMAT_VIOLATION = "FormatViolation"
    PROPERTY_CONSTRAINT_VIOLATION = "PropertyConstraintViolation"
    OCCURRENCE_CONSTRAINT_VIOLATION = "OccurrenceConstraintViolation"
    TYPE_CONSTRAINT_VIOLATION = "TypeConstraintViolation"
    GENERIC_ERROR = "GenericError"
    MESSAGE_TYPE_NOT_SUPPORTED = "MessageTypeNotSupported"
    RPC_FRAMEWORK_ERROR = "RpcFrameworkError"

    def spelling(self, version: OcppVersion) -> str:
        """Return the code as ``version`` writes it.

        OCPP 1.6 spells two codes differently (``FormationViolation``,
        ``OccurenceConstraintViolation``) and lacks the 2.0 framework codes, which
        become ``ProtocolError`` there.
        """
        if version.is_16:
            return _SPELLING_16.get(self, self.value)
        return self.value

    @classmethod
    def from_text(cls, text: str) -> ErrorCode | None:
        """Return the code spelled ``text`` in any version, or ``None``."""
        return _BY_SPELLING.get(text)


_SPELLING_16 = {
    ErrorCode.FORMAT_VIOLATION: "FormationViolation",
    ErrorCode.OCCURRENCE_CONSTRAINT_VIOLATION: "OccurenceConstraintViolation",
    ErrorCode.MESSAGE_TYPE_NOT_SUPPORTED: "ProtocolError",
    ErrorCode.RPC_FRAMEWORK_ERROR: "ProtocolError",
}
_BY_SPELLING = {code.value: code for code in ErrorCode} | {
    "FormationViolation": ErrorCode.FORMAT_VIOLATION,
    "OccurenceConstraintViolation": ErrorCode.OCCURRENCE_CONSTRAINT_VIOLATION,
}


class RpcError(Exception):
    """Base of the errors of the OCPP-J RPC layer."""


class FrameError(RpcError):
    """The peer sent a frame that cannot be used.

    ``code`` is the error to answer with; ``unique_id`` the message id to put in the
    CALLERROR (``"-1"`` when the id could not be read), or ``None`` when the frame was
    a CALLRESULT or CALLERROR, which is never answered.
    """

    def __init__(self, code: ErrorCode, message: str, unique_id: str | None) -> None:
        self.code = code
        self.unique_id = unique_id
        super().__init__(message)


class EncodeError(RpcError):
    """A value to send cannot be written as JSON (a float NaN, a set, ...)."""


@dataclass(frozen=True, slots=True)
class Call:
    """A request: ``action`` with its ``payload`` under message id ``unique_id``."""

    unique_id: str
    action: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CallResult:
    """A successful answer to the CALL with the same ``unique_id``."""

    unique_id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CallError:
    """An error answer to the CALL with the same ``unique_id``.

    ``code`` is the code as the peer spelled it (see :meth:`ErrorCode.from_text`).
    """

    unique_id: str
    code: str
    description: str = ""
    details: dict[str, Any] = field(default_factory=dict)


Message = Call | CallResult | CallError


@dataclass(frozen=True, slots=True)
class FrameQuirks:
    """What a peer may get wrong in its frames and still be understood.

    Each tolerated deviation is reported as a warning; set a flag to ``False`` to
    refuse it instead (``strict`` mode of one charger).
    """

    numeric_ids: bool = True
    """A message id sent as a JSON number: read as its decimal string."""
    result_with_action: bool = True
    """A CALLRESULT ``[3, id, action, payload]`` (four elements): action ignored."""
    null_payload: bool = True
    """``null`` instead of ``{}`` as a payload."""
    long_ids: bool = True
    """A message id longer than 36 characters."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A parsed frame and what it got wrong that was tolerated."""

    message: Message
    warnings: tuple[str, ...] = ()


# --- JSON with exact decimals ---------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes) -> Any:
    """Parse JSON ``text``; numbers with a fraction or exponent become ``Decimal``.

    Raises ``ValueError`` (``json.JSONDecodeError``) for text that is not JSON,
    including ``NaN`` and ``Infinity``.
    """
    return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)


def dumps(value: Any) -> str:
    """Return compact JSON for ``value``; ``Decimal`` is written with its digits.

    Accepts dict (str keys), list, tuple, str, int, bool, None, Decimal and finite
    floats. Raises :class:`EncodeError` for anything else.
    """
    parts: list[str] = []
    _encode(value, parts.append)
    return "".join(parts)


def _encode(value: Any, out: Callable[[str], Any]) -> None:
    if value is None:
        out("null")
    elif value is True:
        out("true")
    elif value is False:
        out("false")
    elif isinstance(value, str):
        out(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        out(str(value))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise EncodeError(f"{value} cannot be written as a JSON number")
        out(_decimal_text(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EncodeError(f"{value} cannot be written as a JSON number")
        out(repr(value))
    elif isinstance(value, Mapping):
        out("{")
        first = True
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodeError(f"JSON object keys must be strings, not {key!r}")
            if not first:
                out(",")
            first = False
            out(json.dumps(key, ensure_ascii=False))
            out(":")
            _encode(item, out)
        out("}")
    elif isinstance(value, list | tuple):
        out("[")
        for index, item in enumerate(value):
            if index:
                out(",")
            _encode(item, out)
        out("]")
    else:
        raise EncodeError(f"{type(value).__name__} cannot be written as JSON")


def _decimal_text(value: Decimal) -> str:
    """Write ``value`` as a JSON number keeping its digits (``1E+3`` stays exact)."""
    text = str(value)
    if "E" in text:
        text = text.replace("E", "e")
    return text


# --- frames ---------------------------------------------------------------------------


def serialise(message: Message) -> str:
    """Return the OCPP-J text of ``message``.

    Message ids are always strings and a CALLRESULT always has three elements.
    Raises :class:`EncodeError` when the payload holds what JSON cannot.
    """
    if isinstance(message, Call):
        frame: list[Any] = [CALL, message.unique_id, message.action, message.payload]
    elif isinstance(message, CallResult):
        frame = [CALL_RESULT, message.unique_id, message.payload]
    else:
        frame = [
            CALL_ERROR,
            message.unique_id,
            message.code,
            message.description,
            message.details,
        ]
    if not isinstance(frame[1], str):
        raise EncodeError(f"message id {frame[1]!r} must be a string")
    return dumps(frame)


def call_error(
    unique_id: str,
    code: ErrorCode,
    description: str,
    version: OcppVersion,
    details: Mapping[str, Any] | None = None,
) -> CallError:
    """Return a CALLERROR answering ``unique_id``, ``code`` spelled for ``version``.

    The description is cut to 255 characters, the limit OCPP 2.0.1 sets.
    """
    return CallError(
        unique_id, code.spelling(version), description[:255], dict(details or {})
    )


def new_message_id() -> str:
    """Return a fresh message id (a random UUID, 36 characters)."""
    return str(uuid.uuid4())


def parse_frame(text: str | bytes, quirks: FrameQuirks | None = None) -> Parsed:
    """Parse one WebSocket text message into a CALL, CALLRESULT or CALLERROR.

    Tolerated deviations (per ``quirks``) come back as warnings. Raises
    :class:`FrameError` when the frame cannot be used: invalid JSON, not an array,
    an unknown message type, missing or mistyped elements.
    """
    quirks = quirks or FrameQuirks()
    try:
        frame = loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR, f"not valid JSON: {exc}", UNKNOWN_ID
        ) from None
    if not isinstance(frame, list):
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR,
            f"an OCPP-J frame is a JSON array, got {_json_kind(frame)}",
            UNKNOWN_ID,
        )
    if not frame:
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR, "empty frame: no message type", UNKNOWN_ID
        )
    warnings: list[str] = []
    type_id = frame[0]
    unique_id = _message_id(frame, type_id, quirks, warnings)
    if type_id == CALL:
        return Parsed(_call(frame, unique_id, quirks, warnings), tuple(warnings))
    if type_id == CALL_RESULT:
        return Parsed(_result(frame, unique_id, quirks, warnings), tuple(warnings))
    if type_id == CALL_ERROR:
        return Parsed(_error(frame, unique_id, warnings), tuple(warnings))
    raise FrameError(
        ErrorCode.MESSAGE_TYPE_NOT_SUPPORTED,
        f"message type {type_id!r} is not 2 (CALL), 3 (CALLRESULT) or 4 (CALLERROR)",
        unique_id,
    )


def _json_kind(value: Any) -> str:
    """Name ``value`` as JSON does: an object, a string, a number, true, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, list):
        return "a JSON array"
    return "a JSON number"


def _message_id(
    frame: list[Any], type_id: Any, quirks: FrameQuirks, warnings: list[str]
) -> str:
    """Return the frame's message id as a string, or raise :class:`FrameError`."""
    answer_to = UNKNOWN_ID if type_id == CALL or type_id not in (3, 4) else None
    if len(frame) < 2:
        raise FrameError(ErrorCode.RPC_FRAMEWORK_ERROR, "no message id", answer_to)
    raw = frame[1]
    if isinstance(raw, str):
        unique_id = raw
    elif isinstance(raw, int) and not isinstance(raw, bool) and quirks.numeric_ids:
        unique_id = str(raw)
        warnings.append(f"message id {raw} is a number; OCPP-J ids are strings")
    else:
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR,
            f"message id {raw!r} is not a string",
            answer_to,
        )
    if not unique_id:
        raise FrameError(ErrorCode.RPC_FRAMEWORK_ERROR, "empty message id", answer_to)
    if len(unique_id) > MAX_MESSAGE_ID_LENGTH:
        if not quirks.long_ids:
            raise FrameError(
                ErrorCode.RPC_FRAMEWORK_ERROR,
                f"message id is {len(unique_id)} characters, at most 36 allowed",
                unique_id if answer_to else None,
            )
        warnings.append(f"message id is {len(unique_id)} characters (limit 36)")
    return unique_id


def _payload(
    value: Any,
    what: str,
    unique_id: str | None,
    quirks: FrameQuirks,
    warnings: list[str],
) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if value is None and quirks.null_payload:
        warnings.append(f"{what} payload is null; read as {{}}")
        return {}
    raise FrameError(
        ErrorCode.FORMAT_VIOLATION,
        f"{what} payload must be a JSON object, got {_json_kind(value)}",
        unique_id,
    )


def _call(
    frame: list[Any], unique_id: str, quirks: FrameQuirks, warnings: list[str]
) -> Call:
    if len(frame) != 4:
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR,
            f"a CALL has 4 elements, this one has {len(frame)}",
            unique_id,
        )
    action = frame[2]
    if not isinstance(action, str) or not action:
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR, f"action {action!r} is not a name", unique_id
        )
    payload = _payload(frame[3], f"{action} CALL", unique_id, quirks, warnings)
    return Call(unique_id, action, payload)


def _result(
    frame: list[Any], unique_id: str, quirks: FrameQuirks, warnings: list[str]
) -> CallResult:
    if len(frame) == 4 and isinstance(frame[2], str) and quirks.result_with_action:
        warnings.append(
            f"CALLRESULT carries an action name {frame[2]!r}; OCPP-J has 3 elements"
        )
        return CallResult(
            unique_id, _payload(frame[3], "CALLRESULT", None, quirks, warnings)
        )
    if len(frame) != 3:
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR,
            f"a CALLRESULT has 3 elements, this one has {len(frame)}",
            None,
        )
    return CallResult(
        unique_id, _payload(frame[2], "CALLRESULT", None, quirks, warnings)
    )


def _error(frame: list[Any], unique_id: str, warnings: list[str]) -> CallError:
    if len(frame) not in (4, 5):
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR,
            f"a CALLERROR has 5 elements, this one has {len(frame)}",
            None,
        )
    code, description = frame[2], frame[3]
    details = frame[4] if len(frame) == 5 else {}
    if len(frame) == 4:
        warnings.append("CALLERROR without details; read as {}")
    if not isinstance(code, str) or not isinstance(description, str):
        raise FrameError(
            ErrorCode.RPC_FRAMEWORK_ERROR,
            "CALLERROR code and description must be strings",
            None,
        )
    if not isinstance(details, dict):
        warnings.append("CALLERROR details are not an object; kept under 'value'")
        details = {"value": details}
    return CallError(unique_id, code, description, details)
