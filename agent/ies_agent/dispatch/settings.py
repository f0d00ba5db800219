"""The site file's ``[dispatch]`` table, and the dispatch feature of a running agent.

Reading (:func:`read_dispatch`, called by :mod:`ies_agent.config`)::

    [dispatch]
    enabled = true                       # default when the table exists
    trust_dir = "trust"                  # pinned issuers and pack signers (PEM);
                                         # default: the shipped configs/trust/
    policies = ["policies"]              # pack files or directories of *.json;
                                         # default: the shipped configs/policies/
    contact_timeout_s = 900              # revert when the issuer is silent this
                                         # long during an event; 0 or absent: never

    [dispatch.mqtt]                      # signed events on {prefix}/{gw}/cmd/<command>
    enabled = true
    command = "dispatch"

    [dispatch.openadr]                   # the agent as an OpenADR 2.0b VEN
    vtn_url = "https://vtn.example/OpenADR2/Simple/2.0b"
    ven_name = "site-42"
    issuer = "discom-north"              # who the VTN's events are recorded as
    targets = ["group:pv"]               # what its events act on
    cert = "ven.crt"                     # optional: TLS client cert and key,
    key = "ven.key"                      #   and the VTN's expected fingerprint
    vtn_fingerprint = "AA:BB:..."

    [dispatch.beckn]                     # DemandFlexNeed issuers, over MQTT on
    key_lookup = "pinned"                #   {prefix}/{gw}/cmd/<command>; only keys
    command = "beckn"                    #   pinned in trust_dir (beckn_route)

    [dispatch.mv]
    method = "high-5-of-10"              # baseline: best 5 of the past 10 days
    meters = ["grid-meter"]              # device ids measured
    quantity = "1-0:1.8.0*255"           # cumulative register (q name or OBIS)
    settle_s = 20                        # wait after the event for boundary readings

    [[dispatch.devices]]                 # what dispatch may act on
    id = "inverter"                      # a [[devices]] id with a SunSpec template
    kind = "sunspec-inverter"            # limit through model 123 or 704
    groups = ["pv"]

    [[dispatch.devices]]
    id = "cp-1"                          # an [[ocpp.chargers]] id
    kind = "ocpp-charger"                # limit through a charging profile
    groups = ["chargers"]
    max_a = 32                           # full current (A), voltage_v, phases:
    voltage_v = 230                      #   to turn kW asked for into amperes
    phases = 1

Every problem is reported with the file, line and key, like the rest of the site file.

Running (:func:`start_dispatch`, called by :mod:`ies_agent.runtime`): builds the
:class:`~ies_agent.dispatch.engine.DispatchEngine` with one actuator per target (SunSpec
inverters on the site's Modbus bus owners, chargers through the OCPP central system),
starts it (persisted events are resumed or reverted), routes the MQTT command to it,
sends its acknowledgements back over every MQTT upstream, routes Beckn
``DemandFlexNeed`` messages (:mod:`ies_agent.dispatch.beckn_route`) when
``[dispatch.beckn]`` is present, runs the OpenADR VEN and
gives the local page a live list of events. A trust store or pack that cannot be used
is recorded as a ``config_error`` event; dispatch then refuses events, with the reason,
rather than act without rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ies_drivers.tomlsource import KeyPath, ProblemCollector

if TYPE_CHECKING:
    from ies_agent.config import DeviceConfig, Site
    from ies_agent.dispatch.engine import AckSink, DispatchEngine, EventRecorder
    from ies_agent.dispatch.model import DispatchEvent
    from ies_agent.dispatch.openadr import OpenAdrVen
    from ies_agent.ocpp.config import OcppConfig
    from ies_agent.ocpp.server import CentralSystem
    from ies_agent.state import AgentState
    from ies_agent.upstream.commands import CommandRegistry
    from ies_drivers.modbus.bus import ModbusBus

log = logging.getLogger(__name__)

KIND_INVERTER = "sunspec-inverter"
KIND_CHARGER = "ocpp-charger"
"""Device kinds, the same words as :mod:`ies_agent.dispatch.planner`."""
DEFAULT_COMMAND = "dispatch"
DEFAULT_METHOD = "high-5-of-10"
DEFAULT_QUANTITY = "1-0:1.8.0*255"

DISPATCH_KEYS = {
    "enabled",
    "trust_dir",
    "policies",
    "contact_timeout_s",
    "mqtt",
    "openadr",
    "beckn",
    "mv",
    "devices",
}
_MQTT_KEYS = {"enabled", "command"}
_OPENADR_KEYS = {
    "vtn_url",
    "ven_name",
    "issuer",
    "targets",
    "cert",
    "key",
    "vtn_fingerprint",
}
_BECKN_KEYS = {"key_lookup", "command"}
_MV_KEYS = {"method", "meters", "quantity", "settle_s"}
_DEVICE_KEYS = {"id", "kind", "groups", "max_a", "voltage_v", "phases"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_TEXT = "a name (letters, digits, '.', '_' or '-'; at most 64)"
_ISSUER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")


@dataclass(frozen=True)
class DispatchTarget:
    """One ``[[dispatch.devices]]`` entry; ``max_a`` (A), ``voltage_v`` (V) and
    ``phases`` describe a charger's full power."""

    device_id: str
    kind: str
    groups: tuple[str, ...] = ()
    max_a: Decimal = Decimal(32)
    voltage_v: Decimal = Decimal(230)
    phases: int = 1


