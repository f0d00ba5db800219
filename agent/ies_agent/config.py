"""Site configuration: one TOML file naming the gateway, its buses and its devices.

:func:`load_site` reads the file, resolves each device's template (the site's own
template directories first, then the shipped ``configs/devices``) and returns a frozen
:class:`Site`. It checks everything it can without touching hardware and reports every
problem at once, each with the file, line and key and what was expected there::

    site.toml:12: devices[1].template: no template 'sdm360' (did you mean
    'eastron-sdm630'?) (known: eastron-sdm630, rish-master-3430)

The file format is documented in ``configs/README.md`` and shown by
``configs/examples/site.toml``. Array indexes in key paths (``devices[1]``) count from
0 in the order the tables appear in the file.

Errors::

    ConfigError      the site file or a template it names is unusable; ``problems``
                     lists every ConfigProblem(file, line, key, message) found
"""

from __future__ import annotations

import dataclasses
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from ies_agent.dispatch.settings import DispatchConfig, read_dispatch
from ies_agent.dlms_config import DLMS_DEVICE_KEYS, DlmsDeviceSettings
from ies_agent.firmware_client import FirmwareConfig, read_firmware
from ies_agent.ocpp.config import OcppConfig, read_ocpp
from ies_agent.upstream.settings import (
    StorageConfig,
    UpstreamConfig,
    read_storage,
    read_upstreams,
)
from ies_agent.web.config import HttpConfig, read_http
from ies_drivers.modbus.model import DeviceTemplate
from ies_drivers.templates import (
    SUNSPEC_BASE_ADDRESSES,
    InvalidTemplateError,
    TemplateFile,
    TemplateNotFoundError,
    find_template_file,
)
from ies_drivers.tomlsource import (
    KeyPath,
    ProblemCollector,
    SourceProblem,
    TomlSourceError,
    did_you_mean,
    load_toml,
)

if TYPE_CHECKING:
    from ies_drivers.modbus.bus import BusSpec

ConfigProblem = SourceProblem
"""One problem: ``file``, ``line`` (None if unknown), ``key`` path and ``message``."""

BusKind = Literal[
    "tcp", "rtu", "rtu-over-tcp", "dlms-hdlc", "dlms-hdlc-tcp", "dlms-wrapper"
]
KeyAlgorithm = Literal["ecdsa-p256", "ed25519"]
Parity = Literal["N", "E", "O"]

