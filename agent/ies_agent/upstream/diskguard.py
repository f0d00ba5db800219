"""Disk guard: when the data directory runs out of room, evidence comes first.

Every ``check_s`` seconds the guard looks at the data directory's file system and at
the size of the evidence files. The alarm is raised when

- free space drops below ``[storage] reserve_mb``, or
- the evidence files (log, checkpoints, cut tails) exceed ``quota_mb`` (if set).

While the alarm is on, the agent

- keeps recording evidence: nothing is deleted, and retention never removes an entry
  an upstream has not acknowledged (there is no other copy of it);
- stops fast telemetry (MQTT ``telemetry``), the one output that is only nice to have;
- says so loudly: one ERROR log line when the alarm is raised and one INFO line when
  it clears, a ``storage_alarm`` event in the evidence log each time (``state``
  ``raised`` / ``cleared``, with the figures), ``alarms`` in the retained MQTT status
  message, and ``storage`` in the agent's status.

When the file system is full for good, the writer itself fails (the evidence log says
why on the next start); the alarm exists so an operator acts before that.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from ies_agent.state import AgentState
from ies_agent.upstream.commands import EventRecorder
from ies_agent.upstream.settings import StorageConfig

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_EVIDENCE_GLOBS = ("evidence.jsonl*", "checkpoints.jsonl")


class DiskGuard:
    """Watches one data directory's disk; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        config: StorageConfig,
        state: AgentState,
        record: EventRecorder | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.state = state
        self.record = record
        self.reasons: list[str] = []

    @property
    def alarm(self) -> bool:
        """Whether the storage alarm is on."""
        return bool(self.reasons)

    def telemetry_allowed(self) -> bool:
        """Whether fast telemetry may be sent (not while the alarm is on)."""
        return not self.reasons

    def alarms(self) -> list[str]:
        """Names of the alarms that are on (``disk_low``, ``evidence_quota``)."""
        return list(self.reasons)

    def check(self) -> list[str]:
        """Look at the disk now; raise or clear the alarm; return its reasons."""
        try:
            usage = shutil.disk_usage(self.data_dir)
        except OSError as exc:
            log.debug(
                "cannot stat the data directory", extra={"kv": {"error": str(exc)}}
            )
            return self.reasons
        used = self.evidence_bytes()
        reasons = []
        reserve = int(self.config.reserve_mb * MIB)
        quota = int(self.config.quota_mb * MIB)
        if usage.free < reserve:
            reasons.append("disk_low")
        if quota and used > quota:
            reasons.append("evidence_quota")
        figures: dict[str, object] = {
            "free_bytes": usage.free,
            "evidence_bytes": used,
            "reserve_bytes": reserve,
            "quota_bytes": quota,
        }
        self.state.storage = {"alarms": reasons, **figures}
        if reasons and not self.reasons:
            log.error(
                "storage alarm: the data directory is running out of room; evidence "
                "is kept, telemetry stops until room is made",
                extra={"kv": {"reasons": ",".join(reasons), **figures}},
            )
            self._record({"state": "raised", "reasons": reasons, **figures})
        elif self.reasons and not reasons:
            log.info("storage alarm cleared", extra={"kv": figures})
            self._record({"state": "cleared", **figures})
        self.reasons = reasons
        return reasons

    def evidence_bytes(self) -> int:
        """Bytes taken by the evidence files of the data directory."""
        total = 0
        for pattern in _EVIDENCE_GLOBS:
            for path in self.data_dir.glob(pattern):
                try:
                    total += path.stat().st_size
                except OSError:
                    continue
        return total

    async def run(self) -> None:
        """Check every ``check_s`` seconds, forever (cancel to stop)."""
        while True:
            self.check()
            await asyncio.sleep(self.config.check_s)

    def _record(self, fields: dict[str, object]) -> None:
        if self.record is None:
            return
        try:
            self.record("storage_alarm", fields)
        except Exception:
            log.exception("cannot record the storage alarm in the evidence log")
