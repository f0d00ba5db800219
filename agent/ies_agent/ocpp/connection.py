"""One OCPP-J RPC endpoint over a WebSocket: calls both ways at the same time.

OCPP-J lets each side have one CALL of its own outstanding while it answers the
other's. A reader that handles one message at a time deadlocks a bridge: the charger's
StartTransaction waits for the CSMS while the CSMS's RemoteStart waits for the
charger. :class:`RpcConnection` therefore reads continuously and runs every incoming
CALL in its own task (at most a few at once), while :meth:`RpcConnection.call` sends
its own CALLs one at a time and matches answers by message id.

Guarantees:

- every call has a timeout (:class:`CallTimeout`), and a CALLERROR answer raises
  :class:`CallRejected`; ``call()`` never returns ``None`` for a failure;
- a frame that cannot be used is answered with a CALLERROR when it was a CALL, logged
  otherwise, and never closes the connection;
- a handler that raises anything but :class:`Reject` gives the peer an
  ``InternalError`` CALLERROR and keeps the connection up;
- our frames always carry string ids and three-element CALLRESULTs.

Errors::

    OcppLinkError        base
    ├── CallTimeout      no answer within the call's timeout
    ├── CallRejected     the peer answered with a CALLERROR (code, description,
    │                    details as sent)
    └── LinkClosed       the connection closed before the answer came
    Reject               raised BY a handler to answer a CALL with a CALLERROR
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from ies_drivers.ocpp.rpc import (
    Call,
    CallError,
    CallResult,
    EncodeError,
    ErrorCode,
    FrameError,
    FrameQuirks,
    call_error,
    new_message_id,
    parse_frame,
    serialise,
)
from ies_drivers.ocpp.versions import OcppVersion

log = logging.getLogger(__name__)

MAX_CONCURRENT_CALLS = 4
"""Incoming CALLs handled at once per connection; OCPP peers send one at a time."""
MAX_QUEUED_CALLS = 16
"""Incoming CALLs waiting or running per connection; beyond it the connection stops
reading until one is answered (TCP back-pressure), so a peer that floods cannot make
the agent's memory grow, and nothing it sent is refused for being early."""


class OcppLinkError(Exception):
    """Base of the errors of a call over an OCPP-J connection."""


class CallTimeout(OcppLinkError):
    """The peer did not answer a call within its timeout."""


class LinkClosed(OcppLinkError):
    """The connection closed before the answer arrived (or before sending)."""


class CallRejected(OcppLinkError):
    """The peer answered with a CALLERROR; ``code``, ``description``, ``details``."""

    def __init__(self, action: str, error: CallError) -> None:
        self.code = error.code
        self.description = error.description
        self.details = error.details
        super().__init__(f"{action} rejected: {error.code} {error.description}".strip())


