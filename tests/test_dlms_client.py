"""The association state machine, client against our server session, in memory.

:class:`ClientSession` and :class:`ServerSession` exchange APDUs directly (no link,
no I/O), so every accept, reject, HLS step, ciphered APDU and data block is an exact
byte exchange. The server side is checked against Gurux in ``test_dlms_gurux.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import axdr, security
from ies_drivers.dlms.apdu import AttributeDescriptor
from ies_drivers.dlms.client import (
    Associated,
    ClientSession,
    ClientSettings,
    GetDone,
    Released,
    SendNext,
    SessionEvent,
    SetDone,
)
from ies_drivers.dlms.errors import (
    ApduError,
    AssociationRejected,
    AxdrError,
    SecurityError,
    ServiceError,
    SessionStateError,
)
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.server import (
    ServerSecurity,
    ServerSession,
    SimulatedMeter,
    demo_keys,
)

METER_KEYS = demo_keys()
CLIENT_KEYS = security.SecurityKeys(
    METER_KEYS.block_cipher_key, METER_KEYS.authentication_key, b"IESGW001"
)
SERIAL = AttributeDescriptor(1, Obis(0, 0, 96, 1, 0), 2)
BLOCK_LOAD = AttributeDescriptor(7, Obis(1, 0, 99, 1, 0), 2)
CLOCK = AttributeDescriptor(8, Obis(0, 0, 1, 0, 0), 2)


def server_for(sap: int, **policy: object) -> ServerSession:
    meter = SimulatedMeter(history_days=1)
    return ServerSession(meter, ServerSecurity(keys=METER_KEYS, **policy), sap)  # type: ignore[arg-type]


def run(client: ClientSession, server: ServerSession, request: bytes) -> SessionEvent:
    """Pass ``request`` and every follow-up until the client has a final event."""
    event: SessionEvent
    while True:
        answer = server.handle(request)
        assert answer is not None
        event = client.receive(answer)
        if not isinstance(event, SendNext):
            return event
        request = event.request


def associate(
    settings: ClientSettings, **policy: object
) -> tuple[ClientSession, ServerSession]:
    client = ClientSession(settings)
    server = server_for(settings.client_sap, **policy)
    event = run(client, server, client.associate())
    assert isinstance(event, Associated)
    assert client.state == "associated" and server.state == "associated"
    return client, server


def get(
    client: ClientSession, server: ServerSession, what: AttributeDescriptor
) -> axdr.Data:
    event = run(client, server, client.get(what))
    assert isinstance(event, GetDone)
    (result,) = event.results
    assert isinstance(result, axdr.Data)
    return result


def test_public_client_reads_and_releases() -> None:
    client, server = associate(ClientSettings())
    assert get(client, server, SERIAL).as_text() == "IES0000001"
    assert isinstance(run(client, server, client.release()), Released)
    assert client.state == "idle"


def test_low_level_security_with_the_right_password() -> None:
    client, server = associate(
        ClientSettings(client_sap=32, authentication="low", password=b"ABCDEFGH")
    )
    assert get(client, server, SERIAL).as_text() == "IES0000001"


def test_a_wrong_password_is_rejected_with_the_reason() -> None:
    client = ClientSession(
        ClientSettings(client_sap=32, authentication="low", password=b"WRONG123")
    )
    server = server_for(32)
    with pytest.raises(AssociationRejected, match="authentication failure") as caught:
        run(client, server, client.associate())
    assert caught.value.diagnostic == 13
    assert client.state == "idle"


def test_a_client_that_omits_required_authentication_is_rejected() -> None:
    client = ClientSession(ClientSettings(client_sap=32))
    with pytest.raises(AssociationRejected, match="mechanism name required"):
        run(client, server_for(32), client.associate())


def test_hls_gmac_both_sides_prove_their_keys() -> None:
    client, server = associate(
        ClientSettings(client_sap=48, authentication="high-gmac", keys=CLIENT_KEYS)
    )
    assert client.server_title == METER_KEYS.system_title
    assert get(client, server, SERIAL).as_text() == "IES0000001"


def test_hls_with_wrong_keys_fails_and_leaves_the_session_idle() -> None:
    wrong = security.SecurityKeys(b"\x11" * 16, b"\x22" * 16, b"IESGW001")
    client = ClientSession(
        ClientSettings(client_sap=48, authentication="high-gmac", keys=wrong)
    )
    with pytest.raises(SecurityError, match="refused our HLS reply"):
        run(client, server_for(48), client.associate())
    assert client.state == "idle"


def test_suite0_ciphered_session_and_replay_refused() -> None:
    settings = ClientSettings(
        client_sap=48,
        authentication="high-gmac",
        keys=CLIENT_KEYS,
        security_control=0x30,
    )
    client, server = associate(settings)
    request = client.get(SERIAL)
    assert request[0] == ap.Tag.GLO_GET_REQUEST
    answer = server.handle(request)
    assert answer is not None and answer[0] == ap.Tag.GLO_GET_RESPONSE
    assert b"IES0000001" not in answer  # encrypted on the wire
    event = client.receive(answer)
    assert isinstance(event, GetDone)
    client.get(SERIAL)
    with pytest.raises(SecurityError, match="does not grow"):
        client.receive(answer)  # the same answer again
    assert client.state == "associated"


def test_a_tampered_ciphered_answer_is_refused() -> None:
    settings = ClientSettings(
        client_sap=48,
        authentication="high-gmac",
        keys=CLIENT_KEYS,
        security_control=0x30,
    )
    client, server = associate(settings)
    answer = bytearray(server.handle(client.get(SERIAL)) or b"")
    answer[-1] ^= 0x01
    with pytest.raises(SecurityError, match="does not verify"):
        client.receive(bytes(answer))


def test_block_transfer_gives_the_same_value_as_one_answer() -> None:
    client, server = associate(ClientSettings(), max_pdu=96)
    blocks = 0
    request = client.get(BLOCK_LOAD)
    while True:
        answer = server.handle(request)
        assert answer is not None
        blocks += 1
        event = client.receive(answer)
        if not isinstance(event, SendNext):
            break
        request = event.request
    assert isinstance(event, GetDone) and blocks > 10
    (value,) = event.results
    assert isinstance(value, axdr.Data)
    direct_client, direct_server = associate(ClientSettings(), max_pdu=65535)
    assert get(direct_client, direct_server, BLOCK_LOAD).items[:3] == value.items[:3]
    assert len(event.responses) == blocks


def test_get_with_list_and_a_missing_object() -> None:
    client, server = associate(ClientSettings())
    missing = AttributeDescriptor(3, Obis(1, 0, 99, 99, 99), 2)
    event = run(client, server, client.get_with_list([(SERIAL, None), (missing, None)]))
    assert isinstance(event, GetDone)
    assert isinstance(event.results[0], axdr.Data)
    assert event.results[1] == ap.AccessFailure(4)


def test_set_the_clock_then_read_it_back() -> None:
    client, server = associate(
        ClientSettings(client_sap=32, authentication="low", password=b"ABCDEFGH")
    )
    before = (
        get(client, server, CLOCK).as_datetime().to_datetime(india_deviation_sign=True)
    )
    assert before is not None
    target = before + timedelta(hours=1)
    stamp = axdr.CosemDateTime.from_datetime(target, india_deviation_sign=True)
    event = run(client, server, client.set(CLOCK, axdr.date_time_string(stamp)))
    assert isinstance(event, SetDone) and event.result == 0
    after = (
        get(client, server, CLOCK).as_datetime().to_datetime(india_deviation_sign=True)
    )
    assert after is not None and abs((after - target).total_seconds()) < 5


def test_requests_out_of_state_are_our_bug_not_the_meters() -> None:
    client = ClientSession(ClientSettings())
    with pytest.raises(SessionStateError, match="idle"):
        client.get(SERIAL)
    client.associate()
    with pytest.raises(SessionStateError, match="associating"):
        client.associate()


def test_an_answer_to_another_request_is_refused() -> None:
    client, _server = associate(ClientSettings())
    client.get(SERIAL)
    stray = ap.GetResponseNormal(axdr.uint8(1), invoke=0xC9).to_bytes()
    with pytest.raises(ApduError, match="invoke-id 9"):
        client.receive(stray)
    assert client.state == "associated"  # usable again


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("0203 1100 1101", "shorter than announced"),
        ("0201 1100 1101", "longer than"),
    ],
)
def test_data_deeper_or_longer_than_announced_is_a_typed_error(
    payload: str, message: str
) -> None:
    client, _ = associate(ClientSettings())
    client.get(SERIAL)
    answer = bytes.fromhex("c401c100" + payload.replace(" ", ""))
    with pytest.raises((AxdrError, ApduError), match=message):
        client.receive(answer)
    assert client.state == "associated"


def test_a_request_before_association_gets_an_exception_response() -> None:
    server = server_for(16)
    answer = server.handle(ap.GetRequestNormal(SERIAL).to_bytes())
    assert answer is not None
    client = ClientSession(ClientSettings())
    client.state = "waiting"  # as if a request were outstanding
    with pytest.raises(ServiceError, match="service-not-allowed"):
        client.receive(answer)


def test_settings_refuse_missing_secrets_and_hide_them() -> None:
    with pytest.raises(SecurityError, match="password"):
        ClientSettings(authentication="low")
    with pytest.raises(SecurityError, match="block cipher key"):
        ClientSettings(authentication="high-gmac")
    text = repr(ClientSettings(authentication="low", password=b"SECRET99"))
    assert "SECRET99" not in text
