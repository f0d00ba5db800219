"""Commands that arrive from upstream (MQTT ``{prefix}/{gateway}/cmd/<name>``).

The MQTT connector hands every inbound command to a :class:`CommandRegistry`. A
feature that acts on commands (dispatch, later) registers a handler for its name;
until then every command is logged and recorded in the evidence log as a
``command_received`` event (name, size and SHA-256 of the payload, never the payload,
which may hold secrets), so what the gateway was told is on record.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, bytes], Awaitable[None] | None]
"""``handler(name, payload)``; may be a coroutine function."""
EventRecorder = Callable[[str, dict[str, object]], None]
"""Appends an evidence event (``kind``, fields); the log's ``append_event``."""

MAX_COMMAND_BYTES = 64 * 1024


class CommandRegistry:
    """Maps command names to handlers; owned by one agent run, never module-global."""

    def __init__(self, record: EventRecorder | None = None) -> None:
        self._handlers: dict[str, CommandHandler] = {}
        self._record = record

    def register(self, name: str, handler: CommandHandler) -> None:
        """Route commands named ``name`` to ``handler`` (replacing any earlier one)."""
        self._handlers[name] = handler

    def unregister(self, name: str) -> None:
        """Stop routing ``name``; unknown names are ignored."""
        self._handlers.pop(name, None)

    async def dispatch(self, name: str, payload: bytes, *, upstream: str) -> None:
        """Record the command, then call its handler if one is registered.

        A handler's exception is logged with the command's name and does not stop
        the connector. Payloads above ``MAX_COMMAND_BYTES`` are recorded and refused.
        """
        fields: dict[str, object] = {
            "upstream": upstream,
            "name": name,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        handler = self._handlers.get(name)
        fields["handled"] = handler is not None and len(payload) <= MAX_COMMAND_BYTES
        if self._record is not None:
            try:
                self._record("command_received", fields)
            except Exception:
                log.exception("cannot record an inbound command in the evidence log")
        log.info("command received", extra={"kv": fields})
        if handler is None or len(payload) > MAX_COMMAND_BYTES:
            return
        try:
            result = handler(name, payload)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("command handler failed", extra={"kv": {"name": name}})
