"""Fuzzing the DLMS decoders: whatever arrives, only our typed errors come out.

Hypothesis feeds random bytes, random splits and mutated captures to the HDLC frame
reader and link, the A-XDR and APDU decoders, the client session and the capture
printer. Each must return a value or raise a :class:`DlmsError`; any other exception
(IndexError, ValueError, RecursionError, ...) is a bug. Valid values must survive an
encode/decode round trip unchanged.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import axdr, hdlc
from ies_drivers.dlms.axdr import Data, DataType
from ies_drivers.dlms.client import ClientSession, ClientSettings
from ies_drivers.dlms.decode import describe_apdu, describe_hdlc
from ies_drivers.dlms.errors import DlmsError

DATA = Path(__file__).parent / "data" / "dlms"
FUZZ = settings(
    max_examples=int(os.environ.get("DLMS_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def captured() -> list[bytes]:
    out = []
    for name in ("FC-04.hex", "FC-05.hex", "FC-08.hex"):
        text = (DATA / name).read_text()
        out += [
            bytes.fromhex(x) for x in text.splitlines() if x.strip() and x[0] != "#"
        ]
    return out


CAPTURES = captured()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A captured frame with a few bytes changed, cut or inserted."""
    frame = bytearray(draw(st.sampled_from(CAPTURES)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(frame) - 1, 0)))
        if action == "flip" and frame:
            frame[pos] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=4))
    return bytes(frame)


frames_or_noise = st.one_of(st.binary(max_size=600), mutated())


def only_our_errors(action: object) -> None:
    with contextlib.suppress(DlmsError):
        action()  # type: ignore[operator]


@FUZZ
@given(frames_or_noise, st.lists(st.integers(1, 64), max_size=20))
def test_frame_reader_in_any_split(data: bytes, cuts: list[int]) -> None:
    reader = hdlc.FrameReader()
    pos = 0
    for size in [*cuts, len(data)]:
        reader.feed(data[pos : pos + size])
        pos += size
        for _ in range(len(data) + 2):
            try:
                if reader.next_frame() is None:
                    break
            except DlmsError:
                continue


@FUZZ
@given(frames_or_noise)
def test_decode_frame_and_reassemble(data: bytes) -> None:
    only_our_errors(lambda: hdlc.decode_frame(data))
    only_our_errors(lambda: hdlc.reassemble([data]))
    only_our_errors(lambda: describe_hdlc(data))


@FUZZ
@given(frames_or_noise)
def test_client_and_server_links(data: bytes) -> None:
    client = hdlc.HdlcLink(hdlc.HdlcAddress(16), hdlc.HdlcAddress(1, 17, 4))
    client.connect()
    server = hdlc.HdlcLink(
        hdlc.HdlcAddress(1, 17, 4), hdlc.HdlcAddress(0), role="server"
    )
    for link in (client, server):
        link.receive_data(data)
        for _ in range(50):
            try:
                if link.next_event() is hdlc.NEED_DATA:
                    break
            except DlmsError:
                continue


@FUZZ
@given(st.binary(max_size=400))
def test_axdr_and_apdu_decoders(data: bytes) -> None:
    only_our_errors(lambda: axdr.decode(data))
    only_our_errors(lambda: ap.decode_apdu(data))
    only_our_errors(lambda: describe_apdu(data))


@FUZZ
@given(st.binary(max_size=300))
def test_client_session_receives_anything(data: bytes) -> None:
    session = ClientSession(ClientSettings())
    session.associate()
    only_our_errors(lambda: session.receive(data))
    session.state = "waiting"
    session._pending = "get"
    only_our_errors(lambda: session.receive(bytes([0xC4, 0x01, 0xC1]) + data))


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_mutated_valid_data_decodes_or_fails_cleanly(
    seed: bytes, pos: int, value: int
) -> None:
    encoded = bytearray(
        axdr.encode(axdr.array([axdr.octet_string(seed), axdr.uint16(7)]))
    )
    encoded[pos % len(encoded)] = value
    only_our_errors(lambda: axdr.decode(bytes(encoded)))


# --- round trips --------------------------------------------------------------------

scalars = st.one_of(
    st.just(axdr.null()),
    st.booleans().map(axdr.boolean),
    st.integers(-128, 127).map(axdr.int8),
    st.integers(0, 255).map(axdr.uint8),
    st.integers(-(2**15), 2**15 - 1).map(axdr.int16),
    st.integers(0, 2**16 - 1).map(axdr.uint16),
    st.integers(-(2**31), 2**31 - 1).map(axdr.int32),
    st.integers(0, 2**32 - 1).map(axdr.uint32),
    st.integers(-(2**63), 2**63 - 1).map(axdr.int64),
    st.integers(0, 2**64 - 1).map(axdr.uint64),
    st.integers(0, 255).map(axdr.enum),
    st.binary(max_size=300).map(axdr.octet_string),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        axdr.visible_string
    ),
    st.text(max_size=20).map(lambda t: Data(DataType.UTF8_STRING, t)),
    st.floats(allow_nan=False, width=64).map(axdr.float64),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(axdr.structure),
        st.lists(inner, max_size=6).map(axdr.array),
    ),
    max_leaves=30,
)


@FUZZ
@given(values)
def test_every_value_round_trips(value: Data) -> None:
    encoded = axdr.encode(value)
    assert axdr.decode(encoded) == value
    assert axdr.encode(axdr.decode(encoded)) == encoded


@FUZZ
@given(st.binary(min_size=0, max_size=300), st.integers(1, 64))
def test_segmented_info_round_trips_through_two_links(apdu: bytes, size: int) -> None:
    params = hdlc.HdlcParameters(max(size, 16), max(size, 16))
    client = hdlc.HdlcLink(
        hdlc.HdlcAddress(16), hdlc.HdlcAddress(1, 17, 4), params=params
    )
    server = hdlc.HdlcLink(
        hdlc.HdlcAddress(1, 17, 4), hdlc.HdlcAddress(0), role="server", params=params
    )
    client.connect()
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), hdlc.Connected)
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), hdlc.Connected)
    client.send(apdu)
    got = None
    for _ in range(400):
        server.receive_data(client.data_to_send())
        event = server.next_event()
        if isinstance(event, hdlc.ApduReceived):
            got = event.apdu
            break
        client.receive_data(server.data_to_send())
        assert client.next_event() is hdlc.NEED_DATA
    assert got == apdu
