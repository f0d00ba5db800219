"""Typed errors raised by the device drivers.

Every error says who broke what, in a sentence an installer can act on::

    DriverError                      base of everything below
    ├── FrameError                   bytes on the wire are no valid frame (CRC, length)
    ├── DecodeError                  a valid frame whose content cannot become a value
    ├── DeviceError                  the device answered, but not with what we asked for
    │   ├── ExceptionResponse        a Modbus exception response (codes 1-4, 6, 10, 11)
    │   └── WrongUnitError           a response from another unit id than the one asked
    ├── DeviceTimeout                no complete answer within the deadline
    ├── DeviceBackedOff              the device failed recently; not asked again yet
    ├── TransportError               the bus itself (serial port, TCP connection) failed
    └── TemplateError                a device template is missing or malformed

Lower-layer exceptions (pymodbus, pyserial, OSError) are translated into these at the
boundary of each transport; nothing else leaves the drivers.
"""

from __future__ import annotations

from typing import ClassVar


class DriverError(Exception):
    """Base class of every error raised by ``ies_drivers``."""


class FrameError(DriverError):
    """Raised when bytes on the wire are not a valid frame (bad CRC, short, garbled)."""


class DecodeError(DriverError):
    """Raised when a well-formed frame holds content that cannot become a value."""


class DeviceError(DriverError):
    """Raised when a device answered, but not with the data that was asked for."""


class ExceptionResponse(DeviceError):
    """Raised when a Modbus device answers with an exception response.

    ``code`` is the Modbus exception code (1 illegal function, 2 illegal data address,
    3 illegal data value, 4 server device failure, 6 busy, 10 gateway path unavailable,
    11 gateway target failed to respond).
    """

    NAMES: ClassVar[dict[int, str]] = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "server device failure",
        5: "acknowledge",
        6: "server device busy",
        8: "memory parity error",
        10: "gateway path unavailable",
        11: "gateway target device failed to respond",
    }

    def __init__(self, code: int, function: int, unit: int, address: int | None = None):
        self.code = code
        self.function = function
        self.unit = unit
        self.address = address
        name = self.NAMES.get(code, "unknown exception")
        where = f" at register {address}" if address is not None else ""
        super().__init__(
            f"unit {unit} answered function {function} with exception {code} "
            f"({name}){where}"
        )


class WrongUnitError(DeviceError):
    """Raised when a response carries another unit id than the request."""

    def __init__(self, expected: int, got: int):
        self.expected = expected
        self.got = got
        super().__init__(
            f"asked unit {expected} but unit {got} answered: two devices share an id "
            "or the converter mixes up responses"
        )


class DeviceTimeout(DriverError):
    """Raised when a device sends no complete answer within its deadline (seconds)."""


class DeviceBackedOff(DriverError):
    """Raised when a device failed recently and its back-off has not expired yet."""


class TransportError(DriverError):
    """Raised when the bus itself fails: serial port missing, TCP connection refused."""


class TemplateError(DriverError):
    """Raised when a device template is missing or does not describe a valid device."""
