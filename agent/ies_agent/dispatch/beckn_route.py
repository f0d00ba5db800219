"""Beckn ``DemandFlexNeed`` messages over MQTT, into the running dispatch engine.

An issuer (or its Beckn adapter) publishes on ``{prefix}/{gw}/cmd/beckn`` (the
command name is ``[dispatch.beckn] command``) a JSON object::

    {"authorization": "Signature keyId=\\"discom.example|k1|ed25519\\",...",
     "body": "<the exact Beckn confirm/update request body, as a string>"}

The body's UTF-8 bytes are what the signature covers, so the issuer sends them as a
string rather than as nested JSON that a broker or bridge might re-serialise. The
route checks the signature with keys pinned in the dispatch trust store only
(:func:`~ies_agent.dispatch.beckn_flex.pinned_lookup`), within
:data:`~ies_agent.upstream.beckn.DEFAULT_SKEW_S` of clock skew and never after its
``expires``; reads the need (:func:`~ies_agent.dispatch.beckn_flex.read_need`) and
submits the event to the engine. A message refused before it becomes an event
(malformed, unsigned, wrong signature, key not pinned, expired) is logged and recorded
as a ``dispatch_received`` event with ``accepted: false`` and the reason, like the
engine's own refusals, and a ``rejected`` notice goes out.

Everything back to the issuer goes on ``{prefix}/{gw}/dispatch/ack`` of every MQTT
upstream, as JSON with ``"channel": "beckn"``:

- the engine's acknowledgements (``received``, ``accepted``, ``rejected`` with the
  reason, ``started``, ``ended`` ...), as for MQTT dispatch events;
- once the engine has decided, the answer: ``"status": "on_confirm"`` (or
  ``on_update``) with ``authorization`` and ``body`` in the same form as the request.
  ``body`` is the Beckn ``on_confirm``/``on_update`` holding the commitment
  (:func:`~ies_agent.dispatch.beckn_flex.commitment`: offered capacity per interval on
  the need's grid, ``ACCEPTED`` or ``REJECTED`` with the reason). It is signed with the
  gateway's Beckn key when an ``ies-https`` upstream in ``direct`` mode holds one
  (:func:`gateway_signer`); otherwise ``authorization`` is ``null`` and ``note`` says
  why. The answer is recorded as a ``dispatch_ack`` event too.

Errors: none of its own; it turns
:class:`~ies_agent.dispatch.errors.AuthenticationError` and
:class:`~ies_agent.dispatch.errors.EventFormatError` into recorded refusals.
:func:`gateway_signer` raises :class:`~ies_agent.upstream.errors.AuthError` for a
signing key file it cannot use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ies_agent.dispatch.beckn_flex import commitment, pinned_lookup, read_need
from ies_agent.dispatch.engine import AckSink, DispatchEngine
from ies_agent.dispatch.errors import AuthenticationError, EventFormatError
from ies_agent.dispatch.model import DispatchEvent
from ies_agent.dispatch.planner import offered_kw
from ies_agent.upstream.beckn import BecknSigner, load_signing_key
from ies_agent.upstream.settings import UpstreamConfig

log = logging.getLogger(__name__)

BECKN_COMMAND = "beckn"
"""The default MQTT command name: ``{prefix}/{gw}/cmd/beckn``."""
SOURCE = "beckn"
"""The engine source (and ``channel``) of Beckn events."""
ANSWER_TTL_S = 300
"""How long (s) the signature of an answer stays valid (its ``expires``)."""
UNSIGNED_NOTE = (
    "unsigned: no ies-https upstream in direct mode holds a Beckn signing key"
)


def gateway_signer(upstreams: Sequence[UpstreamConfig]) -> BecknSigner | None:
    """The gateway's Beckn signer: that of the first ``ies-https`` upstream in
    ``direct`` mode with a signing key (enabled ones first), or ``None``.

    Raises :class:`~ies_agent.upstream.errors.AuthError` naming a key file that
    cannot be read or is not an Ed25519 key.
    """
    candidates = [
        u
        for u in upstreams
        if u.kind == "ies-https"
        and u.mode == "direct"
        and u.signing_key_file is not None
        and u.subscriber_id
        and u.key_id
    ]
    candidates.sort(key=lambda u: not u.enabled)
    if not candidates:
        return None
    chosen = candidates[0]
    assert chosen.signing_key_file and chosen.subscriber_id and chosen.key_id
    return BecknSigner(
        chosen.subscriber_id, chosen.key_id, load_signing_key(chosen.signing_key_file)
    )


class BecknRoute:
    """Takes Beckn needs from the MQTT command topic to ``engine``; answers them.

    ``transports`` are the MQTT upstream transports (each with
    ``publish_dispatch_ack``); ``signer`` signs answers as the gateway (``None``:
    answers go unsigned, with a note).
    """

    def __init__(
        self,
        engine: DispatchEngine,
        *,
        transports: Sequence[Any],
        gateway_id: str,
        signer: BecknSigner | None = None,
    ) -> None:
        self.engine = engine
        self.transports = list(transports)
        self.gateway_id = gateway_id
        self.signer = signer
        self._rejections: dict[str, str] = {}

    def register(self) -> None:
        """Route the engine's acknowledgements of Beckn events to the ack topic."""
        self.engine.register_source(SOURCE, self.ack_sink())

    def ack_sink(self) -> AckSink:
        """The engine's sink for Beckn events: publish, and keep a rejection's
        reason for the commitment answer."""

        async def send(event: DispatchEvent, fields: dict[str, Any]) -> bool:
            if fields.get("status") == "rejected":
                self._rejections[_key(event)] = str(fields.get("reason", ""))
            return await self._publish(
                {**fields, "gw": self.gateway_id, "issuer": event.issuer}
            )

        return send

    async def handle(self, name: str, payload: bytes) -> None:
        """A command handler (``CommandRegistry.register(name, route.handle)``):
        verify, submit and answer one Beckn message; refusals are recorded."""
        try:
            header, body = _unwrap(payload)
        except EventFormatError as exc:
            await self._refuse("format", str(exc))
            return
        trust = self.engine.trust
        if trust is None:
            await self._refuse("auth", "no trust store: pin the issuers' Beckn keys")
            return
        now = self.engine.clock().timestamp()
        try:
            event, context = read_need(
                {"Authorization": header}, body, pinned_lookup(trust), now=now
            )
        except AuthenticationError as exc:
            await self._refuse("auth", str(exc))
            return
        except EventFormatError as exc:
            await self._refuse("format", str(exc))
            return

        # The engine decides (and acknowledges received / accepted / rejected).
        self._rejections.pop(_key(event), None)
        decision = await self.engine.submit(event)
        accepted = decision is not None and decision.accepted
        if accepted:
            assert decision is not None
            offered = [
                offered_kw(decision.plan, self.engine.devices, i)
                for i in range(len(event.intervals))
            ]
        else:
            offered = [Decimal(0)] * len(event.intervals)
        reason = "" if accepted else self._rejections.pop(_key(event), "refused")

        # The answer, on the need's own grid, signed as the gateway when possible.
        bpp_id = self.signer.subscriber_id if self.signer else self.gateway_id
        answer = commitment(
            event, context, offered, accepted=accepted, reason=reason, bpp_id=bpp_id
        )
        await self._answer(event, answer, accepted, int(now))

    async def _answer(
        self, event: DispatchEvent, answer: dict[str, Any], accepted: bool, now: int
    ) -> None:
        action = str(answer["context"]["action"])
        text = json.dumps(answer, separators=(",", ":"))
        message: dict[str, Any] = {
            "channel": SOURCE,
            "status": action,
            "event": event.event_id,
            "modification": event.modification,
            "accepted": accepted,
            "gw": self.gateway_id,
            "issuer": event.issuer,
            "body": text,
        }
        if self.signer is not None:
            message["authorization"] = self.signer.authorization(
                text.encode("utf-8"), created=now, expires=now + ANSWER_TTL_S
            )
        else:
            message["authorization"] = None
            message["note"] = UNSIGNED_NOTE
        delivered = await self._publish(message)
        self.engine.evidence.append_event(
            "dispatch_ack",
            {
                "event": event.event_id,
                "modification": event.modification,
                "status": action,
                "channel": SOURCE,
                "accepted": accepted,
                "signed": self.signer is not None,
                "delivered": delivered,
            },
        )

    async def _refuse(self, reason: str, detail: str) -> None:
        log.warning(
            "dispatch message refused",
            extra={"kv": {"source": SOURCE, "reason": reason, "error": detail}},
        )
        self.engine.evidence.append_event(
            "dispatch_received",
            {"source": SOURCE, "accepted": False, "reason": reason,
             "error": detail[:500]},
        )  # fmt: skip
        await self._publish(
            {
                "channel": SOURCE,
                "status": "rejected",
                "reason": f"{reason}: {detail}"[:300],
                "gw": self.gateway_id,
            }
        )

    async def _publish(self, body: dict[str, Any]) -> bool:
        delivered = False
        for transport in self.transports:
            publish = getattr(transport, "publish_dispatch_ack", None)
            if publish is not None and await publish(body):
                delivered = True
        return delivered


def _key(event: DispatchEvent) -> str:
    return f"{event.issuer}/{event.event_id}/{event.modification}"


def _unwrap(payload: bytes) -> tuple[str, bytes]:
    """``(authorization, body bytes)`` of a ``cmd/beckn`` payload; raise
    :class:`EventFormatError` saying what is wrong."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EventFormatError(f"cmd/beckn payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventFormatError(
            'cmd/beckn payload must be {"authorization": "...", "body": "..."}'
        )
    header, body = data.get("authorization"), data.get("body")
    if not isinstance(header, str) or not header:
        raise EventFormatError(
            "cmd/beckn payload lacks authorization (the Beckn Authorization header)"
        )
    if not isinstance(body, str):
        raise EventFormatError(
            "cmd/beckn payload: body must be the exact request body as a string"
        )
    return header, body.encode("utf-8")
