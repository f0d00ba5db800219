"""The bridge's own settings: a small TOML file, overridden by command-line flags.

::

    # /etc/ies-firmware-bridge/bridge.toml (every key optional)
    state_dir = "/var/lib/ies-firmware-bridge"     # transfer records, event outbox
    cache_dir = "/var/cache/ies-firmware-bridge"   # verified files, .part downloads
    socket = "/run/ies-firmware-bridge/bridge.sock" # the agent talks here
    listen = "127.0.0.1"      # where chargers fetch files; the site LAN address
    port = 8790
    public_url = ""           # what chargers are told; default http://<listen>:<port>
    quota_mb = 512            # disk the cache may use, .part files included
    max_file_mb = 256         # largest firmware image or log accepted
    trust_dirs = ["/etc/ies-agent/trust", "/etc/ies-firmware-bridge/trust"]
    connect_timeout_s = 10
    read_timeout_s = 30
    retries = 5               # attempts without progress before a download fails
    hold_s = 30               # a charger asking for a file still being verified waits
    tls_cert = ""             # serve chargers over HTTPS with this chain and key
    tls_key = ""
    upstream_ca_file = ""     # extra CA bundle for publisher hosts (HTTPS)

    [pins]                    # OCPP 1.6 files without a manifest, by URL or file name
    "https://fw.example.com/cp-2.1.bin" = "<64 lowercase hex digits of SHA-256>"

Trust dirs hold two kinds of PEM files: publisher public keys (``-----BEGIN PUBLIC
KEY-----``), which sign manifests (``ies_agent.signing.manifest``), and publisher CA
certificates (``-----BEGIN CERTIFICATE-----``), which issue the signing certificates
OCPP 2.0.1 and 1.6 ``SignedUpdateFirmware`` carry.

Errors::

    BridgeConfigError    the file or a flag is unusable; the message names the file,
                         line and key, or the flag, and what was expected
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ies_drivers.tomlsource import KeyPath, ProblemCollector, TomlSourceError, load_toml

DEFAULT_CONFIG = Path("/etc/ies-firmware-bridge/bridge.toml")
DEFAULT_STATE_DIR = Path("/var/lib/ies-firmware-bridge")
DEFAULT_CACHE_DIR = Path("/var/cache/ies-firmware-bridge")
DEFAULT_SOCKET = Path("/run/ies-firmware-bridge/bridge.sock")
DEFAULT_TRUST_DIRS = (
    Path("/etc/ies-agent/trust"),
    Path("/etc/ies-firmware-bridge/trust"),
)
DEFAULT_PORT = 8790
MIB = 1024 * 1024

_KEYS = {
    "state_dir",
    "cache_dir",
    "socket",
    "listen",
    "port",
    "public_url",
    "quota_mb",
    "max_file_mb",
    "trust_dirs",
    "connect_timeout_s",
    "read_timeout_s",
    "retries",
    "hold_s",
    "tls_cert",
    "tls_key",
    "upstream_ca_file",
    "pins",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BridgeConfigError(ValueError):
    """Raised when the bridge's settings are unusable; the message says what to fix."""


