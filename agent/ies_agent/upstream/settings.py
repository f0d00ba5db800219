"""The ``[[upstreams]]`` and ``[storage]`` tables of a site file.

``ies_agent.config`` calls :func:`read_upstreams` and :func:`read_storage` while it
reads a site; problems go to the same collector, so they are reported with the rest as
``file:line: key: message``. Nothing here opens a file or a socket: certificate, key and
password files are read when a connector starts (a site file may be checked on another
machine), and then a missing or bad one is a clear :class:`~.errors.TlsError` or
:class:`~.errors.AuthError`.

One table per upstream::

    [[upstreams]]
    name = "utility-broker"          # id used in logs, status and the cursor file name
    kind = "mqtt"                    # "mqtt" | "ies-https" | "file"
    url = "mqtts://broker.example:8883"
    prefix = "ies"                   # topics: {prefix}/{gateway id}/evidence, ...
    tls_ca_file = "ca.pem"           # server verification (system CAs if absent)
    tls_cert_file = "gw.pem"         # client certificate, with tls_key_file
    tls_key_file = "gw.key"
    username = "gw-0001"
    password_file = "mqtt.pass"      # the secret never sits in the site file
    e2e_ack = true                   # a collector confirms on {prefix}/{gw}/ack

Relative paths are relative to the site file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ies_drivers.tomlsource import KeyPath, ProblemCollector, did_you_mean

UpstreamKind = Literal["mqtt", "ies-https", "file"]
MqttProtocol = Literal["5", "3.1.1"]
BecknMode = Literal["adapter", "direct"]

UPSTREAM_KINDS: tuple[UpstreamKind, ...] = ("mqtt", "ies-https", "file")
MQTT_PROTOCOLS: tuple[MqttProtocol, ...] = ("5", "3.1.1")
BECKN_MODES: tuple[BecknMode, ...] = ("adapter", "direct")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_TEXT = "a name (letters, digits, '.', '_' or '-'; at most 64)"
_PREFIX = re.compile(r"[^/+#\x00]+(/[^/+#\x00]+)*")
_ACTION = re.compile(r"[a-z_]{1,40}")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

_COMMON_KEYS = {
    "name",
    "kind",
    "enabled",
    "batch_max_entries",
    "batch_max_bytes",
    "backoff_max_s",
    "timeout_s",
}
_TLS_KEYS = {"tls_ca_file", "tls_cert_file", "tls_key_file"}
_KEYS: dict[str, set[str]] = {
    "mqtt": _COMMON_KEYS
    | _TLS_KEYS
    | {
        "url",
        "prefix",
        "client_id",
        "protocol",
        "username",
        "password_file",
        "keepalive_s",
        "session_expiry_s",
        "inflight",
        "e2e_ack",
        "e2e_timeout_s",
        "telemetry_s",
    },
    "ies-https": _COMMON_KEYS
    | _TLS_KEYS
    | {
        "url",
        "mode",
        "action",
        "subscriber_id",
        "key_id",
        "signing_key_file",
        "counterparty_id",
        "network_id",
        "domain",
        "signature_ttl_s",
        "meter_refs",
    },
    "file": _COMMON_KEYS | {"path", "fsync"},
}
_ALL_KEYS = set().union(*_KEYS.values())
_STORAGE_KEYS = {"reserve_mb", "quota_mb", "check_s"}


@dataclass(frozen=True)
class UpstreamConfig:
    """One configured upstream (see the module docstring for the TOML form).

    Common: ``batch_max_entries`` / ``batch_max_bytes`` bound one message (entries,
    bytes of entry lines); ``backoff_max_s`` caps the jittered reconnect back-off;
    ``timeout_s`` bounds one publish or request waiting for its acknowledgement.

    MQTT: ``url`` (``mqtt://`` or ``mqtts://``), topic ``prefix``, ``protocol`` 5 or
    3.1.1, ``client_id`` (default ``<gateway id>-<name>``; fixed, for the persistent
    session), ``session_expiry_s`` (MQTT 5), ``inflight`` (messages awaiting PUBACK at
    once), ``e2e_ack`` with ``e2e_timeout_s`` (resend from the collector's confirmed
    ``seq`` when confirmations stall that long), ``telemetry_s`` (live values every so
    many seconds at QoS 0; 0 turns it off).

    IES over HTTPS: ``url`` (the endpoint; requests go to ``{url}/{action}``), ``mode``
    ``adapter`` (an operator's Beckn adapter signs; mutual TLS) or ``direct`` (the
    agent signs with Ed25519 as ``subscriber_id`` / ``key_id`` using
    ``signing_key_file``), ``counterparty_id``, ``network_id``, ``domain``,
    ``signature_ttl_s`` (``expires - created``), ``meter_refs`` (device id -> meter
    reference: a DID or a serial number).

    File: ``path`` (a directory or a mounted USB stick) and ``fsync``.
    """

    name: str
    kind: UpstreamKind
    enabled: bool = True
    url: str = ""
    path: Path | None = None
    batch_max_entries: int = 200
    batch_max_bytes: int = 256 * 1024
    backoff_max_s: float = 60.0
    timeout_s: float = 15.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    prefix: str = "ies"
    client_id: str | None = None
    protocol: MqttProtocol = "5"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    inflight: int = 8
    e2e_ack: bool = False
    e2e_timeout_s: float = 30.0
    telemetry_s: float = 10.0
    mode: BecknMode = "adapter"
    action: str = "on_status"
    subscriber_id: str | None = None
    key_id: str | None = None
    signing_key_file: Path | None = None
    counterparty_id: str | None = None
    network_id: str | None = None
    domain: str = "ies:meter-data"
    signature_ttl_s: int = 60
    meter_refs: Mapping[str, str] = field(default_factory=dict)
    fsync: bool = True

    @property
    def tls(self) -> bool:
        """Whether this upstream talks TLS (``mqtts://`` or ``https://``)."""
        scheme = urlsplit(self.url).scheme
        return scheme in ("mqtts", "https")


@dataclass(frozen=True)
class StorageConfig:
    """How much disk the data directory may take before the agent raises the alarm.

    ``reserve_mb``: free space (MiB) to keep on the data directory's file system;
    ``quota_mb``: the most the evidence files may take (0: no quota). ``check_s``: how
    often to look. See ``ies_agent.upstream.diskguard`` for what happens then.
    """

    reserve_mb: float = 64.0
    quota_mb: float = 0.0
    check_s: float = 30.0


def read_storage(check: ProblemCollector, data: Mapping[str, Any]) -> StorageConfig:
    """Return the ``[storage]`` table of a site (defaults when absent)."""
    table = check.table(data, ("storage",))
    if table is None:
        return StorageConfig()
    at: KeyPath = ("storage",)
    check.unknown_keys(table, _STORAGE_KEYS, at)
    reserve = check.number(table, (*at, "reserve_mb"), default=64.0, low=0)
    quota = check.number(table, (*at, "quota_mb"), default=0.0, low=0)
    every = check.number(table, (*at, "check_s"), default=30.0, low=0.1, high=3600)
    return StorageConfig(
        reserve_mb=64.0 if reserve is None else reserve,
        quota_mb=0.0 if quota is None else quota,
        check_s=30.0 if every is None else every,
    )


def read_upstreams(
    check: ProblemCollector,
    data: Mapping[str, Any],
    resolve: Callable[[str], Path],
) -> tuple[UpstreamConfig, ...]:
    """Return the ``[[upstreams]]`` of a site in file order; record problems.

    ``resolve`` turns a path written in the file into a path (relative to the file).
    """
    upstreams: list[UpstreamConfig] = []
    names: set[str] = set()
    for index, table in enumerate(check.tables(data, ("upstreams",))):
        at: KeyPath = ("upstreams", index)
        upstream = _read_upstream(check, table, at, resolve)
        if upstream is None:
            continue
        if upstream.name in names:
            check.add((*at, "name"), f"upstream name '{upstream.name}' is already used")
            continue
        names.add(upstream.name)
        upstreams.append(upstream)
    return tuple(upstreams)


def _read_upstream(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    resolve: Callable[[str], Path],
) -> UpstreamConfig | None:
    name = check.string(
        table, (*at, "name"), required=True, pattern=_NAME, pattern_text=_NAME_TEXT
    )
    kind = check.choice(table, (*at, "kind"), UPSTREAM_KINDS, required=True)
    allowed = _KEYS.get(kind or "", _ALL_KEYS)
    for key in table:
        if key not in _ALL_KEYS:
            check.add(
                (*at, key),
                f"unknown key{did_you_mean(key, _ALL_KEYS)}; "
                f"allowed here: {', '.join(sorted(allowed))}",
            )
        elif key not in allowed:
            kinds = [k for k, keys in _KEYS.items() if key in keys]
            check.add(
                (*at, key),
                f"{key} applies to {' and '.join(kinds)} upstreams only "
                f"(this one is {kind})",
            )
    values: dict[str, Any] = {}
    ok = True

    def put(key: str, value: Any, *, needed: bool = False) -> None:
        nonlocal ok
        if value is None:
            if key in table or needed:
                ok = False
            return
        values[key] = value

    # What every kind has.
    put("enabled", check.boolean(table, (*at, "enabled"), default=True))
    put(
        "batch_max_entries",
        check.integer(
            table, (*at, "batch_max_entries"), default=200, low=1, high=100_000
        ),
    )
    put(
        "batch_max_bytes",
        check.integer(
            table,
            (*at, "batch_max_bytes"),
            default=256 * 1024,
            low=1024,
            high=64 * 1024 * 1024,
        ),
    )
    put(
        "backoff_max_s",
        check.number(table, (*at, "backoff_max_s"), default=60.0, low=0.1, high=3600),
    )
    put(
        "timeout_s",
        check.number(
            table, (*at, "timeout_s"), default=15.0, low=0, high=600, low_exclusive=True
        ),
    )

    # Where it goes.
    if kind in ("mqtt", "ies-https"):
        url = check.string(table, (*at, "url"), required=True)
        if url is not None and not _url_ok(check, (*at, "url"), url, kind):
            url = None
        put("url", url, needed=True)
        for key in sorted(_TLS_KEYS):
            text = check.string(table, (*at, key))
            put(key, resolve(text) if text else None)
        if ("tls_cert_file" in table) != ("tls_key_file" in table):
            check.add(
                (*at, "tls_cert_file" if "tls_cert_file" in table else "tls_key_file"),
                "a client certificate needs both tls_cert_file and tls_key_file",
            )
            ok = False
        if url and urlsplit(url).scheme in ("mqtt", "http"):
            for key in sorted(_TLS_KEYS & set(table)):
                check.add(
                    (*at, key),
                    f"TLS files are set but the url is plain {urlsplit(url).scheme}://;"
                    " write mqtts:// or https:// (the agent never mixes the two)",
                )
                ok = False
    elif kind == "file":
        text = check.string(table, (*at, "path"), required=True)
        put("path", resolve(text) if text else None, needed=True)
        put("fsync", check.boolean(table, (*at, "fsync"), default=True))

    if kind == "mqtt":
        ok = _read_mqtt(check, table, at, resolve, put) and ok
    elif kind == "ies-https":
        ok = _read_ies(check, table, at, resolve, put) and ok

    if name is None or kind is None or not ok:
        return None
    return UpstreamConfig(name=name, kind=kind, **values)  # type: ignore[arg-type]


def _url_ok(check: ProblemCollector, at: KeyPath, url: str, kind: str) -> bool:
    """Record what is wrong with an upstream url; return whether it is usable.

    MQTT urls are ``mqtt[s]://host[:port]`` and nothing else: topics come from
    ``prefix``, so a path, query or fragment would be silently meaningless. IES urls
    may have a path (the endpoint; requests go to ``{url}/{action}``) but no query
    or fragment, which that would break. Credentials in a url are refused for both
    (they would end up in logs and status); messages never repeat them.
    """
    parts = urlsplit(url)
    shown = _without_credentials(url)
    schemes = ("mqtt", "mqtts") if kind == "mqtt" else ("https", "http")
    example = (
        "mqtts://broker.example:8883" if kind == "mqtt" else "https://ies.example/beckn"
    )
    if parts.scheme not in schemes or not parts.hostname:
        check.add(at, f"{shown!r} is not a {kind} url; expected e.g. {example!r}")
        return False
    if parts.username is not None or parts.password is not None:
        where = (
            'username = "..." and password_file = "..." (the password in a file '
            "readable by the agent only)"
            if kind == "mqtt"
            else "a client certificate (tls_cert_file, tls_key_file) or "
            'mode = "direct" signing'
        )
        check.add(
            at,
            f"{shown!r}: a user name or password in the url is refused (it would "
            f"show in logs and status); use {where}",
        )
        return False
    try:
        _ = parts.port
    except ValueError:
        check.add(at, f"{shown!r} has a bad port number")
        return False
    extras = []
    if kind == "mqtt" and parts.path not in ("", "/"):
        extras.append(f"a path ({parts.path!r})")
    if "?" in url:
        extras.append(f"a query ('?{parts.query}')")
    if "#" in url:
        extras.append(f"a fragment ('#{parts.fragment}')")
    if extras:
        meaning = (
            "an MQTT url names only the broker, mqtt[s]://host[:port]; topics come "
            "from prefix"
            if kind == "mqtt"
            else "requests go to {url}/{action}"
        )
        check.add(
            at,
            f"{shown!r} has {' and '.join(extras)}, which the agent would not use: "
            f"{meaning}; expected e.g. {example!r}",
        )
        return False
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        check.add(
            at,
            "plain http:// is only allowed to a local adapter on this gateway "
            "(127.0.0.1); use https://",
        )
        return False
    return True


def _without_credentials(url: str) -> str:
    """Return ``url`` with any ``user:password@`` part replaced by ``***@``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"***@{host}").geturl()


def _read_mqtt(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    resolve: Callable[[str], Path],
    put: Callable[..., None],
) -> bool:
    ok = True
    prefix = check.string(table, (*at, "prefix"), default="ies")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        check.add(
            (*at, "prefix"),
            f"{prefix!r} is not a topic prefix: no '+', '#', empty levels or "
            "leading/trailing '/'",
        )
        prefix = None
    put("prefix", prefix)
    put("client_id", check.string(table, (*at, "client_id")))
    put("protocol", check.choice(table, (*at, "protocol"), MQTT_PROTOCOLS, default="5"))
    username = check.string(table, (*at, "username"))
    put("username", username)
    password = check.string(table, (*at, "password_file"))
    if password and username is None and "username" not in table:
        check.add((*at, "password_file"), 'a password needs username = "..." too')
        ok = False
    put("password_file", resolve(password) if password else None)
    put(
        "keepalive_s",
        check.integer(table, (*at, "keepalive_s"), default=30, low=5, high=3600),
    )
    put(
        "session_expiry_s",
        check.integer(
            table,
            (*at, "session_expiry_s"),
            default=7 * 24 * 3600,
            low=0,
            high=2**32 - 1,
        ),
    )
    put("inflight", check.integer(table, (*at, "inflight"), default=8, low=1, high=64))
    put("e2e_ack", check.boolean(table, (*at, "e2e_ack"), default=False))
    put(
        "e2e_timeout_s",
        check.number(table, (*at, "e2e_timeout_s"), default=30.0, low=0.5, high=86400),
    )
    put(
        "telemetry_s",
        check.number(table, (*at, "telemetry_s"), default=10.0, low=0, high=86400),
    )
    return ok


def _read_ies(
    check: ProblemCollector,
    table: Mapping[str, Any],
    at: KeyPath,
    resolve: Callable[[str], Path],
    put: Callable[..., None],
) -> bool:
    ok = True
    mode = check.choice(table, (*at, "mode"), BECKN_MODES, default="adapter")
    put("mode", mode)
    action = check.string(
        table,
        (*at, "action"),
        default="on_status",
        pattern=_ACTION,
        pattern_text="a Beckn action such as on_status",
    )
    put("action", action)
    for key in ("subscriber_id", "key_id", "counterparty_id", "network_id", "domain"):
        put(key, check.string(table, (*at, key)))
    key_file = check.string(table, (*at, "signing_key_file"))
    put("signing_key_file", resolve(key_file) if key_file else None)
    if mode == "direct":
        for key in ("subscriber_id", "key_id", "signing_key_file"):
            if key not in table:
                check.add(
                    (*at, key),
                    'missing: mode = "direct" signs every request and needs '
                    "subscriber_id, key_id and signing_key_file",
                )
                ok = False
    for key in ("subscriber_id", "key_id"):
        value = table.get(key)
        if isinstance(value, str) and "|" in value:
            check.add((*at, key), "must not contain '|' (it separates keyId parts)")
            ok = False
    put(
        "signature_ttl_s",
        check.integer(table, (*at, "signature_ttl_s"), default=60, low=5, high=3600),
    )
    refs = check.table(table, (*at, "meter_refs"))
    if refs is not None:
        bad = [k for k, v in refs.items() if not isinstance(v, str) or not v.strip()]
        for key in bad:
            check.add(
                (*at, "meter_refs", key),
                "expected a meter reference: a DID (did:web:...) or a serial number",
            )
        ok = ok and not bad
        put("meter_refs", {k: v for k, v in refs.items() if isinstance(v, str)})
    return ok
