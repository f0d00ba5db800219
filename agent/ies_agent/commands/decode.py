"""``ies-agent decode --protocol PROTOCOL HEX``: read a captured frame by eye.

``modbus-rtu`` prints the unit id, the function and the registers in hex, so a
technician can check a frame captured with a serial sniffer. ``dlms-hdlc`` prints
each HDLC frame (addresses, control, HCS/FCS) and the APDU they carry; ``dlms-apdu``
prints one APDU (from a TCP wrapper capture, say): its type and the data tree with
OBIS codes written ``A-B:C.D.E``. Exit status 1 when the frame is broken (bad CRC,
HCS or FCS, short, not hex, an APDU cut off), 0 otherwise.
"""

from __future__ import annotations

import argparse

PROTOCOLS = ("modbus-rtu", "dlms-hdlc", "dlms-apdu")


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
    """Decode and print the frame; return 1 if it is broken."""
    from ies_drivers.errors import DriverError
    from ies_drivers.modbus.rtu import decode_rtu_frame, parse_hex

    if args.protocol in ("dlms-hdlc", "dlms-apdu"):
        return _decode_dlms(args.protocol, args.hex)
    try:
        frame = decode_rtu_frame(parse_hex(args.hex))
    except DriverError as exc:
        print(f"invalid frame: {exc}")
        return 1
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
    return 0


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
