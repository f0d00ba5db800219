"""The demo's scripted dispatch: one signed event through the agent's real paths.

At demo time, in the data directory (never shipped), the demo makes two Ed25519 keys
(``dispatch-demo/``: an issuer and a policy-pack signer, private halves mode 0600,
reused on the next run), pins their public halves in ``dispatch-demo/trust/`` and
writes a demo policy pack signed by the signer into ``dispatch-demo/policies/``. The
site file gets a ``[dispatch]`` table naming them, the inverter and both chargers.

About ``DELAY_S`` seconds into the run the script writes simulated past days of the
grid meter's interval register on the event's grid (``mv_history`` events marked
``"simulated": true``, for the M&V baseline), signs an event — inverter limited to
``LIMIT_PCT`` % and the chargers to ``CHARGE_A`` A for about ``EVENT_S`` seconds on
the demo's interval grid — and hands it to the agent's MQTT command handler exactly as
the MQTT connector would (no broker needed). Authentication, the policy pack, the
SunSpec write to the simulated inverter, the charging profiles, read-back, revert and
M&V then run as on a gateway in the field; :meth:`DemoDispatch.summary` tells what
happened, from the evidence log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ies_agent.dispatch.settings import DispatchService

log = logging.getLogger(__name__)

DELAY_S = 8.0
"""Seconds after the agent starts before the event is sent."""
EVENT_S = 20
"""About how long the event lasts (whole intervals, at least one)."""
LIMIT_PCT = "50"
CHARGE_A = "10"
METER = "grid-meter"
QUANTITY = "energy_active_import"
HISTORY_DAYS = 5
METHOD = "high-3-of-5"
ISSUER = "demo-discom"
DEMO_DIR = "dispatch-demo"


class DemoDispatch:
    """Keys, pack and site table for the demo's dispatch, and the script itself."""

    def __init__(
        self, data_dir: Path, interval_s: int, chargers: tuple[str, ...]
    ) -> None:
        self.data_dir = data_dir
        self.interval_s = interval_s
        self.chargers = chargers
        self.root = data_dir / DEMO_DIR
        self.event_id: str | None = None
        self.outcome = "not sent (the run ended first)"
        self._issuer: Ed25519PrivateKey | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def intervals(self) -> int:
        """How many intervals the event has on the demo's grid."""
        return max(1, EVENT_S // self.interval_s)

    def prepare(self) -> str:
        """Make the keys, the trust directory and the signed pack; return the site
        file's ``[dispatch]`` tables. Raises ``OSError`` when they cannot be written."""
        from ies_agent.dispatch.auth import DOMAIN_PACK, sign_document

        trust = self.root / "trust"
        policies = self.root / "policies"
        for directory in (self.root, trust, policies):
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._issuer = _key(self.root / "issuer.key.pem", trust / "demo-issuer.pem")
        signer = _key(self.root / "pack-signer.key.pem", trust / "demo-signer.pem")
        (policies / "demo.pack.json").write_bytes(
            sign_document("pack", DOMAIN_PACK, _pack_body(), [signer])
        )
        settle = self.interval_s + 2
        text = (
            "\n# Dispatch: demo keys and pack made in this data directory at demo"
            " time.\n[dispatch]\n"
            f'trust_dir = "{DEMO_DIR}/trust"\n'
            f'policies = ["{DEMO_DIR}/policies"]\n'
            "\n[dispatch.mv]\n"
            f'method = "{METHOD}"\nmeters = ["{METER}"]\n'
            f'quantity = "{QUANTITY}"\nsettle_s = {settle}\n'
            '\n[[dispatch.devices]]\nid = "inverter"\nkind = "sunspec-inverter"\n'
            'groups = ["pv"]\n'
        )
        for charger in self.chargers:
            text += (
                f'\n[[dispatch.devices]]\nid = "{charger}"\nkind = "ocpp-charger"\n'
                'groups = ["chargers"]\nmax_a = 32\n'
            )
        return text

    def banner(self) -> str:
        """One line for the demo's banner."""
        return (
            f"  dispatch     at ~{DELAY_S:g} s a signed event (MQTT command path): "
            f"inverter {LIMIT_PCT} %, chargers {CHARGE_A} A for "
            f"{self.intervals * self.interval_s} s, then revert and M&V"
        )

    async def started(self, service: DispatchService) -> None:
        """``run_site``'s ``on_dispatch``: start the script beside the agent."""
        self._task = asyncio.create_task(self._script(service), name="demo:dispatch")

    async def close(self) -> None:
        """Stop the script if the run ended before it did."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _script(self, service: DispatchService) -> None:
        from ies_agent.dispatch.auth import DOMAIN_EVENT, sign_document
        from ies_agent.dispatch.model import format_utc

        assert self._issuer is not None
        await asyncio.sleep(DELAY_S)
        engine = service.engine
        now = datetime.now(UTC)
        step = self.interval_s
        start_s = (int(now.timestamp()) // step + 2) * step
        start = datetime.fromtimestamp(start_s, UTC)
        self.write_history(engine.evidence, start)
        self.event_id = f"demo-{start:%Y%m%dT%H%M%SZ}"
        body = {
            "format": "ies-dispatch/1",
            "id": self.event_id,
            "issuer": ISSUER,
            "created": format_utc(now),
            "start": format_utc(start),
            "interval_s": step,
            "intervals": [
                {"limit_pct": LIMIT_PCT, "charge_a": CHARGE_A}
                for _ in range(self.intervals)
            ],
            "targets": ["group:pv", "group:chargers"],
        }
        payload = sign_document("event", DOMAIN_EVENT, body, [self._issuer])
        print(f"dispatch: sending signed event {self.event_id}", flush=True)
        self.outcome = "sent"
        if service.command_name is None:
            self.outcome = "not sent: the MQTT dispatch source is off"
            return
        await service.commands.dispatch(service.command_name, payload, upstream="demo")
        duration = self.intervals * step
        final = await engine.wait_finished(self.event_id, duration + 30)
        self.outcome = final
        await engine.wait_mv(self.event_id, engine.mv_settings.settle_s + 30)
        self.outcome = f"{final}, measured"

    def write_history(self, evidence: Any, start: datetime) -> None:
        """Record ``HISTORY_DAYS`` simulated past days of the grid meter's register on
        the event's grid (``mv_history``, ``simulated: true``), scaled to its live
        rate so the baseline is comparable."""
        from ies_agent.dispatch.mv import read_entries

        register, per_interval = Decimal("1000.0000"), Decimal("0.0020")
        readings = [
            e
            for e in read_entries(self.data_dir / "evidence.jsonl")
            if e.get("src") == METER
            and e.get("q") == QUANTITY
            and e.get("type") == "reading"
            and e.get("st") == "G"
        ]
        if readings:
            register = Decimal(readings[-1]["val"])
        if len(readings) >= 2:
            rise = register - Decimal(readings[-2]["val"])
            if rise > 0:
                per_interval = rise
        day_energy = per_interval * (86_400 // self.interval_s)
        quantum = Decimal("0.0001")
        for back in range(HISTORY_DAYS, 0, -1):
            value = register - day_energy * back
            series = []
            for i in range(self.intervals + 1):
                when = (
                    start
                    - timedelta(days=back)
                    + timedelta(seconds=i * self.interval_s)
                )
                series.append([_time_ms(when), format(value, "f")])
                factor = Decimal(100 + 8 * ((back * 7 + i * 3) % 6)) / 100
                value = (value + per_interval * factor).quantize(
                    quantum, rounding=ROUND_HALF_EVEN
                )
            evidence.append_event(
                "mv_history",
                {
                    "q": QUANTITY,
                    "unit": "kWh",
                    "simulated": True,
                    "day": (start - timedelta(days=back)).date().isoformat(),
                    "note": "demo: simulated past interval register for the baseline",
                    "readings": series,
                },
                src=METER,
            )

    def summary(self) -> str:
        """What the dispatch did, from the evidence log (for the end of the demo)."""
        from ies_agent.dispatch.mv import read_entries

        if self.event_id is None:
            return f"dispatch: {self.outcome}"
        mine = [
            e
            for e in read_entries(self.data_dir / "evidence.jsonl")
            if e.get("event") == self.event_id
            and str(e.get("ev", "")).startswith(("dispatch_", "mv_"))
        ]
        lines = [f"dispatch {self.event_id}: {self.outcome}"]
        for entry in mine:
            ev = entry["ev"]
            if ev == "dispatch_decision":
                verdict = "accepted" if entry.get("accepted") else "refused"
                lines.append(
                    f"  decision   {verdict} under pack {entry.get('pack', '-')}"
                    + (f" ({entry['reason']})" if entry.get("reason") else "")
                )
                for clause in entry.get("clauses", []):
                    lines.append(
                        f"    clause {clause.get('clause', '?'):<12} "
                        f"{clause.get('result', '?'):<8} {clause.get('detail', '')}"
                    )
            elif ev == "dispatch_readback":
                lines.append(
                    f"  read-back  {entry['device']}: expected {entry['expected']} "
                    f"{entry['unit']}, ok={entry['ok']}, device shows "
                    + ", ".join(f"{k}={v}" for k, v in entry["observed"].items())
                )
            elif ev == "dispatch_revert":
                lines.append(
                    f"  revert     {entry['device']} ({entry['reason']}): "
                    f"ok={entry['ok']}"
                )
            elif ev == "mv_result":
                lines.append(
                    f"  M&V        {entry['meter']} {entry['method']}, baseline days "
                    f"{', '.join(entry['baseline_days']) or 'none'}"
                    + (" (simulated history)" if entry["simulated_history"] else "")
                )
                lines.append(
                    f"    {'interval start':<26}{'baseline':>12}{'actual':>12}"
                    f"  {entry['unit']}"
                )
                for when, base, act in zip(
                    entry["interval_start"],
                    entry["baseline"],
                    entry["actual"],
                    strict=True,
                ):
                    lines.append(f"    {when:<26}{base or '-':>12}{act or '-':>12}")
        return "\n".join(lines)


def _time_ms(when: datetime) -> str:
    """UTC with milliseconds, as reading times are written (``...T10:00:05.000Z``)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _pack_body() -> dict[str, Any]:
    return {
        "format": "ies-policy-pack/1",
        "id": "demo-generated",
        "version": 1,
        "effective_from": "2024-01-01T00:00:00Z",
        "note": "DEMO pack, signed at demo time by a key made in the data directory",
        "clauses": [
            {"id": "INST-EXPORT", "kind": "export_limit", "devices": ["inverter"],
             "max_pct": "90"},
            {"id": "PV-MIN", "kind": "device_minimum", "devices": ["inverter"],
             "min_pct": "20", "on_violation": "refuse"},
            {"id": "EV-MIN", "kind": "device_minimum", "devices": ["*"],
             "min_a": "6", "on_violation": "clamp"},
            {"id": "LEN", "kind": "max_event_length", "max_s": 3600},
            {"id": "FREQ", "kind": "max_events_per_day", "max": 100},
            {"id": "OPT-OUT", "kind": "consumer_opt_out", "allowed": True},
        ],
    }  # fmt: skip


def _key(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Load the demo key at ``private_path`` or make it (mode 0600); pin its public
    half at ``public_path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key: Ed25519PrivateKey | None = None
    if private_path.is_file():
        loaded = serialization.load_pem_private_key(
            private_path.read_bytes(), password=None
        )
        if isinstance(loaded, Ed25519PrivateKey):
            key = loaded
    if key is None:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileNotFoundError):
            private_path.unlink()
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    return key
