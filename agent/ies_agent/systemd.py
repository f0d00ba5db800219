"""The agent's side of systemd: readiness, status, stopping and a health-gated watchdog.

The unit is ``Type=notify`` with ``WatchdogSec=``. systemd passes the address of its
notification socket in ``$NOTIFY_SOCKET`` (a file path, or ``@name`` for an abstract
socket) and, when the watchdog is on, the deadline in ``$WATCHDOG_USEC`` (µs). We send
datagrams of ``KEY=VALUE`` lines to that socket ourselves (the protocol is a few lines;
no library is needed):

- ``READY=1`` once the buses are started and the evidence log is open,
- ``STATUS=…`` a line ``systemctl status`` shows,
- ``WATCHDOG=1`` every half deadline, but only while every loop the agent registered
  with :class:`Watchdog` has beaten within its own deadline, so a hung bus loop (not
  only a hung process) gets the agent restarted,
- ``STOPPING=1`` when shutting down.

Outside systemd (``ies-agent demo``, tests) ``$NOTIFY_SOCKET`` is unset and
:class:`Notifier` does nothing.

While healthy, the watchdog feeder also rewrites a small health file
(``$RUNTIME_DIRECTORY/health.json``, under systemd ``/run/ies-agent/health.json``):
version, pid and a beat counter. ``ies-agent update apply`` reads it to decide whether
a freshly installed version came up healthy (``ies_agent.selfupdate``).

Errors::

    NotifySocketError   $NOTIFY_SOCKET names no address we can use (logged once by
                        Notifier.from_env, which then stays silent)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ies_agent import __version__

if TYPE_CHECKING:
    from ies_agent.evidence.log import EvidenceLog

log = logging.getLogger(__name__)

HEALTH_FILE = "health.json"
"""Name of the health file in ``$RUNTIME_DIRECTORY``."""
DEFAULT_PET_INTERVAL_S = 10.0
"""How often the health file is rewritten when systemd asks for no watchdog."""


class NotifySocketError(ValueError):
    """Raised when ``$NOTIFY_SOCKET`` holds an address we cannot send to."""


def parse_notify_address(value: str) -> str | bytes:
    """Return the socket address for ``$NOTIFY_SOCKET`` text ``value``.

    An absolute path is a filesystem socket; ``@name`` is an abstract socket (returned
    as bytes with a leading NUL). Raises :class:`NotifySocketError` for anything else
    (a relative path, ``vsock:`` addresses).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise NotifySocketError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor '@abstract'; "
        f"readiness and watchdog notifications are off"
    )