BUS_KINDS: tuple[BusKind, ...] = (
    "tcp",
    "rtu",
    "rtu-over-tcp",
    "dlms-hdlc",
    "dlms-hdlc-tcp",
    "dlms-wrapper",
)
MODBUS_KINDS = ("tcp", "rtu", "rtu-over-tcp")
KEY_ALGORITHMS: tuple[KeyAlgorithm, ...] = ("ecdsa-p256", "ed25519")
INTERVALS_S = (900, 1800, 3600)
"""Interval lengths a production site may use: 15, 30 and 60 minutes."""
DEMO_INTERVAL_MAX_S = 60
"""Longest of the short (1-60 s) intervals allowed with ``demo = true``."""
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
DEFAULT_DATA_DIR = Path("/var/lib/ies-agent")
DEFAULT_TEMPLATE_DIR = "templates"
"""A site's own template directory, relative to the site file, used if it exists."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_ID_TEXT = "an id (letters, digits, '.', '_', ':' or '-'; at most 64)"
_INTERVAL = re.compile(r"\s*(\d+)\s*(s|sec|m|min|h)\s*")
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_PARITY: dict[str, Parity] = {
    "N": "N",
    "E": "E",
    "O": "O",
    "none": "N",
    "even": "E",
    "odd": "O",
}

_TOP_KEYS = {
    "gateway",
    "buses",
    "devices",
    "template_dirs",
    "upstreams",
    "storage",
    "ocpp",
    "http",
    "firmware",
    "dispatch",
}
_GATEWAY_KEYS = {"id", "timezone", "interval", "data_dir", "key_alg", "origin", "demo"}
_COMMON_BUS_KEYS = {"id", "kind", "gap_ms", "timeout_s", "backoff_max_s"}
_BUS_KEYS: dict[str, set[str]] = {
    "tcp": _COMMON_BUS_KEYS | {"host", "port"},
    "rtu-over-tcp": _COMMON_BUS_KEYS | {"host", "port", "baudrate"},
    "rtu": _COMMON_BUS_KEYS
    | {"serial_port", "baudrate", "parity", "stopbits", "bytesize"},
    "dlms-hdlc": _COMMON_BUS_KEYS | {"serial_port", "baudrate", "mode_e"},
    "dlms-hdlc-tcp": _COMMON_BUS_KEYS | {"host", "port"},
    "dlms-wrapper": _COMMON_BUS_KEYS | {"host", "port"},
}
_ALL_BUS_KEYS = set().union(*_BUS_KEYS.values())
_DEVICE_KEYS = {
    "id",
    "bus",
    "unit",
    "template",
    "poll_s",
    "timeout_s",
    "sunspec_base",
    "enabled",
} | DLMS_DEVICE_KEYS


class ConfigError(Exception):
    """Raised when a site configuration cannot be used.

    ``problems`` lists every problem found (not only the first); ``str()`` prints one
    per line as ``file:line: key: message``.
    """

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class GatewayConfig:
    """Who this gateway is and how it keeps time and evidence.

    ``interval_s`` is the length of the evidence intervals in seconds (900, 1800 or
    3600; 1-60 only for demos and tests). ``timezone`` is an IANA zone the intervals
    are aligned in. ``data_dir`` holds the evidence log and keys. ``origin`` names the
    checkpoints' log (None: the evidence log derives it from ``id``).
    """

    id: str
    timezone: str = "Asia/Kolkata"
    interval_s: int = 900
    data_dir: Path = DEFAULT_DATA_DIR
    key_alg: KeyAlgorithm = "ecdsa-p256"
    origin: str | None = None
    demo: bool = False


@dataclass(frozen=True)
class BusConfig:
    """One physical bus: a TCP endpoint, a serial line, or a serial line behind TCP.

    ``gap_ms`` is the silence kept between requests (None: the driver's default,
    derived from the line speed); ``timeout_s`` the default answer deadline of its
    devices; ``backoff_max_s`` the longest a failing device is left alone.
    """

    id: str
    kind: BusKind
    host: str = "127.0.0.1"
    port: int = 502
    serial_port: str = ""
    baudrate: int = 9600
    parity: Parity = "N"
    stopbits: int = 1
    bytesize: int = 8
    gap_ms: float | None = None
    timeout_s: float = 1.0
    backoff_max_s: float = 60.0
    mode_e: bool = False
    """DLMS on an optical probe: open with the IEC 62056-21 mode E handshake."""

    @property
    def label(self) -> str:
        """Where the bus is: ``host:port`` or the serial device path."""
        serial = self.kind in ("rtu", "dlms-hdlc")
        return self.serial_port if serial else f"{self.host}:{self.port}"

    @property
    def protocol(self) -> str:
        """``modbus`` or ``dlms``: which driver owns this bus."""
        return "dlms" if self.kind.startswith("dlms") else "modbus"

    def to_bus_spec(self) -> BusSpec:
        """Return the driver's :class:`~ies_drivers.modbus.bus.BusSpec` for this bus.

        Imported here, not at module level, so loading a config does not load the
        Modbus stack. Raises ``ValueError`` for a DLMS bus.
        """
        from ies_drivers.modbus.bus import BusSpec

        if self.kind not in ("tcp", "rtu", "rtu-over-tcp"):
            raise ValueError(f"bus {self.id} is a {self.kind} bus, not Modbus")
        return BusSpec(
            name=self.id,
            kind=self.kind,
            host=self.host,
            port=self.port,
            serial_port=self.serial_port,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            bytesize=self.bytesize,
            gap_s=None if self.gap_ms is None else self.gap_ms / 1000,
            timeout_s=self.timeout_s,
            backoff_max_s=self.backoff_max_s,
        )


@dataclass(frozen=True)
class DeviceConfig:
    """One device on a bus, with its template resolved.

    ``unit`` is the Modbus unit id. ``poll_s`` is the cadence of instantaneous values
    in seconds (cumulative registers are read at interval boundaries regardless).
    ``timeout_s`` overrides the bus's answer deadline for this device. For SunSpec
    templates ``sunspec_base`` pins the marker address, else ``sunspec_bases`` (from
    the template) are probed in order; ``sunspec_models`` selects the models to read.
    """

    id: str
    bus: str
    unit: int
    template: DeviceTemplate
    template_name: str
    poll_s: float = 10.0
    timeout_s: float | None = None
    sunspec_base: int | None = None
    enabled: bool = True
    sunspec_models: tuple[int, ...] = ()
    sunspec_bases: tuple[int, ...] = SUNSPEC_BASE_ADDRESSES
    template_path: Path | None = None
    dlms: DlmsDeviceSettings | None = None
    """Set for DLMS/COSEM meters (``dlms-*`` buses); ``template`` is then empty."""


@dataclass(frozen=True)
class Site:
    """A loaded, checked site configuration.

    ``buses`` and ``devices`` are keyed by id in file order; ``template_dirs`` are the
    site's own template directories (the shipped one is searched after them).
    ``upstreams`` are the ``[[upstreams]]`` in file order and ``storage`` the disk
    limits (``ies_agent.upstream.settings``).
    """

    path: Path
    gateway: GatewayConfig
    buses: dict[str, BusConfig]
    devices: dict[str, DeviceConfig]
    template_dirs: tuple[Path, ...] = field(default=())
    skipped: tuple[ConfigProblem, ...] = field(default=())
    """Problems of device entries left out (``load_site(skip_broken_devices=True)``)."""
    upstreams: tuple[UpstreamConfig, ...] = field(default=())
    storage: StorageConfig = field(default_factory=StorageConfig)
    ocpp: OcppConfig | None = None
    """The OCPP central system and CSMS bridge (``ies_agent.ocpp.config``)."""
    http: HttpConfig | None = None
    """The local web page (``ies_agent.web.config``); None: no page."""
    firmware: FirmwareConfig | None = None
    """The firmware bridge's socket (``ies_agent.firmware_client``); None: none."""
    dispatch: DispatchConfig | None = None
    """Dispatch (``ies_agent.dispatch.settings``); None: no ``[dispatch]`` table."""


