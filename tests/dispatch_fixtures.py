"""Helpers for the dispatch tests: keys, signed packs and events, a live inverter.

- :func:`issuer_keys`: a fresh Ed25519 issuer key pinned in a temporary trust
  directory (keys are made per test; the shipped demo test key is not used here).
- :func:`signed_pack` / :func:`signed_event`: documents signed the way issuers do.
- :func:`live_inverter`: the demo's SunSpec inverter simulator on a real pymodbus TCP
  server on a free loopback port, with the agent's real :class:`ModbusBus` to it; the
  simulator object is returned too, so a test reads what the device really took.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ies_agent.demo.physics import Counters, Snapshot
from ies_agent.demo.simulator import SunSpecInverter, sim_device
from ies_agent.dispatch.auth import DOMAIN_EVENT, DOMAIN_PACK, sign_document
from ies_drivers.modbus.bus import BusSpec, ModbusBus

DEFAULT_CLAUSES: list[dict[str, Any]] = [
    {"id": "INST-EXPORT", "kind": "export_limit", "devices": ["inverter"],
     "max_pct": "80"},
    {"id": "PV-MIN", "kind": "device_minimum", "devices": ["inverter"],
     "min_pct": "20", "on_violation": "refuse"},
    {"id": "EV-MIN", "kind": "device_minimum", "devices": ["*"], "min_a": "6",
     "on_violation": "clamp"},
    {"id": "LEN", "kind": "max_event_length", "max_s": 14400},
    {"id": "FREQ", "kind": "max_events_per_day", "max": 5},
    {"id": "OPT-OUT", "kind": "consumer_opt_out", "allowed": True},
]  # fmt: skip


@dataclass
class Issuer:
    """A signing key and the trust directory that pins its public half."""

    key: Ed25519PrivateKey
    trust_dir: Path


def issuer_keys(directory: Path, name: str = "issuer") -> Issuer:
    """Make an Ed25519 key and pin its public key as ``<name>.pem`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (directory / f"{name}.pem").write_bytes(pem)
    return Issuer(key, directory)


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (polling every 50 ms) until ``check()`` holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.05)


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def pack_body(
    clauses: list[dict[str, Any]] | None = None, *, version: int = 1
) -> dict[str, Any]:
    return {
        "format": "ies-policy-pack/1",
        "id": "test-site",
        "version": version,
        "effective_from": "2024-01-01T00:00:00Z",
        "clauses": DEFAULT_CLAUSES if clauses is None else clauses,
    }


def signed_pack(path: Path, key: Ed25519PrivateKey, **kw: Any) -> Path:
    path.write_bytes(sign_document("pack", DOMAIN_PACK, pack_body(**kw), [key]))
    return path


def event_body(
    event_id: str,
    start: datetime,
    intervals: list[dict[str, str]],
    *,
    interval_s: int = 1,
    targets: tuple[str, ...] = ("inverter",),
    issuer: str = "discom-test",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "format": "ies-dispatch/1",
        "id": event_id,
        "issuer": issuer,
        "start": iso(start),
        "interval_s": interval_s,
        "intervals": intervals,
        "targets": list(targets),
        **extra,
    }


def signed_event(body: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    return sign_document("event", DOMAIN_EVENT, body, [key])


def soon(seconds: float = 0.3) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def entries(data_dir: Path) -> list[dict[str, Any]]:
    text = (data_dir / "evidence.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def events(data_dir: Path, ev: str) -> list[dict[str, Any]]:
    return [e for e in entries(data_dir) if e.get("ev") == ev]


def sunny(inverter: SunSpecInverter, solar_w: float = 4000.0) -> None:
    """Give the simulator a daytime snapshot so its output is not zero."""
    inverter.snapshot = Snapshot(
        load_w=800.0,
        solar_w=solar_w,
        grid_w=800.0 - solar_w,
        voltage_v=(230.0, 230.0, 230.0),
        frequency_hz=50.0,
        counters=Counters(),
    )


@asynccontextmanager
async def live_inverter(
    inverter: SunSpecInverter | None = None,
) -> AsyncIterator[tuple[SunSpecInverter, ModbusBus]]:
    """The SunSpec simulator behind a real pymodbus TCP server, and a bus to it."""
    from pymodbus.server import ModbusTcpServer

    device = inverter or SunSpecInverter(1)
    sunny(device)
    server = ModbusTcpServer(sim_device(1, device), address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    bus = ModbusBus(BusSpec("inverter-lan", kind="tcp", port=port, timeout_s=1.0))
    await bus.start()
    try:
        yield device, bus
    finally:
        await bus.close()
        await server.shutdown()
