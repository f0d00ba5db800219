"""The operator-facing side of a running agent, started and stopped by the runtime.

:class:`OperatorService` owns three named tasks: ``status-file`` (writes
``status.json`` in the data directory every few seconds for ``ies-agent status``),
``chart-history`` (samples power and energy for the page's charts) and, when the site
has an ``[http]`` table, the web server. aiohttp and prometheus-client are imported
only in that last case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ies_agent.web.facts import SiteFacts

if TYPE_CHECKING:
    from ies_agent.config import Site
    from ies_agent.evidence.log import EvidenceLog
    from ies_agent.state import AgentState
    from ies_agent.web.server import WebServer
    from ies_drivers.modbus.bus import ModbusBus

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_EVERY_S = 2.0
"""How often the status file is rewritten; ``ies-agent status`` calls a file older
than a few of these stale."""


def write_status_file(data_dir: Path, facts: Mapping[str, Any]) -> Path:
    """Write ``facts`` to ``data_dir/status.json`` atomically (mode 0640).

    A reader sees the old file or the new one, never half of one. Raises
    :class:`OSError` when the directory is not writable.
    """
    path = data_dir / STATUS_FILE
    tmp = data_dir / (STATUS_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(facts, handle, separators=(",", ":"), default=str)
    os.replace(tmp, path)
    return path


class OperatorService:
    """Status file, chart history and (when configured) the web page of one site."""

    def __init__(
        self,
        site: Site,
        state: AgentState,
        evidence: EvidenceLog,
        buses: Mapping[str, ModbusBus],
        *,
        data_dir: Path,
    ) -> None:
        interval_s = site.gateway.interval_s
        self.site = site
        self.data_dir = data_dir
        self.facts = SiteFacts(
            state,
            evidence,
            buses,
            data_dir=data_dir,
            interval_s=interval_s,
            # Short demo intervals get a finer chart; a site samples every 30 s.
            history_step_s=min(30.0, max(1.0, interval_s / 2)),
        )
        self.web: WebServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._status_failing = False

    async def start(self) -> None:
        """Start the tasks and, with ``[http]``, listen; raises
        :class:`~ies_agent.web.errors.WebSetupError` when the page cannot start."""
        http = getattr(self.site, "http", None)
        if http is not None:
            from ies_agent.web.server import WebServer

            self.web = WebServer(http, self.facts, self.site)
            await self.web.start()
        self._tasks = [
            asyncio.create_task(self._status_loop(), name="status-file"),
            asyncio.create_task(self._history_loop(), name="chart-history"),
        ]

    async def close(self) -> None:
        """Stop the tasks and the server; write a last status file."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.web is not None:
            await self.web.close()
            self.web = None
        self.facts.close()

    async def _status_loop(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(STATUS_EVERY_S)

    def _write_status(self) -> None:
        try:
            write_status_file(self.data_dir, self.facts.snapshot())
        except OSError as exc:
            if not self._status_failing:  # an outage logged once, its end once
                log.warning(
                    "cannot write the status file",
                    extra={"kv": {"dir": self.data_dir, "error": exc.strerror}},
                )
            self._status_failing = True
            return
        if self._status_failing:
            log.info("status file written again", extra={"kv": {"dir": self.data_dir}})
            self._status_failing = False

    async def _history_loop(self) -> None:
        while True:
            self.facts.sample()
            await asyncio.sleep(self.facts.history_step_s)
