"""Prometheus metrics of one daemon instance.

Each daemon owns its own CollectorRegistry (tests run several daemons in one process, and the bench
runs one beside the CLI). Latency buckets are dense around the 348 ms budget, where a quality
engineer needs to see how close to the edge the line runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_MS_BUCKETS = (
    1,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    40,
    50,
    75,
    100,
    150,
    200,
    250,
    300,
    325,
    348,
    400,
    500,
    1000,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames = Counter(
            "edge_frames_total", "Frames received from cameras.", ["camera"], registry=r
        )
        self.verdicts = Counter(
            "edge_verdicts_total",
            "Decisions acknowledged by the PLC, by verdict and reason.",
            ["camera", "verdict", "reason"],
            registry=r,
        )
        self.failsafes = Counter(
            "edge_failsafe_total",
            "Fail-safe REJECTs decided, by reason.",
            ["camera", "reason"],
            registry=r,
        )
        self.deadline_misses = Counter(
            "edge_deadline_miss_total",
            "Frames whose decision was not acknowledged by the PLC before the deadline.",
            ["camera", "outcome"],
            registry=r,
        )
        self.late_results = Counter(
            "edge_late_results_discarded_total",
            "Real verdicts that arrived after the fail-safe had been written (never written).",
            ["camera"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "edge_end_to_end_latency_ms",
            "Capture to PLC acknowledgement, milliseconds.",
            ["camera"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "edge_stage_latency_ms",
            "Per-stage latency, milliseconds.",
            ["stage"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("edge_queue_depth", "Frames waiting for inference.", registry=r)
        self.inflight = Gauge("edge_inflight_frames", "Frames not yet decided.", registry=r)
        self.plc_pending = Gauge(
            "edge_plc_pending_requests",
            "PLC requests waiting for the connection (EDF queue).",
            registry=r,
        )
        self.batch_size = Histogram(
            "edge_batch_size",
            "Frames per inference batch.",
            buckets=(1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.component_up = Gauge(
            "edge_component_up", "1 when the component is healthy.", ["component"], registry=r
        )
        self.spool_rejected = Counter(
            "edge_spool_rejected_total",
            "Events the spool could not accept (full or broken); the PLC verdict was unaffected.",
            registry=r,
        )
        self.loop_lag = Histogram(
            "edge_event_loop_lag_ms",
            "How late the event loop runs a timer (it keeps every deadline guard).",
            buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.gc_pause = Histogram(
            "edge_gc_pause_ms",
            "How long each garbage collection of the daemon process held the GIL.",
            ["generation"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 250),
            registry=r,
        )
        ProcessCollector(registry=r)
        self.heartbeat = Gauge("edge_plc_heartbeat", "Last heartbeat value written.", registry=r)
        self.alarms = Gauge(
            "edge_plc_alarm_word", "Alarm bits last written to the PLC.", registry=r
        )


class SnapshotCollector(Collector):
    """Counters and gauges read at scrape time from state the daemon already keeps.

    Camera workers, the spool and the inference pool count in their own objects (their threads
    or processes own them); turning those totals into Prometheus counters at scrape time costs the
    frame path nothing and can never drift from the source. `read()` runs on the HTTP thread and
    must only read snapshots.
    """

    def __init__(self, read: Callable[[], Iterable[Sample]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        try:
            samples = list(self._read())
        except Exception:  # a scrape must never take anything down
            return []
        for s in samples:
            fam = families.get(s.name)
            if fam is None:
                fam = (
                    CounterMetricFamily(s.name, s.help, labels=list(s.labels))
                    if s.kind == "counter"
                    else GaugeMetricFamily(s.name, s.help, labels=list(s.labels))
                )
                families[s.name] = fam
            fam.add_metric(list(s.labels.values()), s.value)
        return list(families.values())

    def describe(self) -> Iterable[Metric]:
        return []


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    """Family name; counters without the ``_total`` suffix (prometheus_client adds it)."""
    kind: str
    """"counter" or "gauge"."""
    help: str
    labels: dict[str, str]
    value: float
