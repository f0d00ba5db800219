"""OCMF (Open Charge Metering Format) records: export of readings, and verification.

Export. Each cumulative reading of the evidence log with a value becomes one OCMF record
in fiscal context ``F`` (``PG`` = ``F<n>``, ``n`` counting exported readings from 1 in
log order, so re-exporting gives the same numbers), format version 1.0, signed by the
gateway's ECDSA P-256 log key (RFC 6979, low S, DER, upper-case hex) -- the layout of
``shared/vectors/evidence_example/ocmf_export_and_meta.json``::

    OCMF|{"FV":"1.0","GI":<agent>,"GS":<gateway id>,"GV":<agent version>,"PG":"F2",
          "MV","MM","MS","MF" (meter from the source event),
          "RD":[{"TM":"2025-05-01T12:30:00,000+0000 S","RV":12346.012,
                 "RI":"1-0:1.8.0","RU":"kWh","RT":"AC","EF":"","ST":"G"}]}
        |{"SA":"ECDSA-secp256r1-SHA256","SD":"3044..."}

``RV`` is the logged decimal text written as a JSON number, never through a float.
Device-signed OCMF kept in an entry's ``signed`` field is exported unchanged. OCMF
knows only ECDSA (its Table 22), so a gateway with an Ed25519 log key cannot export
OCMF. Before signing anything, the export verifies the log and signs only entries a
valid checkpoint covers: an edited ``evidence.jsonl`` is never laundered into signed
records.

Verification (:func:`verify_ocmf`) follows what the Transparenzsoftware accepts: the
payload is the exact text between the header and the signature section (a ``|``
inside a JSON string does not split it; whitespace is kept), ``SA`` defaults to
ECDSA-secp256r1-SHA256 (or the key's curve when the key says), ``SE`` hex or base64,
signatures in DER decoded leniently (non-minimal lengths and integers, as BouncyCastle
does) or as bare ``r||s``, keys as DER SubjectPublicKeyInfo or bare ``X||Y``, a
withdrawn fourth section ignored. All curves of Table 22 are checked; secp192k1, which
``cryptography`` lacks, in plain Python.

Errors::

    EvidenceError (ies_agent.evidence.errors)
    └── OcmfError   a record or key that cannot be parsed, an algorithm outside
                    Table 22, a key that cannot sign OCMF, a record too large,
                    a log that does not verify
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ies_agent.evidence.canonical import parse_entry
from ies_agent.evidence.errors import EvidenceError, EvidenceFormatError
from ies_agent.evidence.note import sign_p256_low_s

OCMF_HEADER = "OCMF|"
OCMF_VERSION = "1.0"
"""Format version written in ``FV`` (the subset we use is unchanged up to 1.3)."""
MAX_RECORD_BYTES = 1875
"""Largest record we write (what a QR code or an OCPP signed meter value carries)."""
DEFAULT_GI = "ies-agent"
"""Gateway identification (``GI``) written into exported records."""
SIGNATURE_ALGORITHM = "ECDSA-secp256r1-SHA256"
"""``SA`` of exported records; also the OCMF default when ``SA`` is absent."""

# OCMF meter states from our reading states (st): good, timeout, error, substitute;
# a late read is still a good value.
_METER_STATE = {"G": "G", "L": "G", "S": "S", "T": "T", "E": "E"}


class OcmfError(EvidenceError):
    """An OCMF record or key cannot be used, or an export cannot be made."""


# --- curves ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Curve:
    """A curve of OCMF Table 22: its OID and, for ``cryptography``, its class."""

    name: str
    oid: str
    size: int
    """Bytes per coordinate."""
    backend: type[ec.EllipticCurve] | None
    """``cryptography`` curve class, or ``None`` to use the plain-Python check."""


_CURVES = {
    c.name: c
    for c in (
        _Curve("secp192k1", "1.3.132.0.31", 24, None),
        _Curve("secp256k1", "1.3.132.0.10", 32, ec.SECP256K1),
        _Curve("secp192r1", "1.2.840.10045.3.1.1", 24, ec.SECP192R1),
        _Curve("secp256r1", "1.2.840.10045.3.1.7", 32, ec.SECP256R1),
        _Curve("brainpoolP256r1", "1.3.36.3.3.2.8.1.1.7", 32, ec.BrainpoolP256R1),
        _Curve("secp384r1", "1.3.132.0.34", 48, ec.SECP384R1),
        _Curve("brainpoolP384r1", "1.3.36.3.3.2.8.1.1.11", 48, ec.BrainpoolP384R1),
    )
}
_CURVE_BY_OID = {c.oid: c for c in _CURVES.values()}
_SA_CURVES = {
    **{f"ECDSA-{name}-SHA256": curve for name, curve in _CURVES.items()},
    # Table 22 spells the Brainpool curves without the "P".
    "ECDSA-brainpool256r1-SHA256": _CURVES["brainpoolP256r1"],
    "ECDSA-brainpool384r1-SHA256": _CURVES["brainpoolP384r1"],
}
SIGNATURE_ALGORITHMS = frozenset(_SA_CURVES)
"""The ``SA`` values we accept: OCMF Table 22 (and the ``brainpoolP`` spelling)."""
_EC_PUBLIC_KEY_OID = "1.2.840.10045.2.1"

# secp192k1 (SEC 2, section 2.2.1): y^2 = x^3 + 3 over F_p.
_K192_P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFEE37
_K192_N = 0xFFFFFFFFFFFFFFFFFFFFFFFE26F2FC170F69466A74DEFD8D
_K192_G = (
    0xDB4FF10EC057E9AE26B07D0280B7F4341DA5D1B1EAE06C7D,
    0x9B2F2F6D9C5628A7844163D015BE86344082AA88D95E2F9D,
)


# --- DER, leniently -------------------------------------------------------------------


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """Return (tag, start of value, end of value) of the DER item at ``at``.

    Lengths in long form may be non-minimal (``81 44``), as BouncyCastle accepts.
    Raises ``OcmfError`` when the item runs past the data.
    """
    if at + 2 > len(data):
        raise OcmfError("DER item cut short")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            raise OcmfError("DER length is malformed")
        length = int.from_bytes(data[at : at + count], "big")
        at += count
    if at + length > len(data):
        raise OcmfError("DER item runs past the end")
    return tag, at, at + length


def decode_signature(signature: bytes, size: int) -> tuple[int, int]:
    """Return (r, s) of an ECDSA signature: DER (decoded leniently) or bare r||s.

    ``size`` is the curve's coordinate size in bytes. Raises ``OcmfError`` when the
    bytes are neither.
    """
    try:
        tag, start, end = _der_item(signature, 0)
        if tag != 0x30 or end != len(signature):
            raise OcmfError("not a DER sequence")
        values = []
        at = start
        for _ in range(2):
            tag, value_start, value_end = _der_item(signature, at)
            if tag != 0x02 or value_start == value_end:
                raise OcmfError("not a DER integer")
            values.append(int.from_bytes(signature[value_start:value_end], "big"))
            at = value_end
        if at != end:
            raise OcmfError("trailing bytes in the DER sequence")
        return values[0], values[1]
    except OcmfError:
        if len(signature) == 2 * size:
            return (
                int.from_bytes(signature[:size], "big"),
                int.from_bytes(signature[size:], "big"),
            )
        raise OcmfError(
            f"signature is neither DER nor bare r||s ({len(signature)} bytes)"
        ) from None


def _oid(data: bytes) -> str:
    first = data[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in data[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(p) for p in parts)


def _parse_spki(der: bytes) -> tuple[_Curve, bytes]:
    """Return (curve, encoded point) of an EC SubjectPublicKeyInfo."""
    tag, start, _ = _der_item(der, 0)
    if tag != 0x30:
        raise OcmfError("public key is not a DER SubjectPublicKeyInfo")
    tag, alg_start, alg_end = _der_item(der, start)
    if tag != 0x30:
        raise OcmfError("public key has no algorithm identifier")
    tag, oid_start, oid_end = _der_item(der, alg_start)
    if tag != 0x06 or _oid(der[oid_start:oid_end]) != _EC_PUBLIC_KEY_OID:
        raise OcmfError("public key is not an elliptic-curve key")
    tag, curve_start, curve_end = _der_item(der, oid_end)
    if tag != 0x06:
        raise OcmfError("public key does not name its curve")
    curve_oid = _oid(der[curve_start:curve_end])
    curve = _CURVE_BY_OID.get(curve_oid)
    if curve is None:
        raise OcmfError(f"public key is on curve {curve_oid}, not one OCMF knows")
    tag, bits_start, bits_end = _der_item(der, alg_end)
    if tag != 0x03 or bits_end - bits_start < 2 or der[bits_start] != 0:
        raise OcmfError("public key bit string is malformed")
    return curve, der[bits_start + 1 : bits_end]


def _key_bytes(public_key: bytes | str) -> bytes:
    if isinstance(public_key, bytes):
        return public_key
    text = public_key.strip()
    try:
        return bytes.fromhex(text)
    except ValueError:
        pass
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise OcmfError("public key is neither hex nor base64") from None


def _load_key(
    public_key: bytes | str, curve_hint: _Curve | None
) -> tuple[_Curve, bytes]:
    """Return (curve, uncompressed or compressed point) of a key in any OCMF shape."""
    raw = _key_bytes(public_key)
    if raw[:1] == b"\x30":
        try:
            return _parse_spki(raw)
        except OcmfError:
            pass
    curve = curve_hint or _CURVES["secp256r1"]
    if len(raw) == 2 * curve.size:
        return curve, b"\x04" + raw
    if len(raw) == 2 * curve.size + 1 and raw[0] == 4:
        return curve, raw
    raise OcmfError(
        f"public key ({len(raw)} bytes) is neither a SubjectPublicKeyInfo nor a bare "
        f"{curve.name} point"
    )


# --- plain-Python ECDSA for the curve cryptography lacks ------------------------------

_Point = tuple[int, int, int] | None  # Jacobian coordinates; None is infinity


def _double(point: _Point, p: int) -> _Point:
    if point is None or point[1] == 0:
        return None
    x, y, z = point
    yy = y * y % p
    s = 4 * x * yy % p
    m = 3 * x * x % p  # a = 0
    nx = (m * m - 2 * s) % p
    ny = (m * (s - nx) - 8 * yy * yy) % p
    return nx, ny, 2 * y * z % p


def _add(one: _Point, two: _Point, p: int) -> _Point:
    if one is None:
        return two
    if two is None:
        return one
    x1, y1, z1 = one
    x2, y2, z2 = two
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _double(one, p) if s1 == s2 else None
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    nx = (r * r - hhh - 2 * v) % p
    ny = (r * (v - nx) - s1 * hhh) % p
    return nx, ny, z1 * z2 * h % p


def _multiply(k: int, point: _Point, p: int) -> _Point:
    result: _Point = None
    while k:
        if k & 1:
            result = _add(result, point, p)
        point = _double(point, p)
        k >>= 1
    return result


def _verify_secp192k1(point: bytes, r: int, s: int, message: bytes) -> bool:
    p, n = _K192_P, _K192_N
    if len(point) != 49 or point[0] != 4 or not (0 < r < n and 0 < s < n):
        return False
    qx, qy = int.from_bytes(point[1:25], "big"), int.from_bytes(point[25:], "big")
    if (qy * qy - qx * qx * qx - 3) % p:
        return False  # not on the curve
    digest = int.from_bytes(hashlib.sha256(message).digest(), "big")
    e = digest >> (256 - n.bit_length())
    w = pow(s, -1, n)
    total = _add(
        _multiply(e * w % n, (*_K192_G, 1), p),
        _multiply(r * w % n, (qx, qy, 1), p),
        p,
    )
    if total is None:
        return False
    x, _, z = total
    return x * pow(z * z, -1, p) % p % n == r


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OcmfRecord:
    """A parsed OCMF record; ``payload_text`` is the exact signed text."""

    payload_text: str
    payload: dict[str, Any]
    signature: dict[str, Any]


def parse_ocmf(record: str) -> OcmfRecord:
    """Split ``OCMF|payload|signature`` without re-serialising the payload.

    A ``|`` inside a JSON string belongs to the payload; a withdrawn fourth section
    (a public key) is ignored. Raises ``OcmfError`` when the header, payload or
    signature section is missing or not a JSON object.
    """
    text = record.strip()
    if not text.startswith(OCMF_HEADER):
        raise OcmfError("an OCMF record starts with 'OCMF|'")
    decoder = json.JSONDecoder()
    start = len(OCMF_HEADER)
    try:
        payload, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise OcmfError(f"OCMF payload is not JSON: {exc.msg}") from None
    if not isinstance(payload, dict):
        raise OcmfError("OCMF payload is not a JSON object")
    if text[end : end + 1] != "|":
        raise OcmfError("OCMF payload is not followed by '|' and a signature section")
    try:
        signature, after = decoder.raw_decode(text, end + 1)
    except json.JSONDecodeError as exc:
        raise OcmfError(f"OCMF signature section is not JSON: {exc.msg}") from None
    if not isinstance(signature, dict):
        raise OcmfError("OCMF signature section is not a JSON object")
    rest = text[after:]
    if rest and not rest.startswith("|"):
        raise OcmfError("unexpected text after the OCMF signature section")
    return OcmfRecord(text[start:end], payload, signature)


def check_ocmf(record: str, public_key: bytes | str) -> None:
    """Check the signature of an OCMF record with ``public_key``; return if it holds.

    ``public_key`` is DER SubjectPublicKeyInfo or a bare ``X||Y`` point, as bytes or
    as hex/base64 text. Raises ``OcmfError`` saying why it does not verify (malformed
    record, ``SA`` outside Table 22, undecodable ``SD``, key on another curve, or a
    signature that does not match).
    """
    parsed = parse_ocmf(record)
    algorithm = parsed.signature.get("SA")
    curve_hint: _Curve | None = None
    if algorithm is not None:
        if algorithm not in SIGNATURE_ALGORITHMS:
            raise OcmfError(
                f"signature algorithm SA {algorithm!r} is not one of OCMF Table 22"
            )
        curve_hint = _SA_CURVES[algorithm]
    curve, point = _load_key(public_key, curve_hint)
    if curve_hint is not None and curve is not curve_hint:
        raise OcmfError(f"SA says {curve_hint.name} but the key is on {curve.name}")
    encoded = parsed.signature.get("SD")
    if not isinstance(encoded, str):
        raise OcmfError("OCMF signature section has no SD")
    encoding = parsed.signature.get("SE", "hex")
    try:
        if encoding == "base64":
            raw = base64.b64decode(encoded, validate=True)
        elif encoding == "hex":
            raw = bytes.fromhex(encoded)
        else:
            raise OcmfError(
                f"signature encoding SE {encoding!r} is neither hex nor base64"
            )
    except (ValueError, binascii.Error):
        raise OcmfError(f"signature SD is not valid {encoding}") from None
    r, s = decode_signature(raw, curve.size)
    message = parsed.payload_text.encode("utf-8")
    if curve.backend is None:
        valid = _verify_secp192k1(point, r, s, message)
    else:
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve.backend(), point)
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
            valid = True
        except InvalidSignature:
            valid = False
        except ValueError as exc:
            raise OcmfError(
                f"public key is not a point on {curve.name}: {exc}"
            ) from None
    if not valid:
        raise OcmfError("OCMF signature does not match the payload and key")


def verify_ocmf(record: str, public_key: bytes | str) -> bool:
    """Tell whether ``record`` is a well-formed OCMF record signed by ``public_key``.

    Returns ``False`` for every failure; :func:`check_ocmf` says which.
    """
    try:
        check_ocmf(record, public_key)
    except OcmfError:
        return False
    return True


# --- export ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """``GI``, ``GS`` and ``GV`` of exported records."""

    identification: str
    serial: str
    version: str


def _obis_without_suffix(obis: str) -> str:
    return obis.split("*")[0]


def _meter_fields(device: Mapping[str, Any], src: str) -> list[tuple[str, str]]:
    """Return MV, MM, MS, MF from a ``source`` event's device description."""
    fields = []
    for name, keys in (
        ("MV", ("mfr", "vendor", "manufacturer")),
        ("MM", ("model",)),
        ("MS", ("ser", "serial", "serial_number")),
        ("MF", ("fw", "firmware", "version")),
    ):
        value = next((device[k] for k in keys if isinstance(device.get(k), str)), None)
        if value is None and name == "MS":
            value = src  # OCMF requires a meter serial; the source id stands in
        if value is not None:
            fields.append((name, value))
    return fields


