"""OpenADR 2.0b: the agent as a VEN on the ``openleadr`` library (Apache-2.0).

The VEN polls the VTN; each ``oadrEvent`` becomes a
:class:`~ies_agent.dispatch.model.DispatchEvent` and goes through the engine like any
other source. The engine's decision is the opt answer the VEN sends back in
``oadrCreatedEvent`` (``optIn`` / ``optOut``): that is the acknowledgement on
OpenADR's own channel.

Signals read (one interval of the event per signal interval):

- ``LOAD_CONTROL`` / ``x-loadControlCapacity``: the fraction (0-1) of rated power
  allowed, read as ``limit_pct`` = fraction x 100;
- ``SIMPLE`` / ``level``: levels 1, 2, 3 mapped through ``simple_levels`` (percent
  limits, a site setting; level 0 means no limit).

Authentication is the channel's: the VTN is named in the site's ``[dispatch.openadr]``
(URL, expected VTN fingerprint and the VEN's client certificate for TLS and XML
signatures). openleadr hands payloads over as floats; they are turned into exact
decimals here, at the boundary, rounded to 0.01 percent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ies_agent.dispatch.engine import DispatchEngine
from ies_agent.dispatch.errors import EventFormatError
from ies_agent.dispatch.model import FORMAT, format_utc, parse_event

log = logging.getLogger(__name__)

DEFAULT_SIMPLE_LEVELS = {1: "75", 2: "50", 3: "25"}


def event_document(
    oadr_event: Mapping[str, Any],
    *,
    issuer: str,
    targets: tuple[str, ...],
    simple_levels: Mapping[int, str] = DEFAULT_SIMPLE_LEVELS,
) -> dict[str, Any]:
    """Turn openleadr's event dict into a dispatch document (``ies-dispatch/1``).

    Raises :class:`EventFormatError` for an event without a usable signal or with
    intervals of different lengths.
    """
    descriptor = oadr_event.get("event_descriptor") or {}
    signals = oadr_event.get("event_signals") or []
    signal = next(
        (
            s
            for s in signals
            if (s.get("signal_name"), s.get("signal_type"))
            in (("LOAD_CONTROL", "x-loadControlCapacity"), ("SIMPLE", "level"))
            or (str(s.get("signal_name")).upper(), s.get("signal_type"))
            == ("SIMPLE", "level")
        ),
        None,
    )
    if signal is None:
        raise EventFormatError(
            "OpenADR event carries no LOAD_CONTROL capacity or SIMPLE level signal"
        )
    intervals = signal.get("intervals") or []
    if not intervals:
        raise EventFormatError("OpenADR signal without intervals")
    durations = {_seconds(i.get("duration")) for i in intervals}
    if len(durations) != 1:
        raise EventFormatError("OpenADR intervals of different lengths")
    interval_s = durations.pop()
    active = oadr_event.get("active_period") or {}
    start = intervals[0].get("dtstart") or active.get("dtstart")
    if not isinstance(start, datetime):
        raise EventFormatError("OpenADR event without a start time")
    targets_out: list[dict[str, str]] = []
    for interval in intervals:
        value = Decimal(repr(float(interval.get("signal_payload", 0))))
        if signal.get("signal_type") == "level":
            level = int(value)
            pct = simple_levels.get(level, "100") if level else "100"
        else:
            pct = format((value * 100).quantize(Decimal("0.01")).normalize(), "f")
        targets_out.append({"limit_pct": pct})
    return {
        "format": FORMAT,
        "id": str(descriptor.get("event_id")),
        "issuer": issuer,
        "modification": int(descriptor.get("modification_number") or 0),
        "created": format_utc(datetime.now(UTC)),
        "start": format_utc(start),
        "interval_s": interval_s,
        "intervals": targets_out,
        "targets": list(targets),
    }


def _seconds(value: object) -> int:
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    raise EventFormatError(f"OpenADR interval duration {value!r} is not a duration")


class OpenAdrVen:
    """An openleadr VEN feeding ``engine``; start with :meth:`start`."""

    def __init__(
        self,
        engine: DispatchEngine,
        *,
        vtn_url: str,
        ven_name: str,
        issuer: str,
        targets: tuple[str, ...],
        cert: str | None = None,
        key: str | None = None,
        vtn_fingerprint: str | None = None,
        simple_levels: Mapping[int, str] = DEFAULT_SIMPLE_LEVELS,
    ) -> None:
        from openleadr import OpenADRClient

        self.engine = engine
        self.issuer = issuer
        self.targets = targets
        self.simple_levels = dict(simple_levels)
        signed = cert is not None and key is not None
        self.client = OpenADRClient(
            ven_name=ven_name,
            vtn_url=vtn_url,
            cert=cert,
            key=key,
            vtn_fingerprint=vtn_fingerprint,
            show_fingerprint=False,
            allow_jitter=False,
            disable_signature=not signed,
        )
        self.client.add_handler("on_event", self.on_event)
        self.client.add_handler("on_update_event", self.on_event)
        engine.register_source("openadr", None)

    async def on_event(self, oadr_event: dict[str, Any]) -> str:
        """openleadr's handler: decide and answer ``optIn`` or ``optOut``."""
        self.engine.issuer_seen(self.issuer)
        try:
            doc = event_document(
                oadr_event,
                issuer=self.issuer,
                targets=self.targets,
                simple_levels=self.simple_levels,
            )
            event = parse_event(doc, source="openadr", signed_by="channel:openadr")
        except (EventFormatError, ValueError, TypeError) as exc:
            self.engine.evidence.append_event(
                "dispatch_received",
                {"source": "openadr", "accepted": False, "reason": "format",
                 "error": str(exc)[:300]},
            )  # fmt: skip
            return "optOut"
        decision = await self.engine.submit(event)
        return "optIn" if decision is not None and decision.accepted else "optOut"

    async def start(self) -> None:
        """Register with the VTN and start polling (openleadr's own scheduler)."""
        await self.client.run()

    async def stop(self) -> None:
        """Stop polling."""
        await self.client.stop()
