"""HDLC and TCP wrapper framing: bytes in, frames and events out, no I/O.

Captured frames come from ``tests/data/dlms`` (field cases FC-04, FC-05, FC-08); the
link tests pair a client and a server :class:`HdlcLink` in memory, passing bytes by
hand, so every split, echo and sequence error is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ies_drivers.dlms import hdlc
from ies_drivers.dlms.errors import AddressError, HdlcFrameError, WrapperFrameError
from ies_drivers.dlms.hdlc import HdlcAddress, HdlcLink, HdlcParameters
from ies_drivers.dlms.wrapper import WrapperLink, parse_header, wrap
from ies_drivers.errors import FrameError

DATA = Path(__file__).parent / "data" / "dlms"


def frames(name: str) -> list[bytes]:
    text = (DATA / name).read_text()
    return [
        bytes.fromhex(line)
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_fcs16_check_value() -> None:
    # CRC-16/X-25 check value of "123456789" (reveng catalogue).
    assert hdlc.fcs16(b"123456789") == 0x906E


# --- FC-04: a 0x7E inside the FCS ---------------------------------------------------


def test_fc04_both_frames_are_valid_with_the_published_checks() -> None:
    request, response = frames("FC-04.hex")
    sent = hdlc.decode_frame(request)
    got = hdlc.decode_frame(response)
    assert sent.fcs == 0x625A
    assert (got.hcs, got.fcs) == (0x51D5, 0x8C7E)
    assert sent.src == HdlcAddress(1)
    assert sent.dest == HdlcAddress(1, 3875, 4)
    assert got.dest == HdlcAddress(1) and got.src == HdlcAddress(1, 3875, 4)
    assert sent.kind is hdlc.FrameKind.I and got.kind is hdlc.FrameKind.I
    assert int.from_bytes(response[1:3], "big") & 0x7FF == 0x1B


def test_fc04_response_split_at_every_byte_gives_one_whole_frame() -> None:
    _, response = frames("FC-04.hex")
    for cut in range(len(response) + 1):
        reader = hdlc.FrameReader()
        reader.feed(response[:cut])
        early = reader.next_frame()
        if cut < len(response):
            assert early is None, f"a frame ended early at byte {cut}"
            reader.feed(response[cut:])
            found = reader.next_frame()
        else:
            found = early
        assert found is not None
        assert found[0].info == bytes.fromhex("e6e700c401c10009060100202000ff")


def test_fc04_byte_by_byte_and_with_noise_and_shared_flags() -> None:
    request, response = frames("FC-04.hex")
    reader = hdlc.FrameReader()
    stream = b"\x00\xff" + request + response[1:] + b"\x7e" + request
    found = []
    for byte in stream:
        reader.feed(bytes((byte,)))
        item = reader.next_frame()
        while item is not None:
            found.append(item[0])
            item = reader.next_frame()
    assert [f.fcs for f in found] == [0x625A, 0x8C7E, 0x625A]
    assert reader.skipped == 2


def test_a_broken_fcs_is_an_error_and_the_next_frame_still_reads() -> None:
    request, response = frames("FC-04.hex")
    broken = bytearray(response)
    broken[-3] ^= 0x01
    reader = hdlc.FrameReader()
    reader.feed(bytes(broken) + request)
    with pytest.raises(HdlcFrameError, match="FCS check failed") as caught:
        reader.next_frame()
    assert isinstance(caught.value, FrameError)
    found = reader.next_frame()
    assert found is not None and found[0].fcs == 0x625A


def test_a_broken_hcs_is_reported_as_such() -> None:
    request, _ = frames("FC-04.hex")
    broken = bytearray(request)
    broken[9] ^= 0xFF  # HCS low byte
    # Recompute the FCS so only the HCS is wrong.
    body = bytes(broken[1:-3])
    broken[-3:-1] = hdlc.fcs16(body).to_bytes(2, "little")
    with pytest.raises(HdlcFrameError, match="HCS check failed"):
        hdlc.decode_frame(bytes(broken))


def test_a_length_field_that_lies_is_an_error() -> None:
    request, _ = frames("FC-04.hex")
    reader = hdlc.FrameReader()
    lying = request[:2] + bytes((request[2] - 4,)) + request[3:]
    reader.feed(lying)
    with pytest.raises(HdlcFrameError, match="closing flag"):
        reader.next_frame()


# --- FC-05 / FC-08: segmented and single-frame pushes -------------------------------


def test_fc05_three_segments_reassemble_and_one_alone_fails_cleanly() -> None:
    parts = frames("FC-05.hex")
    decoded = [hdlc.decode_frame(p) for p in parts]
    assert [d.segmented for d in decoded] == [True, True, False]
    assert all(d.kind is hdlc.FrameKind.UI for d in decoded)
    apdu = hdlc.reassemble(parts)
    assert apdu[0] == 0x0F and len(apdu) == sum(len(d.info) for d in decoded) - 3
    with pytest.raises(HdlcFrameError, match="incomplete"):
        hdlc.reassemble(parts[:1])
    with pytest.raises(HdlcFrameError, match="incomplete"):
        hdlc.reassemble(parts[:2])
    with pytest.raises(HdlcFrameError, match="LLC"):
        hdlc.reassemble(parts[2:])


def test_fc08_single_frame_is_valid() -> None:
    (frame,) = frames("FC-08.hex")
    decoded = hdlc.decode_frame(frame)
    assert not decoded.segmented and decoded.fcs == 0xF40E
    assert hdlc.reassemble([frame])[:5] == bytes.fromhex("0f00000000")


# --- addresses and parameters -------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        HdlcAddress(16),
        HdlcAddress(1, 17, 2),
        HdlcAddress(1, 3875, 4),
        HdlcAddress(0x3FFF, 0x3FFF, 4),
    ],
)
def test_addresses_round_trip(address: HdlcAddress) -> None:
    raw = address.to_bytes()
    assert len(raw) == address.size
    assert hdlc.decode_address(raw, 0) == (address, address.size)


def test_an_address_of_three_bytes_is_refused() -> None:
    with pytest.raises(HdlcFrameError, match="address"):
        hdlc.decode_address(b"\x02\x02\x03", 0)


def test_parameters_round_trip_and_default_when_absent() -> None:
    params = HdlcParameters(512, 256, 1, 1)
    assert HdlcParameters.from_info(params.to_info()) == params
    assert HdlcParameters.from_info(b"") == HdlcParameters()
    with pytest.raises(HdlcFrameError, match="parameter group"):
        HdlcParameters.from_info(b"\x01\x02\x03")


# --- a client and a server link in memory -------------------------------------------

CLIENT = HdlcAddress(16)
SERVER = HdlcAddress(1, 17, 4)


def pair(client_info: int = 128, server_info: int = 128) -> tuple[HdlcLink, HdlcLink]:
    client = HdlcLink(CLIENT, SERVER, params=HdlcParameters(client_info, client_info))
    server = HdlcLink(
        SERVER,
        HdlcAddress(0),
        role="server",
        params=HdlcParameters(server_info, server_info),
    )
    return client, server


def pump(a: HdlcLink, b: HdlcLink) -> list[hdlc.HdlcEvent]:
    """Move bytes both ways until both sides are quiet; return b's events."""
    events: list[hdlc.HdlcEvent] = []
    for _ in range(200):
        moved = False
        out = a.data_to_send()
        if out:
            b.receive_data(out)
            moved = True
        while (event := b.next_event()) is not hdlc.NEED_DATA:
            events.append(event)
        back = b.data_to_send()
        if back:
            a.receive_data(back)
            moved = True
        while (event := a.next_event()) is not hdlc.NEED_DATA:
            events.append(event)
        if not moved:
            return events
    raise AssertionError("links never went quiet")


