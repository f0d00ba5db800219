"""IES / DEG demand flexibility: a ``DemandFlexNeed`` in a Beckn ``confirm``/``update``.

The need is a time series on a regular grid (its interval period) with payload
descriptors; the agent reads it into a :class:`~ies_agent.dispatch.model.
DispatchEvent` and answers ``on_confirm``/``on_update`` with the commitment the site
can offer on the same grid. Shape read (inside ``message.order``)::

    "demandFlexNeed": {
      "id": "dfn-77",
      "intervalPeriod": {"start": "2025-06-01T10:00:00Z", "duration": "PT15M"},
      "payloadDescriptors": [{"payloadType": "REQUESTED_CAPACITY", "units": "KW"},
                             {"payloadType": "PRICE", "currency": "INR"}],
      "intervals": [{"id": 0, "payloads": [{"type": "REQUESTED_CAPACITY",
                                            "values": ["1.5"]},
                                           {"type": "PRICE", "values": ["6.00"]}]}],
      "targets": ["group:chargers"]
    }

``REQUESTED_CAPACITY`` (kW) becomes ``capacity_kw``, ``LIMIT_PCT`` becomes
``limit_pct``, ``CHARGE_LIMIT_A`` becomes ``charge_a``; ``PRICE`` and ``PENALTY`` (the
first interval's value) are kept. The issuer is the Beckn ``bap_id`` and the message is
authentic only when its ``Authorization`` header verifies
(:func:`ies_agent.upstream.beckn.verify_authorization`) with a key pinned for that
subscriber; ``context.message_id`` is the event's modification source (``update``
messages raise the modification number).

Errors: :class:`~ies_agent.dispatch.errors.EventFormatError` and
:class:`~ies_agent.dispatch.errors.AuthenticationError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ies_agent.dispatch.errors import AuthenticationError, EventFormatError
from ies_agent.dispatch.model import (
    FORMAT,
    DispatchEvent,
    format_utc,
    parse_decimal,
    parse_event,
)
from ies_agent.signing.manifest import TrustStore
from ies_agent.upstream.beckn import KeyLookup, verify_authorization
from ies_agent.upstream.errors import SignatureError

_DURATION = re.compile(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?")
_TARGET_OF = {
    "REQUESTED_CAPACITY": "capacity_kw",
    "LIMIT_PCT": "limit_pct",
    "CHARGE_LIMIT_A": "charge_a",
}


def parse_duration_s(text: object) -> int:
    """Seconds of an ISO 8601 ``PT..H..M..S`` duration; raise EventFormatError."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise EventFormatError(
            f"intervalPeriod.duration: {text!r} is not a duration such as PT15M"
        )
    h, m, s = (int(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


def read_need(
    headers: Mapping[str, str],
    body: bytes,
    lookup: KeyLookup,
    *,
    now: float,
    default_targets: tuple[str, ...] = (),
) -> tuple[DispatchEvent, dict[str, Any]]:
    """Verify a Beckn ``confirm``/``update`` and return its event and context.

    ``now`` is Unix time (seconds). Raises :class:`AuthenticationError` when the
    signature is missing or fails, :class:`EventFormatError` when the message holds
    no readable ``DemandFlexNeed``.
    """
    header = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    if not header:
        raise AuthenticationError("Beckn message without an Authorization header")
    try:
        params = verify_authorization(header, body, lookup, now=now)
    except SignatureError as exc:
        raise AuthenticationError(f"Beckn signature: {exc}") from None
    try:
        message = json.loads(body.decode("utf-8"), parse_float=str)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EventFormatError(f"Beckn message is not JSON: {exc}") from None
    context = message.get("context") if isinstance(message, dict) else None
    if not isinstance(context, dict) or context.get("action") not in (
        "confirm",
        "update",
    ):
        raise EventFormatError("Beckn context.action must be confirm or update")
    if context.get("bap_id") != params.subscriber_id:
        raise AuthenticationError(
            f"signed by {params.subscriber_id}, but context.bap_id is "
            f"{context.get('bap_id')!r}"
        )
    order = (message.get("message") or {}).get("order") or {}
    need = order.get("demandFlexNeed") if isinstance(order, dict) else None
    if not isinstance(need, dict):
        raise EventFormatError("message.order.demandFlexNeed is missing")
    period = need.get("intervalPeriod") or {}
    interval_s = parse_duration_s(period.get("duration"))
    intervals = []
    price = penalty = None
    for index, item in enumerate(need.get("intervals") or []):
        target: dict[str, str] = {}
        for payload in item.get("payloads", []) if isinstance(item, dict) else []:
            kind = payload.get("type")
            values = payload.get("values") or []
            if not values:
                continue
            where = f"intervals[{index}].{kind}"
            value = parse_decimal(values[0], where)
            if kind in _TARGET_OF:
                target[_TARGET_OF[kind]] = str(value)
            elif kind == "PRICE" and price is None:
                price = value
            elif kind == "PENALTY" and penalty is None:
                penalty = value
        if not target:
            raise EventFormatError(f"demandFlexNeed.intervals[{index}]: no target")
        intervals.append(target)
    currency = next(
        (
            d.get("currency")
            for d in need.get("payloadDescriptors", [])
            if isinstance(d, dict) and d.get("currency")
        ),
        None,
    )
    doc: dict[str, Any] = {
        "format": FORMAT,
        "id": need.get("id"),
        "issuer": params.subscriber_id,
        "modification": _modification(context, order),
        "start": period.get("start"),
        "interval_s": interval_s,
        "intervals": intervals,
        "targets": need.get("targets") or list(default_targets),
    }
    if price is not None:
        doc["price"] = str(price)
    if penalty is not None:
        doc["penalty"] = str(penalty)
    if isinstance(currency, str):
        doc["currency"] = currency
    event = parse_event(doc, source="beckn", signed_by=params.key_id)
    return event, context


def _modification(context: Mapping[str, Any], order: Mapping[str, Any]) -> int:
    revision = order.get("revision", 1 if context.get("action") == "update" else 0)
    return revision if isinstance(revision, int) and revision >= 0 else 0


def commitment(
    event: DispatchEvent,
    context: Mapping[str, Any],
    offered_kw: list[Decimal],
    *,
    accepted: bool,
    reason: str = "",
    bpp_id: str,
) -> dict[str, Any]:
    """The ``on_confirm``/``on_update`` body: what the site commits per interval."""
    reply_context = dict(context)
    reply_context["action"] = "on_" + str(context.get("action", "confirm"))
    reply_context["bpp_id"] = bpp_id
    commitment_body: dict[str, Any] = {
        "needId": event.event_id,
        "status": "ACCEPTED" if accepted else "REJECTED",
        "intervalPeriod": {
            "start": format_utc(event.start),
            "duration": f"PT{event.interval_s}S",
        },
        "payloadDescriptors": [{"payloadType": "OFFERED_CAPACITY", "units": "KW"}],
        "intervals": [
            {"id": i, "payloads": [{"type": "OFFERED_CAPACITY", "values": [str(v)]}]}
            for i, v in enumerate(offered_kw)
        ],
    }
    if reason:
        commitment_body["reason"] = reason
    return {
        "context": reply_context,
        "message": {"order": {"demandFlexCommitment": commitment_body}},
    }


def pinned_lookup(trust: TrustStore) -> KeyLookup:
    """A Beckn key lookup over the site's pinned keys.

    A pinned Ed25519 key answers for ``subscriber_id|unique_key_id`` when its file is
    named ``<subscriber_id>.<unique_key_id>.pem`` or its key id (SHA-256 hex of the
    SPKI DER) is the ``unique_key_id``. No registry is asked: only pinned issuers pass.
    """

    def lookup(subscriber_id: str, unique_key_id: str) -> Ed25519PublicKey | None:
        for key in trust.keys.values():
            named = key.path.name == f"{subscriber_id}.{unique_key_id}.pem"
            if (named or key.key_id == unique_key_id) and isinstance(
                key.public_key, Ed25519PublicKey
            ):
                return key.public_key
        return None

    return lookup
