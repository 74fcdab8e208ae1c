"""``/metrics`` in Prometheus' text format (prometheus_client), read off the engine's counters.

``loramux_decode_steps_total`` and ``loramux_step_sequences_total`` are the direct measure of
mixed batching: their ratio is the mean number of sequences (requests, with whatever mixes) per
``llama_decode``.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (metric name, EngineStats field, help): counters
ENGINE_COUNTERS = (
    ("loramux_decode_steps", "steps", "llama_decode calls"),
    ("loramux_step_sequences", "step_sequences", "sequences summed over decode steps (divide by decode steps: sequences per decode)"),
    ("loramux_tokens_decoded", "tokens_decoded", "tokens fed to llama_decode (prompt and generated)"),
    ("loramux_tokens_generated", "tokens_generated", "tokens generated"),
    ("loramux_prompt_tokens", "prompt_tokens", "prompt tokens of admitted requests"),
    ("loramux_prefix_cache_hit_tokens", "prefix_hit_tokens", "prompt tokens whose K/V came from the prefix cache (same mix)"),
    ("loramux_requests_submitted", "submitted", "requests submitted to the engine"),
    ("loramux_requests_finished", "finished", "requests that finished"),
    ("loramux_requests_cancelled", "cancelled", "requests cancelled (client gone, or by the caller)"),
    ("loramux_requests_rejected", "rejected", "requests refused because the queue was full"),
    ("loramux_decode_seconds", "decode_seconds", "seconds spent in llama_decode"),
)


class HttpCounter:
    """HTTP responses by path and status (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter = Counter()

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.counts[(path, str(status))] += 1


class _Collector:
    def __init__(self, state: Any, extra: Iterable = ()) -> None:
        self.state = state
        self.extra = list(extra)

    def collect(self) -> Iterator:
        pool = self.state.pool
        if pool is not None:
            stats = pool.stats
            for name, attr, doc in ENGINE_COUNTERS:
                yield CounterMetricFamily(name, doc, value=float(getattr(stats, attr)))
            yield GaugeMetricFamily("loramux_step_sequences_max", "most sequences in one decode", value=stats.max_step_sequences)
            yield GaugeMetricFamily("loramux_requests_running", "requests decoding now", value=pool.running)
            yield GaugeMetricFamily("loramux_requests_waiting", "requests waiting for a sequence", value=pool.waiting)
            yield GaugeMetricFamily("loramux_adapters_loaded", "adapters loaded", value=len(pool.names))
        http = CounterMetricFamily("loramux_http_responses", "HTTP responses by path and status", labels=["path", "status"])
        with self.state.http._lock:
            for (path, status), n in sorted(self.state.http.counts.items()):
                http.add_metric([path, status], n)
        yield http
        yield from self.extra


def render(state: Any, extra: Iterable = ()) -> bytes:
    """The server's metrics over ``state``, and the metric families ``extra`` (a front end's own counters)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state, extra))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "HttpCounter", "render"]
