"""Prometheus metrics for /metrics, named like vLLM's with the `xllm:` prefix.

Engine-side numbers (running/waiting requests, KV-cache blocks, prefix-cache hit rate, token
counters) are read from `engine.stats()` when Prometheus scrapes, through a custom collector,
so they can never drift from the engine's own bookkeeping. Latencies are per request and only
the server sees a request's arrival, so the TTFT, time-per-output-token and end-to-end
histograms are observed here. Each app gets its own `CollectorRegistry` so that two servers (or
tests) in one process never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from xllm.engine.kv_handoff import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from xllm.engine.kv_handoff import HandoffStats
    from xllm.service.engine_client import EngineClient

# vLLM's buckets, so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS_S = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class EngineStatsCollector(Collector):
    """Reads `engine.stats()` at scrape time; yields nothing while the model is still loading."""

    def __init__(
        self, get_engine: Callable[[], EngineClient | None], get_model_name: Callable[[], str]
    ) -> None:
        self._get_engine = get_engine
        self._get_model_name = get_model_name

    def describe(self) -> list[Metric]:
        # An empty description keeps the registry from calling collect() at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        engine = self._get_engine()
        if engine is None:
            return
        s = engine.stats()
        labels = ["model_name"]
        values = [self._get_model_name()]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value))
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(value))
            return c

        used, total = int(s.kv_blocks_used), int(s.kv_blocks_total)
        yield gauge("xllm:num_requests_running", "Number of requests in the running batch.", s.num_running)
        yield gauge("xllm:num_requests_waiting", "Number of requests waiting to be scheduled.", s.num_waiting)
        yield gauge(
            "xllm:kv_cache_usage_perc",
            "KV-cache usage, 1 means all blocks used.",
            used / total if total else 0.0,
        )
        yield gauge("xllm:kv_cache_blocks_used", "KV-cache blocks in use.", used)
        yield gauge("xllm:kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield gauge(
            "xllm:prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache.",
            s.prefix_cache_hit_rate,
        )
        yield counter("xllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("xllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter(
            "xllm:num_preemptions", "Requests preempted to free KV-cache blocks.", s.num_preemptions
        )
        yield counter(
            "xllm:num_failed_steps",
            "Model steps that raised (their requests failed; a run of them stops the engine).",
            s.num_failed_steps,
        )
        yield counter(
            "xllm:spec_decode_num_draft_tokens",
            "Speculative decoding: guessed tokens verified.",
            s.spec_draft_tokens,
        )
        yield counter(
            "xllm:spec_decode_num_accepted_tokens",
            "Speculative decoding: guessed tokens kept.",
            s.spec_accepted_tokens,
        )
        yield from self._kv_transfer(s.kv_transfer, labels, values)
        # 1 once the engine has stopped for good (a device fault or too many failed steps in a
        # row): /health answers 503 and `xllm serve` is about to exit with status 1.
        yield gauge(
            "xllm:engine_dead",
            "1 if the engine has stopped and cannot serve.",
            1.0 if engine.errored else 0.0,
        )

    @staticmethod
    def _kv_transfer(t: HandoffStats | None, labels: list[str], values: list[str]) -> Iterator[Metric]:
        """Prefill/decode hand-off: transfers, bytes, blocks, failures by reason, latency."""
        if t is None:
            return
        for name, doc, sent, received in (
            ("xllm:kv_transfers", "KV transfers completed, by direction.", t.sends, t.receives),
            ("xllm:kv_transfer_bytes", "KV bytes transferred, by direction.", t.bytes_sent, t.bytes_received),
            (
                "xllm:kv_transfer_blocks",
                "KV blocks transferred, by direction.",
                t.blocks_sent,
                t.blocks_received,
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=[*labels, "direction"])
            c.add_metric([*values, "sent"], float(sent))
            c.add_metric([*values, "received"], float(received))
            yield c
        failures = CounterMetricFamily(
            "xllm:kv_transfer_failures",
            "KV transfers that failed, by reason (a failed receive is prefilled locally).",
            labels=[*labels, "reason"],
        )
        for reason, count in sorted(t.failures.items()):
            failures.add_metric([*values, reason], float(count))
        yield failures
        expired = CounterMetricFamily(
            "xllm:kv_holds_expired", "Prompt KV held for a decode instance that never asked.", labels=labels
        )
        expired.add_metric(values, float(t.holds_expired))
        yield expired
        for name, doc, value in (
            ("xllm:kv_holds", "Prompt KV held now for decode instances.", t.held),
            ("xllm:kv_receives_pending", "Requests waiting for their prompt KV now.", t.receiving),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value))
            yield g
        h = HistogramMetricFamily(
            "xllm:kv_transfer_receive_seconds", "Time to receive a request's prompt KV.", labels=labels
        )
        bounds = [*(str(b) for b in LATENCY_BUCKETS_S), "+Inf"]
        h.add_metric(
            values, list(zip(bounds, (float(c) for c in t.latency_buckets), strict=True)), t.latency_sum_s
        )
        yield h


class ServiceMetrics:
    """The registry of one app and the per-request instruments the handlers observe."""

    def __init__(
        self, get_engine: Callable[[], EngineClient | None], get_model_name: Callable[[], str]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineStatsCollector(get_engine, get_model_name))
        self._get_model_name = get_model_name
        self.ttft = Histogram(
            "xllm:time_to_first_token_seconds",
            "Time to first token.",
            ["model_name"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "xllm:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ["model_name"],
            buckets=TPOT_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "xllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            ["model_name"],
            buckets=E2E_BUCKETS_S,
            registry=self.registry,
        )
        self.request_success = Counter(
            "xllm:request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "xllm:http_requests",
            "HTTP requests answered, by status code.",
            ["status"],
            registry=self.registry,
        )

    def observe_request(
        self, *, ttft_s: float | None, e2e_s: float, num_generated: int, finish_reasons: list[str]
    ) -> None:
        name = self._get_model_name()
        if ttft_s is not None:
            self.ttft.labels(name).observe(ttft_s)
            if num_generated > 1:
                self.tpot.labels(name).observe((e2e_s - ttft_s) / (num_generated - 1))
        self.e2e.labels(name).observe(e2e_s)
        for reason in finish_reasons:
            self.request_success.labels(name, reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
