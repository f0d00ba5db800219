"""Start, watch and stop a site's upstream connectors and its disk guard.

:class:`Upstreams` builds one :class:`~.delivery.Connector` per enabled
``[[upstreams]]`` table, each with its transport, and runs them as named tasks it
keeps references to; the disk guard runs beside them. When the agent stops, the
evidence log is closed first (its ``shutdown`` entry and final checkpoint must go
upstream too), then :meth:`Upstreams.finish` lets the connectors deliver what is left
for a bounded time and cancels the rest; cursors are saved either way.

Transports are imported only for the kinds configured, and they import aiomqtt or
aiohttp only when they connect, so a site without upstreams pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ies_agent.state import AgentState, UpstreamState
from ies_agent.upstream.commands import CommandRegistry
from ies_agent.upstream.delivery import Connector, LogSource, Transport
from ies_agent.upstream.diskguard import DiskGuard
from ies_agent.upstream.settings import StorageConfig, UpstreamConfig

if TYPE_CHECKING:
    from ies_agent.evidence.log import EvidenceLog

log = logging.getLogger(__name__)


class Upstreams:
    """A site's upstream connectors and disk guard, as one unit to start and finish."""

    def __init__(
        self,
        configs: Sequence[UpstreamConfig],
        *,
        data_dir: Path,
        gateway_id: str,
        origin: str,
        state: AgentState,
        storage: StorageConfig | None = None,
        evidence: EvidenceLog | None = None,
        commands: CommandRegistry | None = None,
    ) -> None:
        self.state = state
        self.evidence = evidence
        record = self._record if evidence is not None else None
        self.commands = commands or CommandRegistry(record)
        self.guard = DiskGuard(data_dir, storage or StorageConfig(), state, record)
        self.source = LogSource(
            data_dir, gateway_id=gateway_id, origin=origin, log=evidence
        )
        self.connectors: list[Connector] = []
        self._transports: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        for config in configs:
            if not config.enabled:
                continue
            transport = self._transport(config, gateway_id)
            upstream_state = UpstreamState(config.name, config.kind)
            state.upstreams[config.name] = upstream_state
            self._transports.append(transport)
            self.connectors.append(
                Connector(
                    config.name,
                    transport,
                    self.source,
                    upstream_state,
                    max_entries=config.batch_max_entries,
                    max_bytes=config.batch_max_bytes,
                    backoff_max_s=config.backoff_max_s,
                    e2e_timeout_s=config.e2e_timeout_s
                    if config.kind == "mqtt" and config.e2e_ack
                    else None,
                )
            )

    def _transport(self, config: UpstreamConfig, gateway_id: str) -> Transport:
        if config.kind == "mqtt":
            from ies_agent.upstream.mqtt import MqttTransport

            return MqttTransport(
                config,
                gateway_id=gateway_id,
                state=self.state,
                commands=self.commands,
                telemetry_allowed=self.guard.telemetry_allowed,
                alarms=self.guard.alarms,
            )
        if config.kind == "ies-https":
            from ies_agent.upstream.ies_https import IesHttpsTransport

            return IesHttpsTransport(config, gateway_id=gateway_id)
        from ies_agent.upstream.filesink import FileTransport

        return FileTransport(config, gateway_id=gateway_id)

    def start(self) -> None:
        """Start the disk guard and every connector as named tasks."""
        self._tasks.append(
            asyncio.create_task(self.guard.run(), name="upstream:disk-guard")
        )
        for connector in self.connectors:
            task = asyncio.create_task(
                connector.run(), name=f"upstream:{connector.name}"
            )
            task.add_done_callback(self._ended)
            self._tasks.append(task)

    async def finish(self, wait_s: float) -> bool:
        """Deliver what is left for at most ``wait_s`` seconds, then stop everything.

        Call after the evidence log is closed. Returns whether every connector
        caught up (its backlog is empty).
        """
        self.source.detach()
        self.evidence = None
        for transport in self._transports:
            shutting_down = getattr(transport, "shutting_down", None)
            if shutting_down is not None:
                shutting_down()
        for connector in self.connectors:
            connector.drain()
        runs = [t for t in self._tasks if t.get_name() != "upstream:disk-guard"]
        started = time.monotonic()
        if runs and wait_s > 0:
            _, pending = await asyncio.wait(runs, timeout=wait_s)
        else:
            pending = set(runs)
        done = all(c.caught_up() for c in self.connectors)
        for connector in self.connectors:
            connector.refresh_backlog()
        if self.connectors:
            log.log(
                logging.INFO if done else logging.WARNING,
                "upstream delivery at shutdown",
                extra={
                    "kv": {
                        "caught_up": done,
                        "waited_s": round(time.monotonic() - started, 1),
                        **{
                            c.name: f"acked={c.cursor.acked} backlog="
                            f"{c.state.backlog_entries}"
                            for c in self.connectors
                        },
                    }
                },
            )
        del pending
        await self.cancel()
        return done

    async def cancel(self) -> None:
        """Stop every task now (cursors are saved by the connectors)."""
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _record(self, kind: str, fields: dict[str, object]) -> None:
        evidence = self.evidence
        if evidence is not None and not evidence.closed:
            evidence.append_event(kind, fields)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "an upstream connector stopped on an unexpected error",
                extra={"kv": {"task": task.get_name(), "error": repr(exc)}},
                exc_info=exc,
            )
