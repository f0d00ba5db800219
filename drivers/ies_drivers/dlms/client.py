"""The client side of a DLMS/COSEM association, as a state machine without I/O.

:class:`ClientSession` turns what we want (associate, GET, SET, ACTION, release)
into request APDUs and the meter's response APDUs into events. It never reads or
writes anything itself: :mod:`ies_drivers.dlms.transport` carries the bytes over an
HDLC or wrapper link. States, and the only moves it allows::

    idle ──associate()──▶ associating ──AARE accepted──▶ associated
                              │  └──AARE with HLS──▶ authenticating ──reply ok──┘
                              └──AARE rejected──▶ idle (AssociationRejected)
    associated ──get()/set()/action()──▶ waiting ──response──▶ associated
    waiting ──data block, not last──▶ waiting (SendNext: get the next block)
    associated ──release()──▶ releasing ──RLRE──▶ idle

Anything else raises :class:`SessionStateError` (our bug) or :class:`ApduError`
(the meter's answer does not fit the request). With security suite 0 every request
after the AARQ is glo-ciphered and every ciphered answer checked, the meter's
invocation counter must grow (replayed answers are refused); with HLS-GMAC
(mechanism 5) each side proves it holds the keys after the AARE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import axdr, security
from ies_drivers.dlms.apdu import (
    AccessFailure,
    AccessSelection,
    AttributeDescriptor,
    GetResult,
    MethodDescriptor,
)
from ies_drivers.dlms.axdr import Data
from ies_drivers.dlms.errors import (
    ApduError,
    AssociationRejected,
    SecurityError,
    ServiceError,
    SessionStateError,
)
from ies_drivers.dlms.obis import Obis

AuthLevel = Literal["none", "low", "high-gmac"]
AUTH_LEVELS: Final = ("none", "low", "high-gmac")
CURRENT_ASSOCIATION: Final = Obis(0, 0, 40, 0, 0, 255)
ASSOCIATION_LN_CLASS: Final = 15
REPLY_TO_HLS: Final = 1
MAX_BLOCKS: Final = 100_000


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How the client associates.

    ``client_sap`` 16 is the public client (no security); IS 15959 meters give the
    meter reader SAP 32 with LLS and the utility settings SAP 48 with HLS.
    ``authentication``: ``"none"``, ``"low"`` (``password``) or ``"high-gmac"``
    (mechanism 5, needs ``keys``). ``security_control`` 0 sends APDUs in clear,
    0x10/0x20/0x30 protects them with suite 0 (needs ``keys``).
    ``max_receive_pdu`` is the longest APDU we accept, in bytes.
    """

    client_sap: int = 16
    authentication: AuthLevel = "none"
    password: bytes = b""
    keys: security.SecurityKeys | None = None
    security_control: int = 0
    max_receive_pdu: int = 0xFFFF
    conformance: int = int(ap.CLIENT_CONFORMANCE)
    invocation_counter: int = 1

    def __post_init__(self) -> None:
        if self.authentication not in AUTH_LEVELS:
            raise SecurityError(
                f"authentication {self.authentication!r} is not one of {AUTH_LEVELS}"
            )
        if self.authentication == "low" and not self.password:
            raise SecurityError("low level security needs a password")
        needs_keys = self.authentication == "high-gmac" or self.security_control
        if needs_keys and self.keys is None:
            raise SecurityError(
                "high level security and ciphering need the block cipher key, the "
                "authentication key and a client system title"
            )

    def __repr__(self) -> str:  # keep passwords and keys out of logs
        return (
            f"ClientSettings(client_sap={self.client_sap}, "
            f"authentication={self.authentication!r}, "
            f"security_control=0x{self.security_control:02X})"
        )


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Associated:
    """The association is established with these negotiated parameters."""

    conformance: int
    server_max_pdu: int
    server_title: bytes | None


@dataclass(frozen=True, slots=True)
class SendNext:
    """The exchange goes on: send ``request`` (HLS reply, next data block)."""

    request: bytes


@dataclass(frozen=True, slots=True)
class GetDone:
    """Results of a GET, in request order, and the plain response APDUs."""

    results: tuple[GetResult, ...]
    responses: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SetDone:
    """Data-access-result of a SET (0 success)."""

    result: int
    response: bytes


@dataclass(frozen=True, slots=True)
class ActionDone:
    """Action-result (0 success) and return value of an ACTION."""

    result: int
    value: GetResult | None
    response: bytes


@dataclass(frozen=True, slots=True)
class Released:
    """The association is released."""


@dataclass(frozen=True, slots=True)
class PushReceived:
    """An unsolicited DataNotification arrived while we waited; keep waiting."""

    notification: ap.DataNotification


