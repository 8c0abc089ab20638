"""Prometheus metrics of the gateway, named like vLLM's with a `chatserve:` prefix so existing dashboards
adapt in minutes. One registry per app (no module globals). Worker gauges (running, waiting, KV-cache
use, prefix-cache hit rate) are read from the controller's status at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("chatserve:requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("chatserve:prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cached_tokens = Counter("chatserve:prompt_tokens_cached", "Prompt tokens served from the prefix cache",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("chatserve:generation_tokens", "Generated tokens", ["model"], registry=r)
        self.ttft = Histogram("chatserve:time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("chatserve:inter_token_latency_seconds", "Time between streamed deltas", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("chatserve:e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        labels = ["model", "worker"]
        self.running = Gauge("chatserve:num_requests_running", "Sequences in the engine's running batch", labels,
                             registry=r)
        self.waiting = Gauge("chatserve:num_requests_waiting", "Sequences waiting for admission", labels, registry=r)
        self.kv_usage = Gauge("chatserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use", labels,
                              registry=r)
        self.prefix_hit_rate = Gauge("chatserve:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                                     "prompt tokens", labels, registry=r)
        self.throughput = Gauge("chatserve:generation_tokens_per_second", "Recent output throughput", labels,
                                registry=r)

    def observe_request(self, model: str, ttft: float | None, itls: list[float], e2e: float, prompt: int,
                        completion: int, cached: int) -> None:
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        for gap in itls:
            self.itl.labels(model).observe(gap)
        self.e2e.labels(model).observe(e2e)
        self.prompt_tokens.labels(model).inc(prompt)
        self.cached_tokens.labels(model).inc(cached)
        self.generation_tokens.labels(model).inc(completion)

    def set_workers(self, status: dict) -> None:
        for gauge in (self.running, self.waiting, self.kv_usage, self.prefix_hit_rate, self.throughput):
            gauge.clear()
        for w in status.get("workers", []):
            load = w.get("load", {})
            for model in w.get("models", []):
                key = (model, w.get("worker_id", "?"))
                self.running.labels(*key).set(load.get("num_running", 0))
                self.waiting.labels(*key).set(load.get("num_waiting", 0))
                self.kv_usage.labels(*key).set(load.get("kv_cache_usage", 0.0))
                self.prefix_hit_rate.labels(*key).set(load.get("prefix_cache_hit_rate", 0.0))
                self.throughput.labels(*key).set(load.get("tokens_per_second", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
