"""Assemble and run a site: buses, devices, evidence log, scheduler.

``ies-agent run`` and ``ies-agent demo`` both come through :func:`run_site`, so the demo
exercises exactly the code path a gateway in the field runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from ies_agent.clock import Clock, SystemClock
from ies_agent.state import AgentState

if TYPE_CHECKING:
    from ies_agent.config import Site
    from ies_agent.devices import SiteDevice
    from ies_agent.evidence.log import EvidenceLog
    from ies_drivers.modbus.bus import ModbusBus

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run left behind: where, how much, and the last checkpoint."""

    data_dir: Path
    entries: int
    intervals: int
    last_checkpoint: str | None


def config_hash(path: Path) -> str:
    """Return ``sha256:<hex>`` of the site file, recorded in the boot event."""
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def build_devices(site: Site) -> tuple[dict[str, ModbusBus], list[SiteDevice]]:
    """Create one bus owner per configured bus and the devices on them."""
    from ies_agent.devices import ModbusDevice
    from ies_drivers.modbus.bus import ModbusBus

    buses = {bus_id: ModbusBus(cfg.to_bus_spec()) for bus_id, cfg in site.buses.items()}
    devices: list[SiteDevice] = []
    for dev in site.devices.values():
        if not dev.enabled:
            continue
        bus_cfg = site.buses[dev.bus]
        bases = (dev.sunspec_base,) if dev.sunspec_base is not None else None
        devices.append(
            ModbusDevice(
                dev.id,
                buses[dev.bus],
                dev.unit,
                dev.template,
                poll_s=dev.poll_s,
                timeout_s=dev.timeout_s,
                sunspec_models=dev.sunspec_models,
                sunspec_bases=bases or dev.sunspec_bases,
                bus_label=f"modbus-{bus_cfg.kind}:{bus_cfg.label}",
            )
        )
    return buses, devices


async def run_site(
    site: Site,
    stop: asyncio.Event,
    *,
    data_dir: Path | None = None,
    clock: Clock | None = None,
    state: AgentState | None = None,
    on_started: Callable[[EvidenceLog, AgentState], Awaitable[None]] | None = None,
) -> RunResult:
    """Run ``site`` until ``stop`` is set; close the log cleanly on the way out.

    Raises the evidence log's errors (key file with loose permissions, data directory
    locked by another agent) before any device is touched.
    """
    from ies_agent.evidence.log import EvidenceLog
    from ies_agent.scheduler import Scheduler

    clock = clock or SystemClock()
    data_dir = Path(data_dir or site.gateway.data_dir)
    tz = ZoneInfo(site.gateway.timezone)
    state = state or AgentState(site.gateway.id)
    evidence = EvidenceLog.open(
        data_dir,
        gateway_id=site.gateway.id,
        origin=site.gateway.origin,
        key_alg=site.gateway.key_alg,
        clock=clock,
        interval_s=site.gateway.interval_s,
        tz=site.gateway.timezone,
        cfg_hash=config_hash(Path(site.path)),
    )
    buses, devices = build_devices(site)
    scheduler = Scheduler(
        devices,
        evidence,
        state,
        clock,
        interval_s=site.gateway.interval_s,
        tz=tz,
    )
    try:
        for bus in buses.values():
            await bus.start()
        if on_started is not None:
            await on_started(evidence, state)
        await scheduler.run(stop)
    finally:
        for bus in buses.values():
            with contextlib.suppress(Exception):
                await bus.close()
        entries = evidence.size
        evidence.close()
    return RunResult(data_dir, entries + 2, scheduler.intervals_done, evidence.last_checkpoint)
