"""A small agent process for SIGKILL tests: an evidence log writer plus connectors.

Usage: ``python upstream_agent.py DATA_DIR MQTT_URL --until N [--rate R]``

Opens the log in DATA_DIR (continuing it if it exists), starts the real upstream
connectors (``ies_agent.upstream.manager.Upstreams``) with one MQTT upstream, and
appends readings at about R per second until the log holds N entries; then closes the
log, waits for delivery and exits 0. It prints ``ready`` when started and
``acked <seq>`` now and then. Tests kill it with SIGKILL at random moments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ies_agent.clock import SystemClock
from ies_agent.evidence.log import EvidenceLog
from ies_agent.state import AgentState
from ies_agent.upstream.manager import Upstreams
from ies_agent.upstream.settings import UpstreamConfig
from ies_drivers.reading import Reading, ReadingState


async def run(args: argparse.Namespace) -> int:
    clock = SystemClock()
    log = EvidenceLog.open(args.data_dir, gateway_id="gw-kill", clock=clock)
    state = AgentState("gw-kill")
    config = UpstreamConfig(
        name="broker",
        kind="mqtt",
        url=args.url,
        backoff_max_s=0.5,
        timeout_s=3,
        telemetry_s=0,
        batch_max_entries=50,
    )
    upstreams = Upstreams(
        [config],
        data_dir=args.data_dir,
        gateway_id="gw-kill",
        origin=log.origin,
        state=state,
        evidence=log,
    )
    upstreams.start()
    print("ready", flush=True)
    count = 0
    while log.size < args.until:
        stamp = clock.now()
        value = 1_000_000 + log.size
        log.append_reading(
            Reading(
                source="m1",
                quantity="import_energy",
                obis="1-0:1.8.0*255",
                value=f"{value // 1000}.{value % 1000:03d}",
                unit="kWh",
                state=ReadingState.OK,
                raw=f"test:{value:08x}",
                t_ms=stamp.t_ms,
                tq=stamp.tq,
                mono_ns=stamp.mono_ns,
                cumulative=True,
            )
        )
        count += 1
        if count % 100 == 0:
            log.checkpoint()
            print(f"acked {state.upstreams['broker'].acked}", flush=True)
        await asyncio.sleep(1 / args.rate)
    log.close()
    done = await upstreams.finish(30)
    print(f"done {done} acked {state.upstreams['broker'].acked}", flush=True)
    return 0 if done else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("url")
    parser.add_argument("--until", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1000.0)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