@dataclass(frozen=True)
class OpenAdrSettings:
    """``[dispatch.openadr]``: the VTN to poll and who its events count as from."""

    vtn_url: str
    ven_name: str
    issuer: str
    targets: tuple[str, ...]
    cert: Path | None = None
    key: Path | None = None
    vtn_fingerprint: str | None = None


@dataclass(frozen=True)
class MvConfig:
    """``[dispatch.mv]``: baseline method, meters, register quantity, settle (s)."""

    method: str = DEFAULT_METHOD
    meters: tuple[str, ...] = ()
    quantity: str = DEFAULT_QUANTITY
    settle_s: float = 20.0


@dataclass(frozen=True)
class DispatchConfig:
    """The ``[dispatch]`` table (see the module docstring).

    ``trust_dir`` / ``policies`` are ``None`` / empty for the shipped defaults;
    ``mqtt_command`` is ``None`` when the MQTT source is off; ``contact_timeout_s``
    is ``None`` when the contact watchdog is off; ``beckn_command`` is ``None``
    unless ``[dispatch.beckn]`` is present (then Beckn needs come over MQTT).
    """

    enabled: bool = True
    trust_dir: Path | None = None
    policies: tuple[Path, ...] = ()
    contact_timeout_s: float | None = None
    mqtt_command: str | None = DEFAULT_COMMAND
    openadr: OpenAdrSettings | None = None
    beckn_key_lookup: str = "pinned"
    beckn_command: str | None = None
    mv: MvConfig = field(default_factory=MvConfig)
    devices: tuple[DispatchTarget, ...] = ()


# --- reading the table ----------------------------------------------------------------


