"""DLMS/COSEM APDUs (Green Book): association, xDLMS services and ciphered forms.

Each APDU is a frozen dataclass with ``to_bytes()``; :func:`decode_apdu` reads any of
them from bytes. Covered, all with logical-name referencing:

* ACSE (BER): AARQ, AARE, RLRQ, RLRE, with the xDLMS InitiateRequest /
  InitiateResponse (or a ciphered glo-initiate) in their user-information;
* GET normal, next (block transfer) and with-list, with their responses including
  the data-block response; SET normal; ACTION normal;
* DataNotification (push), ExceptionResponse, ConfirmedServiceError;
* service-specific global ciphering (glo-get-request ... glo-initiate-response) and
  general-glo-ciphering, as :class:`CipheredApdu` (payload still ciphered: see
  :mod:`ies_drivers.dlms.security`).

Errors: :class:`ApduError` for bytes that are not a valid APDU (unknown tag,
truncated, bad BER lengths); A-XDR data inside raise :class:`AxdrError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from ies_drivers.dlms import axdr
from ies_drivers.dlms.axdr import Data
from ies_drivers.dlms.errors import ApduError, AxdrError
from ies_drivers.dlms.obis import Obis


class Tag(IntEnum):
    """First byte of each APDU we know."""

    INITIATE_REQUEST = 0x01
    INITIATE_RESPONSE = 0x08
    CONFIRMED_SERVICE_ERROR = 0x0E
    DATA_NOTIFICATION = 0x0F
    GLO_INITIATE_REQUEST = 0x21
    GLO_INITIATE_RESPONSE = 0x28
    AARQ = 0x60
    AARE = 0x61
    RLRQ = 0x62
    RLRE = 0x63
    GET_REQUEST = 0xC0
    SET_REQUEST = 0xC1
    ACTION_REQUEST = 0xC3
    GET_RESPONSE = 0xC4
    SET_RESPONSE = 0xC5
    ACTION_RESPONSE = 0xC7
    GLO_GET_REQUEST = 0xC8
    GLO_SET_REQUEST = 0xC9
    GLO_ACTION_REQUEST = 0xCB
    GLO_GET_RESPONSE = 0xCC
    GLO_SET_RESPONSE = 0xCD
    GLO_ACTION_RESPONSE = 0xCF
    EXCEPTION_RESPONSE = 0xD8
    GENERAL_GLO_CIPHERING = 0xDB


GLO_TAGS: Final = {
    Tag.GET_REQUEST: Tag.GLO_GET_REQUEST,
    Tag.SET_REQUEST: Tag.GLO_SET_REQUEST,
    Tag.ACTION_REQUEST: Tag.GLO_ACTION_REQUEST,
    Tag.GET_RESPONSE: Tag.GLO_GET_RESPONSE,
    Tag.SET_RESPONSE: Tag.GLO_SET_RESPONSE,
    Tag.ACTION_RESPONSE: Tag.GLO_ACTION_RESPONSE,
    Tag.INITIATE_REQUEST: Tag.GLO_INITIATE_REQUEST,
    Tag.INITIATE_RESPONSE: Tag.GLO_INITIATE_RESPONSE,
}
"""Plain APDU tag -> the tag of its glo-ciphered form."""

CONTEXT_LN: Final = 1
CONTEXT_LN_CIPHERED: Final = 3
_CONTEXT_PREFIX: Final = bytes.fromhex("608574050801")
_MECHANISM_PREFIX: Final = bytes.fromhex("608574050802")

MECHANISM_LLS: Final = 1
MECHANISM_HLS_GMAC: Final = 5
DEFAULT_INVOKE: Final = 0xC1
"""Invoke-id-and-priority: high priority, confirmed service, invoke-id 1."""


class Conformance(IntFlag):
    """The xDLMS conformance block (24 bits, Blue Book bit 0 is the highest)."""

    GENERAL_PROTECTION = 1 << 22
    GENERAL_BLOCK_TRANSFER = 1 << 21
    READ = 1 << 20
    WRITE = 1 << 19
    UNCONFIRMED_WRITE = 1 << 18
    ATTRIBUTE0_SET = 1 << 15
    PRIORITY_MGMT = 1 << 14
    ATTRIBUTE0_GET = 1 << 13
    BLOCK_TRANSFER_GET = 1 << 12
    BLOCK_TRANSFER_SET = 1 << 11
    BLOCK_TRANSFER_ACTION = 1 << 10
    MULTIPLE_REFERENCES = 1 << 9
    INFORMATION_REPORT = 1 << 8
    DATA_NOTIFICATION = 1 << 7
    ACCESS = 1 << 6
    PARAMETERIZED_ACCESS = 1 << 5
    GET = 1 << 4
    SET = 1 << 3
    SELECTIVE_ACCESS = 1 << 2
    EVENT_NOTIFICATION = 1 << 1
    ACTION = 1 << 0


CLIENT_CONFORMANCE: Final = (
    Conformance.BLOCK_TRANSFER_GET
    | Conformance.BLOCK_TRANSFER_SET
    | Conformance.BLOCK_TRANSFER_ACTION
    | Conformance.MULTIPLE_REFERENCES
    | Conformance.GET
    | Conformance.SET
    | Conformance.SELECTIVE_ACCESS
    | Conformance.ACTION
    | Conformance.ATTRIBUTE0_GET
    | Conformance.PRIORITY_MGMT
    | Conformance.EVENT_NOTIFICATION
)
"""What our client proposes: LN services with block transfer and selective access."""


# --- byte readers -------------------------------------------------------------------


class _Reader:
    """Sequential reader over an APDU; every short read raises :class:`ApduError`."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str, pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.what = what

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise ApduError(
                f"{self.what} ends at byte {len(self.data)}, needed {size} bytes at "
                f"byte {self.pos}"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def length(self) -> int:
        try:
            value, self.pos = axdr.decode_length(self.data, self.pos)
        except AxdrError as exc:
            raise ApduError(f"{self.what}: {exc}") from None
        return value

    def data_value(self) -> Data:
        value, self.pos = axdr.decode_from(self.data, self.pos)
        return value

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ApduError(
                f"{self.what} is longer than its fields announce: "
                f"{len(self.data) - self.pos} bytes left over"
            )

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


# --- descriptors --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttributeDescriptor:
    """Which attribute of which object: class id, logical name, attribute id."""

    class_id: int
    instance: Obis
    attribute: int

    def to_bytes(self) -> bytes:
        """Return the cosem-attribute-descriptor bytes."""
        return (
            self.class_id.to_bytes(2, "big")
            + self.instance.to_bytes()
            + self.attribute.to_bytes(1, "big", signed=True)
        )

    @classmethod
    def read(cls, reader: _Reader) -> AttributeDescriptor:
        class_id = reader.uint(2)
        instance = Obis.from_bytes(reader.take(6))
        attribute = int.from_bytes(reader.take(1), "big", signed=True)
        return cls(class_id, instance, attribute)

    def __str__(self) -> str:
        return f"class {self.class_id} {self.instance} attribute {self.attribute}"


@dataclass(frozen=True, slots=True)
class MethodDescriptor:
    """Which method of which object: class id, logical name, method id."""

    class_id: int
    instance: Obis
    method: int

    def to_bytes(self) -> bytes:
        """Return the cosem-method-descriptor bytes."""
        return (
            self.class_id.to_bytes(2, "big")
            + self.instance.to_bytes()
            + self.method.to_bytes(1, "big", signed=True)
        )

    @classmethod
    def read(cls, reader: _Reader) -> MethodDescriptor:
        class_id = reader.uint(2)
        instance = Obis.from_bytes(reader.take(6))
        method = int.from_bytes(reader.take(1), "big", signed=True)
        return cls(class_id, instance, method)

    def __str__(self) -> str:
        return f"class {self.class_id} {self.instance} method {self.method}"


@dataclass(frozen=True, slots=True)
class AccessSelection:
    """Selective access: selector 1 is a range (by a column, e.g. the clock),
    selector 2 an entry range; ``parameters`` is its structure."""

    selector: int
    parameters: Data


def _encode_access(access: AccessSelection | None) -> bytes:
    if access is None:
        return b"\x00"
    return b"\x01" + bytes((access.selector,)) + axdr.encode(access.parameters)


def _read_access(reader: _Reader) -> AccessSelection | None:
    if not reader.byte():
        return None
    selector = reader.byte()
    return AccessSelection(selector, reader.data_value())


@dataclass(frozen=True, slots=True)
class AccessFailure:
    """An attribute or method answered with a data-access-result code instead of
    data (4 object-undefined, 3 read-write-denied, ...)."""

    code: int


GetResult = Data | AccessFailure


def _encode_result(result: GetResult) -> bytes:
    if isinstance(result, AccessFailure):
        return b"\x01" + bytes((result.code,))
    return b"\x00" + axdr.encode(result)


def _read_result(reader: _Reader) -> GetResult:
    choice = reader.byte()
    if choice == 0:
        return reader.data_value()
    if choice == 1:
        return AccessFailure(reader.byte())
    raise ApduError(f"{reader.what}: result choice {choice} is neither data nor error")


# --- xDLMS initiate -----------------------------------------------------------------


def _conformance_bytes(conformance: int) -> bytes:
    return b"\x5f\x1f\x04\x00" + (conformance & 0xFFFFFF).to_bytes(3, "big")


def _read_conformance(reader: _Reader) -> int:
    if reader.take(2) != b"\x5f\x1f":
        raise ApduError(f"{reader.what}: conformance block tag 5F 1F missing")
    size = reader.byte()
    if size != 4:
        raise ApduError(f"{reader.what}: conformance block of {size} bytes, not 4")
    reader.byte()  # unused bits
    return reader.uint(3)


@dataclass(frozen=True, slots=True)
class InitiateRequest:
    """xDLMS InitiateRequest: what the client proposes."""

    conformance: int = int(CLIENT_CONFORMANCE)
    max_receive_pdu: int = 0xFFFF
    dlms_version: int = 6
    dedicated_key: bytes | None = None

    def to_bytes(self) -> bytes:
        """Return the A-XDR encoded InitiateRequest."""
        key = b"\x00"
        if self.dedicated_key is not None:
            key = b"\x01" + bytes((len(self.dedicated_key),)) + self.dedicated_key
        return (
            b"\x01"
            + key
            + b"\x00\x00"
            + bytes((self.dlms_version,))
            + _conformance_bytes(self.conformance)
            + self.max_receive_pdu.to_bytes(2, "big")
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InitiateRequest:
        """Read an InitiateRequest; raises :class:`ApduError`."""
        reader = _Reader(data, "InitiateRequest")
        if reader.byte() != Tag.INITIATE_REQUEST:
            raise ApduError("user-information is not an InitiateRequest")
        key = None
        if reader.byte():
            key = reader.take(reader.byte())
        if reader.byte():  # response-allowed given
            reader.byte()
        if reader.byte():  # proposed quality of service given
            reader.byte()
        version = reader.byte()
        conformance = _read_conformance(reader)
        size = reader.uint(2)
        return cls(conformance, size, version, key)


@dataclass(frozen=True, slots=True)
class InitiateResponse:
    """xDLMS InitiateResponse: what the server accepts."""

    conformance: int
    max_receive_pdu: int
    dlms_version: int = 6
    vaa_name: int = 0x0007

    def to_bytes(self) -> bytes:
        """Return the A-XDR encoded InitiateResponse."""
        return (
            b"\x08\x00"
            + bytes((self.dlms_version,))
            + _conformance_bytes(self.conformance)
            + self.max_receive_pdu.to_bytes(2, "big")
            + self.vaa_name.to_bytes(2, "big")
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InitiateResponse:
        """Read an InitiateResponse; raises :class:`ApduError`."""
        reader = _Reader(data, "InitiateResponse")
        if reader.byte() != Tag.INITIATE_RESPONSE:
            raise ApduError("user-information is not an InitiateResponse")
        if reader.byte():
            reader.byte()
        version = reader.byte()
        conformance = _read_conformance(reader)
        size = reader.uint(2)
        vaa = reader.uint(2)
        return cls(conformance, size, version, vaa)


# --- BER helpers for ACSE -----------------------------------------------------------


def _ber_length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    if size < 0x100:
        return bytes((0x81, size))
    return bytes((0x82,)) + size.to_bytes(2, "big")


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _ber_length(len(value)) + value


def _ber_items(data: bytes, what: str) -> dict[int, bytes]:
    """Split a BER sequence into ``{tag: value}``; raises :class:`ApduError`."""
    items: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise ApduError(f"{what} ends inside a field at byte {pos}")
        tag = data[pos]
        size = data[pos + 1]
        pos += 2
        if size & 0x80:
            count = size & 0x7F
            if not 1 <= count <= 2 or pos + count > len(data):
                raise ApduError(f"{what}: bad BER length at byte {pos}")
            size = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + size > len(data):
            raise ApduError(
                f"{what}: field 0x{tag:02X} announces {size} bytes, "
                f"{len(data) - pos} remain"
            )
        items[tag] = data[pos : pos + size]
        pos += size
    return items


def _read_ber_apdu(data: bytes, tag: int, what: str) -> dict[int, bytes]:
    if not data or data[0] != tag:
        raise ApduError(f"not an {what}")
    outer = _ber_items(data, what)
    return _ber_items(outer[tag], what)


def _context_name(context: int) -> bytes:
    return _tlv(0xA1, _tlv(0x06, _CONTEXT_PREFIX + bytes((context,))))


def _read_oid_tail(value: bytes, what: str) -> int:
    inner = _ber_items(value, what)
    oid = inner.get(0x06, b"")
    if len(oid) != 7:
        raise ApduError(f"{what} is not a DLMS object identifier: {oid.hex()}")
    return oid[-1]


def _read_integer(value: bytes, what: str) -> int:
    inner = _ber_items(value, what)
    number = inner.get(0x02)
    if number is None or not number:
        raise ApduError(f"{what} holds no integer")
    return int.from_bytes(number, "big")


def _octets(value: bytes, tag: int, what: str) -> bytes:
    inner = _ber_items(value, what)
    if tag not in inner:
        raise ApduError(f"{what}: expected field 0x{tag:02X}")
    return inner[tag]


# --- ACSE ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Aarq:
    """Association request. ``user_information`` is the (possibly ciphered)
    InitiateRequest; ``mechanism`` 1 for LLS, 5 for HLS-GMAC, ``None`` without
    authentication."""

    user_information: bytes
    context: int = CONTEXT_LN
    mechanism: int | None = None
    calling_ap_title: bytes | None = None
    authentication_value: bytes | None = None

    def to_bytes(self) -> bytes:
        """Return the BER encoded AARQ."""
        body = _context_name(self.context)
        if self.calling_ap_title is not None:
            body += _tlv(0xA6, _tlv(0x04, self.calling_ap_title))
        if self.mechanism is not None:
            body += _tlv(0x8A, b"\x07\x80")
            body += _tlv(0x8B, _MECHANISM_PREFIX + bytes((self.mechanism,)))
        if self.authentication_value is not None:
            body += _tlv(0xAC, _tlv(0x80, self.authentication_value))
        body += _tlv(0xBE, _tlv(0x04, self.user_information))
        return _tlv(Tag.AARQ, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> Aarq:
        """Read an AARQ; raises :class:`ApduError`."""
        items = _read_ber_apdu(data, Tag.AARQ, "AARQ")
        if 0xA1 not in items:
            raise ApduError("AARQ has no application context name")
        context = _read_oid_tail(items[0xA1], "AARQ application context")
        title = (
            _octets(items[0xA6], 0x04, "calling AP title") if 0xA6 in items else None
        )
        mechanism = None
        if 0x8B in items:
            if len(items[0x8B]) != 7:
                raise ApduError("AARQ mechanism name is not a DLMS mechanism")
            mechanism = items[0x8B][-1]
        auth = (
            _octets(items[0xAC], 0x80, "authentication value")
            if 0xAC in items
            else None
        )
        if 0xBE not in items:
            raise ApduError("AARQ has no user-information (InitiateRequest)")
        user = _octets(items[0xBE], 0x04, "AARQ user-information")
        return cls(user, context, mechanism, title, auth)


ASSOCIATION_ACCEPTED: Final = 0


@dataclass(frozen=True, slots=True)
class Aare:
    """Association response: ``result`` 0 accepted, 1 rejected-permanent,
    2 rejected-transient; ``diagnostic`` from the ``diagnostic_source``
    (``"user"`` or ``"provider"``); ``authentication_value`` is the server's
    challenge for HLS."""

    result: int
    diagnostic: int = 0
    diagnostic_source: str = "user"
    user_information: bytes = b""
    context: int = CONTEXT_LN
    responding_ap_title: bytes | None = None
    mechanism: int | None = None
    authentication_value: bytes | None = None

    def to_bytes(self) -> bytes:
        """Return the BER encoded AARE."""
        body = _context_name(self.context)
        body += _tlv(0xA2, _tlv(0x02, bytes((self.result,))))
        source = 0xA1 if self.diagnostic_source == "user" else 0xA2
        body += _tlv(0xA3, _tlv(source, _tlv(0x02, bytes((self.diagnostic,)))))
        if self.responding_ap_title is not None:
            body += _tlv(0xA4, _tlv(0x04, self.responding_ap_title))
        if self.mechanism is not None:
            body += _tlv(0x88, b"\x07\x80")
            body += _tlv(0x89, _MECHANISM_PREFIX + bytes((self.mechanism,)))
        if self.authentication_value is not None:
            body += _tlv(0xAA, _tlv(0x80, self.authentication_value))
        if self.user_information:
            body += _tlv(0xBE, _tlv(0x04, self.user_information))
        return _tlv(Tag.AARE, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> Aare:
        """Read an AARE; raises :class:`ApduError`."""
        items = _read_ber_apdu(data, Tag.AARE, "AARE")
        if 0xA2 not in items:
            raise ApduError("AARE has no result")
        result = _read_integer(items[0xA2], "AARE result")
        diagnostic, source = 0, "user"
        if 0xA3 in items:
            inner = _ber_items(items[0xA3], "AARE diagnostic")
            if 0xA2 in inner:
                source = "provider"
            value = inner.get(0xA1, inner.get(0xA2, b""))
            diagnostic = _read_integer(value, "AARE diagnostic") if value else 0
        context = (
            _read_oid_tail(items[0xA1], "AARE application context")
            if 0xA1 in items
            else CONTEXT_LN
        )
        title = (
            _octets(items[0xA4], 0x04, "responding AP title") if 0xA4 in items else None
        )
        mechanism = items[0x89][-1] if len(items.get(0x89, b"")) == 7 else None
        auth = (
            _octets(items[0xAA], 0x80, "responding authentication value")
            if 0xAA in items
            else None
        )
        user = (
            _octets(items[0xBE], 0x04, "AARE user-information")
            if 0xBE in items
            else b""
        )
        return cls(result, diagnostic, source, user, context, title, mechanism, auth)


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """RLRQ: release the association (reason 0 normal)."""

    reason: int | None = 0
    user_information: bytes | None = None

    def to_bytes(self) -> bytes:
        """Return the BER encoded RLRQ."""
        body = b"" if self.reason is None else _tlv(0x80, bytes((self.reason,)))
        if self.user_information is not None:
            body += _tlv(0xBE, _tlv(0x04, self.user_information))
        return _tlv(Tag.RLRQ, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReleaseRequest:
        """Read an RLRQ; raises :class:`ApduError`."""
        items = _read_ber_apdu(data, Tag.RLRQ, "RLRQ")
        reason = items[0x80][0] if items.get(0x80) else None
        user = (
            _octets(items[0xBE], 0x04, "RLRQ user-information")
            if 0xBE in items
            else None
        )
        return cls(reason, user)


@dataclass(frozen=True, slots=True)
class ReleaseResponse:
    """RLRE: the association is released (reason 0 normal)."""

    reason: int | None = 0
    user_information: bytes | None = None

    def to_bytes(self) -> bytes:
        """Return the BER encoded RLRE."""
        body = b"" if self.reason is None else _tlv(0x80, bytes((self.reason,)))
        if self.user_information is not None:
            body += _tlv(0xBE, _tlv(0x04, self.user_information))
        return _tlv(Tag.RLRE, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReleaseResponse:
        """Read an RLRE; raises :class:`ApduError`."""
        items = _read_ber_apdu(data, Tag.RLRE, "RLRE")
        reason = items[0x80][0] if items.get(0x80) else None
        user = (
            _octets(items[0xBE], 0x04, "RLRE user-information")
            if 0xBE in items
            else None
        )
        return cls(reason, user)


# --- GET ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetRequestNormal:
    """GET one attribute, optionally with selective access."""

    descriptor: AttributeDescriptor
    access: AccessSelection | None = None
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded request."""
        return (
            bytes((Tag.GET_REQUEST, 1, self.invoke))
            + self.descriptor.to_bytes()
            + _encode_access(self.access)
        )


@dataclass(frozen=True, slots=True)
class GetRequestNext:
    """Ask for the next data block after ``block_number``."""

    block_number: int
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded request."""
        return bytes((Tag.GET_REQUEST, 2, self.invoke)) + self.block_number.to_bytes(
            4, "big"
        )


@dataclass(frozen=True, slots=True)
class GetRequestWithList:
    """GET several attributes in one request."""

    items: tuple[tuple[AttributeDescriptor, AccessSelection | None], ...]
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded request."""
        out = bytes((Tag.GET_REQUEST, 3, self.invoke)) + axdr.encode_length(
            len(self.items)
        )
        for descriptor, access in self.items:
            out += descriptor.to_bytes() + _encode_access(access)
        return out


@dataclass(frozen=True, slots=True)
class GetResponseNormal:
    """The value of one attribute, or the error code the meter gave."""

    result: GetResult
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded response."""
        return bytes((Tag.GET_RESPONSE, 1, self.invoke)) + _encode_result(self.result)


@dataclass(frozen=True, slots=True)
class GetResponseBlock:
    """One data block of a long answer: ``raw`` is a piece of the encoded value,
    or ``failure`` says why the block is not there."""

    block_number: int
    last: bool
    raw: bytes = b""
    failure: AccessFailure | None = None
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded response."""
        head = bytes((Tag.GET_RESPONSE, 2, self.invoke, 1 if self.last else 0))
        head += self.block_number.to_bytes(4, "big")
        if self.failure is not None:
            return head + b"\x01" + bytes((self.failure.code,))
        return head + b"\x00" + axdr.encode_length(len(self.raw)) + self.raw


@dataclass(frozen=True, slots=True)
class GetResponseWithList:
    """The results of a GET with list, in request order."""

    results: tuple[GetResult, ...]
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded response."""
        out = bytes((Tag.GET_RESPONSE, 3, self.invoke))
        out += axdr.encode_length(len(self.results))
        return out + b"".join(_encode_result(r) for r in self.results)


# --- SET and ACTION -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetRequestNormal:
    """SET one attribute to ``value``."""

    descriptor: AttributeDescriptor
    value: Data
    access: AccessSelection | None = None
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded request."""
        return (
            bytes((Tag.SET_REQUEST, 1, self.invoke))
            + self.descriptor.to_bytes()
            + _encode_access(self.access)
            + axdr.encode(self.value)
        )


@dataclass(frozen=True, slots=True)
class SetResponseNormal:
    """The data-access-result of a SET (0 success)."""

    result: int
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded response."""
        return bytes((Tag.SET_RESPONSE, 1, self.invoke, self.result))


@dataclass(frozen=True, slots=True)
class ActionRequestNormal:
    """Invoke one method, with optional parameters."""

    method: MethodDescriptor
    parameters: Data | None = None
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded request."""
        params = (
            b"\x00"
            if self.parameters is None
            else b"\x01" + axdr.encode(self.parameters)
        )
        return (
            bytes((Tag.ACTION_REQUEST, 1, self.invoke))
            + self.method.to_bytes()
            + params
        )


@dataclass(frozen=True, slots=True)
class ActionResponseNormal:
    """The action-result (0 success) and the method's return value, if any."""

    result: int
    return_value: GetResult | None = None
    invoke: int = DEFAULT_INVOKE

    def to_bytes(self) -> bytes:
        """Return the encoded response."""
        out = bytes((Tag.ACTION_RESPONSE, 1, self.invoke, self.result))
        if self.return_value is None:
            return out + b"\x00"
        return out + b"\x01" + _encode_result(self.return_value)


# --- other --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataNotification:
    """A push: long invoke id, optional date-time (12 bytes) and the body."""

    long_invoke: int
    date_time: bytes | None
    body: Data

    def to_bytes(self) -> bytes:
        """Return the encoded notification."""
        stamp = b"\x00" if self.date_time is None else bytes((len(self.date_time),))
        stamp += self.date_time or b""
        return (
            bytes((Tag.DATA_NOTIFICATION,))
            + self.long_invoke.to_bytes(4, "big")
            + stamp
            + axdr.encode(self.body)
        )


_STATE_ERRORS = {1: "service-not-allowed", 2: "service-unknown"}
_SERVICE_ERRORS = {
    1: "operation-not-possible",
    2: "service-not-supported",
    3: "other-reason",
    4: "pdu-too-long",
    5: "deciphering-error",
    6: "invocation-counter-error",
}


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """The meter could not handle the request at all (state or service error)."""

    state_error: int
    service_error: int

    def to_bytes(self) -> bytes:
        """Return the encoded response."""
        return bytes((Tag.EXCEPTION_RESPONSE, self.state_error, self.service_error))

    def describe(self) -> str:
        """Return the two errors in words."""
        state = _STATE_ERRORS.get(self.state_error, str(self.state_error))
        service = _SERVICE_ERRORS.get(self.service_error, str(self.service_error))
        return f"{state}, {service}"


@dataclass(frozen=True, slots=True)
class ConfirmedServiceError:
    """The meter refused a confirmed service (often the InitiateRequest)."""

    service: int
    error_type: int
    code: int

    def to_bytes(self) -> bytes:
        """Return the encoded error."""
        return bytes(
            (Tag.CONFIRMED_SERVICE_ERROR, self.service, self.error_type, self.code)
        )

    def describe(self) -> str:
        """Return the error in words."""
        types = {
            0: "application-reference",
            1: "hardware-resource",
            2: "vde-state-error",
            3: "service",
            4: "definition",
            5: "access",
            6: "initiate",
            7: "load-data-set",
            8: "task",
            9: "other",
        }
        kind = types.get(self.error_type, str(self.error_type))
        if self.error_type == 6:
            reason = {
                0: "other",
                1: "dlms-version-too-low",
                2: "incompatible-conformance",
                3: "pdu-size-too-short",
                4: "refused-by-the-VDE-handler",
            }.get(self.code, str(self.code))
            return f"{kind} error: {reason}"
        return f"{kind} error {self.code} (service {self.service})"


@dataclass(frozen=True, slots=True)
class CipheredApdu:
    """A glo-ciphered APDU: security control byte, invocation counter and the
    ciphered payload with its authentication tag. ``system_title`` is set for
    general-glo-ciphering, which carries the sender's title itself."""

    tag: int
    security_control: int
    invocation_counter: int
    payload: bytes
    system_title: bytes | None = None

    def to_bytes(self) -> bytes:
        """Return the encoded ciphered APDU."""
        inner = (
            bytes((self.security_control,))
            + self.invocation_counter.to_bytes(4, "big")
            + self.payload
        )
        head = bytes((self.tag,))
        if self.tag == Tag.GENERAL_GLO_CIPHERING:
            title = self.system_title or b""
            head += axdr.encode_length(len(title)) + title
        return head + axdr.encode_length(len(inner)) + inner


Apdu = (
    Aarq
    | Aare
    | ReleaseRequest
    | ReleaseResponse
    | GetRequestNormal
    | GetRequestNext
    | GetRequestWithList
    | GetResponseNormal
    | GetResponseBlock
    | GetResponseWithList
    | SetRequestNormal
    | SetResponseNormal
    | ActionRequestNormal
    | ActionResponseNormal
    | DataNotification
    | ExceptionResponse
    | ConfirmedServiceError
    | CipheredApdu
    | InitiateRequest
    | InitiateResponse
)

_CIPHERED_TAGS: Final = frozenset(GLO_TAGS.values()) | {Tag.GENERAL_GLO_CIPHERING}


def decode_apdu(data: bytes) -> Apdu:
    """Decode one APDU.

    Raises :class:`ApduError` for an unknown tag or choice, a truncated APDU or
    bytes after its end, and :class:`AxdrError` for broken data inside it.
    """
    if not data:
        raise ApduError("empty APDU")
    tag = data[0]
    try:
        if tag == Tag.AARQ:
            return Aarq.from_bytes(data)
        if tag == Tag.AARE:
            return Aare.from_bytes(data)
        if tag == Tag.RLRQ:
            return ReleaseRequest.from_bytes(data)
        if tag == Tag.RLRE:
            return ReleaseResponse.from_bytes(data)
        if tag == Tag.INITIATE_REQUEST:
            return InitiateRequest.from_bytes(data)
        if tag == Tag.INITIATE_RESPONSE:
            return InitiateResponse.from_bytes(data)
    except KeyError as exc:  # a BER field looked up after its presence was checked
        raise ApduError(f"APDU 0x{tag:02X} lacks field {exc}") from None
    name = Tag(tag).name if tag in Tag._value2member_map_ else f"0x{tag:02X}"
    reader = _Reader(data, f"APDU {name}", 1)
    apdu = _decode_service(tag, reader)
    reader.done()
    return apdu


def _decode_service(tag: int, reader: _Reader) -> Apdu:
    """Decode the xDLMS service APDUs (A-XDR encoded)."""
    if tag in _CIPHERED_TAGS:
        title = None
        if tag == Tag.GENERAL_GLO_CIPHERING:
            title = reader.take(reader.length())
        size = reader.length()
        if size < 5:
            raise ApduError(f"ciphered APDU of {size} bytes has no room for its header")
        if size != reader.left:
            raise ApduError(
                f"ciphered APDU announces {size} bytes, {reader.left} follow"
            )
        control = reader.byte()
        counter = reader.uint(4)
        return CipheredApdu(tag, control, counter, reader.take(size - 5), title)
    if tag == Tag.DATA_NOTIFICATION:
        invoke = reader.uint(4)
        size = reader.byte()
        stamp = reader.take(size) if size else None
        return DataNotification(invoke, stamp, reader.data_value())
    if tag == Tag.EXCEPTION_RESPONSE:
        state, service = reader.byte(), reader.byte()
        if reader.left:
            reader.take(reader.left)  # invocation counter of some error kinds
        return ExceptionResponse(state, service)
    if tag == Tag.CONFIRMED_SERVICE_ERROR:
        return ConfirmedServiceError(reader.byte(), reader.byte(), reader.byte())
    choice = reader.byte()
    invoke = reader.byte()
    key = (tag, choice)
    if key == (Tag.GET_REQUEST, 1):
        descriptor = AttributeDescriptor.read(reader)
        return GetRequestNormal(descriptor, _read_access(reader), invoke)
    if key == (Tag.GET_REQUEST, 2):
        return GetRequestNext(reader.uint(4), invoke)
    if key == (Tag.GET_REQUEST, 3):
        count = reader.length()
        items = []
        for _ in range(count):
            descriptor = AttributeDescriptor.read(reader)
            items.append((descriptor, _read_access(reader)))
        return GetRequestWithList(tuple(items), invoke)
    if key == (Tag.GET_RESPONSE, 1):
        return GetResponseNormal(_read_result(reader), invoke)
    if key == (Tag.GET_RESPONSE, 2):
        last = reader.byte() != 0
        number = reader.uint(4)
        choice = reader.byte()
        if choice == 0:
            return GetResponseBlock(
                number, last, reader.take(reader.length()), None, invoke
            )
        if choice == 1:
            return GetResponseBlock(
                number, last, b"", AccessFailure(reader.byte()), invoke
            )
        raise ApduError(f"data block result choice {choice} is unknown")
    if key == (Tag.GET_RESPONSE, 3):
        count = reader.length()
        if count > reader.left:
            raise ApduError(f"GET with list announces {count} results, too few bytes")
        return GetResponseWithList(
            tuple(_read_result(reader) for _ in range(count)), invoke
        )
    if key == (Tag.SET_REQUEST, 1):
        descriptor = AttributeDescriptor.read(reader)
        access = _read_access(reader)
        return SetRequestNormal(descriptor, reader.data_value(), access, invoke)
    if key == (Tag.SET_RESPONSE, 1):
        return SetResponseNormal(reader.byte(), invoke)
    if key == (Tag.ACTION_REQUEST, 1):
        method = MethodDescriptor.read(reader)
        params = reader.data_value() if reader.byte() else None
        return ActionRequestNormal(method, params, invoke)
    if key == (Tag.ACTION_RESPONSE, 1):
        result = reader.byte()
        value = _read_result(reader) if reader.byte() else None
        return ActionResponseNormal(result, value, invoke)
    raise ApduError(
        f"APDU tag 0x{tag:02X} choice {choice} is not a service this client handles"
    )


def range_access(
    clock: Obis,
    start: bytes,
    end: bytes,
    *,
    clock_class: int = 8,
    clock_attribute: int = 2,
) -> AccessSelection:
    """Return selective access by range on the clock column of a profile: entries
    with ``start <= clock <= end`` (both 12-byte date-times), all columns."""
    restricting = axdr.structure(
        (
            axdr.uint16(clock_class),
            axdr.octet_string(clock.to_bytes()),
            axdr.int8(clock_attribute),
            axdr.uint16(0),
        )
    )
    return AccessSelection(
        1,
        axdr.structure(
            (
                restricting,
                axdr.octet_string(start),
                axdr.octet_string(end),
                axdr.array(()),
            )
        ),
    )


def entry_access(first: int, last: int = 0) -> AccessSelection:
    """Return selective access by entry: rows ``first``..``last`` (1-based; last 0
    means "to the newest"), all columns."""
    return AccessSelection(
        2,
        axdr.structure(
            (axdr.uint32(first), axdr.uint32(last), axdr.uint16(1), axdr.uint16(0))
        ),
    )


def describe_tag(tag: int) -> str:
    """Return the Green Book name of an APDU tag (``get-response``), or hex."""
    names: dict[int, str] = {
        Tag.AARQ: "AARQ (association request)",
        Tag.AARE: "AARE (association response)",
        Tag.RLRQ: "RLRQ (release request)",
        Tag.RLRE: "RLRE (release response)",
        Tag.GET_REQUEST: "get-request",
        Tag.GET_RESPONSE: "get-response",
        Tag.SET_REQUEST: "set-request",
        Tag.SET_RESPONSE: "set-response",
        Tag.ACTION_REQUEST: "action-request",
        Tag.ACTION_RESPONSE: "action-response",
        Tag.DATA_NOTIFICATION: "data-notification",
        Tag.EXCEPTION_RESPONSE: "exception-response",
        Tag.CONFIRMED_SERVICE_ERROR: "confirmed-service-error",
        Tag.GLO_GET_REQUEST: "glo-get-request (ciphered)",
        Tag.GLO_GET_RESPONSE: "glo-get-response (ciphered)",
        Tag.GLO_SET_REQUEST: "glo-set-request (ciphered)",
        Tag.GLO_SET_RESPONSE: "glo-set-response (ciphered)",
        Tag.GLO_ACTION_REQUEST: "glo-action-request (ciphered)",
        Tag.GLO_ACTION_RESPONSE: "glo-action-response (ciphered)",
        Tag.GLO_INITIATE_REQUEST: "glo-initiate-request (ciphered)",
        Tag.GLO_INITIATE_RESPONSE: "glo-initiate-response (ciphered)",
        Tag.GENERAL_GLO_CIPHERING: "general-glo-ciphering",
        Tag.INITIATE_REQUEST: "initiate-request",
        Tag.INITIATE_RESPONSE: "initiate-response",
    }
    return names.get(tag, f"unknown APDU 0x{tag:02X}")
