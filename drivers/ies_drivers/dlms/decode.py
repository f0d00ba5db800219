"""Captured DLMS frames and APDUs as text a technician can read.

``ies-agent decode --protocol dlms-hdlc HEX`` prints every HDLC frame in ``HEX``
(addresses, control, checks), reassembles the APDU they carry and prints it;
``--protocol dlms-apdu HEX`` prints one APDU. Data trees are indented; a 6-byte
octet-string is shown as the OBIS code it usually is (``1-0:32.7.0``), a 12-byte
one as the date-time it usually is, under both deviation conventions.

Raises the package's typed errors: :class:`HdlcFrameError` for a frame whose HCS or
FCS fails or an APDU whose segments are incomplete, :class:`ApduError` and
:class:`AxdrError` for APDUs that do not decode.
"""

from __future__ import annotations

from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import axdr, hdlc
from ies_drivers.dlms.axdr import CosemDateTime, Data, DataType
from ies_drivers.dlms.errors import DlmsError, HdlcFrameError
from ies_drivers.dlms.obis import Obis

_KIND_TEXT = {
    hdlc.FrameKind.I: "I-frame (information)",
    hdlc.FrameKind.RR: "RR (receive ready)",
    hdlc.FrameKind.RNR: "RNR (receive not ready)",
    hdlc.FrameKind.SNRM: "SNRM (connect)",
    hdlc.FrameKind.DISC: "DISC (disconnect)",
    hdlc.FrameKind.UA: "UA (acknowledge)",
    hdlc.FrameKind.DM: "DM (disconnected mode)",
    hdlc.FrameKind.FRMR: "FRMR (frame reject)",
    hdlc.FrameKind.UI: "UI (unnumbered information)",
}


def _address(address: hdlc.HdlcAddress) -> str:
    if address.lower is None:
        return f"{address.upper} (1 byte)"
    return (
        f"{address} (logical {address.upper}, physical {address.lower}, "
        f"{address.size} bytes)"
    )


def describe_hdlc(data: bytes) -> list[str]:
    """Describe the HDLC frames in ``data`` and the APDU they carry.

    Raises :class:`HdlcFrameError` for a frame that fails its checks (the message
    says which) or a segmented APDU whose last segment is missing.
    """
    reader = hdlc.FrameReader()
    reader.feed(data)
    lines: list[str] = []
    raws: list[bytes] = []
    while True:
        found = reader.next_frame()
        if found is None:
            break
        frame, raw = found
        raws.append(raw)
        lines += _frame_lines(len(raws), frame, raw)
    if not raws:
        raise HdlcFrameError(
            f"no complete HDLC frame in {len(data)} bytes (a frame starts and ends "
            "with 7E)"
        )
    if reader.pending > 1:
        raise HdlcFrameError(f"{reader.pending} bytes after the last frame are cut off")
    carrying = [r for r in raws if hdlc.decode_frame(r).info]
    info_frames = [
        r
        for r in carrying
        if hdlc.decode_frame(r).kind in (hdlc.FrameKind.I, hdlc.FrameKind.UI)
    ]
    if info_frames:
        apdu = hdlc.reassemble(info_frames)
        count = len(info_frames)
        lines.append(f"APDU ({len(apdu)} bytes from {count} frame{'s' * (count > 1)}):")
        lines += ["  " + line for line in describe_apdu(apdu)]
    return lines


def _frame_lines(number: int, frame: hdlc.HdlcFrame, raw: bytes) -> list[str]:
    kind = frame.kind
    control = f"0x{frame.control:02X} {_KIND_TEXT.get(kind, 'unknown')}"
    if kind is hdlc.FrameKind.I:
        control += f" N(S)={frame.send_seq} N(R)={frame.recv_seq}"
    elif kind in (hdlc.FrameKind.RR, hdlc.FrameKind.RNR):
        control += f" N(R)={frame.recv_seq}"
    control += f" P/F={int(frame.poll_final)}"
    segment = "segmented, more follow" if frame.segmented else "last or only segment"
    lines = [
        f"frame {number}: {len(raw)} bytes, length field {len(raw) - 2}, {segment}",
        f"  to:      {_address(frame.dest)}",
        f"  from:    {_address(frame.src)}",
        f"  control: {control}",
    ]
    if frame.hcs is not None:
        lines.append(f"  HCS:     0x{frame.hcs:04X} (valid)")
    lines.append(f"  FCS:     0x{frame.fcs:04X} (valid)")
    if kind in (hdlc.FrameKind.SNRM, hdlc.FrameKind.UA) and frame.info:
        params = hdlc.HdlcParameters.from_info(frame.info)
        lines.append(
            f"  params:  max info tx {params.max_info_tx}, rx {params.max_info_rx}, "
            f"window tx {params.window_tx}, rx {params.window_rx}"
        )
    elif frame.info:
        lines.append(f"  info:    {len(frame.info)} bytes")
    return lines


