"""What `GET /metrics` reports, in Prometheus' text format (prometheus-client, one registry per server)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from engine.events import Stats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_FIRST_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class HotHistogram:
    """A histogram observed once per token of every stream, on the event loop's thread alone: plain counts, which
    become Prometheus' histogram when scraped (prometheus-client's `observe` takes a lock and walks its buckets,
    several microseconds a token). Scrapes run on the same thread, so nothing is locked."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.bounds = name, documentation, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), float(total)))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class Metrics:
    """The server's counters, histograms and gauges. The gauges read the bridge's state when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter(
            "codellama_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.finished = Counter(
            "codellama_sequences_finished", "Generated sequences by how they ended", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("codellama_prompt_tokens", "Prompt tokens of finished sequences", registry=r)
        self.generation_tokens = Counter("codellama_generation_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter(
            "codellama_prefix_cache_hits", "Sequences that found part of their prompt cached", registry=r
        )
        self.cache_hit_tokens = Counter(
            "codellama_prefix_cache_hit_tokens",
            "Prompt tokens taken from the prefix cache instead of prefilled",
            registry=r,
        )
        self.ttft = Histogram(
            "codellama_time_to_first_token_seconds",
            "From a request's acceptance (its prompt checked) to its first text",
            buckets=_FIRST_S,
            registry=r,
        )
        self.itl = HotHistogram(
            "codellama_inter_token_latency_seconds", "Between two pieces of one sequence's text", _LATENCY_S, r
        )
        self.running = Gauge(
            "codellama_requests_running", "Requests generating (with a sequence in the engine)", registry=r
        )
        self.waiting = Gauge(
            "codellama_requests_waiting", "Requests queued, none of their sequences in the engine yet", registry=r
        )
        self.slots_in_use = Gauge("codellama_kv_slots_in_use", "KV-cache slots held by running sequences", registry=r)
        self.slots = Gauge("codellama_kv_slots", "KV-cache slots (--instance-num)", registry=r)

    def watch(
        self, running: Callable[[], int], waiting: Callable[[], int], slots_in_use: Callable[[], int], slots: int
    ) -> None:
        """Read the gauges from the bridge at each scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.slots_in_use.set_function(slots_in_use)
        self.slots.set(slots)

    def sequence_done(self, reason: str, stats: Stats | None) -> None:
        self.finished.labels(reason).inc()
        if stats is None:
            return
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        if stats.cached_tokens:
            self.cache_hits.inc()
            self.cache_hit_tokens.inc(stats.cached_tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)