def load_site(
    path: str | Path,
    *,
    allow_short_interval: bool = False,
    skip_broken_devices: bool = False,
) -> Site:
    """Read, check and return the site configuration at ``path``.

    ``allow_short_interval`` accepts 1-60 s intervals without ``demo = true`` (tests).
    Relative paths in the file (``data_dir``, ``template_dirs``) are relative to the
    file's directory. Serial ports are not checked here: the file may be checked on
    another machine. Raises :class:`ConfigError` listing every problem found.

    ``skip_broken_devices`` is for the running agent: when every problem concerns a
    ``[[devices]]`` entry (a template that does not exist, a bad unit id, …), those
    devices are left out and the problems returned in ``Site.skipped`` instead of
    raised, so one bad entry does not keep a gateway from reading the others.
    """
    try:
        document = load_toml(path)
    except TomlSourceError as exc:
        raise ConfigError([ConfigProblem(exc.path, exc.line, "", exc.reason)]) from None
    reader = _SiteReader(ProblemCollector(document), Path(path), allow_short_interval)
    site = reader.read(document.data)
    problems = reader.problems()
    if problems and site is not None and skip_broken_devices:
        broken = reader.broken_device_indexes(problems)
        if broken is not None:
            keep = {
                dev_id: dev
                for dev_id, dev in site.devices.items()
                if reader.device_indexes.get(dev_id) not in broken
            }
            return dataclasses.replace(site, devices=keep, skipped=tuple(problems))
    if problems or site is None:
        raise ConfigError(problems)
    return site


def parse_interval(value: object) -> int:
    """Return an interval length in seconds from ``900`` or ``"15m"``/``"5s"``/``"1h"``.

    Raises :class:`ValueError` with a message for anything else; whether the length is
    allowed is checked by the caller.
    """
    if isinstance(value, bool):
        raise ValueError('expected seconds (900) or a duration like "15m"')
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (match := _INTERVAL.fullmatch(value)):
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"{shown} is not an interval: write seconds (900) or a duration like "
            '"15m", "30m", "60m" ("5s" for demos)'
        )
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive interval")
    return seconds


# --- reading the file ----------------------------------------------------------------


