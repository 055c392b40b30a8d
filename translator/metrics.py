"""Prometheus metrics of the appliance (prometheus_client, on a registry of our own).

Per listener and exporter (labels ``role`` = listener|exporter, ``name``, ``service``):
connections, active connections, bytes each way (``direction`` = upstream: from the client
towards the server; downstream: back), connect errors by reason, connect latency, connection ends
by reason, migrations. For the stack: servald up, servald restarts. For the process: config
reloads by result, paused listeners (at max_connections), and the relay engine's worker counters,
read at scrape time.

A registry of our own (not the global default) lets tests run several supervisors in one
process and keeps library metrics we did not ask for off the endpoint.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from splice_ext import WorkerStats
from translator.config import Endpoint

NAMESPACE = "serval_translator"
CONNECTION_LABELS = ("role", "name", "service")
# Serval connects are one SAL round trip plus servald's work: sub-millisecond on a LAN, up to
# the connect timeout when a SYN must be retransmitted.
CONNECT_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0)


class _RelayCollector:
    """Exports the relay workers' counters on every scrape (no polling in between)."""

    def __init__(self, source: Callable[[], Iterable[WorkerStats]]) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []  # unchecked collector: the families depend on what the relay reports

    def collect(self) -> Iterable[Any]:
        try:
            stats = list(self._source())
        except Exception:  # a stopped relay between reloads: report nothing this scrape
            stats = []
        counters = {
            "splice_calls": "splice() calls",
            "copy_calls": "read/send calls on the copy (non-splice) path",
            "fallbacks": "directions switched to read/send for good",
            "pipes_created": "relay pipes created",
            "pipes_discarded": "relay pipes destroyed while holding bytes",
            "pipe_failures": "pipe2() failures",
        }
        for field_name, help_text in counters.items():
            family = CounterMetricFamily(f"{NAMESPACE}_relay_{field_name}",
                                         f"Relay engine: {help_text}", labels=["worker"])
            for worker in stats:
                family.add_metric([str(worker.worker)], float(getattr(worker, field_name)))
            yield family
        gauges = {
            "active_pairs": "connection pairs being relayed",
            "pipes_in_use": "pipes holding bytes in flight",
            "pipes_pooled": "empty pipes pooled for reuse",
        }
        for field_name, help_text in gauges.items():
            gauge = GaugeMetricFamily(f"{NAMESPACE}_relay_{field_name}",
                                      f"Relay engine: {help_text}", labels=["worker"])
            for worker in stats:
                gauge.add_metric([str(worker.worker)], float(getattr(worker, field_name)))
            yield gauge


class Metrics:
    """All the appliance's metrics plus the optional HTTP endpoint serving them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter(
            "connections", "Connections accepted (listeners: legacy clients; exporters: Serval "
            "clients)", CONNECTION_LABELS, namespace=NAMESPACE, registry=r)
        self.active = Gauge(
            "connections_active", "Connections being relayed now", CONNECTION_LABELS,
            namespace=NAMESPACE, registry=r)
        self.bytes = Counter(
            "bytes", "Bytes relayed; direction upstream = client to server, downstream = back",
            (*CONNECTION_LABELS, "direction"), namespace=NAMESPACE, registry=r)
        self.connect_errors = Counter(
            "connect_errors", "Connections closed because the far side could not be reached, "
            "by reason", (*CONNECTION_LABELS, "reason"), namespace=NAMESPACE, registry=r)
        self.connect_latency = Histogram(
            "connect_latency_seconds", "Time from accept to a connected far side",
            CONNECTION_LABELS, namespace=NAMESPACE, registry=r,
            buckets=CONNECT_LATENCY_BUCKETS_S)
        self.ends = Counter(
            "connection_ends", "Relayed connections that ended, by reason",
            (*CONNECTION_LABELS, "reason"), namespace=NAMESPACE, registry=r)
        self.migrations = Counter(
            "migrations", "Serval-side migrations of relayed connections", CONNECTION_LABELS,
            namespace=NAMESPACE, registry=r)
        self.flow_adoptions = Counter(
            "flow_adoptions", "Relayed flows handed back to a restarted servald, by result "
            "(adopted, failed)", (*CONNECTION_LABELS, "result"), namespace=NAMESPACE,
            registry=r)
        self.servald_up = Gauge(
            "servald_up", "1 when servald answers on its control socket", namespace=NAMESPACE,
            registry=r)
        self.servald_restarts = Counter(
            "servald_restarts", "Restarts of the bundled servald", namespace=NAMESPACE,
            registry=r)
        self.reloads = Counter(
            "config_reloads", "Configuration reloads by result (ok, rejected)", ("result",),
            namespace=NAMESPACE, registry=r)
        self.listener_paused = Gauge(
            "listener_paused", "1 while a listener stops accepting at max_connections",
            ("name",), namespace=NAMESPACE, registry=r)
        self.exporter_registered = Gauge(
            "exporter_listening", "1 while servald has the exporter's service listener",
            ("name", "service"), namespace=NAMESPACE, registry=r)
        self._relay_collector: _RelayCollector | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: Endpoint | None = None

    def watch_relay(self, source: Callable[[], Iterable[WorkerStats]]) -> None:
        if self._relay_collector is not None:
            return
        self._relay_collector = _RelayCollector(source)
        self.registry.register(self._relay_collector)

    def serve(self, address: Endpoint | None) -> None:
        """Serve on `address` (None: stop serving); restarts only when the address changed."""
        if address == self.address and (self._server is not None or address is None):
            return
        self.stop()
        if address is None:
            return
        server, thread = start_http_server(address.port, addr=address.host,
                                           registry=self.registry)
        self._server, self._thread, self.address = server, thread, address

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        self.address = None

    def render(self) -> bytes:
        """The exposition text (what the endpoint serves), for status and tests."""
        return bytes(generate_latest(self.registry))

    def per_service(self) -> dict[str, dict[str, Any]]:
        """Totals per service across listeners and exporters (for `serval-translator status`)."""
        services: dict[str, dict[str, Any]] = {}

        def entry(labels: dict[str, str]) -> dict[str, Any]:
            return services.setdefault(labels["service"], {
                "connections": 0, "active": 0, "bytes_up": 0, "bytes_down": 0,
                "connect_errors": {}})

        for family in self.connections.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    entry(sample.labels)["connections"] += int(sample.value)
        for family in self.active.collect():
            for sample in family.samples:
                entry(sample.labels)["active"] += int(sample.value)
        for family in self.bytes.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = "bytes_up" if sample.labels["direction"] == "upstream" else "bytes_down"
                    entry(sample.labels)[key] += int(sample.value)
        for family in self.connect_errors.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    errors = entry(sample.labels)["connect_errors"]
                    reason = sample.labels["reason"]
                    errors[reason] = errors.get(reason, 0) + int(sample.value)
        return services
