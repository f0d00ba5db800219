"""OCPP versions, their WebSocket subprotocol names, and negotiation.

OCPP-J names the protocol version in the WebSocket subprotocol (``ocpp1.6``,
``ocpp2.0.1``, ``ocpp2.1``), negotiated per connection: the same charger may open a
1.6 connection and then a 2.0.1 one (field case FC-12), so nothing may assume a
charger's version from an earlier connection.

Errors::

    UnknownVersionError   a version or subprotocol name this agent does not speak
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum


class UnknownVersionError(ValueError):
    """Raised for an OCPP version or subprotocol name that is not supported."""


class OcppVersion(StrEnum):
    """An OCPP-J version the agent speaks, by its version number."""

    V16 = "1.6"
    V201 = "2.0.1"
    V21 = "2.1"

    @property
    def subprotocol(self) -> str:
        """The WebSocket subprotocol name, e.g. ``ocpp2.0.1``."""
        return "ocpp" + self.value

    @property
    def is_16(self) -> bool:
        """True for OCPP 1.6 (transactions by integer id, ``StartTransaction``)."""
        return self is OcppVersion.V16

    @classmethod
    def parse(cls, text: str) -> OcppVersion:
        """Return the version named ``text``: ``"1.6"``, ``"ocpp1.6"``, ``"2.0.1"``.

        Raises :class:`UnknownVersionError` naming the versions that are known.
        """
        name = text.strip().lower()
        name = name.removeprefix("ocpp")
        if name in ("1.6j", "16"):
            name = "1.6"
        for version in cls:
            if version.value == name:
                return version
        known = ", ".join(v.value for v in cls)
        raise UnknownVersionError(f"unknown OCPP version {text!r} (known: {known})")


ALL_VERSIONS: tuple[OcppVersion, ...] = (
    OcppVersion.V21,
    OcppVersion.V201,
    OcppVersion.V16,
)
"""Every supported version, newest first (the default preference)."""


def negotiate(
    offered: Iterable[str], allowed: Sequence[OcppVersion]
) -> OcppVersion | None:
    """Pick the version for one connection, or ``None`` when there is no common one.

    ``offered`` are the subprotocol names the charger sent (unknown names are
    ignored); ``allowed`` the versions configured for it, in order of preference.
    The first allowed version the charger offered wins.
    """
    names = {name.strip().lower() for name in offered}
    for version in allowed:
        if version.subprotocol in names:
            return version
    return None