@dataclass(frozen=True)
class BridgeConfig:
    """Where the bridge keeps things, whom it trusts and how it downloads.

    Sizes are in bytes, durations in seconds. ``pins`` maps a URL or a bare file name
    to the SHA-256 hex a file there must have (OCPP 1.6 files with no manifest).
    """

    state_dir: Path = DEFAULT_STATE_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR
    socket: Path = DEFAULT_SOCKET
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    public_url: str = ""
    quota_bytes: int = 512 * MIB
    max_file_bytes: int = 256 * MIB
    trust_dirs: tuple[Path, ...] = DEFAULT_TRUST_DIRS
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 5
    hold_s: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_ca_file: Path | None = None
    pins: dict[str, str] = field(default_factory=dict)
    backoff_first_s: float = 0.5
    backoff_max_s: float = 30.0

    @property
    def base_url(self) -> str:
        """The address chargers fetch from, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_cert is not None else "http"
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        return f"{scheme}://{host}:{self.port}"


def load_config(path: Path | None, overrides: dict[str, Any]) -> BridgeConfig:
    """Read ``path`` (``None``: defaults only), then apply ``overrides``.

    ``overrides`` holds values from command-line flags under the file's key names
    (``None`` values are ignored). Relative paths in the file are relative to it.
    Raises :class:`BridgeConfigError` listing every problem found.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_file(path)
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    return _build(values, str(path) if path else "command line")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        document = load_toml(path)
    except TomlSourceError as exc:
        raise BridgeConfigError(str(exc)) from None
    check = ProblemCollector(document)
    data = document.data
    check.unknown_keys(data, _KEYS, ())
    at: KeyPath = ()
    base = path.parent
    values: dict[str, Any] = {}
    for key in ("state_dir", "cache_dir", "socket", "tls_cert", "tls_key"):
        text = check.string(data, (*at, key))
        if text:
            values[key] = base / text
    text = check.string(data, ("upstream_ca_file",))
    if text:
        values["upstream_ca_file"] = base / text
    for key in ("listen", "public_url"):
        text = check.string(data, (key,))
        if text is not None:
            values[key] = text
    for key, low, high in (
        ("port", 1, 65535),
        ("quota_mb", 1, 1 << 20),
        ("max_file_mb", 1, 1 << 16),
        ("retries", 1, 100),
    ):
        number = check.integer(data, (key,), low=low, high=high)
        if number is not None:
            values[key] = number
    for key, low_s, high_s in (
        ("connect_timeout_s", 0.1, 300.0),
        ("read_timeout_s", 0.1, 3600.0),
        ("hold_s", 0.0, 3600.0),
    ):
        seconds = check.number(data, (key,), low=low_s, high=high_s)
        if seconds is not None:
            values[key] = seconds
    if "trust_dirs" in data:
        dirs = check.string_list(data, ("trust_dirs",))
        if dirs is not None:
            values["trust_dirs"] = [base / d for d in dirs]
    pins = check.table(data, ("pins",))
    if pins is not None:
        values["pins"] = {}
        for name in pins:
            digest = check.string(
                pins, ("pins", name), pattern=_SHA256, pattern_text="64 lowercase hex"
            )
            if digest is not None:
                values["pins"][name] = digest
    if check.problems:
        raise BridgeConfigError("\n".join(str(p) for p in check.problems))
    return values


def _build(values: dict[str, Any], source: str) -> BridgeConfig:
    """Turn collected values into a :class:`BridgeConfig`; check what flags gave."""
    config = BridgeConfig()
    kwargs: dict[str, Any] = {}
    for key in ("state_dir", "cache_dir", "socket", "tls_cert", "tls_key"):
        if key in values:
            kwargs[key] = Path(values[key])
    if "upstream_ca_file" in values:
        kwargs["upstream_ca_file"] = Path(values["upstream_ca_file"])
    if "trust_dirs" in values:
        kwargs["trust_dirs"] = tuple(Path(d) for d in values["trust_dirs"])
    for key in ("listen", "public_url"):
        if key in values:
            kwargs[key] = str(values[key])
    for key in ("port", "retries"):
        if key in values:
            kwargs[key] = int(values[key])
    if "quota_mb" in values:
        kwargs["quota_bytes"] = int(values["quota_mb"]) * MIB
    if "max_file_mb" in values:
        kwargs["max_file_bytes"] = int(values["max_file_mb"]) * MIB
    for key in ("connect_timeout_s", "read_timeout_s", "hold_s"):
        if key in values:
            kwargs[key] = float(values[key])
    if "pins" in values:
        kwargs["pins"] = dict(values["pins"])
    config = BridgeConfig(**kwargs)

    # Checks the file reader cannot make alone (flags, combinations).
    try:
        ipaddress.ip_address(config.listen)
    except ValueError:
        raise BridgeConfigError(
            f"{source}: listen {config.listen!r} is not an IP address: write "
            "127.0.0.1 (this machine only) or the gateway's site LAN address"
        ) from None
    if not 0 <= config.port <= 65535:
        raise BridgeConfigError(f"{source}: port {config.port} is not 0-65535")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise BridgeConfigError(f"{source}: tls_cert and tls_key go together")
    if config.public_url and not config.public_url.startswith(("http://", "https://")):
        raise BridgeConfigError(
            f"{source}: public_url {config.public_url!r} must start with http:// or "
            "https://"
        )
    if config.max_file_bytes > config.quota_bytes:
        raise BridgeConfigError(
            f"{source}: max_file_mb is larger than quota_mb: the largest file must "
            "fit in the cache"
        )
    return config