def describe_apdu(data: bytes) -> list[str]:
    """Describe one APDU: its type, fields and data tree.

    Raises :class:`ApduError` or :class:`AxdrError` when it does not decode.
    """
    message = ap.decode_apdu(data)
    name = ap.describe_tag(data[0])
    lines = [f"type:    {name}"]
    if isinstance(message, ap.GetRequestNormal):
        lines += [
            f"invoke:  {_invoke(message.invoke)}",
            f"object:  {_descriptor(message.descriptor)}",
        ]
        if message.access is not None:
            lines.append(f"access:  selector {message.access.selector}")
            lines += _tree(message.access.parameters, "  ")
    elif isinstance(message, ap.GetRequestNext):
        lines += [
            f"invoke:  {_invoke(message.invoke)}",
            f"next after block {message.block_number}",
        ]
    elif isinstance(message, ap.GetRequestWithList):
        lines.append(f"invoke:  {_invoke(message.invoke)}")
        for descriptor, _ in message.items:
            lines.append(f"object:  {_descriptor(descriptor)}")
    elif isinstance(message, ap.GetResponseNormal):
        lines.append(f"invoke:  {_invoke(message.invoke)}")
        lines += _result(message.result)
    elif isinstance(message, ap.GetResponseBlock):
        lines.append(
            f"invoke:  {_invoke(message.invoke)}, block {message.block_number}"
            f"{' (last)' if message.last else ''}, {len(message.raw)} bytes of raw data"
        )
    elif isinstance(message, ap.GetResponseWithList):
        lines.append(f"invoke:  {_invoke(message.invoke)}")
        for index, result in enumerate(message.results):
            lines.append(f"[{index}]")
            lines += ["  " + line for line in _result(result)]
    elif isinstance(message, ap.SetRequestNormal):
        lines += [
            f"invoke:  {_invoke(message.invoke)}",
            f"object:  {_descriptor(message.descriptor)}",
            "value:",
            *_tree(message.value, "  "),
        ]
    elif isinstance(message, ap.SetResponseNormal | ap.ActionResponseNormal):
        lines.append(f"invoke:  {_invoke(message.invoke)}")
        lines.append(f"result:  {_access_result(message.result)}")
        if isinstance(message, ap.ActionResponseNormal) and message.return_value:
            lines += _result(message.return_value)
    elif isinstance(message, ap.ActionRequestNormal):
        method = message.method
        lines += [
            f"invoke:  {_invoke(message.invoke)}",
            f"method:  class {method.class_id}, {method.instance}, "
            f"method {method.method}",
        ]
        if message.parameters is not None:
            lines += ["parameters:", *_tree(message.parameters, "  ")]
    elif isinstance(message, ap.DataNotification):
        lines.append(f"invoke:  long invoke-id {message.long_invoke & 0xFFFFFF}")
        if message.date_time:
            lines.append(f"time:    {_date_time_text(message.date_time)}")
        lines += ["body:", *_tree(message.body, "  ")]
    elif isinstance(message, ap.Aarq | ap.Aare):
        lines += _association(message)
    elif isinstance(message, ap.ExceptionResponse | ap.ConfirmedServiceError):
        lines.append(f"error:   {message.describe()}")
    elif isinstance(message, ap.CipheredApdu):
        lines += [
            f"security control 0x{message.security_control:02X}, invocation counter "
            f"{message.invocation_counter}, {len(message.payload)} ciphered bytes",
            "(decrypting needs the meter's keys; not done here)",
        ]
    elif isinstance(message, ap.ReleaseRequest | ap.ReleaseResponse):
        lines.append(f"reason:  {message.reason}")
    return lines


