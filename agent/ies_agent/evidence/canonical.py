"""Canonical JSON for evidence entries: the bytes that are stored are the bytes hashed.

An entry is one line of JSON with sorted keys, no insignificant whitespace, UTF-8 text
and no floats; integers stay below 2**53 in magnitude and decimals travel as strings
(``"12345.678"``). For this subset the encoding equals RFC 8785 (JCS), so any JCS
implementation reproduces our bytes. Because there is exactly one encoding of each
entry, a verifier can re-encode what it parsed and compare: any edit that still parses
(a space, a reordered key, ``1.0`` for ``1``) shows up as a difference.

Keys are ordered by their UTF-16 code units as RFC 8785 asks; for keys inside the Basic
Multilingual Plane this is the same as Python's code point order, so the fast path uses
the standard library encoder and only keys with characters beyond U+FFFF take the slow
path.

Raises :class:`~ies_agent.evidence.errors.EvidenceFormatError` (see ``errors`` for the
tree) for anything outside the subset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ies_agent.evidence.errors import EvidenceFormatError

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer magnitude allowed (IEEE 754 doubles hold every integer up to it)."""

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def _refuse_float(text: str) -> Any:
    raise EvidenceFormatError(f"floats are not allowed, found {text}")


def _bounded_int(text: str) -> int:
    value = int(text)
    if len(text) > 15 and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise EvidenceFormatError(f"integer {text} is beyond 2**53 - 1")
    return value


# The decoder refuses floats, NaN/Infinity and oversized integers while parsing, so a
# parsed entry needs no second walk before it is re-encoded and compared.
_DECODER = json.JSONDecoder(
    parse_float=_refuse_float, parse_int=_bounded_int, parse_constant=_refuse_float
)


_SCAN = _DECODER.scan_once  # type: ignore[attr-defined]

# The C encoder behind json.JSONEncoder, built once: encode() would rebuild it for
# every entry, a fifth of the cost of re-encoding one.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE: Any = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None,
        _ENCODER.default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        True,
        False,
        False,
    )
)


def _encode_sorted(obj: Any) -> str:
    """Encode with sorted keys and no whitespace (code point key order)."""
    if _C_ENCODE is None:  # pragma: no cover - interpreters without the accelerator
        return _ENCODER.encode(obj)
    return "".join(_C_ENCODE(obj, 0))


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """Return the canonical UTF-8 bytes of ``obj`` (no trailing newline).

    Allowed values are dicts with ``str`` keys, lists, ``str``, ``int`` (magnitude at
    most 2**53 - 1), ``bool`` and ``None``. Raises ``EvidenceFormatError`` naming the
    offending path for floats, other types, non-string keys, oversized integers and
    strings that are not valid Unicode (lone surrogates).
    """
    if not isinstance(obj, Mapping):
        raise EvidenceFormatError(
            f"an entry must be a JSON object, got {type(obj).__name__}"
        )
    if _check_value(obj, "$"):
        text = _encode_utf16_ordered(obj)
    else:
        text = _ENCODER.encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EvidenceFormatError(
            f"entry holds text that is not valid Unicode ({exc.reason})"
        ) from None


def parse_entry(line: bytes) -> dict[str, Any]:
    """Parse one stored entry line (without its newline) and check it is canonical.

    Returns the entry as a dict. Raises ``EvidenceFormatError`` when the bytes are not
    UTF-8, not JSON, not an object, or differ in any byte from the canonical encoding
    of what they parse to (whitespace, key order, escapes, floats, duplicate keys).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvidenceFormatError(
            f"entry is not UTF-8 (bad byte at offset {exc.start})"
        ) from None
    try:
        obj, end = _SCAN(text, 0)
    except (StopIteration, ValueError, EvidenceFormatError, RecursionError):
        end = -1
    if end != len(text):
        obj = _decode_with_reason(text)
    if not isinstance(obj, dict):
        raise EvidenceFormatError(
            f"an entry must be a JSON object, got {type(obj).__name__}"
        )
    # Fast path: the standard encoder orders keys by code point, which equals UTF-16
    # order unless a key holds characters beyond U+FFFF; only then the slow path.
    # Comparing text is enough: ``text`` came from valid UTF-8, so an encoding equal
    # to it holds no lone surrogate and has the same bytes.
    if _encode_sorted(obj) == text:
        return obj
    if canonical_bytes(obj) != line:
        raise EvidenceFormatError(
            "entry bytes are not canonical JSON (whitespace, key order, escapes, "
            "number form or duplicate keys differ from the canonical encoding)"
        )
    return obj


def _decode_with_reason(text: str) -> Any:
    """Decode ``text`` the slow way, raising ``EvidenceFormatError`` with the reason."""
    try:
        return _DECODER.decode(text)
    except EvidenceFormatError as exc:
        raise EvidenceFormatError(f"entry is not canonical: {exc}") from None
    except json.JSONDecodeError as exc:
        raise EvidenceFormatError(
            f"entry is not JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:
        raise EvidenceFormatError("entry is nested too deeply") from None


def _check_value(value: Any, path: str) -> bool:
    """Raise unless ``value`` fits the subset; tell whether UTF-16 order matters."""
    # bool before int: bool is a subclass of int.
    if value is None or isinstance(value, (bool, str)):
        return False
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return False
        raise EvidenceFormatError(
            f"{path}: integer {value} is beyond 2**53 - 1; write it as a string"
        )
    if isinstance(value, float):
        raise EvidenceFormatError(
            f"{path}: floats are not allowed; write {value!r} as a decimal string"
        )
    if isinstance(value, Mapping):
        needs_order = False
        for key, item in value.items():
            if not isinstance(key, str):
                raise EvidenceFormatError(f"{path}: object key {key!r} is not a string")
            if not key.isascii() and max(key) > "\uffff":
                needs_order = True
            if _check_value(item, f"{path}.{key}"):
                needs_order = True
        return needs_order
    if isinstance(value, (list, tuple)):
        needs_order = False
        for index, item in enumerate(value):
            if _check_value(item, f"{path}[{index}]"):
                needs_order = True
        return needs_order
    raise EvidenceFormatError(
        f"{path}: a {type(value).__name__} cannot be stored in an entry"
    )


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _encode_utf16_ordered(value: Any) -> str:
    """Encode ``value`` with object keys in UTF-16 code unit order (slow path)."""
    if isinstance(value, Mapping):
        members = sorted(value.items(), key=lambda item: _utf16_key(item[0]))
        inner = ",".join(
            _ENCODER.encode(key) + ":" + _encode_utf16_ordered(item)
            for key, item in members
        )
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_encode_utf16_ordered(item) for item in value) + "]"
    return _ENCODER.encode(value)
