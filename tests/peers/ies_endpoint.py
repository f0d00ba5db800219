"""A real HTTPS server acting as an IES endpoint (a Beckn participant's receiver).

It runs aiohttp on a free loopback port with a server certificate from a test PKI,
optionally requiring a client certificate (the "operator's adapter over mutual TLS"
case). For every request it:

- verifies the Beckn ``Authorization`` signature with an implementation separate from
  the agent's: its own header parsing, ``hashlib.blake2b`` for the digest and PyNaCl
  (libsodium) for Ed25519 — not ``cryptography``, not ``ies_agent.upstream.beckn``;
- validates the MeterData profiles against the IES v0.6 JSON schema (jsonschema) and
  against the rules of the IES validation cases (:func:`meterdata_problems`);
- keeps one copy of every evidence entry by ``seq`` and of every checkpoint, and the
  MeterData profiles of every request it acknowledged (``meter_data``).

Its ``mode`` decides the answer: ``ack``, ``nack`` (200 with a NACK body), ``401``,
``500``, ``slow`` (ACK after ``slow_s``) or ``silent`` (never answers). With
``ack_limit`` set, it answers 500 once it has acknowledged that many requests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import ssl
import time
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data" / "ies"
_PARAM = re.compile(r'(\w+)="([^"]*)"')


def load_schema_validator() -> Any:
    """Return a Draft 2020-12 validator of the MeterData v0.6 schema, with formats."""
    import jsonschema

    schema = json.loads((DATA / "meterdata-v0.6-schema.json").read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def load_codes() -> dict[str, dict[str, Any]]:
    """Return the IES code list keyed by OBIS (``1.0.1.8.0.255``)."""
    data = json.loads((DATA / "meterdata-v0.6-codes.json").read_text())
    return {code["obis"]: code for code in data["codes"]}


def meterdata_problems(
    document: list[dict[str, Any]], codes: dict[str, dict[str, Any]]
) -> list[str]:
    """Check the rules the IES validation cases show; return what is wrong.

    Descriptor references resolve; each reading type is allowed in the profile type
    (per the IES code list); interval ids increase; cumulative values never
    decrease; closing - opening = value for usage readings. Numbers must have been
    parsed as Decimal (``json.loads(..., parse_float=Decimal)``).
    """
    problems: list[str] = []
    sets: dict[str, dict[str, Any]] = {}
    for profile in document:
        if profile.get("profileType") == "DESCRIPTOR":
            for item in profile.get("payloadDescriptorSets", []):
                sets[item["name"]] = item
    for index, profile in enumerate(document):
        kind = profile.get("profileType")
        if kind in ("DESCRIPTOR", "CUSTOMER"):
            continue
        where = f"profile {index} ({kind})"
        ref = profile.get("payloadDescriptorSetRef")
        uses_descriptors = "compactSequenceRef" in profile or "intervals" in profile
        if ref is None:
            if uses_descriptors:
                problems.append(f"{where}: no payloadDescriptorSetRef")
            descriptor_set = None
        elif ref not in sets:
            problems.append(f"{where}: descriptor set {ref!r} not declared")
            descriptor_set = None
        else:
            descriptor_set = sets[ref]
        descriptors = {
            d["readingType"]: d
            for d in (descriptor_set or {}).get("payloadDescriptors", [])
        }
        # Reading types must be allowed in this profile type.
        used = {
            r["readingType"]
            for r in profile.get("readings", [])
            if isinstance(r, dict) and "readingType" in r
        }
        sequence = None
        if "compactSequenceRef" in profile and descriptor_set is not None:
            found = [
                s
                for s in descriptor_set.get("compactSequences", [])
                if s["name"] == profile["compactSequenceRef"]
            ]
            if not found:
                problems.append(f"{where}: compact sequence not declared")
            else:
                sequence = found[0]["sequenceItems"]
                used |= {item["readingType"] for item in sequence}
        for reading_type in sorted(used):
            descriptor = descriptors.get(reading_type)
            if descriptor is None:
                if descriptor_set is not None:
                    problems.append(f"{where}: {reading_type!r} has no descriptor")
                continue
            code = codes.get(descriptor.get("obis", ""))
            if code is not None and kind not in code["profiles"]:
                problems.append(
                    f"{where}: {reading_type!r} ({code['obis']}) is not allowed in "
                    f"{kind} profiles"
                )
        # Readings with opening/closing values.
        for reading in profile.get("readings", []):
            opening, closing = reading.get("openingValue"), reading.get("closingValue")
            if (
                opening is not None
                and closing is not None
                and closing - opening != reading["value"]
            ):
                problems.append(f"{where}: closing - opening != value")
        # Interval rows.
        intervals = profile.get("intervals", [])
        ids = [row["id"] for row in intervals]
        if any(b <= a for a, b in pairwise(ids)):
            problems.append(f"{where}: interval ids do not increase")
        if sequence is None:
            continue
        columns: dict[tuple[str, str], list[Decimal]] = {}
        for row in intervals:
            payloads = row.get("payloads", [])
            values: dict[tuple[str, str], Decimal] = {}
            for item, value in zip(sequence, payloads, strict=False):
                key = (item["readingType"], item.get("attribute", "value"))
                values[key] = value
                columns.setdefault(key, []).append(value)
            for reading_type in {k[0] for k in values}:
                o = values.get((reading_type, "openingValue"))
                c = values.get((reading_type, "closingValue"))
                v = values.get((reading_type, "value"))
                if o is not None and c is not None and v is not None and c - o != v:
                    problems.append(
                        f"{where} row {row['id']}: closing - opening != value"
                    )
        for (reading_type, attribute), column in columns.items():
            descriptor = descriptors.get(reading_type, {})
            code = codes.get(descriptor.get("obis", ""), {})
            cumulative = attribute in ("openingValue", "closingValue") or (
                descriptor.get("reportedMode") == "READING"
                and code.get("accumulationBehaviour") == "CUMULATIVE"
            )
            if cumulative and any(b < a for a, b in pairwise(column)):
                problems.append(f"{where}: cumulative {reading_type!r} decreases")
    return problems


def _nack(code: str, message: str) -> dict[str, Any]:
    return {"status": "NACK", "error": {"errorCode": code, "errorMessage": message}}


class IesEndpoint:
    """The endpoint: start with :meth:`start` (returns the base URL), :meth:`stop`."""

    def __init__(
        self,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        client_ca: Path | None = None,
        keys: dict[tuple[str, str], bytes] | None = None,
        max_skew_s: float = 30.0,
    ) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.keys = keys  # (subscriber_id, unique_key_id) -> raw Ed25519 public key
        self.max_skew_s = max_skew_s
        self.mode = "ack"
        self.slow_s = 2.0
        self.entries: dict[int, bytes] = {}
        self.checkpoints: dict[int, str] = {}
        self.requests = 0
        self.answers: list[int] = []
        self.invalid: list[str] = []
        self.profiles = 0
        self.meter_data: list[list[dict[str, Any]]] = []
        self.ack_limit: int | None = None
        self.actions: list[str] = []
        self._validator = load_schema_validator()
        self._codes = load_codes()
        self._runner: Any = None
        self._stopping = asyncio.Event()
        self.port = 0

    async def start(self) -> str:
        """Listen on 127.0.0.1 (HTTPS when a certificate is given); return the URL."""
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/beckn/{action}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        context = None
        if self.cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.cert), str(self.key))
            if self.client_ca is not None:
                context.load_verify_locations(str(self.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        scheme = "https" if context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/beckn"

    async def stop(self) -> None:
        """Stop listening and close connections."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def missing(self, upto: int) -> list[int]:
        """``seq`` numbers 0..``upto`` not received."""
        return [seq for seq in range(upto + 1) if seq not in self.entries]

    def _verify(self, header: str | None, body: bytes) -> str | None:
        """Return why the signature fails, or None when it verifies (PyNaCl)."""
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        if self.keys is None:
            return None
        if not header or not header.startswith("Signature "):
            return "no Signature header"
        params = dict(_PARAM.findall(header))
        try:
            subscriber, key_id, algorithm = params["keyId"].split("|")
            created, expires = int(params["created"]), int(params["expires"])
            signature = base64.b64decode(params["signature"])
        except (KeyError, ValueError):
            return "malformed Signature header"
        if (
            algorithm != "ed25519"
            or params.get("headers") != "(created) (expires) digest"
        ):
            return "unexpected algorithm or headers"
        now = time.time()
        if created > now + self.max_skew_s or expires < now - self.max_skew_s:
            return "signature outside its time window"
        public = self.keys.get((subscriber, key_id))
        if public is None:
            return "unknown key"
        digest = base64.b64encode(hashlib.blake2b(body, digest_size=64).digest())
        text = b"(created): %d\n(expires): %d\ndigest: BLAKE-512=%s" % (
            created,
            expires,
            digest,
        )
        try:
            VerifyKey(public).verify(text, signature)
        except BadSignatureError:
            return "bad signature"
        return None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        self.requests += 1
        self.actions.append(request.match_info["action"])
        mode = self.mode
        if mode == "silent":
            await self._stopping.wait()
        if mode == "slow":
            await asyncio.sleep(self.slow_s)
        if mode == "401":
            self.answers.append(401)
            return web.json_response(_nack("401", "unknown participant"), status=401)
        if mode == "500" or (
            self.ack_limit is not None and len(self.meter_data) >= self.ack_limit
        ):
            self.answers.append(500)
            return web.json_response({"error": {"errorCode": "500"}}, status=500)
        failure = self._verify(request.headers.get("Authorization"), body)
        if failure is not None:
            self.invalid.append(f"signature: {failure}")
            self.answers.append(401)
            return web.json_response(_nack("401", failure), status=401)
        try:
            envelope = json.loads(body, parse_float=Decimal)
            attributes = envelope["message"]["contract"]["performance"][0][
                "performanceAttributes"
            ]
            meter_data = attributes["meterData"]
            evidence = attributes["evidence"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self.invalid.append(f"envelope: {exc!r}")
            self.answers.append(400)
            return web.json_response(_nack("400", "bad envelope"), status=400)
        problems: list[str] = []
        if meter_data:
            problems += [e.message for e in self._validator.iter_errors(meter_data)]
            problems += meterdata_problems(meter_data, self._codes)
        if problems:
            self.invalid.extend(problems)
            self.answers.append(400)
            return web.json_response(_nack("400", problems[0][:200]), status=400)
        if mode == "nack":
            self.answers.append(200)
            return web.json_response(_nack("30001", "not accepting data now"))
        self.profiles += len(meter_data)
        self.meter_data.append(meter_data)
        for entry in evidence["entries"]:
            line = json.dumps(
                entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
            self.entries.setdefault(entry["seq"], line)
        for item in evidence["checkpoints"]:
            self.checkpoints[item["size"]] = item["note"]
        self.answers.append(200)
        return web.json_response({"status": "ACK"})