def reading_payload(
    entry: Mapping[str, Any],
    *,
    gateway: GatewayInfo,
    device: Mapping[str, Any],
    pagination: int,
) -> str:
    """Return the OCMF payload text of one cumulative reading entry.

    Raises ``OcmfError`` when the entry has no value, OBIS code or time.
    """
    value, obis, t = entry.get("val"), entry.get("obis"), entry.get("t")
    if not (isinstance(value, str) and isinstance(obis, str) and isinstance(t, str)):
        raise OcmfError(
            f"entry seq {entry.get('seq')} lacks the value, OBIS code or time that "
            "OCMF needs"
        )
    time_text = f"{t[:19]},{t[20:23]}+0000 {entry.get('tq', 'U')}"
    head: list[tuple[str, str]] = [
        ("FV", OCMF_VERSION),
        ("GI", gateway.identification),
        ("GS", gateway.serial),
        ("GV", gateway.version),
        ("PG", f"F{pagination}"),
        *_meter_fields(device, str(entry.get("src", ""))),
    ]
    reading = [
        ("TM", json.dumps(time_text)),
        ("RV", value),  # the exact decimal text, as a JSON number
        ("RI", json.dumps(_obis_without_suffix(obis))),
        ("RU", json.dumps(entry.get("unit", ""), ensure_ascii=False)),
        ("RT", json.dumps("AC")),
        ("EF", json.dumps("")),
        ("ST", json.dumps(_METER_STATE.get(str(entry.get("st")), "E"))),
    ]
    head_text = ",".join(
        f"{json.dumps(k)}:{json.dumps(v, ensure_ascii=False)}" for k, v in head
    )
    reading_text = ",".join(f"{json.dumps(k)}:{v}" for k, v in reading)
    return "{" + head_text + ',"RD":[{' + reading_text + "}]}"