def test_snrm_ua_negotiates_the_smaller_sizes() -> None:
    client, server = pair(client_info=512, server_info=64)
    client.connect()
    events = pump(client, server)
    connected = [e for e in events if isinstance(e, hdlc.Connected)]
    assert len(connected) == 2
    assert client.state == server.state == "connected"
    assert client.max_info_tx == 64 and server.max_info_tx == 64


def test_segmented_apdus_both_ways_with_rr_and_numbering() -> None:
    client, server = pair(client_info=32, server_info=32)
    client.connect()
    pump(client, server)
    request = bytes(range(100))
    client.send(request)
    events = pump(client, server)
    received = [e for e in events if isinstance(e, hdlc.ApduReceived)]
    assert [(e.apdu, e.frames) for e in received] == [(request, 4)]
    answer = bytes(range(200, 256)) * 3
    server.send(answer)
    events = pump(server, client)
    got = [e for e in events if isinstance(e, hdlc.ApduReceived)]
    assert got[0].apdu == answer and got[0].frames == 6
    client.send(b"\xc0\x01")  # numbering carries on across APDUs
    assert any(isinstance(e, hdlc.ApduReceived) for e in pump(client, server))


def test_the_rs485_echo_of_our_own_frames_is_ignored() -> None:
    client, server = pair()
    client.connect()
    snrm = client.data_to_send()
    client.receive_data(snrm)  # the line repeats what we sent
    assert client.next_event() is hdlc.NEED_DATA
    server.receive_data(snrm)
    assert isinstance(server.next_event(), hdlc.Connected)
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), hdlc.Connected)
    assert client.echoes == 1


