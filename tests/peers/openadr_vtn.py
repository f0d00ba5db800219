"""A real OpenADR 2.0b VTN: openleadr's ``OpenADRServer`` on a free loopback port.

It registers any VEN that asks (ven id ``ven-<name>``), queues events with
:meth:`Vtn.add_capacity_event` and keeps each VEN's opt answer in ``answers``. No TLS
and no XML signatures on loopback: the test says so where it matters.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from openleadr import OpenADRServer


class Vtn:
    """openleadr's VTN, started and stopped by its owner."""

    def __init__(self, port: int, vtn_id: str = "vtn-test") -> None:
        self.port = port
        self.answers: dict[str, str] = {}
        self.server = OpenADRServer(
            vtn_id=vtn_id,
            http_port=port,
            http_host="127.0.0.1",
            requested_poll_freq=timedelta(seconds=0.3),
            verify_message_signatures=False,
            show_server_cert_domain=False,
        )
        self.server.add_handler("on_create_party_registration", self._register)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/OpenADR2/Simple/2.0b"

    async def _register(self, payload: dict[str, Any]) -> tuple[str, str]:
        name = payload["ven_name"]
        return f"ven-{name}", f"reg-{name}"

    def add_capacity_event(
        self, ven_id: str, event_id: str, start: datetime, fractions: list[float],
        interval: timedelta,
    ) -> None:  # fmt: skip
        """Queue a LOAD_CONTROL x-loadControlCapacity event with one interval per
        fraction of rated power."""

        async def answered(ven_id: str, event_id: str, opt_type: str) -> None:
            self.answers[event_id] = opt_type

        self.server.add_event(
            ven_id=ven_id,
            signal_name="LOAD_CONTROL",
            signal_type="x-loadControlCapacity",
            intervals=[
                {
                    "dtstart": start + interval * i,
                    "duration": interval,
                    "signal_payload": value,
                }
                for i, value in enumerate(fractions)
            ],
            callback=answered,
            event_id=event_id,
        )

    async def start(self) -> None:
        await self.server.run()

    async def stop(self) -> None:
        await self.server.stop()
