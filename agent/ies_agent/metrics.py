"""Prometheus metrics of a running agent, all named ``ies_…``.

Nothing is counted twice: a :class:`SiteCollector` reads the counters the scheduler,
the bus owners, the evidence log and the upstreams already keep, at scrape time.
Each agent gets its own registry (no module-level global), with prometheus-client's
process collector for memory and CPU (``process_resident_memory_bytes``, …).

Metrics (labels in braces):

- ``ies_device_reads_total{device}``, ``ies_device_errors_total{device,kind}``,
  ``ies_device_read_latency_seconds{device}`` (last read), ``ies_device_online``
- ``ies_bus_connected{bus}``, ``ies_bus_queue_depth{bus}``,
  ``ies_bus_reconnects_total{bus}``, ``ies_bus_requests_total{bus,unit}``,
  ``ies_bus_errors_total{bus,unit,kind}``, ``ies_bus_latency_seconds{bus,unit}``
- ``ies_evidence_entries``, ``ies_evidence_bytes``,
  ``ies_evidence_checkpoint_age_seconds``
- ``ies_upstream_connected{upstream}``, ``ies_upstream_backlog_entries{upstream}``,
  ``ies_upstream_backlog_bytes{upstream}``
- ``ies_dispatch_events_total``
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ies_agent.web.facts import SiteFacts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SiteCollector(Collector):
    """Turns the live facts of one site into metric families at each scrape."""

    def __init__(self, facts: SiteFacts) -> None:
        self.facts = facts

    def collect(self) -> Iterator[Metric]:
        """Yield every ``ies_`` metric family."""
        yield from self._devices()
        yield from self._buses()
        yield from self._evidence()
        yield from self._upstreams()
        dispatch = self.facts.dispatch_facts()
        events = CounterMetricFamily(
            "ies_dispatch_events", "Dispatch events received since start."
        )
        events.add_metric([], float(len(dispatch["events"])))
        yield events

    def _devices(self) -> Iterator[Metric]:
        reads = CounterMetricFamily(
            "ies_device_reads", "Successful reads per device.", labels=["device"]
        )
        errors = CounterMetricFamily(
            "ies_device_errors",
            "Failed reads per device and error kind.",
            labels=["device", "kind"],
        )
        latency = GaugeMetricFamily(
            "ies_device_read_latency_seconds",
            "Duration of the device's last successful read, in seconds.",
            labels=["device"],
        )
        online = GaugeMetricFamily(
            "ies_device_online",
            "1 when the device's last read succeeded.",
            labels=["device"],
        )
        for device_id, ds in self.facts.state.devices.items():
            reads.add_metric([device_id], float(ds.reads))
            for kind, count in ds.faults.items():
                errors.add_metric([device_id, kind], float(count))
            if ds.last_latency_s is not None:
                latency.add_metric([device_id], ds.last_latency_s)
            online.add_metric([device_id], 1.0 if ds.online else 0.0)
        yield from (reads, errors, latency, online)

    def _buses(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "ies_bus_connected", "1 when the bus link is open.", labels=["bus"]
        )
        depth = GaugeMetricFamily(
            "ies_bus_queue_depth", "Requests waiting for the wire.", labels=["bus"]
        )
        reconnects = CounterMetricFamily(
            "ies_bus_reconnects", "Times the bus link was reopened.", labels=["bus"]
        )
        requests = CounterMetricFamily(
            "ies_bus_requests",
            "Modbus requests sent per bus and unit id.",
            labels=["bus", "unit"],
        )
        errors = CounterMetricFamily(
            "ies_bus_errors",
            "Failed Modbus requests per bus, unit id and kind.",
            labels=["bus", "unit", "kind"],
        )
        latency = GaugeMetricFamily(
            "ies_bus_latency_seconds",
            "Round trip of the unit's last answered request, in seconds.",
            labels=["bus", "unit"],
        )
        for bus_id, bus in self.facts.buses.items():
            status = bus.status
            connected.add_metric([bus_id], 1.0 if status.connected else 0.0)
            depth.add_metric([bus_id], float(status.queue_depth))
            reconnects.add_metric([bus_id], float(status.reconnects))
            for unit, stats in bus.stats.items():
                labels = [bus_id, str(unit)]
                requests.add_metric(labels, float(stats.requests))
                for kind, count in stats.errors.items():
                    errors.add_metric([*labels, kind], float(count))
                if stats.last_latency_s is not None:
                    latency.add_metric(labels, stats.last_latency_s)
        yield from (connected, depth, reconnects, requests, errors, latency)

    def _evidence(self) -> Iterator[Metric]:
        facts = self.facts.evidence_facts()
        entries = GaugeMetricFamily(
            "ies_evidence_entries", "Entries in the evidence log."
        )
        entries.add_metric([], float(facts["entries"]))
        yield entries
        if facts["bytes"] is not None:
            size = GaugeMetricFamily(
                "ies_evidence_bytes", "Size of the evidence log file, in bytes."
            )
            size.add_metric([], float(facts["bytes"]))
            yield size
        if facts["checkpoint_age_s"] is not None:
            age = GaugeMetricFamily(
                "ies_evidence_checkpoint_age_seconds",
                "Seconds since the last signed checkpoint.",
            )
            age.add_metric([], float(facts["checkpoint_age_s"]))
            yield age

    def _upstreams(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "ies_upstream_connected",
            "1 when the upstream link is up.",
            labels=["upstream"],
        )
        backlog = GaugeMetricFamily(
            "ies_upstream_backlog_entries",
            "Evidence entries not yet acknowledged by the upstream.",
            labels=["upstream"],
        )
        backlog_bytes = GaugeMetricFamily(
            "ies_upstream_backlog_bytes",
            "Bytes of evidence not yet acknowledged by the upstream.",
            labels=["upstream"],
        )
        for name, up in self.facts.state.upstreams.items():
            connected.add_metric([name], 1.0 if up.connected else 0.0)
            backlog.add_metric([name], float(up.backlog_entries))
            backlog_bytes.add_metric([name], float(up.backlog_bytes))
        yield from (connected, backlog, backlog_bytes)


def site_registry(facts: SiteFacts) -> CollectorRegistry:
    """Return a registry with the site's metrics and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(facts))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """Return the registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(registry)