def _association(message: ap.Aarq | ap.Aare) -> list[str]:
    context = {1: "logical names", 3: "logical names with ciphering"}.get(
        message.context, str(message.context)
    )
    mechanism = {None: "none", 1: "low level (password)", 5: "high level (GMAC)"}.get(
        message.mechanism, str(message.mechanism)
    )
    lines = [f"context: {context}", f"authentication: {mechanism}"]
    if isinstance(message, ap.Aare):
        outcome = {0: "accepted", 1: "rejected (permanent)", 2: "rejected (transient)"}
        lines.append(
            f"result:  {outcome.get(message.result, message.result)}, diagnostic "
            f"{message.diagnostic} ({message.diagnostic_source})"
        )
        if message.responding_ap_title:
            lines.append(f"server system title: {message.responding_ap_title.hex()}")
    elif message.calling_ap_title:
        lines.append(f"client system title: {message.calling_ap_title.hex()}")
    info = message.user_information
    if info and info[0] == ap.Tag.INITIATE_REQUEST:
        request = ap.InitiateRequest.from_bytes(info)
        lines.append(
            f"xDLMS:   version {request.dlms_version}, conformance "
            f"0x{request.conformance:06X}, max PDU {request.max_receive_pdu}"
        )
    elif info and info[0] == ap.Tag.INITIATE_RESPONSE:
        response = ap.InitiateResponse.from_bytes(info)
        lines.append(
            f"xDLMS:   version {response.dlms_version}, conformance "
            f"0x{response.conformance:06X}, max PDU {response.max_receive_pdu}"
        )
    elif info:
        lines.append(f"xDLMS:   {ap.describe_tag(info[0])}")
    return lines


def _invoke(value: int) -> str:
    return f"{value & 0x0F} (0x{value:02X})"


def _descriptor(descriptor: ap.AttributeDescriptor) -> str:
    return (
        f"class {descriptor.class_id}, {descriptor.instance}, "
        f"attribute {descriptor.attribute}"
    )


def _access_result(code: int) -> str:
    if code == 0:
        return "success (0)"
    from ies_drivers.dlms.errors import DataAccessError

    return f"{DataAccessError.NAMES.get(code, 'error')} ({code})"


def _result(result: ap.GetResult) -> list[str]:
    if isinstance(result, ap.AccessFailure):
        return [f"result:  {_access_result(result.code)}"]
    return ["result:", *_tree(result, "  ")]


def _date_time_text(raw: bytes) -> str:
    try:
        stamp = CosemDateTime.from_bytes(raw)
    except DlmsError as exc:
        return f"not a valid date-time ({exc})"
    if stamp.unspecified:
        return "not specified (no timestamp)"
    d, t = stamp.date, stamp.time
    local = (
        f"{d.year:04d}-{d.month:02d}-{d.day:02d} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    )
    if stamp.deviation is None:
        return f"{local}, deviation not specified (0x8000)"
    dev = stamp.deviation
    return (
        f"{local}, deviation {dev:+d} min (IS 15959: UTC{_offset(dev)}; "
        f"Blue Book: UTC{_offset(-dev)})"
    )


def _offset(minutes: int) -> str:
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


def _tree(value: Data, indent: str) -> list[str]:
    tag = value.tag
    raw = value.value
    if tag in (DataType.ARRAY, DataType.STRUCTURE, DataType.COMPACT_ARRAY):
        items = value.items
        lines = [f"{indent}{tag.name.lower().replace('_', '-')} of {len(items)}"]
        for item in items:
            lines += _tree(item, indent + "  ")
        return lines
    name = tag.name.lower().replace("_", "-")
    if isinstance(raw, bytes):
        text = f"{indent}{name}[{len(raw)}] {raw.hex(' ')}"
        if len(raw) == 6:
            text += f"  = OBIS {Obis.from_bytes(raw)}"
        elif len(raw) == 12:
            text += f"  = {_date_time_text(raw)}"
        elif raw and all(32 <= b < 127 for b in raw):
            text += f'  = "{raw.decode("ascii")}"'
        return [text]
    if isinstance(raw, CosemDateTime):
        return [f"{indent}{name} {_date_time_text(raw.to_bytes())}"]
    if isinstance(raw, str):
        return [f'{indent}{name} "{raw}"']
    if axdr.is_number(value):
        return [f"{indent}{name} {axdr.numeric_text(value)}"]
    if raw is None:
        return [f"{indent}{name}"]
    return [f"{indent}{name} {raw}"]