def read_dispatch(
    check: ProblemCollector,
    data: Mapping[str, Any],
    resolve: Callable[[str], Path],
    *,
    devices: Mapping[str, DeviceConfig],
    declared_devices: Collection[str] = (),
    ocpp: OcppConfig | None = None,
) -> DispatchConfig | None:
    """Return the ``[dispatch]`` table (``None`` when absent); record problems.

    ``resolve`` makes paths relative to the site file. ``devices`` are the accepted
    ``[[devices]]`` (an inverter target must be one, with a SunSpec template, on a
    Modbus bus); ``declared_devices`` every id written in the file (an entry left out
    for its own problem is not reported twice); ``ocpp`` holds the known chargers.
    """
    if "dispatch" not in data:
        return None
    table = check.table(data, ("dispatch",))
    if table is None:
        return None
    at: KeyPath = ("dispatch",)
    check.unknown_keys(table, DISPATCH_KEYS, at)
    enabled = check.boolean(table, (*at, "enabled"), default=True)
    trust_dir = _directory(check, table, (*at, "trust_dir"), resolve)
    policies = _policy_paths(check, table, (*at, "policies"), resolve)
    timeout = check.number(table, (*at, "contact_timeout_s"), default=0.0, low=0.0)
    known = set(devices) | set(declared_devices)
    chargers = set(ocpp.chargers) if ocpp is not None else set()
    targets = _targets(check, table, at, devices, known, ocpp)
    ids = {t.device_id for t in targets}
    return DispatchConfig(
        enabled=bool(enabled),
        trust_dir=trust_dir,
        policies=policies,
        contact_timeout_s=timeout or None,
        mqtt_command=_mqtt(check, table, at),
        openadr=_openadr(check, table, at, resolve, ids),
        beckn_key_lookup=_beckn(check, table, at),
        beckn_command=_beckn_command(check, table, at),
        mv=_mv(check, table, at, known | chargers),
        devices=targets,
    )


def _directory(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    resolve: Callable[[str], Path],
) -> Path | None:
    text = check.string(table, at)
    if not text:
        if text == "":
            check.add(at, "expected a directory, got an empty string")
        return None
    path = resolve(text)
    if not path.is_dir():
        check.add(at, f"{path} is not a directory: put the pinned keys (PEM) there")
        return None
    return path


def _policy_paths(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    resolve: Callable[[str], Path],
) -> tuple[Path, ...]:
    names = check.string_list(table, at) or []
    paths = []
    for index, name in enumerate(names):
        path = resolve(name)
        if not path.exists():
            check.add(
                (*at, index),
                f"{path} does not exist: name a signed pack or a directory",
            )
            continue
        paths.append(path)
    return tuple(paths)


def _mqtt(check: ProblemCollector, table: Mapping[str, Any], at: KeyPath) -> str | None:
    sub = check.table(table, (*at, "mqtt"))
    if sub is None:
        return DEFAULT_COMMAND
    where: KeyPath = (*at, "mqtt")
    check.unknown_keys(sub, _MQTT_KEYS, where)
    enabled = check.boolean(sub, (*where, "enabled"), default=True)
    command = check.string(
        sub,
        (*where, "command"),
        default=DEFAULT_COMMAND,
        pattern=_NAME,
        pattern_text=_NAME_TEXT,
    )
    return command if enabled else None


def _openadr(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    resolve: Callable[[str], Path],
    target_ids: Collection[str],
) -> OpenAdrSettings | None:
    sub = check.table(table, (*at, "openadr"))
    if sub is None:
        return None
    where: KeyPath = (*at, "openadr")
    check.unknown_keys(sub, _OPENADR_KEYS, where)
    url = check.string(sub, (*where, "vtn_url"), required=True)
    if url is not None and not url.startswith(("http://", "https://")):
        check.add((*where, "vtn_url"), f"{url!r} is not an http(s):// address")
        url = None
    ven = check.string(
        sub, (*where, "ven_name"), required=True, pattern=_NAME, pattern_text=_NAME_TEXT
    )
    issuer = check.string(
        sub,
        (*where, "issuer"),
        required=True,
        pattern=_ISSUER,
        pattern_text="an issuer id (letters, digits, '.', '_', ':', '@', '/', '-')",
    )
    targets = check.string_list(sub, (*where, "targets")) or []
    for index, target in enumerate(targets):
        if not target.startswith("group:") and target not in target_ids:
            check.add(
                (*where, "targets", index),
                f"{target!r} is not a [[dispatch.devices]] id or 'group:<name>'",
            )
    if not targets and "targets" not in sub:
        check.add((*where, "targets"), "missing, expected the devices its events limit")
    files = {}
    for name in ("cert", "key"):
        text = check.string(sub, (*where, name))
        if text:
            path = resolve(text)
            if not path.is_file():
                check.add((*where, name), f"{path} does not exist")
            files[name] = path
    if ("cert" in files) != ("key" in files):
        check.add(where, "cert and key go together (the VEN's TLS client identity)")
    fingerprint = check.string(sub, (*where, "vtn_fingerprint"))
    if url is None or ven is None or issuer is None or not targets:
        return None
    return OpenAdrSettings(
        url,
        ven,
        issuer,
        tuple(targets),
        cert=files.get("cert"),
        key=files.get("key"),
        vtn_fingerprint=fingerprint or None,
    )


