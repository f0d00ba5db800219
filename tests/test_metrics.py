"""``/metrics`` of a running demo, parsed by the Prometheus client's own parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from web_fixtures import DEMO_DEVICES, RunningDemo, running_demo

__all__ = ["running_demo"]


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Return every sample of ``url`` as name -> [(labels, value)]."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_metrics_cover_devices_buses_evidence_and_process(
    running_demo: RunningDemo,
) -> None:
    samples = scrape(running_demo.url)
    reads = {
        labels["device"]: value for labels, value in samples["ies_device_reads_total"]
    }
    assert set(DEMO_DEVICES) <= set(reads)
    assert all(reads[d] >= 1 for d in DEMO_DEVICES)
    latency = {
        labels["device"] for labels, _ in samples["ies_device_read_latency_seconds"]
    }
    assert set(DEMO_DEVICES) <= latency
    connected = {lb["bus"]: v for lb, v in samples["ies_bus_connected"]}
    assert connected == {"lan-grid-meter": 1.0, "lan-inverter": 1.0, "rs485": 1.0}
    units = {(lb["bus"], lb["unit"]) for lb, _ in samples["ies_bus_requests_total"]}
    assert {("rs485", "5"), ("rs485", "6"), ("lan-grid-meter", "1")} <= units
    assert samples["ies_evidence_entries"][0][1] > 0
    assert "ies_dispatch_events_total" in samples
    assert samples["process_resident_memory_bytes"][0][1] > 10e6


def test_counters_rise_and_checkpoint_age_is_fresh(running_demo: RunningDemo) -> None:
    import time

    first = scrape(running_demo.url)
    time.sleep(2.5)  # the demo polls every 2-3 s and checkpoints every 2 s
    second = scrape(running_demo.url)

    def total(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float:
        return sum(v for _, v in samples["ies_device_reads_total"])

    assert total(second) > total(first)
    assert second["ies_evidence_entries"][0][1] > first["ies_evidence_entries"][0][1]
    age = second["ies_evidence_checkpoint_age_seconds"][0][1]
    assert 0 <= age < 10