SessionEvent = (
    Associated | SendNext | GetDone | SetDone | ActionDone | Released | PushReceived
)
State = Literal[
    "idle", "associating", "authenticating", "associated", "waiting", "releasing"
]


class ClientSession:
    """One association with one meter; see the module docstring."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.state: State = "idle"
        self.conformance = 0
        self.server_max_pdu = 0xFFFF
        self.server_title: bytes | None = None
        self._counter = settings.invocation_counter
        self._server_counter = -1
        self._invoke_id = 0
        self._challenge = b""
        self._pending: Literal["get", "get-list", "set", "action", "hls"] | None = None
        self._pending_what = ""
        self._pending_count = 1
        self._blocks: list[bytes] = []
        self._block_number = 0
        self._responses: list[bytes] = []

    # -- requests

    def associate(self) -> bytes:
        """Return the AARQ; the next response must be the AARE."""
        self._expect_state("idle", "associate")
        settings = self.settings
        initiate = ap.InitiateRequest(
            conformance=settings.conformance, max_receive_pdu=settings.max_receive_pdu
        ).to_bytes()
        context = ap.CONTEXT_LN
        title = None
        if settings.keys is not None and (
            settings.security_control or settings.authentication == "high-gmac"
        ):
            title = settings.keys.system_title
        if settings.security_control:
            context = ap.CONTEXT_LN_CIPHERED
            initiate = self._cipher(initiate, ap.Tag.INITIATE_REQUEST)
        mechanism = None
        value = None
        if settings.authentication == "low":
            mechanism, value = ap.MECHANISM_LLS, settings.password
        elif settings.authentication == "high-gmac":
            self._challenge = security.new_challenge(16)
            mechanism, value = ap.MECHANISM_HLS_GMAC, self._challenge
        self.state = "associating"
        return ap.Aarq(initiate, context, mechanism, title, value).to_bytes()

    def get(
        self, descriptor: AttributeDescriptor, access: AccessSelection | None = None
    ) -> bytes:
        """Return the GET request for one attribute."""
        self._start("get", str(descriptor), 1)
        request = ap.GetRequestNormal(descriptor, access, self._next_invoke())
        return self._protect(request.to_bytes())

    def get_with_list(
        self, items: Sequence[tuple[AttributeDescriptor, AccessSelection | None]]
    ) -> bytes:
        """Return one GET request for several attributes."""
        if not items:
            raise SessionStateError("GET with list needs at least one attribute")
        self._start("get-list", f"{len(items)} attributes", len(items))
        request = ap.GetRequestWithList(tuple(items), self._next_invoke())
        return self._protect(request.to_bytes())

    def set(self, descriptor: AttributeDescriptor, value: Data) -> bytes:
        """Return the SET request writing ``value``."""
        self._start("set", f"writing {descriptor}", 1)
        request = ap.SetRequestNormal(descriptor, value, None, self._next_invoke())
        return self._protect(request.to_bytes())

    def action(self, method: MethodDescriptor, parameters: Data | None = None) -> bytes:
        """Return the ACTION request invoking ``method``."""
        self._start("action", f"invoking {method}", 1)
        request = ap.ActionRequestNormal(method, parameters, self._next_invoke())
        return self._protect(request.to_bytes())

    def release(self) -> bytes:
        """Return the RLRQ; the next response must be the RLRE."""
        if self.state not in ("associated", "waiting", "authenticating"):
            raise SessionStateError(f"cannot release: the session is {self.state}")
        self.state = "releasing"
        self._pending = None
        return ap.ReleaseRequest(0).to_bytes()

    def abort(self) -> None:
        """Forget the association (link lost, error): back to ``idle``."""
        self.state = "idle"
        self._pending = None
        self._blocks.clear()
        self._responses.clear()

    # -- responses

    def receive(self, data: bytes) -> SessionEvent:
        """Handle one response APDU and return what it means.

        Raises :class:`AssociationRejected`, :class:`ServiceError`,
        :class:`SecurityError`, :class:`ApduError` (and A-XDR errors) as the
        module docstring describes; after an error the session is ``idle`` or
        ``associated`` again, never stuck in ``waiting``.
        """
        try:
            return self._receive(data)
        except Exception:
            if self.state in ("associating", "authenticating", "releasing"):
                self.state = "idle"
            elif self.state == "waiting":
                self.state = "associated"
                self._pending = None
            raise

    def _receive(self, data: bytes) -> SessionEvent:
        message = ap.decode_apdu(data)
        if isinstance(message, ap.CipheredApdu):
            data = self._decipher(message)
            message = ap.decode_apdu(data)
        if isinstance(message, ap.DataNotification):
            return PushReceived(message)
        if isinstance(message, ap.ExceptionResponse):
            raise ServiceError(
                f"meter answered with an exception-response: {message.describe()}"
            )
        if isinstance(message, ap.ConfirmedServiceError):
            raise ServiceError(f"meter refused the request: {message.describe()}")
        if self.state == "associating":
            if not isinstance(message, ap.Aare):
                raise ApduError(f"expected the AARE, got {type(message).__name__}")
            return self._on_aare(message)
        if self.state == "releasing":
            if not isinstance(message, ap.ReleaseResponse):
                raise ApduError(f"expected the RLRE, got {type(message).__name__}")
            self.state = "idle"
            return Released()
        if self.state not in ("waiting", "authenticating"):
            raise ApduError(
                f"unexpected {type(message).__name__} while the session is {self.state}"
            )
        return self._on_response(message, data)

    # -- internals

    def _expect_state(self, state: State, action: str) -> None:
        if self.state != state:
            raise SessionStateError(f"cannot {action}: the session is {self.state}")

    def _start(
        self, kind: Literal["get", "get-list", "set", "action"], what: str, count: int
    ) -> None:
        self._expect_state("associated", f"send a {kind} request")
        self.state = "waiting"
        self._pending = kind
        self._pending_what = what
        self._pending_count = count
        self._blocks = []
        self._block_number = 0
        self._responses = []

    def _next_invoke(self) -> int:
        self._invoke_id = (self._invoke_id % 15) + 1
        return 0xC0 | self._invoke_id

    def _check_invoke(self, invoke: int) -> None:
        if invoke & 0x0F != self._invoke_id:
            raise ApduError(
                f"response carries invoke-id {invoke & 0x0F}, we asked with "
                f"{self._invoke_id}: an answer to another request"
            )

    def _cipher(self, plain: bytes, plain_tag: int) -> bytes:
        keys = self.settings.keys
        assert keys is not None
        control = self.settings.security_control or security.AUTHENTICATED_ENCRYPTED
        counter = self._counter
        self._counter += 1
        payload = security.encrypt(
            control,
            keys.system_title,
            counter,
            keys.block_cipher_key,
            keys.authentication_key,
            plain,
        )
        tag = ap.GLO_TAGS[ap.Tag(plain_tag)]
        return ap.CipheredApdu(tag, control, counter, payload).to_bytes()

    def _protect(self, plain: bytes) -> bytes:
        if not self.settings.security_control:
            return plain
        return self._cipher(plain, plain[0])

    def _decipher(self, message: ap.CipheredApdu) -> bytes:
        keys = self.settings.keys
        if keys is None:
            raise SecurityError(
                "meter sent a ciphered APDU but no keys are configured for it"
            )
        title = message.system_title or self.server_title
        if title is None:
            raise SecurityError(
                "ciphered APDU before the meter's system title is known (no "
                "responding AP title in the AARE)"
            )
        if message.invocation_counter <= self._server_counter:
            raise SecurityError(
                f"meter invocation counter {message.invocation_counter} does not "
                f"grow (last {self._server_counter}): replayed or stale APDU"
            )
        plain = security.decrypt(
            message.security_control,
            title,
            message.invocation_counter,
            keys.block_cipher_key,
            keys.authentication_key,
            message.payload,
        )
        self._server_counter = message.invocation_counter
        return plain

    def _on_aare(self, aare: ap.Aare) -> SessionEvent:
        if aare.result != ap.ASSOCIATION_ACCEPTED:
            detail = ""
            self.state = "idle"
            if aare.user_information:
                try:
                    info = ap.decode_apdu(aare.user_information)
                    if isinstance(info, ap.ConfirmedServiceError):
                        detail = info.describe()
                except Exception:  # the rejection matters, not its decoration
                    detail = ""
            error = AssociationRejected(
                aare.result, aare.diagnostic, aare.diagnostic_source
            )
            if detail:
                error.args = (f"{error.args[0]} ({detail})",)
            raise error
        self.server_title = aare.responding_ap_title
        user_info = aare.user_information
        if user_info and user_info[0] in (
            ap.Tag.GLO_INITIATE_RESPONSE,
            ap.Tag.GENERAL_GLO_CIPHERING,
        ):
            ciphered = ap.decode_apdu(user_info)
            assert isinstance(ciphered, ap.CipheredApdu)
            user_info = self._decipher(ciphered)
        response = ap.decode_apdu(user_info) if user_info else None
        if isinstance(response, ap.ConfirmedServiceError):
            self.state = "idle"
            raise ServiceError(
                f"meter refused the xDLMS initiate: {response.describe()}"
            )
        if not isinstance(response, ap.InitiateResponse):
            self.state = "idle"
            raise ApduError("AARE carries no InitiateResponse")
        self.conformance = response.conformance
        self.server_max_pdu = response.max_receive_pdu
        if self.settings.authentication != "high-gmac":
            self.state = "associated"
            return Associated(self.conformance, self.server_max_pdu, self.server_title)
        # HLS mechanism 5: prove our keys over the meter's challenge.
        challenge = aare.authentication_value
        if not challenge or self.server_title is None:
            self.state = "idle"
            raise SecurityError(
                "AARE for HLS-GMAC lacks the meter's challenge or system title"
            )
        keys = self.settings.keys
        assert keys is not None
        counter = self._counter
        self._counter += 1
        reply = security.hls_reply(keys, counter, challenge)
        self.state = "authenticating"
        self._pending = "hls"
        self._pending_what = "the HLS reply"
        request = ap.ActionRequestNormal(
            MethodDescriptor(ASSOCIATION_LN_CLASS, CURRENT_ASSOCIATION, REPLY_TO_HLS),
            axdr.octet_string(reply),
            self._next_invoke(),
        )
        return SendNext(self._protect(request.to_bytes()))

    def _on_response(self, message: ap.Apdu, plain: bytes) -> SessionEvent:
        pending = self._pending
        if pending == "hls":
            if not isinstance(message, ap.ActionResponseNormal):
                raise ApduError(
                    f"expected the HLS action response, got {type(message).__name__}"
                )
            self._check_invoke(message.invoke)
            value = message.return_value
            if message.result != 0 or not isinstance(value, Data):
                raise SecurityError(
                    f"meter refused our HLS reply (action result {message.result}): "
                    "wrong keys or system title"
                )
            keys = self.settings.keys
            assert keys is not None and self.server_title is not None
            security.check_hls_reply(
                value.as_bytes(),
                self.server_title,
                keys.block_cipher_key,
                keys.authentication_key,
                self._challenge,
            )
            self.state = "associated"
            self._pending = None
            return Associated(self.conformance, self.server_max_pdu, self.server_title)
        self._responses.append(plain)
        if pending == "get" and isinstance(message, ap.GetResponseNormal):
            self._check_invoke(message.invoke)
            return self._finish(GetDone((message.result,), tuple(self._responses)))
        if pending in ("get", "get-list") and isinstance(message, ap.GetResponseBlock):
            return self._on_block(message)
        if pending == "get-list" and isinstance(message, ap.GetResponseWithList):
            self._check_invoke(message.invoke)
            if len(message.results) != self._pending_count:
                raise ApduError(
                    f"asked for {self._pending_count} attributes, got "
                    f"{len(message.results)} results"
                )
            return self._finish(GetDone(message.results, tuple(self._responses)))
        if pending == "set" and isinstance(message, ap.SetResponseNormal):
            self._check_invoke(message.invoke)
            return self._finish(SetDone(message.result, plain))
        if pending == "action" and isinstance(message, ap.ActionResponseNormal):
            self._check_invoke(message.invoke)
            return self._finish(ActionDone(message.result, message.return_value, plain))
        raise ApduError(
            f"expected the answer to {self._pending_what}, got {type(message).__name__}"
        )

    def _on_block(self, block: ap.GetResponseBlock) -> SessionEvent:
        self._check_invoke(block.invoke)
        if block.failure is not None:
            raise ApduError(
                f"meter stopped the block transfer of {self._pending_what}: "
                f"data-access-result {block.failure.code}"
            )
        expected = self._block_number + 1
        if block.block_number != expected:
            raise ApduError(
                f"data block {block.block_number} received, expected {expected}"
            )
        if expected > MAX_BLOCKS:
            raise ApduError(f"more than {MAX_BLOCKS} data blocks: refused")
        self._block_number = expected
        self._blocks.append(block.raw)
        if not block.last:
            request = ap.GetRequestNext(block.block_number, 0xC0 | self._invoke_id)
            return SendNext(self._protect(request.to_bytes()))
        raw = b"".join(self._blocks)
        self._blocks = []
        if self._pending == "get":
            return self._finish(GetDone((axdr.decode(raw),), tuple(self._responses)))
        # GET with list in blocks: the raw data is the list of results.
        reader_count, pos = axdr.decode_length(raw, 0)
        results: list[GetResult] = []
        for _ in range(reader_count):
            if pos >= len(raw):
                raise ApduError("block-transferred result list ends early")
            choice = raw[pos]
            if choice == 0:
                value, pos = axdr.decode_from(raw, pos + 1)
                results.append(value)
            elif choice == 1 and pos + 1 < len(raw):
                results.append(AccessFailure(raw[pos + 1]))
                pos += 2
            else:
                raise ApduError(
                    f"bad result choice {choice} in a block-transferred list"
                )
        return self._finish(GetDone(tuple(results), tuple(self._responses)))

    def _finish(self, event: SessionEvent) -> SessionEvent:
        self.state = "associated"
        self._pending = None
        return event