def _beckn(check: ProblemCollector, table: Mapping[str, Any], at: KeyPath) -> str:
    sub = check.table(table, (*at, "beckn"))
    if sub is None:
        return "pinned"
    where: KeyPath = (*at, "beckn")
    check.unknown_keys(sub, _BECKN_KEYS, where)
    return check.choice(sub, (*where, "key_lookup"), ("pinned",), default="pinned") or (
        "pinned"
    )


def _beckn_command(
    check: ProblemCollector, table: Mapping[str, Any], at: KeyPath
) -> str | None:
    sub = table.get("beckn")
    if not isinstance(sub, Mapping):
        return None  # absent (or not a table: reported by _beckn)
    from ies_agent.dispatch.beckn_route import BECKN_COMMAND

    return check.string(
        sub,
        (*at, "beckn", "command"),
        default=BECKN_COMMAND,
        pattern=_NAME,
        pattern_text=_NAME_TEXT,
    )


def _mv(
    check: ProblemCollector, table: Mapping[str, Any], at: KeyPath, known: set[str]
) -> MvConfig:
    sub = check.table(table, (*at, "mv"))
    if sub is None:
        return MvConfig()
    from ies_agent.dispatch.errors import DispatchError
    from ies_agent.dispatch.mv import parse_method

    where: KeyPath = (*at, "mv")
    check.unknown_keys(sub, _MV_KEYS, where)
    method = check.string(sub, (*where, "method"), default=DEFAULT_METHOD)
    if method is not None:
        try:
            parse_method(method)
        except DispatchError as exc:
            check.add((*where, "method"), str(exc))
            method = None
    meters = check.string_list(sub, (*where, "meters")) or []
    for index, meter in enumerate(meters):
        if meter not in known:
            check.add(
                (*where, "meters", index),
                f"{meter!r} is not a [[devices]] or [[ocpp.chargers]] id",
            )
    quantity = check.string(sub, (*where, "quantity"), default=DEFAULT_QUANTITY)
    settle = check.number(sub, (*where, "settle_s"), default=20.0, low=0.0, high=3600)
    return MvConfig(
        method=method or DEFAULT_METHOD,
        meters=tuple(meters),
        quantity=quantity or DEFAULT_QUANTITY,
        settle_s=20.0 if settle is None else settle,
    )


def _targets(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    devices: Mapping[str, DeviceConfig],
    known: set[str],
    ocpp: OcppConfig | None,
) -> tuple[DispatchTarget, ...]:
    out: list[DispatchTarget] = []
    seen: set[str] = set()
    for index, item in enumerate(check.tables(table, (*at, "devices"))):
        where: KeyPath = (*at, "devices", index)
        check.unknown_keys(item, _DEVICE_KEYS, where)
        device_id = check.string(item, (*where, "id"), required=True)
        kind = check.choice(
            item, (*where, "kind"), (KIND_INVERTER, KIND_CHARGER), required=True
        )
        groups = check.string_list(item, (*where, "groups")) or []
        for g, group in enumerate(groups):
            if not _NAME.fullmatch(group):
                check.add((*where, "groups", g), f"{group!r} is not {_NAME_TEXT}")
        numbers = {}
        for key, default, low in (("max_a", 32, 6), ("voltage_v", 230, 1)):
            value = check.number(item, (*where, key), default=default, low=low)
            numbers[key] = Decimal(str(value if value is not None else default))
        phases = check.integer(item, (*where, "phases"), default=1, low=1, high=3)
        if device_id is None or kind is None:
            continue
        if device_id in seen:
            check.add((*where, "id"), f"{device_id!r} is listed twice")
            continue
        seen.add(device_id)
        if kind == KIND_INVERTER and not _inverter_ok(
            check, (*where, "id"), device_id, devices, known
        ):
            continue
        if kind == KIND_CHARGER and not _charger_ok(
            check, (*where, "id"), device_id, ocpp
        ):
            continue
        out.append(
            DispatchTarget(
                device_id,
                kind,
                tuple(groups),
                max_a=numbers["max_a"],
                voltage_v=numbers["voltage_v"],
                phases=phases or 1,
            )
        )
    return tuple(out)


