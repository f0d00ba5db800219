"""Typed errors of the DLMS/COSEM client, server and codecs.

Each error names who broke what. They all derive from :class:`DlmsError` and from the
driver error that the scheduler already understands, so a DLMS meter that fails is
counted and backed off like any other device::

    DriverError
    └── DlmsError                    base of everything below
        ├── HdlcFrameError           (FrameError) bad flag, length, HCS or FCS; a
        │                            segmented APDU cut short; frame out of sequence
        ├── WrapperFrameError        (FrameError) TCP wrapper header wrong
        ├── AxdrError                (DecodeError) A-XDR data truncated, deeper or
        │   │                        longer than announced, unknown type tag
        │   └── DateTimeError        a date, time or date-time with invalid fields
        ├── ObisError                (DecodeError) an OBIS code that is not six groups
        ├── ApduError                (DecodeError) an APDU we cannot parse or did not
        │                            expect at this point of the session
        ├── AddressError             (DeviceError) a frame for another address
        ├── AssociationRejected      (DeviceError) the AARE refused the association
        ├── DataAccessError          (DeviceError) the meter answered an attribute or
        │                            method with an error code (e.g. object-undefined)
        ├── ServiceError             (DeviceError) exception-response or
        │                            confirmed-service-error from the meter
        ├── SecurityError            (DeviceError) GCM tag or HLS reply does not verify,
        │                            keys or system title missing
        ├── SessionStateError        we asked for something the session state forbids
        │                            (a GET before the association): our own bug
        ├── DlmsTimeout              (DeviceTimeout) no complete answer in time
        ├── DlmsTransportError       (TransportError) serial port or TCP failed
        └── ProfileError             (TemplateError) a configs/dlms file is malformed

Lower-layer exceptions (pyserial, ``OSError``, ``cryptography``) are translated into
these at the boundary of :mod:`ies_drivers.dlms.transport` and
:mod:`ies_drivers.dlms.security`; nothing else leaves the package.
"""

from __future__ import annotations

from typing import ClassVar

from ies_drivers.errors import (
    DecodeError,
    DeviceError,
    DeviceTimeout,
    DriverError,
    FrameError,
    TemplateError,
    TransportError,
)


class DlmsError(DriverError):
    """Base class of every DLMS/COSEM error."""


class HdlcFrameError(DlmsError, FrameError):
    """Raised when bytes on an HDLC line are not a valid frame or frame sequence."""


class WrapperFrameError(DlmsError, FrameError):
    """Raised when a TCP wrapper header is wrong (version, ports, length)."""


class AxdrError(DlmsError, DecodeError):
    """Raised when A-XDR data cannot be decoded or encoded."""


class DateTimeError(AxdrError):
    """Raised when a COSEM date, time or date-time has fields out of range."""


class ObisError(DlmsError, DecodeError):
    """Raised when an OBIS code is not six groups of 0..255."""


class ApduError(DlmsError, DecodeError):
    """Raised when an APDU cannot be parsed or does not fit the session's state."""


class AddressError(DlmsError, DeviceError):
    """Raised when a frame is addressed to another client or comes from another
    server than the one we talk to."""


class AssociationRejected(DlmsError, DeviceError):
    """Raised when the meter's AARE refuses the association.

    ``result`` is the AARE result (1 rejected-permanent, 2 rejected-transient),
    ``diagnostic`` the result-source-diagnostic value and ``source`` whether the
    ACSE service user or provider gave it.
    """

    USER_DIAGNOSTICS: ClassVar[dict[int, str]] = {
        0: "null",
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AP title not recognised",
        4: "calling AP invocation identifier not recognised",
        5: "calling AE qualifier not recognised",
        6: "calling AE invocation identifier not recognised",
        7: "called AP title not recognised",
        8: "called AP invocation identifier not recognised",
        9: "called AE qualifier not recognised",
        10: "called AE invocation identifier not recognised",
        11: "authentication mechanism name not recognised",
        12: "authentication mechanism name required",
        13: "authentication failure",
        14: "authentication required",
    }

    def __init__(self, result: int, diagnostic: int, source: str = "user") -> None:
        self.result = result
        self.diagnostic = diagnostic
        self.source = source
        kind = {1: "permanently", 2: "transiently"}.get(result, f"(result {result})")
        if source == "user":
            why = self.USER_DIAGNOSTICS.get(diagnostic, f"diagnostic {diagnostic}")
        else:
            why = f"ACSE provider diagnostic {diagnostic}"
        hint = ""
        if source == "user" and diagnostic in (11, 12, 13, 14):
            hint = ": check the client address, authentication level and password/keys"
        elif source == "user" and diagnostic == 2:
            hint = (
                ": the meter wants (or refuses) ciphering; check the security settings"
            )
        super().__init__(f"meter {kind} rejected the association: {why}{hint}")


class DataAccessError(DlmsError, DeviceError):
    """Raised when the meter answers a GET, SET or ACTION with a result code.

    ``code`` is the data-access-result (or action-result) value.
    """

    NAMES: ClassVar[dict[int, str]] = {
        1: "hardware-fault",
        2: "temporary-failure",
        3: "read-write-denied",
        4: "object-undefined",
        9: "object-class-inconsistent",
        11: "object-unavailable",
        12: "type-unmatched",
        13: "scope-of-access-violated",
        14: "data-block-unavailable",
        15: "long-get-aborted",
        16: "no-long-get-in-progress",
        17: "long-set-aborted",
        18: "no-long-set-in-progress",
        19: "data-block-number-invalid",
        250: "other-reason",
    }

    def __init__(self, code: int, what: str) -> None:
        self.code = code
        self.what = what
        name = self.NAMES.get(code, "unknown result")
        super().__init__(f"meter refused {what}: {name} ({code})")


class ServiceError(DlmsError, DeviceError):
    """Raised when the meter answers with an exception-response or a
    confirmed-service-error (it did not understand or accept the request)."""


class SecurityError(DlmsError, DeviceError):
    """Raised when ciphered data or an HLS reply does not verify, or when security
    material (keys, system title) needed for the chosen security is missing."""


class SessionStateError(DlmsError):
    """Raised when a request does not fit the session's state; a bug of the caller."""


class DlmsTimeout(DlmsError, DeviceTimeout):
    """Raised when the meter sends no complete answer before the deadline (seconds)."""


class DlmsTransportError(DlmsError, TransportError):
    """Raised when the serial port or TCP connection fails or is closed."""


class ProfileError(DlmsError, TemplateError):
    """Raised when a DLMS profile file in ``configs/dlms`` is missing or malformed."""