class Notifier:
    """Send ``sd_notify`` messages to systemd; a no-op without ``$NOTIFY_SOCKET``.

    A failed send is logged once (and again after a send succeeded) and never raised:
    the agent keeps reading meters when systemd cannot be told about it.
    """

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Return the notifier for ``$NOTIFY_SOCKET``; off when unset or unusable."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        try:
            return cls(parse_notify_address(value))
        except NotifySocketError as exc:
            log.warning("cannot notify systemd", extra={"kv": {"detail": str(exc)}})
            return cls(None)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; return whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot notify systemd",
                    extra={"kv": {"socket": _shown(self.address), "error": exc}},
                )
            return False
        if self._failing:
            self._failing = False
            log.info("notifying systemd again", extra={"kv": {}})
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), with a status line."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """Set the status line ``systemctl status`` shows."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """Pet the watchdog (``WATCHDOG=1``)."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the agent is shutting down (``STOPPING=1``)."""
        return self.send("STOPPING=1", *_status(status))

    def close(self) -> None:
        """Close the socket (sending again reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.split()),)


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode() if isinstance(address, bytes) else address


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how often to pet systemd's watchdog (half its deadline), in seconds.

    ``None`` when ``$WATCHDOG_USEC`` is unset, not a positive integer, or meant for
    another process (``$WATCHDOG_PID`` is not ours).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    if not usec.isdigit() or int(usec) <= 0:
        return None
    return int(usec) / 2_000_000


@dataclass
class _Loop:
    due: float
    """Monotonic time (s) by which the loop must beat again."""
    beats: int = 0


class Watchdog:
    """Decides whether the agent is healthy enough to pet systemd's watchdog.

    Every long-lived loop beats with :meth:`healthy` once per turn, saying within how
    many seconds its next beat is due (``within_s``; default ``deadline_s``). The
    watchdog is petted only while no registered loop is overdue. :meth:`expect`
    registers a loop before its first beat, so a loop that hangs before it ever beats
    is noticed too. ``interval_s`` is how often :meth:`feed` pets (half of
    systemd's ``WatchdogSec``). Times come from ``clock`` (monotonic seconds).
    """

    def __init__(
        self,
        interval_s: float,
        *,
        deadline_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"watchdog interval must be positive, not {interval_s}")
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self._clock = clock
        self._loops: dict[str, _Loop] = {}
        self._late: tuple[str, ...] = ()
        self.pets = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Watchdog:
        """Return a watchdog petting at half of ``$WATCHDOG_USEC`` (default 10 s)."""
        return cls(watchdog_interval_s(environ) or DEFAULT_PET_INTERVAL_S)

    def expect(self, name: str, within_s: float | None = None) -> None:
        """Register loop ``name``: its first beat is due within ``within_s`` seconds."""
        due = self._clock() + (self.deadline_s if within_s is None else within_s)
        self._loops[name] = _Loop(due)

    def healthy(self, name: str, within_s: float | None = None) -> None:
        """Heartbeat of loop ``name``; its next beat is due within ``within_s`` s."""
        due = self._clock() + (self.deadline_s if within_s is None else within_s)
        loop = self._loops.get(name)
        if loop is None:
            self._loops[name] = _Loop(due, 1)
        else:
            loop.due = due
            loop.beats += 1

    def done(self, name: str) -> None:
        """Forget loop ``name`` (it ended on purpose); unknown names are ignored."""
        self._loops.pop(name, None)

    def overdue(self) -> list[str]:
        """Return the loops whose beat is late, in registration order."""
        now = self._clock()
        return [name for name, loop in self._loops.items() if loop.due < now]

    def all_healthy(self) -> bool:
        """Whether every registered loop beat within its deadline."""
        return not self.overdue()

    @property
    def loops(self) -> tuple[str, ...]:
        """Names of the registered loops."""
        return tuple(self._loops)

    def check(self) -> bool:
        """Return whether the watchdog may be petted now; log changes once each.

        A newly late set of loops is logged once as a warning naming them, and the
        recovery once, so a hung loop does not flood the journal.
        """
        late = tuple(self.overdue())
        if late != self._late:
            if late:
                log.warning(
                    "loops are late; not petting the watchdog",
                    extra={"kv": {"loops": ",".join(late)}},
                )
            else:
                log.info("all loops beat again", extra={"kv": {}})
            self._late = late
        return not late

    async def feed(
        self,
        notifier: Notifier,
        stop: asyncio.Event,
        *,
        health_file: Path | None = None,
        status: Callable[[], str] | None = None,
    ) -> None:
        """Until ``stop`` is set, every ``interval_s`` pet systemd and the health file.

        Both only while :meth:`check` passes; ``status`` (if given) supplies the status
        line sent along with each pet. The health file is written atomically and
        removed when this returns.
        """
        try:
            while not stop.is_set():
                if self.check():
                    self.pets += 1
                    notifier.send("WATCHDOG=1", *_status(status() if status else None))
                    if health_file is not None:
                        write_health(health_file, self.pets, len(self._loops))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
        finally:
            if health_file is not None:
                remove_health(health_file)


def health_file_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """Return ``$RUNTIME_DIRECTORY/health.json``, or ``None`` outside systemd.

    systemd may pass several runtime directories separated by ``:``; the first is used.
    """
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / HEALTH_FILE if runtime else None


def write_health(path: Path, beats: int, loops: int) -> None:
    """Write the health file ``path`` atomically: version, pid, beats, loops.

    A failed write is logged at DEBUG only: the file is a convenience for the updater
    and systemd's watchdog is the authority.
    """
    record: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "beats": beats,
        "loops": loops,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot write health file", extra={"kv": {"error": exc}})


def remove_health(path: Path) -> None:
    """Remove the health file ``path`` (the agent is no longer healthy: it stops)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def read_health(path: Path) -> dict[str, Any] | None:
    """Return the health record at ``path``, or ``None`` if absent or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class ServiceLink:
    """What ``run_site`` tells its service manager.

    ``started()`` after the buses are up and the log is open (``READY=1``, start the
    watchdog feeder and the update-journal drain), ``stopping()`` on the way out.
    Both are harmless outside systemd. ``watchdog`` is what the scheduler's loops beat.
    """

    def __init__(
        self,
        notifier: Notifier,
        watchdog: Watchdog,
        *,
        health_file: Path | None = None,
    ) -> None:
        self.notifier = notifier
        self.watchdog = watchdog
        self.health_file = health_file
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceLink:
        """Return the link for this process's environment."""
        return cls(
            Notifier.from_env(environ),
            Watchdog.from_env(environ),
            health_file=health_file_from_env(environ),
        )

    async def started(
        self, status: str, *, evidence: EvidenceLog | None = None
    ) -> None:
        """Send ``READY=1`` with ``status``; start feeding the watchdog.

        With ``evidence`` (the open log), also start recording pending self-update
        steps into it (``ies_agent.selfupdate.drain_journal``) every few seconds.
        """
        self.notifier.ready(status)
        if self.notifier.enabled or self.health_file is not None:
            self._tasks.append(
                asyncio.create_task(
                    self.watchdog.feed(
                        self.notifier, self._stop, health_file=self.health_file
                    ),
                    name="watchdog",
                )
            )
        if evidence is not None:
            from ies_agent.selfupdate import drain_journal

            self._tasks.append(
                asyncio.create_task(
                    drain_journal(evidence, evidence.data_dir, self._stop),
                    name="update-journal",
                )
            )

    async def stopping(self, status: str = "stopping") -> None:
        """Send ``STOPPING=1``; stop the feeder and drain and wait for them."""
        self.notifier.stopping(status)
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        self._tasks.clear()
        self.notifier.close()