def sign_payload(payload: str, private_key: ec.EllipticCurvePrivateKey) -> str:
    """Return the OCMF record of ``payload`` signed with ``private_key`` (P-256).

    Raises ``OcmfError`` for a key on another curve.
    """
    if not isinstance(private_key.curve, ec.SECP256R1):
        raise OcmfError(f"OCMF export signs with P-256, not {private_key.curve.name}")
    signature = sign_p256_low_s(private_key, payload.encode("utf-8")).hex().upper()
    section = json.dumps(
        {"SA": SIGNATURE_ALGORITHM, "SD": signature}, separators=(",", ":")
    )
    return f"{OCMF_HEADER}{payload}|{section}"


def _is_cumulative(entry: Mapping[str, Any]) -> bool:
    if entry.get("cum") is True:
        return True
    obis = entry.get("obis")
    if not isinstance(obis, str):
        return False
    parts = obis.partition(":")[2].split("*")[0].split(".")
    return len(parts) >= 2 and parts[1] == "8"


def ocmf_records(
    lines: Iterable[bytes],
    private_key: ec.EllipticCurvePrivateKey,
    *,
    gateway_identification: str = DEFAULT_GI,
) -> Iterator[tuple[int, str]]:
    """Yield (seq, record) for each exportable entry of ``lines`` (entry lines).

    Cumulative readings with a value become signed records; an entry's ``signed``
    OCMF string is passed through unchanged. Raises ``OcmfError`` for a line that
    is not a canonical entry or a record over ``MAX_RECORD_BYTES``.
    """
    gateway = GatewayInfo(gateway_identification, "", "")
    devices: dict[str, Mapping[str, Any]] = {}
    pagination = 0
    for line in lines:
        try:
            entry = parse_entry(line)
        except EvidenceFormatError as exc:
            raise OcmfError(f"cannot export a damaged log: {exc}") from None
        seq = entry.get("seq")
        if not isinstance(seq, int):
            raise OcmfError("cannot export a damaged log: an entry has no seq")
        if entry.get("ev") == "boot" and isinstance(entry.get("agent"), dict):
            agent = entry["agent"]
            gateway = GatewayInfo(
                gateway_identification,
                str(agent.get("id", "")),
                str(agent.get("sw", "")),
            )
        elif entry.get("ev") == "source" and isinstance(entry.get("dev"), dict):
            devices[str(entry.get("src"))] = entry["dev"]
        signed = entry.get("signed")
        if isinstance(signed, str) and signed.startswith(OCMF_HEADER):
            yield seq, signed
            continue
        if entry.get("type") != "reading" or "val" not in entry:
            continue
        if not _is_cumulative(entry) or entry.get("st") not in _METER_STATE:
            continue
        pagination += 1
        payload = reading_payload(
            entry,
            gateway=gateway,
            device=devices.get(str(entry.get("src")), {}),
            pagination=pagination,
        )
        record = sign_payload(payload, private_key)
        if len(record.encode("utf-8")) >= MAX_RECORD_BYTES:
            raise OcmfError(
                f"OCMF record of entry seq {seq} would take "
                f"{len(record.encode('utf-8'))} bytes; OCMF carriers allow "
                f"{MAX_RECORD_BYTES}"
            )
        yield seq, record


