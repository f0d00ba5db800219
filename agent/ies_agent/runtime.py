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
    from ies_agent.config import BusConfig, DeviceConfig, Site
    from ies_agent.devices import SiteDevice
    from ies_agent.dispatch.settings import DispatchService
    from ies_agent.evidence.log import EvidenceLog
    from ies_agent.ocpp.server import CentralSystem
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


def build_devices(
    site: Site, on_unusable: Callable[[str, str], None] | None = None
) -> tuple[dict[str, ModbusBus], list[SiteDevice]]:
    """Create one bus owner per Modbus bus and every enabled device.

    DLMS meters own their link themselves (one association per meter). Each
    protocol's code is imported only when the site has a device that speaks it.
    A meter whose password or key file is missing or readable by others is left out
    and reported to ``on_unusable(device_id, message)``; without that callback
    :class:`~ies_agent.dlms_config.DlmsSecretError` is raised.
    """
    devices: list[SiteDevice] = []
    buses: dict[str, ModbusBus] = {}
    enabled = [dev for dev in site.devices.values() if dev.enabled]
    if any(site.buses[dev.bus].protocol == "modbus" for dev in enabled):
        from ies_drivers.modbus.bus import ModbusBus

        buses = {
            bus_id: ModbusBus(cfg.to_bus_spec())
            for bus_id, cfg in site.buses.items()
            if cfg.protocol == "modbus"
        }
    for dev in enabled:
        bus_cfg = site.buses[dev.bus]
        if dev.dlms is not None:
            from ies_agent.dlms_config import DlmsSecretError

            try:
                devices.append(_dlms_device(dev, bus_cfg))
            except DlmsSecretError as exc:
                if on_unusable is None:
                    raise
                on_unusable(dev.id, str(exc))
            continue
        from ies_agent.devices import ModbusDevice

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


def _dlms_device(dev: DeviceConfig, bus: BusConfig) -> SiteDevice:
    """Build the DLMS meter of device entry ``dev`` on ``bus``."""
    from ies_agent.dlms_config import client_settings, link_settings
    from ies_agent.dlms_device import DlmsDevice

    assert dev.dlms is not None
    link = link_settings(
        bus.kind,
        dev.dlms,
        host=bus.host,
        port=bus.port,
        serial_port=bus.serial_port,
        baudrate=bus.baudrate,
        mode_e=bus.mode_e,
        timeout_s=dev.timeout_s or bus.timeout_s,
    )
    return DlmsDevice(
        dev.id,
        link,
        client_settings(dev.dlms),
        profile=dev.dlms.profile,
        poll_s=dev.poll_s,
        backoff_max_s=bus.backoff_max_s,
    )


