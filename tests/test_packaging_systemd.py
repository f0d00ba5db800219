"""sd_notify and the health-gated watchdog, against real unix datagram sockets.

The socket a test binds plays systemd's part: whatever the agent sends arrives there
as datagrams, exactly as systemd would receive them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import agent_cmd, agent_env
from ies_agent.selfupdate import HealthFileProbe
from ies_agent.systemd import (
    Notifier,
    NotifySocketError,
    ServiceLink,
    Watchdog,
    health_file_from_env,
    parse_notify_address,
    read_health,
    watchdog_interval_s,
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def receive(sock: socket.socket, *, until: str, timeout_s: float) -> list[str]:
    """Collect datagrams until one contains ``until`` or ``timeout_s`` passes."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in messages[-1]:
            break
    return messages


class FakeClock:
    """Monotonic seconds that move only when the test says so (virtual time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the notify protocol --------------------------------------------------------------


def test_ready_status_watchdog_and_stopping_arrive_as_systemd_reads_them(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("gw-1: 3 devices,\n log at seq 7")
    assert notifier.watchdog()
    assert notifier.status("reading")
    assert notifier.stopping("bye")
    notifier.close()

    got = [sock.recv(4096) for _ in range(4)]
    assert got == [
        b"READY=1\nSTATUS=gw-1: 3 devices, log at seq 7",
        b"WATCHDOG=1",
        b"STATUS=reading",
        b"STOPPING=1\nSTATUS=bye",
    ]


def test_abstract_socket_address_is_reached(tmp_path: Path) -> None:
    name = f"ies-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()


def test_unusable_notify_socket_is_refused_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(NotifySocketError, match="neither an absolute path"):
        parse_notify_address("run/notify")
    with caplog.at_level(logging.WARNING):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "cannot notify systemd" in caplog.text


def test_a_vanished_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING):
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    assert caplog.text.count("cannot notify systemd") == 1


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(mine) == 2.0
    other = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval_s(other) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({}) is None
    assert Watchdog.from_env({}).interval_s == 10.0


def test_health_file_lives_in_the_runtime_directory() -> None:
    env = {"RUNTIME_DIRECTORY": "/run/ies-agent:/run/other"}
    assert health_file_from_env(env) == Path("/run/ies-agent/health.json")
    assert health_file_from_env({}) is None


# --- the watchdog's judgement ---------------------------------------------------------


def test_watchdog_is_healthy_only_while_every_loop_beats_in_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    watchdog = Watchdog(1.0, deadline_s=60, clock=clock)
    watchdog.expect("poll:meter", 12)
    watchdog.expect("intervals", 900)
    assert watchdog.all_healthy()

    clock.now += 10
    watchdog.healthy("poll:meter", 12)
    clock.now += 10
    assert watchdog.overdue() == []

    # The meter's loop hangs: 13 s without a beat against a 12 s deadline.
    clock.now += 3
    with caplog.at_level(logging.INFO):
        assert watchdog.overdue() == ["poll:meter"]
        assert not watchdog.check()
        assert not watchdog.check()
        watchdog.healthy("poll:meter", 12)
        assert watchdog.check()
    assert caplog.text.count("loops are late") == 1
    assert caplog.text.count("all loops beat again") == 1

    # A loop that never beat after being expected counts as hung as well.
    clock.now += 901
    assert "intervals" in watchdog.overdue()
    watchdog.done("intervals")
    assert "intervals" not in watchdog.loops


async def test_feeder_pets_only_while_healthy_and_keeps_the_health_file(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = notify_socket
    sock.setblocking(False)
    health = tmp_path / "health.json"
    watchdog = Watchdog(0.05)
    watchdog.healthy("poll:meter", 0.3)
    stop = asyncio.Event()
    feeder = asyncio.create_task(
        watchdog.feed(Notifier(path), stop, health_file=health), name="feeder"
    )

    async def pets_during(seconds: float) -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            try:
                while True:
                    count += sock.recv(4096) == b"WATCHDOG=1"
            except BlockingIOError:
                pass
        return count

    # Healthy: the loop beats every 0.1 s; pets every ~0.05 s.
    async def beat() -> None:
        for _ in range(5):
            watchdog.healthy("poll:meter", 0.3)
            await asyncio.sleep(0.1)

    beating = asyncio.create_task(beat(), name="beat")
    assert await pets_during(0.45) >= 4
    await beating
    record = read_health(health)
    assert record is not None
    assert record["pid"] == os.getpid() and record["beats"] >= 4

    # The loop stops beating: once its deadline passes, no more pets.
    await asyncio.sleep(0.4)
    await pets_during(0.05)  # drain what was sent before the deadline
    assert await pets_during(0.3) == 0
    beats_before = read_health(health)
    await asyncio.sleep(0.15)
    assert read_health(health) == beats_before

    stop.set()
    await feeder
    assert not health.exists()


async def test_health_probe_accepts_the_watchdogs_health_file(tmp_path: Path) -> None:
    health = tmp_path / "health.json"
    watchdog = Watchdog(0.05)
    watchdog.healthy("intervals", 60)
    stop = asyncio.Event()
    feeder = asyncio.create_task(
        watchdog.feed(Notifier(None), stop, health_file=health), name="feeder"
    )
    probe = HealthFileProbe(health, beats_needed=2, poll_s=0.02)
    from ies_agent import __version__

    verdict = await asyncio.to_thread(probe.wait, f"{__version__}-1", 3.0)
    wrong = await asyncio.to_thread(probe.wait, "9.9.9-1", 0.3)
    stop.set()
    await feeder
    assert verdict.healthy, verdict.reason
    assert not wrong.healthy and "did not report healthy" in wrong.reason


async def test_service_link_outside_systemd_is_quiet(tmp_path: Path) -> None:
    link = ServiceLink.from_env({})
    await link.started("demo")
    await link.stopping()
    assert not link.notifier.enabled and link.health_file is None


# --- the agent, as systemd runs it ----------------------------------------------------


def test_agent_reports_ready_pets_the_watchdog_and_says_stopping(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = notify_socket
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = agent_env()
    env.update(
        NOTIFY_SOCKET=path, WATCHDOG_USEC="400000", RUNTIME_DIRECTORY=str(runtime)
    )
    data = tmp_path / "data"
    child = subprocess.Popen(
        agent_cmd("demo", "--data-dir", str(data), "--for", "3", "--interval", "2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages = receive(sock, until="READY=1", timeout_s=60)
        assert messages and messages[-1].startswith("READY=1\nSTATUS=")
        health = None
        for _ in range(100):  # the first pet may come before the loops register
            health = read_health(runtime / "health.json")
            if health is not None and health["loops"] >= 2:
                break
            time.sleep(0.05)
        messages += receive(sock, until="STOPPING=1", timeout_s=30)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr
    assert health is not None and health["pid"] == child.pid
    assert health["loops"] >= 2  # every device's poll loop and the interval loop
    pets = [m for m in messages if m.startswith("WATCHDOG=1")]
    assert len(pets) >= 3, messages
    assert messages[-1].startswith("STOPPING=1")
    assert not (runtime / "health.json").exists()
    first_boot = json.loads((data / "evidence.jsonl").read_text().splitlines()[0])
    assert first_boot["ev"] == "boot"