class Reject(Exception):
    """Raised by a CALL handler: answer with a CALLERROR of ``code``."""

    def __init__(
        self,
        code: ErrorCode,
        description: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.code = code
        self.description = description
        self.details = dict(details or {})
        super().__init__(f"{code.value}: {description}")


CallHandler = Callable[[Call], Awaitable[dict[str, Any]]]
"""Answers one incoming CALL with its CALLRESULT payload, or raises :class:`Reject`."""
WarningHandler = Callable[[str], None]


class RpcConnection:
    """Both directions of OCPP-J RPC over one WebSocket connection.

    ``name`` labels log lines (``CP-1 charger`` / ``CP-1 csms``). ``handler`` answers
    the peer's CALLs; ``on_warning`` hears every tolerated frame deviation. Start it
    with :meth:`run` (returns when the connection closes).
    """

    def __init__(
        self,
        websocket: Connection,
        *,
        version: OcppVersion,
        name: str,
        handler: CallHandler,
        call_timeout_s: float = 30.0,
        quirks: FrameQuirks | None = None,
        on_warning: WarningHandler | None = None,
    ) -> None:
        self.websocket = websocket
        self.version = version
        self.name = name
        self.call_timeout_s = call_timeout_s
        self._handler = handler
        self._quirks = quirks or FrameQuirks()
        self._on_warning = on_warning
        self._pending: dict[
            str, tuple[str, asyncio.Future[CallResult | CallError]]
        ] = {}
        self._call_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._warned: set[str] = set()
        self._task_done = asyncio.Event()
        self.frames_in = 0
        self.frames_out = 0
        self.warnings = 0

    @property
    def closed(self) -> bool:
        """True once the connection has closed."""
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return when the connection has closed."""
        await self._closed.wait()

    async def run(self) -> None:
        """Read and dispatch frames until the connection closes; then clean up.

        Pending calls fail with :class:`LinkClosed`; running handlers are cancelled.
        """
        try:
            while True:
                while len(self._tasks) >= MAX_QUEUED_CALLS:
                    self._task_done.clear()
                    await self._task_done.wait()
                try:
                    text = await self.websocket.recv()
                except ConnectionClosed:
                    break
                self.frames_in += 1
                self._dispatch(text)
        finally:
            self._closed.set()
            for _action, future in self._pending.values():
                if not future.done():
                    future.set_exception(LinkClosed(f"{self.name}: connection closed"))
            self._pending.clear()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket (the :meth:`run` loop then ends)."""
        with contextlib.suppress(Exception):
            await self.websocket.close(code, reason)

    async def call(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        """Send ``action`` and return the peer's CALLRESULT payload.

        Calls go out one at a time (OCPP-J); ``timeout_s`` (default the connection's)
        covers the wait for our turn and for the answer. Raises :class:`CallTimeout`,
        :class:`CallRejected` or :class:`LinkClosed`.
        """
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        unique_id = unique_id or new_message_id()
        try:
            text = serialise(Call(unique_id, action, dict(payload)))
        except EncodeError as exc:
            raise OcppLinkError(f"{self.name}: cannot encode {action}: {exc}") from exc
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                async with self._call_lock:
                    if self.closed:
                        raise LinkClosed(f"{self.name}: connection closed")
                    future: asyncio.Future[CallResult | CallError] = (
                        loop.create_future()
                    )
                    self._pending[unique_id] = (action, future)
                    try:
                        await self._send_text(text)
                        answer = await future
                    finally:
                        self._pending.pop(unique_id, None)
        except TimeoutError:
            raise CallTimeout(
                f"{self.name}: no answer to {action} within {timeout:g} s"
            ) from None
        if isinstance(answer, CallError):
            raise CallRejected(action, answer)
        return answer.payload

    # --- incoming ---------------------------------------------------------------------

    def _dispatch(self, text: str | bytes) -> None:
        try:
            parsed = parse_frame(text, self._quirks)
        except FrameError as exc:
            self._warn(f"unusable frame: {exc}; frame {_clip(text)}")
            if exc.unique_id is not None:
                error = call_error(exc.unique_id, exc.code, str(exc), self.version)
                self._spawn(self._send_message(error), "frame-error")
            return
        for warning in parsed.warnings:
            self._warn(warning)
        message = parsed.message
        if isinstance(message, Call):
            self._spawn(self._answer(message), message.action)
            return
        entry = self._pending.get(message.unique_id)
        if entry is None or entry[1].done():
            self._warn(f"answer to unknown or expired message id {message.unique_id!r}")
            return
        entry[1].set_result(message)

    async def _answer(self, call: Call) -> None:
        async with self._slots:
            try:
                payload = await self._handler(call)
                reply: CallResult | CallError = CallResult(call.unique_id, payload)
            except Reject as exc:
                reply = call_error(
                    call.unique_id, exc.code, exc.description, self.version, exc.details
                )
            except OcppLinkError as exc:
                reply = call_error(
                    call.unique_id, ErrorCode.INTERNAL_ERROR, str(exc), self.version
                )
            except Exception as exc:
                log.exception("%s: handler for %s failed", self.name, call.action)
                reply = call_error(
                    call.unique_id,
                    ErrorCode.INTERNAL_ERROR,
                    f"{type(exc).__name__} while handling {call.action}",
                    self.version,
                )
            await self._send_message(reply)

    async def _send_message(self, message: CallResult | CallError) -> None:
        try:
            text = serialise(message)
        except EncodeError as exc:
            log.error("%s: cannot encode answer: %s", self.name, exc)
            text = serialise(
                call_error(
                    message.unique_id, ErrorCode.INTERNAL_ERROR, str(exc), self.version
                )
            )
        with contextlib.suppress(LinkClosed):
            await self._send_text(text)

    async def _send_text(self, text: str) -> None:
        try:
            await self.websocket.send(text)
        except ConnectionClosed:
            raise LinkClosed(f"{self.name}: connection closed") from None
        self.frames_out += 1

    def _spawn(self, work: Awaitable[None], label: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(f"ocpp:{self.name}:{label}")
        self._tasks.add(task)
        task.add_done_callback(self._task_finished)

    def _task_finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._task_done.set()

    def warn(self, text: str) -> None:
        """Report a deviation of the peer (logged, counted, passed to
        ``on_warning``)."""
        self._warn(text)

    def _warn(self, text: str) -> None:
        """Log a deviation: each kind once per connection at WARNING, then DEBUG."""
        self.warnings += 1
        kind = _SHAPE.sub("", text)[:80]
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        if len(self._warned) < 64:
            self._warned.add(kind)
        log.log(level, "%s: %s", self.name, text)
        if self._on_warning is not None:
            self._on_warning(text)


_SHAPE = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


def _clip(text: str | bytes, limit: int = 200) -> str:
    shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return shown if len(shown) <= limit else shown[:limit] + "…"