async def run_site(
    site: Site,
    stop: asyncio.Event,
    *,
    data_dir: Path | None = None,
    clock: Clock | None = None,
    state: AgentState | None = None,
    on_started: Callable[[EvidenceLog, AgentState], Awaitable[None]] | None = None,
    upstream_wait_s: float = 10.0,
    on_dispatch: Callable[[DispatchService], Awaitable[None]] | None = None,
) -> RunResult:
    """Run ``site`` until ``stop`` is set; close the log cleanly on the way out.

    The site's ``[[upstreams]]`` connectors run beside the scheduler; after the log
    is closed they get up to ``upstream_wait_s`` seconds to deliver what is left
    (its ``shutdown`` entry and last checkpoint included), then stop.

    With ``[dispatch]`` enabled the dispatch engine starts once the buses and the
    OCPP central system are up (``on_dispatch`` is then called with it, for the demo)
    and is closed, reverting what is active, before the buses and the log.

    Raises the evidence log's errors (key file with loose permissions, data directory
    locked by another agent) before any device is touched.
    """
    from ies_agent.evidence.log import EvidenceLog
    from ies_agent.scheduler import Scheduler
    from ies_agent.systemd import ServiceLink
    from ies_agent.upstream.manager import Upstreams

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

    def unusable(device_id: str, message: str) -> None:
        # A device the agent cannot use: say so where it explains the gap.
        log.warning(
            "device left out", extra={"kv": {"device": device_id, "why": message}}
        )
        evidence.append_event("config_error", {"msg": message[:300]}, src=device_id)

    buses, devices = build_devices(site, unusable)
    for problem in site.skipped:
        # A device entry the agent could not use: say so where it explains the gap.
        log.warning("device left out", extra={"kv": {"problem": str(problem)}})
        evidence.append_event(
            "config_error",
            {
                "file": problem.file,
                "line": problem.line,
                "key": problem.key,
                "msg": problem.message[:300],
            },
        )
    # systemd: READY once started, a watchdog fed only while the loops beat, STOPPING.
    service = ServiceLink.from_env()
    scheduler = Scheduler(
        devices,
        evidence,
        state,
        clock,
        interval_s=site.gateway.interval_s,
        tz=tz,
        watchdog=service.watchdog,
    )
    upstreams = Upstreams(
        site.upstreams,
        data_dir=data_dir,
        gateway_id=site.gateway.id,
        origin=evidence.origin,
        state=state,
        storage=site.storage,
        evidence=evidence,
    )
    central: CentralSystem | None = None
    dispatch: DispatchService | None = None
    # The status file for `ies-agent status`, chart history and (with [http]) the page.
    from ies_agent.web.service import OperatorService

    operator = OperatorService(site, state, evidence, buses, data_dir=data_dir)
    try:
        upstreams.start()
        if site.ocpp is not None:
            # The OCPP central system (and CSMS bridge) listens before devices start.
            from ies_agent.ocpp.server import CentralSystem

            central = CentralSystem(
                site.ocpp,
                data_dir=data_dir,
                evidence=evidence,
                state=state,
                clock=clock,
            )
            await central.start()
        for bus in buses.values():
            await bus.start()
        await operator.start()
        if site.dispatch is not None and site.dispatch.enabled:
            # Dispatch acts on the buses and chargers started above.
            from ies_agent.dispatch.settings import start_dispatch
            from ies_agent.evidence.log import LOG_FILE

            dispatch = await start_dispatch(
                site,
                buses=buses,
                central=central,
                evidence=evidence,
                evidence_path=data_dir / LOG_FILE,
                data_dir=data_dir,
                commands=upstreams.commands,
                mqtt_transports=[
                    c.transport
                    for c in upstreams.connectors
                    if c.transport.kind == "mqtt"
                ],
                state=state,
            )
            if dispatch is not None and on_dispatch is not None:
                await on_dispatch(dispatch)
        if on_started is not None:
            await on_started(evidence, state)
        await service.started(
            f"{site.gateway.id}: {len(devices)} devices, log at seq {evidence.size}",
            evidence=evidence,
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(scheduler.run(stop), name="scheduler")
            if central is not None:
                group.create_task(central.serve(stop), name="ocpp:central-system")
                if site.firmware is not None and site.firmware.enabled:
                    # Firmware and diagnostics files through the separate bridge.
                    from ies_agent.firmware_client import FirmwareClient

                    files = FirmwareClient(site.firmware.socket, evidence)
                    files.attach(central)
                    group.create_task(files.run(stop), name="firmware-bridge")
            if dispatch is not None and dispatch.ven is not None:
                group.create_task(dispatch.run_ven(stop), name="dispatch:openadr-ven")
    finally:
        await service.stopping()
        if dispatch is not None:
            try:
                await dispatch.close()  # revert whatever is still limited
            except Exception:
                log.exception("dispatch did not close cleanly")
        for bus in buses.values():
            with contextlib.suppress(Exception):
                await bus.close()
        for device in devices:
            close = getattr(device, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        try:
            evidence.close()
        finally:
            await upstreams.finish(upstream_wait_s)
            # Last: the status file then shows what the upstreams finally took.
            with contextlib.suppress(Exception):
                await operator.close()
    return RunResult(
        data_dir, evidence.size, scheduler.intervals_done, evidence.last_checkpoint
    )