def test_a_frame_from_another_server_is_an_address_error() -> None:
    client, _server = pair()
    client.connect()
    client.data_to_send()
    stranger = hdlc.encode_frame(
        CLIENT, HdlcAddress(1, 99, 4), hdlc.UA | hdlc.POLL_FINAL
    )
    client.receive_data(stranger)
    with pytest.raises(AddressError, match="1/99"):
        client.next_event()


def test_a_server_ignores_frames_for_another_meter() -> None:
    _, server = pair()
    other = hdlc.encode_frame(HdlcAddress(1, 5, 4), CLIENT, hdlc.SNRM | hdlc.POLL_FINAL)
    server.receive_data(other)
    assert server.next_event() is hdlc.NEED_DATA and not server.data_to_send()


def test_a_frame_out_of_sequence_is_an_error() -> None:
    client, server = pair()
    client.connect()
    pump(client, server)
    wrong = hdlc.encode_frame(
        CLIENT, SERVER, hdlc.i_control(3, 0), hdlc.LLC_RESPONSE + b"\xc4"
    )
    client.receive_data(wrong)
    with pytest.raises(HdlcFrameError, match="out of sequence"):
        client.next_event()


def test_dm_to_snrm_says_the_meter_refuses_the_link() -> None:
    client, _ = pair()
    client.connect()
    client.data_to_send()
    client.receive_data(hdlc.encode_frame(CLIENT, SERVER, hdlc.DM | hdlc.POLL_FINAL))
    with pytest.raises(HdlcFrameError, match="DM"):
        client.next_event()


def test_disc_brings_both_ends_down() -> None:
    client, server = pair()
    client.connect()
    pump(client, server)
    client.disconnect()
    events = pump(client, server)
    assert sum(isinstance(e, hdlc.Disconnected) for e in events) == 2
    assert client.state == server.state == "disconnected"


# --- IEC 62056-21 mode E ------------------------------------------------------------


def test_mode_e_identification_and_acknowledgement() -> None:
    ident = hdlc.parse_identification(b"/ISK5\\2MT382-1000\r\n")
    assert (ident.manufacturer, ident.baudrate, ident.mode_e) == ("ISK", 9600, True)
    assert ident.ident == "MT382-1000"
    assert hdlc.mode_e_ack(ident.baud_char) == b"\x06252\r\n"
    assert hdlc.iec_request() == b"/?!\r\n"
    plain = hdlc.parse_identification(b"/LGZ4ZMD3104407.B32\r\n")
    assert not plain.mode_e and plain.baudrate == 4800
    with pytest.raises(HdlcFrameError, match="identification"):
        hdlc.parse_identification(b"garbage\r\n")


# --- the TCP wrapper ----------------------------------------------------------------


def test_wrapper_frames_split_anywhere() -> None:
    stream = wrap(1, 16, b"\xc4\x01\xc1\x00\x11\x05") + wrap(1, 16, b"\x63\x00")
    link = WrapperLink(16, 1)
    got = []
    for byte in stream:
        link.receive_data(bytes((byte,)))
        while (event := link.next_event()) is not hdlc.NEED_DATA:
            assert isinstance(event, hdlc.ApduReceived)
            got.append(event.apdu)
    assert got == [b"\xc4\x01\xc1\x00\x11\x05", b"\x63\x00"]
    assert parse_header(stream) == (1, 16, 6)


def test_wrapper_refuses_another_version_and_other_ports() -> None:
    link = WrapperLink(16, 1)
    link.receive_data(b"\x00\x02\x00\x01\x00\x10\x00\x01\x00")
    with pytest.raises(WrapperFrameError, match="version 2"):
        link.next_event()
    link = WrapperLink(16, 1)
    link.receive_data(wrap(1, 32, b"\x00"))
    with pytest.raises(WrapperFrameError, match="wPort 1 to 32"):
        link.next_event()