def _inverter_ok(
    check: ProblemCollector,
    at: KeyPath,
    device_id: str,
    devices: Mapping[str, DeviceConfig],
    known: set[str],
) -> bool:
    device = devices.get(device_id)
    if device is None:
        if device_id not in known:
            check.add(at, f"{device_id!r} is not a [[devices]] id")
        return False  # else: the entry has its own problem, reported there
    if device.dlms is not None or not device.template.sunspec:
        check.add(
            at,
            f"{device_id!r} does not use a SunSpec template (template "
            f"'{device.template_name}'); only SunSpec inverters can be limited",
        )
        return False
    return True


def _charger_ok(
    check: ProblemCollector, at: KeyPath, device_id: str, ocpp: OcppConfig | None
) -> bool:
    if ocpp is None:
        check.add(at, f"{device_id!r}: chargers need the [ocpp] table")
        return False
    if device_id not in ocpp.chargers and not ocpp.accept_unknown:
        check.add(at, f"{device_id!r} is not an [[ocpp.chargers]] id")
        return False
    return True


# --- the running feature --------------------------------------------------------------


class DispatchEventsView:
    """A live, newest-first list of dispatch events for the local page and status.

    Each row: event id, issuer, source, start, end, interval length (s), targets,
    state (``accepted``, ``active``, ``ended``, ``reverted``...) and, once measured,
    the M&V series per meter.
    """

    def __init__(self, engine: DispatchEngine, limit: int = 20) -> None:
        self.engine = engine
        self.limit = limit
        self._rows: dict[str, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        engine = self.engine
        for event_id, active in list(engine.active.items()):
            event = active.event
            self._rows[event_id] = {
                "event": event_id,
                "issuer": event.issuer,
                "source": event.source,
                "start": event.summary()["start"],
                "end": event.end.isoformat(),
                "interval_s": event.interval_s,
                "intervals": len(event.intervals),
                "targets": list(event.targets),
                "state": active.state,
            }
        for event_id, final in list(engine.finished.items()):
            row = dict(self._rows.get(event_id, {"event": event_id}))
            row["state"] = final
            results = engine.results.get(event_id)
            if results:
                row["mv"] = [
                    {k: r.get(k) for k in ("meter", "unit", "baseline", "actual")}
                    for r in results
                ]
            self._rows[event_id] = row
        rows = list(self._rows.values())[-self.limit :]
        return iter(reversed(rows))


@dataclass
class DispatchService:
    """Dispatch in one agent run: the engine and the sources feeding it."""

    engine: DispatchEngine
    commands: CommandRegistry
    command_name: str | None
    ven: OpenAdrVen | None = None
    beckn_command: str | None = None

    async def run_ven(self, stop: asyncio.Event, retry_s: float = 30.0) -> None:
        """Register with the VTN and poll until ``stop``; retry registration every
        ``retry_s`` seconds while the VTN cannot be reached."""
        ven = self.ven
        if ven is None:
            return
        while not stop.is_set():
            try:
                await ven.start()
            except Exception as exc:  # openleadr raises what aiohttp raises
                log.warning(
                    "OpenADR VTN not reachable", extra={"kv": {"error": repr(exc)}}
                )
            else:
                if getattr(ven.client, "registration_id", None):
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry_s)
        await stop.wait()

    async def close(self) -> None:
        """Stop taking events, stop the VEN, revert what is active (clean stop)."""
        if self.command_name is not None:
            self.commands.unregister(self.command_name)
        if self.beckn_command is not None:
            self.commands.unregister(self.beckn_command)
        if self.ven is not None:
            with contextlib.suppress(Exception):
                await self.ven.stop()
        await self.engine.close(revert=True)


