"""An upstream CSMS for tests, built on the ``ocpp`` package (not on the agent's code).

It serves OCPP 1.6, 2.0.1 and 2.1 on ``ws://127.0.0.1:<port>/<charger id>`` and writes
every frame it receives and sends to a JSON-lines record file (flushed per line), so a
test can check what reached it even across a kill and restart. Transaction ids it gives
continue from the highest one in the record file.

Run it in a child process (so a test can SIGKILL it and start it again)::

    python tests/peers/ocpp_csms.py --port 9100 --record csms.jsonl \
        [--call-during-start]

``--call-during-start`` makes it ask the charger for its configuration (1.6
GetConfiguration, 2.x GetVariables) *before* it answers a StartTransaction or a Started
TransactionEvent: a call from the CSMS while the charger's call is in flight, which
deadlocks a bridge that handles one message at a time.

:class:`CsmsProcess` starts and stops such a process by its pid; :func:`read_record`
parses the record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --- reading the record ---------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One frame in the record: who, which way, the parsed OCPP-J array."""

    charger: str
    proto: str
    direction: str
    frame: list[Any]

    @property
    def action(self) -> str | None:
        return self.frame[2] if self.frame[0] == 2 else None


def read_record(path: Path) -> list[Frame]:
    """Return every frame in the record file, in the order the CSMS saw them."""
    frames = []
    if not path.exists():
        return frames
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        frames.append(
            Frame(
                entry["charger"], entry["proto"], entry["dir"], json.loads(entry["raw"])
            )
        )
    return frames


def calls_in(frames: list[Frame], charger: str) -> list[tuple[str, dict[str, Any]]]:
    """The CALLs ``charger`` sent to the CSMS, in order: (action, payload)."""
    return [
        (f.frame[2], f.frame[3])
        for f in frames
        if f.charger == charger and f.direction == "in" and f.frame[0] == 2
    ]


# --- the server -----------------------------------------------------------------------


