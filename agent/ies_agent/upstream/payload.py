"""The messages upstream connectors send and receive, as bytes in and objects out.

**Evidence batch** (MQTT topic ``{prefix}/{gateway}/evidence``, file upstream batch
files, the ``evidence`` part of IES requests): one JSON object, keys sorted::

    {"checkpoints": [{"note": "<signed note>", "size": 1042}],
     "entries": [<entry seq 1000>, ..., <entry seq 1041>],
     "first": 1000, "gw": "gw-0001", "kind": "evidence", "last": 1041,
     "origin": "ies-agent/gw-0001/log-1", "v": 1}

``entries`` holds the entries as JSON objects (each with its ``seq``), contiguous
from ``first`` to ``last``; it may be empty (``last`` is then ``first - 1``) when a
message carries only checkpoints. The encoder splices the log lines in unchanged, so
the message text contains every line's bytes; a receiver that parses the message
gets objects and recovers the exact lines by canonical re-encoding (RFC 8785 for
this subset: sorted keys, no whitespace, UTF-8 unescaped), as :func:`decode_batch`
does. ``checkpoints`` are lines of
``checkpoints.jsonl`` not yet delivered, sent as soon as they are made; a checkpoint
may arrive before the entries it covers. Re-sent batches after an outage repeat
entries; a collector keeps one copy per ``seq``.

**End-to-end confirmation** (``{prefix}/{gateway}/ack``, from a collector):
``{"upto": N}`` — the collector holds every ``seq`` from 0 to ``N``.

Parsers raise :class:`PayloadError` with what was wrong; they never return a partly
checked batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from ies_agent.evidence.canonical import canonical_bytes
from ies_agent.evidence.errors import EvidenceFormatError
from ies_agent.upstream.errors import UpstreamError

PAYLOAD_VERSION = 1


class PayloadError(UpstreamError):
    """A received message is not a valid evidence batch or confirmation."""


@dataclass(frozen=True)
class EvidenceBatch:
    """A decoded evidence batch: entry lines ``first..last`` and checkpoints."""

    gw: str
    origin: str
    first: int
    entries: tuple[bytes, ...]
    checkpoints: tuple[tuple[int, str], ...]

    @property
    def last(self) -> int:
        """``seq`` of the last entry (``first - 1`` when there are none)."""
        return self.first + len(self.entries) - 1


def encode_batch(
    *,
    gw: str,
    origin: str,
    first: int,
    lines: Sequence[bytes],
    checkpoints: Sequence[tuple[int, str]],
) -> bytes:
    """Return the evidence batch message for ``lines`` (entries ``first``...).

    The entry lines are placed in the message as they are, without re-encoding, so
    the cost is one join; the whole message is canonical JSON when the lines are.
    """
    return _encode(gw, origin, first, len(lines), b",".join(lines), checkpoints)


def encode_block(
    *,
    gw: str,
    origin: str,
    first: int,
    block: bytes,
    count: int,
    checkpoints: Sequence[tuple[int, str]],
) -> bytes:
    """Like :func:`encode_batch` for ``count`` lines as on disk (newline-ended).

    Turning the block's newlines into commas is one pass in C: canonical JSON never
    holds a raw newline (it is escaped inside strings).
    """
    joined = block[:-1].replace(b"\n", b",") if block else b""
    return _encode(gw, origin, first, count, joined, checkpoints)


def _encode(
    gw: str,
    origin: str,
    first: int,
    count: int,
    joined: bytes,
    checkpoints: Sequence[tuple[int, str]],
) -> bytes:
    cps = canonical_bytes(
        {"cp": [{"note": note, "size": size} for size, note in checkpoints]}
    )[6:-1]
    tail = canonical_bytes(
        {
            "first": first,
            "gw": gw,
            "kind": "evidence",
            "last": first + count - 1,
            "origin": origin,
            "v": PAYLOAD_VERSION,
        }
    )[1:]
    return b"".join((b'{"checkpoints":', cps, b',"entries":[', joined, b"],", tail))


def decode_batch(payload: bytes) -> EvidenceBatch:
    """Parse an evidence batch and return it with entries as canonical lines.

    Checks the layout, that every entry is canonical-JSON-encodable and that the
    entries carry ``first``, ``first + 1``, ... ``last``. Raises
    :class:`PayloadError` otherwise.
    """
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise PayloadError(f"evidence batch is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "evidence":
        raise PayloadError('not an evidence batch (no "kind": "evidence")')
    if data.get("v") != PAYLOAD_VERSION:
        raise PayloadError(f"evidence batch version {data.get('v')!r} is not 1")
    first, last = data.get("first"), data.get("last")
    entries, checkpoints = data.get("entries"), data.get("checkpoints")
    gw, origin = data.get("gw"), data.get("origin")
    if not (_is_int(first) and _is_int(last) and isinstance(entries, list)):
        raise PayloadError("evidence batch needs integer first/last and entries[]")
    if not isinstance(gw, str) or not isinstance(origin, str):
        raise PayloadError("evidence batch needs gw and origin strings")
    if last - first + 1 != len(entries):
        raise PayloadError(
            f"evidence batch says {first}..{last} but holds {len(entries)} entries"
        )
    lines = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("seq") != first + index:
            raise PayloadError(
                f"evidence batch entry {index} does not carry seq {first + index}"
            )
        try:
            lines.append(canonical_bytes(entry))
        except EvidenceFormatError as exc:
            raise PayloadError(f"evidence batch entry {first + index}: {exc}") from None
    cps = []
    for item in checkpoints if isinstance(checkpoints, list) else [None]:
        if (
            not isinstance(item, dict)
            or not _is_int(item.get("size"))
            or not isinstance(item.get("note"), str)
        ):
            raise PayloadError("evidence batch checkpoints must be {size, note}")
        cps.append((int(item["size"]), str(item["note"])))
    return EvidenceBatch(gw, origin, first, tuple(lines), tuple(cps))


def encode_confirmation(upto: int) -> bytes:
    """Return the end-to-end confirmation message for entries ``0..upto``."""
    return canonical_bytes({"upto": upto})


def decode_confirmation(payload: bytes) -> int:
    """Return ``N`` of a confirmation ``{"upto": N}``; raise :class:`PayloadError`."""
    try:
        data: Any = json.loads(payload)
    except ValueError as exc:
        raise PayloadError(f"confirmation is not JSON: {exc}") from None
    upto = data.get("upto") if isinstance(data, dict) else None
    if not _is_int(upto) or upto < -1:
        raise PayloadError('confirmation must be {"upto": <seq>}')
    return int(upto)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
