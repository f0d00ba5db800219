"""Errors of the dispatch path; each message says what to do about it.

::

    DispatchError                 base
    ├── EventFormatError          a dispatch message is malformed (the issuer's fault)
    ├── AuthenticationError       no pinned key signed it, or the signature fails
    ├── EventRejectedError        valid and authentic, but refused: past, expired,
    │                             replayed, overlapping; ``reason`` is a short code
    ├── PolicyPackError           a policy pack is malformed, unsigned or not effective
    └── DeviceCommandError        a device refused a command or read back otherwise
"""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error of the dispatch package."""


class EventFormatError(DispatchError):
    """Raised when a dispatch message cannot be read: bad JSON, a missing field."""


class AuthenticationError(DispatchError):
    """Raised when a message is not signed by a pinned key or its signature fails."""


class EventRejectedError(DispatchError):
    """Raised when an authentic event is refused; ``reason`` is a short code.

    Codes: ``past``, ``expired``, ``replayed``, ``overlapping``, ``policy``,
    ``no_target``, ``opted_out``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PolicyPackError(DispatchError):
    """Raised when a policy pack is malformed, not signed by a trusted key, or when
    no pack is in effect."""


class DeviceCommandError(DispatchError):
    """Raised when a device refuses a command or does not apply it (read-back)."""