def mqtt_ack_sink(transports: Sequence[Any], gateway_id: str) -> AckSink:
    """Acknowledgements of MQTT events, published on every MQTT upstream's
    ``{prefix}/{gw}/dispatch/ack``; delivered when at least one broker took it."""

    async def send(event: DispatchEvent, fields: dict[str, Any]) -> bool:
        body = {**fields, "gw": gateway_id, "issuer": event.issuer}
        delivered = False
        for transport in transports:
            publish = getattr(transport, "publish_dispatch_ack", None)
            if publish is not None and await publish(body):
                delivered = True
        return delivered

    return send


def _record_problem(evidence: EventRecorder, key: str, message: str) -> None:
    log.warning("dispatch setting unusable", extra={"kv": {"key": key, "why": message}})
    evidence.append_event("config_error", {"key": key, "msg": message[:300]})


async def start_dispatch(
    site: Site,
    *,
    buses: Mapping[str, ModbusBus],
    central: CentralSystem | None,
    evidence: EventRecorder,
    evidence_path: Path,
    data_dir: Path,
    commands: CommandRegistry,
    mqtt_transports: Sequence[Any] = (),
    state: AgentState | None = None,
) -> DispatchService | None:
    """Build, start and connect the dispatch engine of ``site`` (``[dispatch]``).

    Call after the Modbus bus owners and the OCPP central system have started: the
    start resumes or reverts events persisted by an earlier run. Returns ``None`` (and
    records a ``config_error``) when the persisted dispatch state is unreadable, so
    the agent keeps metering; unusable trust stores or packs are recorded and leave
    the engine refusing events with the reason.
    """
    from ies_agent.dispatch.auth import load_trust
    from ies_agent.dispatch.engine import (
        DispatchEngine,
        MvSettings,
        mqtt_command_handler,
    )
    from ies_agent.dispatch.errors import (
        AuthenticationError,
        DispatchError,
        PolicyPackError,
    )
    from ies_agent.dispatch.executor import Actuator
    from ies_agent.dispatch.planner import DispatchDevice
    from ies_agent.dispatch.policy import PolicyPack, load_pack
    from ies_drivers.templates import shipped_configs_dir

    config = site.dispatch
    assert config is not None
    trust_dir = config.trust_dir or shipped_configs_dir() / "trust"
    trust = None
    try:
        trust = load_trust([trust_dir])
    except AuthenticationError as exc:
        _record_problem(evidence, "dispatch.trust_dir", str(exc))
    packs: list[PolicyPack] = []
    for path in config.policies or (shipped_configs_dir() / "policies",):
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            if trust is None:
                break
            try:
                packs.append(load_pack(file, trust))
            except PolicyPackError as exc:
                _record_problem(evidence, "dispatch.policies", str(exc))
    if not packs:
        _record_problem(
            evidence,
            "dispatch.policies",
            "no usable policy pack: every dispatch event will be refused",
        )
    devices: list[DispatchDevice] = []
    actuators: dict[str, Actuator] = {}
    for target in config.devices:
        devices.append(
            DispatchDevice(
                target.device_id,
                target.kind,
                target.groups,
                max_a=target.max_a,
                voltage_v=target.voltage_v,
                phases=target.phases,
            )
        )
        actuator = _actuator(target, site, buses, central)
        if actuator is None:
            _record_problem(
                evidence,
                "dispatch.devices",
                f"{target.device_id}: not running in this agent; not acted on",
            )
            continue
        actuators[target.device_id] = actuator
    try:
        engine = DispatchEngine(
            evidence=evidence,
            evidence_path=evidence_path,
            data_dir=data_dir,
            trust=trust,
            packs=packs,
            devices=devices,
            actuators=actuators,
            tz=site.gateway.timezone,
            contact_timeout_s=config.contact_timeout_s,
            mv_settings=MvSettings(
                meters=config.mv.meters,
                quantity=config.mv.quantity,
                method=config.mv.method,
                settle_s=config.mv.settle_s,
            ),
        )
    except DispatchError as exc:
        _record_problem(evidence, "dispatch", f"dispatch not started: {exc}")
        return None
    service = DispatchService(engine, commands, config.mqtt_command)
    if config.mqtt_command is not None:
        engine.register_source("mqtt", mqtt_ack_sink(mqtt_transports, site.gateway.id))
        commands.register(config.mqtt_command, mqtt_command_handler(engine))
    if config.beckn_command is not None:
        service.beckn_command = config.beckn_command
        _route_beckn(engine, site, config.beckn_command, commands, mqtt_transports)
    await engine.start()
    if config.openadr is not None:
        service.ven = _ven(engine, config.openadr, evidence)
    if state is not None:
        state.dispatch_events = DispatchEventsView(engine)
    log.info(
        "dispatch started",
        extra={
            "kv": {
                "packs": ",".join(p.label for p in packs) or "none",
                "devices": ",".join(sorted(actuators)) or "none",
                "mqtt": config.mqtt_command or "off",
                "beckn": config.beckn_command or "off",
                "openadr": "on" if service.ven is not None else "off",
            }
        },
    )
    return service


