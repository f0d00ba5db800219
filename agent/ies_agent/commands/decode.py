"""``ies-agent decode --protocol PROTOCOL HEX``: read a captured frame by eye.

``modbus-rtu`` (and ``modbus-tcp``, with its MBAP header) prints the unit id, the
function and the registers in hex — and register pairs as float32 in both word
orders — so a technician can check a frame captured with a sniffer or Wireshark.
``dlms-hdlc`` prints
each HDLC frame (addresses, control, HCS/FCS) and the APDU they carry; ``dlms-apdu``
prints one APDU (from a TCP wrapper capture, say): its type and the data tree with
OBIS codes written ``A-B:C.D.E``. Exit status 1 when the frame is broken (bad CRC,
HCS or FCS, short, an APDU cut off), 2 when the argument is not hex, 0 otherwise.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ies_drivers.modbus.rtu import RtuFrame

PROTOCOLS = ("modbus-rtu", "modbus-tcp", "dlms-hdlc", "dlms-apdu")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``decode`` arguments."""
    parser.add_argument(
        "--protocol", required=True, choices=PROTOCOLS, help="how the frame is framed"
    )
    parser.add_argument(
        "hex",
        metavar="HEX",
        help="the frame as hex, one argument; spaces or colons between bytes allowed",
    )


def main(args: argparse.Namespace) -> int:
    """Decode and print the frame; 1 if it is broken, 2 if it is not hex at all."""
    from ies_drivers.errors import DriverError, FrameError
    from ies_drivers.modbus.rtu import decode_rtu_frame, parse_hex

    if args.protocol in ("dlms-hdlc", "dlms-apdu"):
        return _decode_dlms(args.protocol, args.hex)
    try:
        data = parse_hex(args.hex)
    except FrameError as exc:
        print(f"ies-agent decode: {exc}")
        return 2
    frame: RtuFrame
    try:
        if args.protocol == "modbus-tcp":
            frame = _decode_mbap(data)
        else:
            frame = decode_rtu_frame(data)
    except DriverError as exc:
        print(f"invalid frame: {exc}")
        if args.protocol == "modbus-rtu" and _looks_like_mbap(data):
            print("hint: this looks like a Modbus TCP frame; try --protocol modbus-tcp")
        return 1
    _print_modbus(frame)
    return 0


def _looks_like_mbap(data: bytes) -> bool:
    """Tell whether ``data`` has the shape of a Modbus TCP (MBAP) frame."""
    return (
        len(data) >= 8
        and data[2:4] == b"\x00\x00"
        and int.from_bytes(data[4:6], "big") == len(data) - 6
    )


def _decode_mbap(data: bytes) -> RtuFrame:
    """Decode a Modbus TCP frame: MBAP header (transaction, protocol, length, unit)."""
    import dataclasses

    from ies_drivers.errors import FrameError
    from ies_drivers.modbus.rtu import decode_pdu

    if len(data) < 8:
        raise FrameError(
            f"a Modbus TCP frame has at least 8 bytes, this has {len(data)}"
        )
    if data[2:4] != b"\x00\x00":
        raise FrameError(
            f"protocol id 0x{data[2:4].hex()} is not 0x0000: not a Modbus TCP frame"
        )
    length = int.from_bytes(data[4:6], "big")
    if length != len(data) - 6:
        raise FrameError(
            f"MBAP length says {length} bytes follow, but {len(data) - 6} do: the "
            "frame is cut off or two frames are run together"
        )
    frame = decode_pdu(data[6], data[7:])
    return dataclasses.replace(frame, transaction_id=int.from_bytes(data[0:2], "big"))


def _print_modbus(frame: RtuFrame) -> None:
    """Print a decoded Modbus frame for a technician."""
    function_names = {
        1: "read coils",
        2: "read discrete inputs",
        3: "read holding registers",
        4: "read input registers",
        5: "write single coil",
        6: "write single register",
        15: "write multiple coils",
        16: "write multiple registers",
    }
    name = function_names.get(frame.function, "other")
    if frame.transaction_id is not None:
        print(f"transaction: {frame.transaction_id}")
    print(f"unit:      {frame.unit}")
    print(f"function:  {frame.function} ({name})")
    print(f"kind:      {frame.kind}")
    if frame.crc is not None:
        print(f"crc:       0x{frame.crc:04X} (valid)")
    if frame.exception_code is not None:
        from ies_drivers.errors import ExceptionResponse

        text = ExceptionResponse.NAMES.get(frame.exception_code, "unknown")
        print(f"exception: {frame.exception_code} ({text})")
    if frame.address is not None:
        print(f"address:   {frame.address} (0x{frame.address:04X})")
    if frame.count is not None:
        print(f"count:     {frame.count}")
    if frame.registers:
        print("registers:")
        for i, value in enumerate(frame.registers):
            where = f"+{i}" if frame.address is None else str(frame.address + i)
            print(f"  [{where}] 0x{value:04X}  ({value})")
        _print_floats(frame.registers)


def _print_floats(registers: tuple[int, ...]) -> None:
    """Show register pairs as float32 in both word orders (wrong order shows up)."""
    from ies_drivers.errors import DecodeError
    from ies_drivers.modbus.codec import decode_point
    from ies_drivers.modbus.model import PointSpec, PointType

    if not 2 <= len(registers) <= 16 or len(registers) % 2:
        return  # a long block is a register map, not one value
    print("as float32 (pairs):")
    for i in range(0, len(registers), 2):
        shown = []
        for order in ("ABCD", "CDAB"):
            spec = PointSpec("pair", 0, PointType.F32, order=order)
            try:
                value = decode_point(spec, registers[i : i + 2]).value
            except DecodeError as exc:
                value = "denormal (wrong order?)" if "denormal" in str(exc) else "NaN"
            shown.append(f"{order}={value}")
        print(f"  [+{i}] " + "  ".join(shown))


def _decode_dlms(protocol: str, text: str) -> int:
    """Print a DLMS capture; return 1 if it is broken."""
    from ies_drivers.dlms.decode import describe_apdu, describe_hdlc
    from ies_drivers.errors import DriverError
    from ies_drivers.modbus.rtu import parse_hex

    try:
        data = parse_hex(text)
        lines = describe_hdlc(data) if protocol == "dlms-hdlc" else describe_apdu(data)
    except DriverError as exc:
        print(f"invalid frame: {exc}")
        return 1
    for line in lines:
        print(line)
    return 0