class _SiteReader:
    """Turns the parsed TOML of a site file into a :class:`Site`; collects problems."""

    def __init__(self, check: ProblemCollector, path: Path, short_ok: bool) -> None:
        self.check = check
        self.path = path
        self.base = path.parent
        self.short_ok = short_ok
        self.template_problems: list[ConfigProblem] = []
        self._templates: dict[str, TemplateFile | None] = {}
        self.device_indexes: dict[str, int] = {}
        """Position of each accepted device among the ``[[devices]]`` tables."""
        self.template_users: dict[str, list[int]] = {}
        """Which ``[[devices]]`` tables name each template."""

    def broken_device_indexes(
        self, problems: Sequence[ConfigProblem]
    ) -> set[int] | None:
        """Return the ``[[devices]]`` indexes the problems concern.

        ``None`` when some problem is outside the device entries (gateway, buses, …),
        which the agent cannot run without.
        """
        broken: set[int] = set()
        for problem in problems:
            match = re.match(r"devices\[(\d+)\]", problem.key)
            if match:
                broken.add(int(match.group(1)))
                continue
            users = [
                index
                for name, indexes in self.template_users.items()
                for index in indexes
                if Path(problem.file).stem == name
            ]
            if not users:
                return None
            broken.update(users)
        return broken

    def problems(self) -> list[ConfigProblem]:
        """Problems of the site file in line order, then those of its templates."""
        own = sorted(self.check.problems, key=lambda p: p.line or 0)
        return own + self.template_problems

    def read(self, data: dict[str, Any]) -> Site | None:
        check = self.check
        check.unknown_keys(data, _TOP_KEYS, ())
        gateway = self.read_gateway(data)
        template_dirs = self.read_template_dirs(data)
        buses = self.read_buses(data)
        devices = self.read_devices(data, buses, template_dirs)
        upstreams = read_upstreams(check, data, self.resolve)
        storage = read_storage(check, data)
        ocpp = read_ocpp(check, data, self.resolve, taken_ids=devices)
        http = read_http(check, data, self.resolve)
        firmware = read_firmware(check, data, self.resolve)
        dispatch = read_dispatch(
            check,
            data,
            self.resolve,
            devices=devices,
            declared_devices=self.declared_device_ids(data),
            ocpp=ocpp,
        )
        if gateway is None:
            return None
        return Site(
            path=self.path,
            gateway=gateway,
            buses=buses,
            devices=devices,
            template_dirs=tuple(template_dirs),
            upstreams=upstreams,
            storage=storage,
            ocpp=ocpp,
            http=http,
            firmware=firmware,
            dispatch=dispatch,
        )

    def read_gateway(self, data: dict[str, Any]) -> GatewayConfig | None:
        check = self.check
        table = check.table(data, ("gateway",), required=True)
        if table is None:
            return None
        at: KeyPath = ("gateway",)
        check.unknown_keys(table, _GATEWAY_KEYS, at)
        gateway_id = check.string(
            table, (*at, "id"), required=True, pattern=_ID, pattern_text=_ID_TEXT
        )
        demo = bool(check.boolean(table, (*at, "demo"), default=False))
        timezone = self.read_timezone(table, (*at, "timezone"))
        interval_s = self.read_interval(table, (*at, "interval"), demo)
        data_dir = check.string(table, (*at, "data_dir"))
        key_alg = check.choice(
            table, (*at, "key_alg"), KEY_ALGORITHMS, default="ecdsa-p256"
        )
        origin = check.string(table, (*at, "origin"))
        if origin is not None and not origin.strip():
            check.add(
                (*at, "origin"), "must not be empty (leave it out for the default)"
            )
        if gateway_id is None or timezone is None or interval_s is None or not key_alg:
            return None
        return GatewayConfig(
            id=gateway_id,
            timezone=timezone,
            interval_s=interval_s,
            data_dir=self.resolve(data_dir) if data_dir else DEFAULT_DATA_DIR,
            key_alg="ed25519" if key_alg == "ed25519" else "ecdsa-p256",
            origin=origin or None,
            demo=demo,
        )

    def read_timezone(self, table: Mapping[str, Any], at: KeyPath) -> str | None:
        name = self.check.string(table, at, default="Asia/Kolkata")
        if name is None:
            return None
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            abbreviations = {"IST": "Asia/Kolkata", "UTC": "UTC", "GMT": "UTC"}
            if name.upper() in abbreviations:
                hint = f" (did you mean '{abbreviations[name.upper()]}'?)"
            else:
                hint = did_you_mean(name, zoneinfo.available_timezones())
            self.check.add(
                at,
                f"unknown time zone {name!r}{hint}; expected an IANA name such as "
                '"Asia/Kolkata"',
            )
            return None
        return name

    def read_interval(
        self, table: Mapping[str, Any], at: KeyPath, demo: bool
    ) -> int | None:
        if "interval" not in table:
            return INTERVALS_S[0]
        try:
            seconds = parse_interval(table["interval"])
        except ValueError as exc:
            self.check.add(at, str(exc))
            return None
        if seconds in INTERVALS_S:
            return seconds
        if seconds <= DEMO_INTERVAL_MAX_S and (demo or self.short_ok):
            return seconds
        extra = (
            " (1-60 s only with demo = true in [gateway])"
            if seconds <= DEMO_INTERVAL_MAX_S
            else ""
        )
        written = table["interval"]
        shown = (
            f"{written!r} ({seconds} s)" if isinstance(written, str) else f"{seconds} s"
        )
        if isinstance(written, int) and written in (15, 30, 60):
            extra += f'; a bare number is seconds: write "{written}m" for minutes'
        self.check.add(
            at,
            f'an interval of {shown} is not allowed: use "15m", "30m" or "60m"{extra}',
        )
        return None

    def read_template_dirs(self, data: dict[str, Any]) -> list[Path]:
        at: KeyPath = ("template_dirs",)
        if "template_dirs" not in data:
            default = self.base / DEFAULT_TEMPLATE_DIR
            return [default] if default.is_dir() else []
        entries = self.check.string_list(data, at) or []
        dirs: list[Path] = []
        for index, entry in enumerate(entries):
            directory = self.resolve(entry)
            if not directory.is_dir():
                self.check.add((*at, index), f"no such directory: {directory}")
            else:
                dirs.append(directory)
        return dirs

    def read_buses(self, data: dict[str, Any]) -> dict[str, BusConfig]:
        check = self.check
        buses: dict[str, BusConfig] = {}
        lines: dict[str, int | None] = {}
        for index, table in enumerate(check.tables(data, ("buses",))):
            at: KeyPath = ("buses", index)
            bus = self.read_bus(table, at)
            if bus is None:
                continue
            if bus.id in buses:
                check.add(
                    (*at, "id"),
                    f"bus id '{bus.id}' is already used (line {lines[bus.id]})",
                )
                continue
            buses[bus.id] = bus
            lines[bus.id] = check.document.line_of((*at, "id"))
        return buses

    def read_bus(self, table: dict[str, Any], at: KeyPath) -> BusConfig | None:
        check = self.check
        bus_id = check.string(
            table, (*at, "id"), required=True, pattern=_ID, pattern_text=_ID_TEXT
        )
        kind = check.choice(table, (*at, "kind"), BUS_KINDS, required=True)

        # Keys must exist and apply to this kind of bus.
        allowed = _BUS_KEYS.get(kind or "", _ALL_BUS_KEYS)
        for key in table:
            if key not in _ALL_BUS_KEYS:
                check.add(
                    (*at, key),
                    f"unknown key{did_you_mean(key, _ALL_BUS_KEYS)}; "
                    f"allowed here: {', '.join(sorted(allowed))}",
                )
            elif key not in allowed:
                kinds = [k for k, keys in _BUS_KEYS.items() if key in keys]
                check.add(
                    (*at, key),
                    f"{key} applies to {', '.join(kinds[:-1])}"
                    f"{' and ' if len(kinds) > 1 else ''}{kinds[-1]} buses only "
                    f"(this bus is {kind})",
                )

        # Where the bus is.
        host = "127.0.0.1"
        port = 502
        serial_port = ""
        if kind in ("tcp", "rtu-over-tcp", "dlms-hdlc-tcp", "dlms-wrapper"):
            host = self.where(table, (*at, "host"), f'a {kind} bus needs host = "..."')
            default_port = 4059 if kind == "dlms-wrapper" else 502
            port = (
                check.integer(
                    table, (*at, "port"), default=default_port, low=1, high=65535
                )
                or 0
            )
        elif kind in ("rtu", "dlms-hdlc"):
            serial_port = self.where(
                table,
                (*at, "serial_port"),
                'an rtu bus needs serial_port = "/dev/ttyUSB0" (or the port it uses)',
            )

        # The serial line's settings (rtu; rtu-over-tcp only knows the baud rate).
        baudrate = check.integer(table, (*at, "baudrate"), default=9600)
        if baudrate is not None and baudrate not in BAUDRATES:
            check.add(
                (*at, "baudrate"),
                f"{baudrate} is not a standard rate: expected one of "
                + ", ".join(str(b) for b in BAUDRATES),
            )
        parity = self.read_parity(table, (*at, "parity"))
        stopbits = check.integer(table, (*at, "stopbits"), default=1, low=1, high=2)
        bytesize = check.integer(table, (*at, "bytesize"), default=8, low=7, high=8)

        # Timing.
        gap_ms = check.number(table, (*at, "gap_ms"), low=0, high=1000)
        timeout_s = check.number(
            table, (*at, "timeout_s"), default=1.0, low=0, high=60, low_exclusive=True
        )
        backoff_max_s = check.number(
            table, (*at, "backoff_max_s"), default=60.0, low=2, high=3600
        )
        mode_e = check.boolean(table, (*at, "mode_e"), default=False)

        if (
            bus_id is None
            or kind is None
            or baudrate is None
            or parity is None
            or stopbits is None
            or bytesize is None
            or timeout_s is None
            or backoff_max_s is None
            or mode_e is None
            or ("gap_ms" in table and gap_ms is None)
        ):
            return None
        return BusConfig(
            id=bus_id,
            kind=cast(BusKind, kind),
            host=host,
            port=port,
            serial_port=serial_port,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            gap_ms=gap_ms,
            timeout_s=timeout_s,
            backoff_max_s=backoff_max_s,
            mode_e=mode_e,
        )

    def where(self, table: Mapping[str, Any], at: KeyPath, needed: str) -> str:
        """Return the non-empty string at ``at`` (host, serial port); ``""`` if bad."""
        key = str(at[-1])
        if key not in table:
            self.check.add(at, f"missing: {needed}")
            return ""
        value = self.check.string(table, at) or ""
        if isinstance(table[key], str) and not value.strip():
            self.check.add(at, f"empty: {needed}")
            return ""
        return value

    def read_parity(self, table: Mapping[str, Any], at: KeyPath) -> Parity | None:
        if "parity" not in table:
            return "N"
        value = table["parity"]
        if isinstance(value, str) and value in _PARITY:
            return _PARITY[value]
        shown = repr(value) if isinstance(value, str) else "not a string"
        self.check.add(at, f'{shown} is not a parity: expected "N", "E" or "O"')
        return None

    def read_devices(
        self,
        data: dict[str, Any],
        buses: Mapping[str, BusConfig],
        template_dirs: Sequence[Path],
    ) -> dict[str, DeviceConfig]:
        check = self.check
        devices: dict[str, DeviceConfig] = {}
        id_lines: dict[str, int | None] = {}
        units: dict[tuple[str, int], str] = {}
        declared_buses = self.declared_bus_ids(data)
        for index, table in enumerate(check.tables(data, ("devices",))):
            at: KeyPath = ("devices", index)
            device = self.read_device(table, at, buses, declared_buses, template_dirs)
            if device is None:
                continue
            if device.id in devices:
                check.add(
                    (*at, "id"),
                    f"device id '{device.id}' is already used "
                    f"(line {id_lines[device.id]})",
                )
                continue
            owner = units.get((device.bus, device.unit))
            if owner is not None:
                check.add(
                    (*at, "unit"),
                    f"unit {device.unit} on bus '{device.bus}' is already used by "
                    f"device '{owner}' (line {id_lines[owner]})",
                )
                continue
            devices[device.id] = device
            self.device_indexes[device.id] = index
            id_lines[device.id] = check.document.line_of((*at, "id"))
            units[(device.bus, device.unit)] = device.id
        return devices

    def read_device(
        self,
        table: dict[str, Any],
        at: KeyPath,
        buses: Mapping[str, BusConfig],
        declared_buses: Sequence[str],
        template_dirs: Sequence[Path],
    ) -> DeviceConfig | None:
        check = self.check
        check.unknown_keys(table, _DEVICE_KEYS, at)
        device_id = check.string(
            table, (*at, "id"), required=True, pattern=_ID, pattern_text=_ID_TEXT
        )

        # The bus: must be declared; units depend on its kind.
        bus_id = check.string(table, (*at, "bus"), required=True)
        bus = buses.get(bus_id or "")
        if bus_id is not None and bus is None and bus_id not in declared_buses:
            known = ", ".join(declared_buses) or "none declared"
            check.add(
                (*at, "bus"),
                f"no bus '{bus_id}'{did_you_mean(bus_id, declared_buses)} "
                f"(buses: {known})",
            )
        if bus is not None and bus.protocol == "dlms":
            return self.read_dlms_device(table, at, bus, device_id)
        for key in sorted(DLMS_DEVICE_KEYS & set(table)):
            check.add((*at, key), f"{key} applies to DLMS meters (dlms-* buses) only")
        tcp = bus is not None and bus.kind == "tcp"
        unit = check.integer(
            table,
            (*at, "unit"),
            required=True,
            low=0 if tcp else 1,
            high=255 if tcp else 247,
        )

        # The template, resolved now so a typo fails at check time, not at 3 a.m.
        name = check.string(table, (*at, "template"), required=True)
        if name is not None:
            self.template_users.setdefault(name, []).append(int(at[1]))
        template_file = self.template(name, (*at, "template"), template_dirs)

        poll_s = check.number(table, (*at, "poll_s"), default=10.0, low=0.1, high=86400)
        timeout_s = check.number(
            table, (*at, "timeout_s"), low=0, high=60, low_exclusive=True
        )
        enabled = check.boolean(table, (*at, "enabled"), default=True)
        sunspec_base = check.integer(table, (*at, "sunspec_base"), low=0, high=0xFFFD)
        if (
            sunspec_base is not None
            and template_file is not None
            and not template_file.template.sunspec
        ):
            check.add(
                (*at, "sunspec_base"),
                f"applies to SunSpec templates only ('{name}' is plain Modbus)",
            )

        if (
            device_id is None
            or bus is None
            or unit is None
            or name is None
            or template_file is None
            or poll_s is None
            or enabled is None
            or ("timeout_s" in table and timeout_s is None)
            or ("sunspec_base" in table and sunspec_base is None)
        ):
            return None
        return DeviceConfig(
            id=device_id,
            bus=bus.id,
            unit=unit,
            template=template_file.template,
            template_name=name,
            poll_s=poll_s,
            timeout_s=timeout_s,
            sunspec_base=sunspec_base,
            enabled=enabled,
            sunspec_models=template_file.sunspec_models,
            sunspec_bases=template_file.sunspec_bases,
            template_path=template_file.path,
        )

    def read_dlms_device(
        self,
        table: dict[str, Any],
        at: KeyPath,
        bus: BusConfig,
        device_id: str | None,
    ) -> DeviceConfig | None:
        """Read a DLMS meter entry: profile, addresses, association, secret files."""
        from ies_agent.dlms_config import (
            AUTHENTICATIONS,
            DEFAULT_CLIENT_SAP,
            Authentication,
        )
        from ies_drivers.dlms.errors import DlmsError
        from ies_drivers.dlms.profiles import load_profile

        check = self.check
        for key in ("unit", "sunspec_base"):
            if key in table:
                check.add(
                    (*at, key),
                    f"{key} applies to Modbus devices; a DLMS meter is addressed by "
                    "server_logical and server_physical",
                )
        name = check.string(table, (*at, "template"), required=True)
        if name is not None:
            self.template_users.setdefault(name, []).append(int(at[1]))
            try:
                load_profile(name)
            except DlmsError as exc:
                check.add(
                    (*at, "template"),
                    f"no usable DLMS meter profile '{name}' (configs/dlms/): {exc}",
                )
                name = None
        auth = check.choice(table, (*at, "auth"), AUTHENTICATIONS, default="none")
        client_sap = check.integer(
            table,
            (*at, "client_sap"),
            default=DEFAULT_CLIENT_SAP.get(auth or "none", 16),
            low=1,
            high=127,
        )
        logical = check.integer(
            table, (*at, "server_logical"), default=1, low=0, high=0x3FFF
        )
        physical = check.integer(
            table, (*at, "server_physical"), default=0, low=0, high=0x3FFF
        )
        password_file = self.secret_path(table, (*at, "password_file"))
        keys_file = self.secret_path(table, (*at, "keys_file"))
        if auth == "low" and "password_file" not in table:
            check.add(
                (*at, "password_file"),
                'auth = "low" needs password_file = "..." (the LLS password)',
            )
        if auth == "high-gmac" and "keys_file" not in table:
            check.add(
                (*at, "keys_file"),
                'auth = "high-gmac" needs keys_file = "..." (block cipher key, '
                "authentication key, system title)",
            )
        poll_s = check.number(table, (*at, "poll_s"), default=10.0, low=0.1, high=86400)
        timeout_s = check.number(
            table, (*at, "timeout_s"), low=0, high=60, low_exclusive=True
        )
        enabled = check.boolean(table, (*at, "enabled"), default=True)
        if (
            device_id is None
            or name is None
            or auth is None
            or client_sap is None
            or logical is None
            or physical is None
            or poll_s is None
            or enabled is None
            or ("timeout_s" in table and timeout_s is None)
        ):
            return None
        return DeviceConfig(
            id=device_id,
            bus=bus.id,
            unit=physical,
            template=DeviceTemplate(
                id=name, manufacturer="", model="", kind="meter", points=()
            ),
            template_name=name,
            poll_s=poll_s,
            timeout_s=timeout_s,
            enabled=enabled,
            dlms=DlmsDeviceSettings(
                profile=name,
                auth=cast(Authentication, auth),
                client_sap=client_sap,
                server_logical=logical,
                server_physical=physical,
                password_file=password_file,
                keys_file=keys_file,
            ),
        )

    def secret_path(self, table: Mapping[str, Any], at: KeyPath) -> Path | None:
        """Return the path of a secret file (relative to the site file)."""
        text = self.check.string(table, at)
        return None if text is None else self.resolve(text)

    def template(
        self, name: str | None, at: KeyPath, template_dirs: Sequence[Path]
    ) -> TemplateFile | None:
        """Return the template ``name``, loading each one once; record problems."""
        if name is None:
            return None
        if name not in self._templates:
            try:
                self._templates[name] = find_template_file(name, template_dirs)
            except TemplateNotFoundError as exc:
                self._templates[name] = None
                listing = ", ".join(exc.known) or "none"
                from ies_drivers.dlms.profiles import profiles_dir

                if (profiles_dir() / f"{name}.toml").is_file():
                    self.check.add(
                        at,
                        f"'{name}' is a DLMS/COSEM meter profile: put this device on "
                        'a bus of kind "dlms-hdlc", "dlms-hdlc-tcp" or "dlms-wrapper"',
                    )
                    return None
                self.check.add(
                    at,
                    f"no template '{name}'{did_you_mean(name, exc.known)} "
                    f"(known: {listing})",
                )
                return None
            except InvalidTemplateError as exc:
                self._templates[name] = None
                self.template_problems.extend(exc.problems)
                files = sorted({p.file for p in exc.problems})
                self.check.add(
                    at,
                    f"template '{name}' is invalid: {len(exc.problems)} problem(s) in "
                    f"{', '.join(files)}, listed below",
                )
                return None
        return self._templates[name]

    def declared_bus_ids(self, data: Mapping[str, Any]) -> list[str]:
        """Bus ids written in the file, even of buses that had other problems."""
        tables = data.get("buses")
        if not isinstance(tables, list):
            return []
        ids = [t.get("id") for t in tables if isinstance(t, dict)]
        return list(dict.fromkeys(i for i in ids if isinstance(i, str)))

    def declared_device_ids(self, data: Mapping[str, Any]) -> list[str]:
        """Device ids written in the file, even of entries that had problems."""
        tables = data.get("devices")
        if not isinstance(tables, list):
            return []
        ids = [t.get("id") for t in tables if isinstance(t, dict)]
        return [i for i in ids if isinstance(i, str)]

    def resolve(self, text: str) -> Path:
        """Return ``text`` as a path; relative paths are relative to the site file."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path