def _route_beckn(
    engine: DispatchEngine,
    site: Site,
    command: str,
    commands: CommandRegistry,
    mqtt_transports: Sequence[Any],
) -> None:
    """Take Beckn needs on ``cmd/<command>``; answer signed as the gateway when an
    upstream holds its Beckn key (an unusable key is recorded; answers go unsigned)."""
    from ies_agent.dispatch.beckn_route import BecknRoute, gateway_signer
    from ies_agent.upstream.errors import AuthError

    try:
        signer = gateway_signer(site.upstreams)
    except AuthError as exc:
        _record_problem(engine.evidence, "dispatch.beckn", f"answers unsigned: {exc}")
        signer = None
    route = BecknRoute(
        engine,
        transports=mqtt_transports,
        gateway_id=site.gateway.id,
        signer=signer,
    )
    route.register()
    commands.register(command, route.handle)


def _actuator(
    target: DispatchTarget,
    site: Site,
    buses: Mapping[str, ModbusBus],
    central: CentralSystem | None,
) -> Any:
    """The actuator of ``target``, or ``None`` when its device is not running."""
    from ies_agent.dispatch.executor import ChargerLimit, SunSpecLimit

    if target.kind == KIND_CHARGER:
        return ChargerLimit(target.device_id, central) if central is not None else None
    device = site.devices.get(target.device_id)
    if device is None or not device.enabled or device.bus not in buses:
        return None
    bases = (
        (device.sunspec_base,)
        if device.sunspec_base is not None
        else device.sunspec_bases
    )
    return SunSpecLimit(target.device_id, buses[device.bus], device.unit, bases=bases)


def _ven(
    engine: DispatchEngine, settings: OpenAdrSettings, evidence: EventRecorder
) -> OpenAdrVen | None:
    try:
        from ies_agent.dispatch.openadr import OpenAdrVen

        return OpenAdrVen(
            engine,
            vtn_url=settings.vtn_url,
            ven_name=settings.ven_name,
            issuer=settings.issuer,
            targets=settings.targets,
            cert=str(settings.cert) if settings.cert else None,
            key=str(settings.key) if settings.key else None,
            vtn_fingerprint=settings.vtn_fingerprint,
        )
    except Exception as exc:  # openleadr missing or refusing its settings
        _record_problem(evidence, "dispatch.openadr", f"VEN not started: {exc!r}")
        return None
