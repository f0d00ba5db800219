"""Site-file settings of DLMS/COSEM meters: links, association and profile.

DLMS meters sit on buses of their own kinds — ``dlms-hdlc`` (HDLC over an RS-485 line
or an optical probe), ``dlms-hdlc-tcp`` (HDLC through a serial-to-Ethernet converter)
and ``dlms-wrapper`` (the IEC 62056-47 TCP wrapper, port 4059) — and name a meter
profile (``configs/dlms/<profile>.toml``, e.g. ``is15959``) as their template. Secrets
(the LLS password, the HLS/suite-0 keys) come from files that must be readable by the
service user only.
"""

from __future__ import annotations

import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ies_drivers.dlms.client import ClientSettings
    from ies_drivers.dlms.transport import LinkSettings, TransportKind

DLMS_BUS_KINDS = ("dlms-hdlc", "dlms-hdlc-tcp", "dlms-wrapper")
Authentication = Literal["none", "low", "high-gmac"]
AUTHENTICATIONS: tuple[Authentication, ...] = ("none", "low", "high-gmac")
DEFAULT_CLIENT_SAP = {"none": 16, "low": 32, "high-gmac": 48}
"""IS 15959 client SAPs: public client, meter reader (LLS), utility (HLS)."""

DLMS_DEVICE_KEYS = {
    "server_logical",
    "server_physical",
    "client_sap",
    "auth",
    "password_file",
    "keys_file",
}


class DlmsSecretError(Exception):
    """Raised when a password or key file is missing, malformed or not private."""


@dataclass(frozen=True)
class DlmsDeviceSettings:
    """How to reach and associate with one DLMS meter.

    ``server_logical``/``server_physical`` are the HDLC server address parts
    (logical device 1 is the management device; physical 0 means "not used" and is
    replaced by the wrapper's port on TCP); ``client_sap`` defaults from ``auth``.
    """

    profile: str
    auth: Authentication = "none"
    client_sap: int = 16
    server_logical: int = 1
    server_physical: int = 0
    password_file: Path | None = None
    keys_file: Path | None = None


def read_secret_file(path: Path) -> bytes:
    """Return the bytes of a secret file; refuse one that others may read."""
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise DlmsSecretError(f"{path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise DlmsSecretError(
            f"{path} is readable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):03o}); run: chmod 600 {path}"
        )
    return data


def client_settings(settings: DlmsDeviceSettings) -> ClientSettings:
    """Build the client's association settings, reading secrets from their files."""
    from ies_drivers.dlms.client import ClientSettings
    from ies_drivers.dlms.security import SecurityKeys

    password = b""
    keys = None
    if settings.password_file is not None:
        password = read_secret_file(settings.password_file).strip()
    if settings.keys_file is not None:
        raw = read_secret_file(settings.keys_file)
        try:
            table: dict[str, Any] = tomllib.loads(raw.decode())
            keys = SecurityKeys(
                bytes.fromhex(table["block_cipher_key"]),
                bytes.fromhex(table["authentication_key"]),
                bytes.fromhex(table["system_title"]),
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise DlmsSecretError(
                f"{settings.keys_file}: expected hex strings block_cipher_key, "
                f"authentication_key (16 bytes) and system_title (8 bytes): {exc}"
            ) from None
    return ClientSettings(
        client_sap=settings.client_sap,
        authentication=settings.auth,
        password=password,
        keys=keys,
        security_control=0x30 if keys is not None else 0,
    )


def link_settings(
    kind: str,
    settings: DlmsDeviceSettings,
    *,
    host: str,
    port: int,
    serial_port: str,
    baudrate: int,
    mode_e: bool,
    timeout_s: float,
) -> LinkSettings:
    """Build the link settings of a meter on a ``dlms-*`` bus."""
    from ies_drivers.dlms.transport import LinkSettings

    transports: dict[str, TransportKind] = {
        "dlms-hdlc": "hdlc-serial",
        "dlms-hdlc-tcp": "hdlc-tcp",
        "dlms-wrapper": "wrapper-tcp",
    }
    return LinkSettings(
        transport=transports[kind],
        serial_port=serial_port,
        baudrate=baudrate,
        mode_e=mode_e,
        host=host,
        port=port,
        server_logical=settings.server_logical,
        server_physical=settings.server_physical,
        timeout_s=max(timeout_s, 1.0),
    )