def write_export(path: Path, out: TextIO, args: argparse.Namespace) -> int:
    """Export handler of ``ies-agent export --format ocmf``: write one record per
    line to ``out``; return how many.

    ``path`` is a data directory. The log is verified with the gateway's own key
    first; only entries a valid checkpoint covers are exported (the rest is counted
    on stderr). Raises ``OcmfError`` when the key is not ECDSA P-256 or the log does
    not verify, ``KeyFileError`` when the key cannot be loaded.
    """
    from ies_agent.evidence import keys as keystore
    from ies_agent.evidence import note
    from ies_agent.evidence.verify import (
        directory_checkpoints,
        find_log,
        load_verifiers,
        verify_log,
    )

    log_path, directory = find_log(path)
    key = keystore.load_private_key(keystore.keys_dir(directory) / keystore.KEY_FILE)
    private_key = key.private_key
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise OcmfError(
            "this gateway's log key is Ed25519, but OCMF signatures are ECDSA only "
            "(OCMF Table 22): OCMF export needs an ECDSA P-256 key; rotate the log "
            "key to ecdsa-p256 or export another format"
        )
    records = directory_checkpoints(directory)
    origin = _origin(records, directory)
    verifiers = [note.parse_vkey(key.signer(origin).vkey())]
    card = directory / "keys" / "key-card.json"
    if card.exists():
        verifiers += load_verifiers(card)
    data = log_path.read_bytes()
    report = verify_log(data, records, verifiers, path=str(log_path))
    if not report.ok:
        first = report.errors[0]
        raise OcmfError(
            f"the log does not verify ({len(report.errors)} error(s); first: "
            f"{first.line()}); refusing to sign its contents. Run 'ies-agent verify "
            f"{path}'"
        )
    lines = data.split(b"\n")[:-1]
    covered = lines[: report.signed_size]
    count = 0
    identification = getattr(args, "gateway_identification", None) or DEFAULT_GI
    for _, record in ocmf_records(
        covered, private_key, gateway_identification=identification
    ):
        out.write(record + "\n")
        count += 1
    waiting = len(lines) - len(covered)
    if waiting:
        print(
            f"ies-agent export: {waiting} entries after the last checkpoint are not "
            "exported yet",
            file=sys.stderr,
        )
    return count


def _origin(records: Iterable[Any], directory: Path) -> str:
    """Return the log's origin: from its first checkpoint, else from the key card."""
    from ies_agent.evidence import note
    from ies_agent.evidence.errors import NoteError

    for record in records:
        try:
            text, _ = note.split_note(record.note)
            return note.parse_checkpoint(text).origin
        except NoteError:
            continue
    try:
        card = json.loads((directory / "keys" / "key-card.json").read_text())
        return str(card["origin"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OcmfError(
            f"cannot tell the log's origin in {directory}: no checkpoint and no key "
            "card"
        ) from None


def public_key_spki(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the DER SubjectPublicKeyInfo that verifies exported records."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
