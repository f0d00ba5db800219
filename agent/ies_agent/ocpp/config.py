"""The ``[ocpp]`` table of a site file: the central system, its chargers, the CSMS.

Example (every key but ``listen_port`` has a default)::

    [ocpp]
    listen_host = "127.0.0.1"        # loopback by default; the LAN address on a site
    listen_port = 9000
    security_profile = 1             # 0 none (lab only), 1 basic auth, 2 TLS + basic
                                     # auth, 3 TLS with client certificates
    tls_cert = "tls/gateway.pem"     # profiles 2 and 3
    tls_key = "tls/gateway.key"
    client_ca = "tls/chargers-ca.pem"  # profile 3
    accept_unknown = false           # refuse chargers not listed below
    versions = ["2.0.1", "1.6"]      # offered to chargers, preferred first

    [[ocpp.chargers]]
    id = "CP-0001"                   # the identity in the URL path
    versions = ["1.6"]
    password_file = "secrets/CP-0001.pass"   # profiles 1 and 2
    strict = false                   # true: refuse every schema break not in quirks
    quirks = ["over_length_strings"] # see ies_drivers.ocpp.validation.QUIRK_NAMES

    [ocpp.csms]
    url = "wss://csms.example.net/ocpp"   # the charger id is appended as a path segment
    security_profile = 2
    ca_file = "tls/csms-ca.pem"

Problems are reported through the site loader's collector, so they read
``site.toml:31: ocpp.chargers[0].versions[1]: ...`` like every other config error.
Secrets are read from their files when the central system starts, never here, so a
config can be checked on another machine; only their existence is checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ies_drivers.ocpp.validation import QUIRK_NAMES, Quirks
from ies_drivers.ocpp.versions import (
    ALL_VERSIONS,
    OcppVersion,
    UnknownVersionError,
)
from ies_drivers.tomlsource import KeyPath, ProblemCollector

OfflineIdTag = Literal["Accepted", "Invalid"]

CHARGER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:*+@-]{0,47}")
"""A charger identity: OCPP 2.0.1 allows 48 characters of a URL-safe set."""
_CHARGER_ID_TEXT = "a charger identity (letters, digits and . _ : * + @ -; at most 48)"

_OCPP_KEYS = {
    "listen_host",
    "listen_port",
    "security_profile",
    "tls_cert",
    "tls_key",
    "client_ca",
    "accept_unknown",
    "versions",
    "call_timeout_s",
    "answer_wait_s",
    "heartbeat_interval_s",
    "offline_unknown_id_tag",
    "dispatch_stack_level",
    "drain_timeout_s",
    "measurands",
    "chargers",
    "csms",
}
_CHARGER_KEYS = {
    "id",
    "versions",
    "password_file",
    "strict",
    "quirks",
    "csms_password_file",
    "connectors",
}
_CSMS_KEYS = {
    "url",
    "security_profile",
    "ca_file",
    "client_cert",
    "client_key",
    "password_file",
}


@dataclass(frozen=True)
class ChargerConfig:
    """One known charger: identity, versions it may use, credentials, quirks.

    ``password_file`` holds its basic-auth password toward the agent (profiles 1, 2);
    ``csms_password_file`` the one the agent uses toward the CSMS under its identity.
    """

    id: str
    versions: tuple[OcppVersion, ...] = ALL_VERSIONS
    password_file: Path | None = None
    quirks: Quirks = field(default_factory=Quirks.default)
    csms_password_file: Path | None = None


@dataclass(frozen=True)
class CsmsConfig:
    """The charge point operator's CSMS the chargers are bridged to.

    ``url`` is the base address; the charger id is appended as the last path segment.
    ``security_profile`` 1 sends basic auth (per charger ``csms_password_file``, else
    ``password_file``), 2 adds TLS verified with ``ca_file`` (system CAs when unset),
    3 adds the gateway's client certificate.
    """

    url: str
    security_profile: int = 0
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class OcppConfig:
    """The agent's OCPP central system. See the module docstring for the keys.

    Times in seconds: ``call_timeout_s`` bounds every call the agent makes;
    ``answer_wait_s`` is how long a charger's billing-critical call waits for the
    CSMS before the agent answers it itself; ``drain_timeout_s`` how long shutdown
    waits for queued messages to reach the CSMS.
    """

    listen_port: int
    listen_host: str = "127.0.0.1"
    security_profile: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    accept_unknown: bool = False
    versions: tuple[OcppVersion, ...] = ALL_VERSIONS
    call_timeout_s: float = 30.0
    answer_wait_s: float = 5.0
    heartbeat_interval_s: int = 300
    offline_unknown_id_tag: OfflineIdTag = "Invalid"
    dispatch_stack_level: int = 90
    drain_timeout_s: float = 15.0
    measurands: Path | None = None
    chargers: dict[str, ChargerConfig] = field(default_factory=dict)
    csms: CsmsConfig | None = None

    def charger(self, charger_id: str) -> ChargerConfig | None:
        """Return the config of ``charger_id``; a default one when unknown chargers
        are accepted, else ``None``."""
        known = self.chargers.get(charger_id)
        if known is not None:
            return known
        if self.accept_unknown:
            return ChargerConfig(charger_id, versions=self.versions)
        return None


def read_ocpp(
    check: ProblemCollector,
    data: Mapping[str, Any],
    resolve: Callable[[str], Path],
    taken_ids: Collection[str] = (),
) -> OcppConfig | None:
    """Read the ``[ocpp]`` table of a site file (``None`` when there is none).

    Problems go to ``check``; ``resolve`` makes paths relative to the site file;
    ``taken_ids`` are device ids a charger id must not repeat (they share the
    evidence log's source names). Returns ``None`` when the table has problems.
    """
    if "ocpp" not in data:
        return None
    table = check.table(data, ("ocpp",))
    if table is None:
        return None
    reader = _Reader(check, resolve)
    return reader.read(table, taken_ids)


class _Reader:
    def __init__(self, check: ProblemCollector, resolve: Callable[[str], Path]) -> None:
        self.check = check
        self.resolve = resolve
        self.failed = False

    def read(
        self, table: dict[str, Any], taken_ids: Collection[str]
    ) -> OcppConfig | None:
        check = self.check
        at: KeyPath = ("ocpp",)
        before = len(check.problems)
        check.unknown_keys(table, _OCPP_KEYS, at)
        host = check.string(table, (*at, "listen_host"), default="127.0.0.1") or ""
        port = check.integer(
            table, (*at, "listen_port"), required=True, low=0, high=65535
        )
        profile = check.integer(
            table, (*at, "security_profile"), default=1, low=0, high=3
        )
        tls_cert = self.path(table, (*at, "tls_cert"), must_exist=True)
        tls_key = self.path(table, (*at, "tls_key"), must_exist=True)
        client_ca = self.path(table, (*at, "client_ca"), must_exist=True)
        if profile in (2, 3):
            for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
                if value is None and key not in table:
                    check.add(
                        (*at, key), f"security profile {profile} needs {key} (TLS)"
                    )
        if profile == 3 and client_ca is None and "client_ca" not in table:
            check.add(
                (*at, "client_ca"),
                "security profile 3 needs client_ca: the CA that signed the chargers' "
                "certificates",
            )
        versions = self.versions(table, (*at, "versions"), ALL_VERSIONS)
        accept_unknown = check.boolean(table, (*at, "accept_unknown"), default=False)
        call_timeout = check.number(
            table,
            (*at, "call_timeout_s"),
            default=30.0,
            low=0,
            high=600,
            low_exclusive=True,
        )
        answer_wait = check.number(
            table, (*at, "answer_wait_s"), default=5.0, low=0, high=120
        )
        heartbeat = check.integer(
            table, (*at, "heartbeat_interval_s"), default=300, low=1, high=86400
        )
        offline_tag = check.choice(
            table,
            (*at, "offline_unknown_id_tag"),
            ("Invalid", "Accepted"),
            default="Invalid",
        )
        stack = check.integer(
            table, (*at, "dispatch_stack_level"), default=90, low=1, high=1000
        )
        drain = check.number(
            table, (*at, "drain_timeout_s"), default=15.0, low=0, high=3600
        )
        measurands = self.path(table, (*at, "measurands"))
        chargers = self.chargers(table, versions, profile or 0, taken_ids)
        csms = self.csms(table)
        if len(check.problems) > before or port is None or profile is None:
            return None
        return OcppConfig(
            listen_port=port,
            listen_host=host,
            security_profile=profile,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_ca=client_ca,
            accept_unknown=bool(accept_unknown),
            versions=versions,
            call_timeout_s=call_timeout or 30.0,
            answer_wait_s=answer_wait if answer_wait is not None else 5.0,
            heartbeat_interval_s=heartbeat or 300,
            offline_unknown_id_tag="Accepted"
            if offline_tag == "Accepted"
            else "Invalid",
            dispatch_stack_level=stack or 90,
            drain_timeout_s=drain if drain is not None else 15.0,
            measurands=measurands,
            chargers=chargers,
            csms=csms,
        )

    def chargers(
        self,
        table: dict[str, Any],
        versions: tuple[OcppVersion, ...],
        profile: int,
        taken_ids: Collection[str],
    ) -> dict[str, ChargerConfig]:
        check = self.check
        chargers: dict[str, ChargerConfig] = {}
        lines: dict[str, int | None] = {}
        for index, entry in enumerate(check.tables(table, ("ocpp", "chargers"))):
            at: KeyPath = ("ocpp", "chargers", index)
            check.unknown_keys(entry, _CHARGER_KEYS, at)
            charger_id = check.string(
                entry,
                (*at, "id"),
                required=True,
                pattern=CHARGER_ID,
                pattern_text=_CHARGER_ID_TEXT,
            )
            own_versions = self.versions(entry, (*at, "versions"), versions)
            password = self.path(entry, (*at, "password_file"), must_exist=True)
            if profile in (1, 2) and password is None and "password_file" not in entry:
                check.add(
                    (*at, "password_file"),
                    f"security profile {profile} needs a password_file for each "
                    "charger (basic auth)",
                )
            csms_password = self.path(
                entry, (*at, "csms_password_file"), must_exist=True
            )
            quirks = self.quirks(entry, at)
            if charger_id is None or quirks is None:
                continue
            if charger_id in chargers:
                check.add(
                    (*at, "id"),
                    f"charger id '{charger_id}' is already used "
                    f"(line {lines[charger_id]})",
                )
                continue
            if charger_id in taken_ids:
                check.add(
                    (*at, "id"),
                    f"'{charger_id}' is already a device id; chargers and devices "
                    "share the evidence log's source names",
                )
                continue
            lines[charger_id] = check.document.line_of((*at, "id"))
            chargers[charger_id] = ChargerConfig(
                id=charger_id,
                versions=own_versions,
                password_file=password,
                quirks=quirks,
                csms_password_file=csms_password,
            )
        return chargers

    def quirks(self, entry: dict[str, Any], at: KeyPath) -> Quirks | None:
        check = self.check
        strict = check.boolean(entry, (*at, "strict"), default=False)
        names = check.string_list(entry, (*at, "quirks"))
        if names is None or strict is None:
            return None
        unknown = [n for n in names if n not in QUIRK_NAMES]
        if unknown:
            check.add(
                (*at, "quirks"),
                f"unknown quirk flag(s) {', '.join(unknown)}; known: "
                + ", ".join(QUIRK_NAMES),
            )
            return None
        if strict:
            return Quirks.strict(names)
        return Quirks.default()

    def csms(self, table: dict[str, Any]) -> CsmsConfig | None:
        check = self.check
        entry = check.table(table, ("ocpp", "csms"))
        if entry is None:
            return None
        at: KeyPath = ("ocpp", "csms")
        check.unknown_keys(entry, _CSMS_KEYS, at)
        url = check.string(entry, (*at, "url"), required=True)
        if url is not None and not re.match(r"wss?://[^/]+", url):
            check.add((*at, "url"), f"{url!r} is not a ws:// or wss:// address")
            url = None
        profile = check.integer(
            entry, (*at, "security_profile"), default=0, low=0, high=3
        )
        if url is not None and profile in (2, 3) and not url.startswith("wss://"):
            check.add(
                (*at, "url"), f"security profile {profile} needs a wss:// address"
            )
        ca_file = self.path(entry, (*at, "ca_file"), must_exist=True)
        client_cert = self.path(entry, (*at, "client_cert"), must_exist=True)
        client_key = self.path(entry, (*at, "client_key"), must_exist=True)
        password = self.path(entry, (*at, "password_file"), must_exist=True)
        if profile == 3 and (client_cert is None or client_key is None):
            check.add(
                (*at, "client_cert"),
                "security profile 3 needs client_cert and client_key",
            )
        if url is None or profile is None:
            return None
        return CsmsConfig(
            url=url.rstrip("/"),
            security_profile=profile,
            ca_file=ca_file,
            client_cert=client_cert,
            client_key=client_key,
            password_file=password,
        )

    def versions(
        self, table: Mapping[str, Any], at: KeyPath, default: tuple[OcppVersion, ...]
    ) -> tuple[OcppVersion, ...]:
        key = str(at[-1])
        if key not in table:
            return default
        names = self.check.string_list(table, at)
        if not names:
            if names is not None:
                self.check.add(
                    at, 'expected at least one version, e.g. ["2.0.1", "1.6"]'
                )
            return default
        versions: list[OcppVersion] = []
        for index, name in enumerate(names):
            try:
                versions.append(OcppVersion.parse(name))
            except UnknownVersionError as exc:
                self.check.add((*at, index), str(exc))
        return tuple(dict.fromkeys(versions)) or default

    def path(
        self, table: Mapping[str, Any], at: KeyPath, *, must_exist: bool = False
    ) -> Path | None:
        text = self.check.string(table, at)
        if text is None:
            return None
        path = self.resolve(text)
        if must_exist and not path.is_file():
            self.check.add(at, f"no such file: {path}")
            return None
        return path