def serve_main(argv: list[str] | None = None) -> None:
    """Entry point of the child process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--call-during-start", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.record, args.call_during_start))


async def _serve(port: int, record: Path, call_during_start: bool) -> None:
    csms = InProcessCsms(port, record, call_during_start=call_during_start)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await csms.start()
    print("csms ready", flush=True)
    await stop.wait()
    await csms.stop()


class InProcessCsms:
    """The same CSMS in the test's event loop, for tests that drive it: ``stations``
    maps charger ids to the connected ``ocpp`` charge point objects (call them to
    send RemoteStop, SetChargingProfile, ...)."""

    def __init__(self, port: int, record: Path, *, call_during_start: bool = False):
        self.port = port
        self.record = record
        self.call_during_start = call_during_start
        self.stations: dict[str, Any] = {}
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ocpp"

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        recorder = _Recorder(self.record)

        async def handler(websocket: Any) -> None:
            charger_id = websocket.request.path.rstrip("/").rsplit("/", 1)[-1]
            proto = websocket.subprotocol or "ocpp1.6"
            station = _station_class(proto)(charger_id, websocket, response_timeout=10)
            station.recorder = recorder
            station.proto = proto
            station.call_during_start = self.call_during_start
            self.stations[charger_id] = station
            with contextlib.suppress(Exception):
                await station.start()

        self._server = await serve(
            handler,
            "127.0.0.1",
            self.port,
            subprotocols=["ocpp2.1", "ocpp2.0.1", "ocpp1.6"],
            compression=None,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def frames(self) -> list[Frame]:
        return read_record(self.record)


class _Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.next_tx = 1000
        for frame in read_record(path):
            if frame.direction == "out" and frame.frame[0] == 3:
                tx = frame.frame[2].get("transactionId")
                if isinstance(tx, int):
                    self.next_tx = max(self.next_tx, tx + 1)
        self.file = path.open("a", buffering=1)

    def write(self, charger: str, proto: str, direction: str, raw: str) -> None:
        entry = {
            "t": time.time(),
            "charger": charger,
            "proto": proto,
            "dir": direction,
            "raw": raw,
        }
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def tx_id(self) -> int:
        self.next_tx += 1
        return self.next_tx - 1


def _station_class(proto: str) -> type:
    from ocpp.routing import on
    from ocpp.v16 import ChargePoint as Cp16
    from ocpp.v16 import call as call16
    from ocpp.v16 import call_result as r16
    from ocpp.v21 import ChargePoint as Cp21
    from ocpp.v21 import call_result as r21
    from ocpp.v201 import ChargePoint as Cp201
    from ocpp.v201 import call as call201
    from ocpp.v201 import call_result as r201

    class Recording:
        """Record frames; run each incoming message in its own task."""

        recorder: _Recorder
        proto: str
        call_during_start: bool

        async def start(self) -> None:
            tasks = set()
            while True:
                message = await self._connection.recv()
                self.recorder.write(self.id, self.proto, "in", message)
                task = asyncio.ensure_future(self.route_message(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def _send(self, message: str) -> None:
            self.recorder.write(self.id, self.proto, "out", message)
            await self._connection.send(message)

    if proto == "ocpp1.6":

        class Csms16(Recording, Cp16):
            @on("BootNotification")
            def boot(self, **_: Any) -> Any:
                return r16.BootNotification(
                    current_time=_now(), interval=60, status="Accepted"
                )

            @on("Heartbeat")
            def heartbeat(self, **_: Any) -> Any:
                return r16.Heartbeat(current_time=_now())

            @on("StatusNotification")
            def status(self, **_: Any) -> Any:
                return r16.StatusNotification()

            @on("Authorize")
            def authorize(self, id_tag: str, **_: Any) -> Any:
                status = "Blocked" if id_tag == "BLOCKED" else "Accepted"
                return r16.Authorize(id_tag_info={"status": status})

            @on("StartTransaction")
            async def start_tx(self, id_tag: str, **_: Any) -> Any:
                if self.call_during_start:
                    # A charger that is gone (a replay) cannot answer: carry on.
                    with contextlib.suppress(Exception):
                        await self.call(
                            call16.GetConfiguration(key=["MeterValueSampleInterval"]),
                            suppress=False,
                        )
                return r16.StartTransaction(
                    transaction_id=self.recorder.tx_id(),
                    id_tag_info={"status": "Accepted"},
                )

            @on("StopTransaction")
            def stop_tx(self, **_: Any) -> Any:
                return r16.StopTransaction(id_tag_info={"status": "Accepted"})

            @on("MeterValues")
            def meter_values(self, **_: Any) -> Any:
                return r16.MeterValues()

            @on("DataTransfer")
            def data_transfer(self, **_: Any) -> Any:
                return r16.DataTransfer(status="Accepted")

        return Csms16

    base201 = Cp21 if proto == "ocpp2.1" else Cp201
    results: Any = r21 if proto == "ocpp2.1" else r201

    class Csms2x(Recording, base201):  # type: ignore[misc, valid-type]
        @on("BootNotification")
        def boot(self, **_: Any) -> Any:
            return results.BootNotification(
                current_time=_now(), interval=60, status="Accepted"
            )

        @on("Heartbeat")
        def heartbeat(self, **_: Any) -> Any:
            return results.Heartbeat(current_time=_now())

        @on("StatusNotification")
        def status(self, **_: Any) -> Any:
            return results.StatusNotification()

        @on("Authorize")
        def authorize(self, **_: Any) -> Any:
            return results.Authorize(id_token_info={"status": "Accepted"})

        @on("TransactionEvent")
        async def transaction_event(self, event_type: str, **kwargs: Any) -> Any:
            if self.call_during_start and event_type == "Started":
                with contextlib.suppress(Exception):
                    await self.call(
                        call201.GetVariables(
                            get_variable_data=[
                                {
                                    "component": {"name": "SampledDataCtrlr"},
                                    "variable": {"name": "TxUpdatedInterval"},
                                }
                            ]
                        ),
                        suppress=False,
                        skip_schema_validation=True,
                    )
            if kwargs.get("id_token"):
                return results.TransactionEvent(id_token_info={"status": "Accepted"})
            return results.TransactionEvent()

        @on("MeterValues")
        def meter_values(self, **_: Any) -> Any:
            return results.MeterValues()

        @on("NotifyEvent")
        def notify_event(self, **_: Any) -> Any:
            return results.NotifyEvent()

    return Csms2x


# --- the process handle ---------------------------------------------------------------


class CsmsProcess:
    """The CSMS in a child process on ``port``, recording to ``record``.

    ``start()`` waits until it listens; ``kill()`` sends SIGKILL to its own pid.
    """

    def __init__(
        self, port: int, record: Path, *, call_during_start: bool = False
    ) -> None:
        self.port = port
        self.record = record
        self.call_during_start = call_during_start
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ocpp"

    def start(self, timeout_s: float = 15.0) -> None:
        args = [
            sys.executable,
            str(HERE / "ocpp_csms.py"),
            "--port",
            str(self.port),
            "--record",
            str(self.record),
        ]
        if self.call_during_start:
            args.append("--call-during-start")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE.parent), env.get("PYTHONPATH", "")]
        )
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "csms ready" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError("the test CSMS did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def frames(self) -> list[Frame]:
        return read_record(self.record)


if __name__ == "__main__":
    serve_main()
