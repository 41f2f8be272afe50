"""Prometheus metrics: gemrun's counters and histograms, the engine's gauges and the prefix cache, with vLLM's
gauge names beside them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# (name, help, attribute) of the engine's counters and the prefix pool's, in the order /metrics lists them
ENGINE_COUNTERS = (("gemrun_prompt_tokens", "Prompt tokens prefilled", "prompt_tokens"),
                   ("gemrun_generated_tokens", "Tokens generated", "generated_tokens"),
                   ("gemrun_draft_tokens", "Speculative decoding: tokens drafted", "drafted_tokens"),
                   ("gemrun_draft_accepted_tokens", "Speculative decoding: drafted tokens accepted", "accepted_tokens"))
POOL_COUNTERS = (("gemrun_prefix_cache_hits", "Requests that reused cached KV of a prefix", "hits"),
                 ("gemrun_prefix_cache_misses", "Requests that found no reusable prefix", "misses"),
                 ("gemrun_prefix_cache_reused_tokens", "Prompt tokens not prefilled again", "reused_tokens"))


def _counter(name: str, text: str, source, attr: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=getattr(source, attr) if source else 0)


def _gauge(name: str, text: str, source, attr: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=getattr(source, attr) if source else 0)


class Metrics:
    """Prometheus metrics: HTTP counts by status and latency here; engine figures read at scrape time."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.http = Counter("gemrun_http_responses", "HTTP responses by status", ["status"], registry=self.registry)
        self.latency = Histogram("gemrun_request_seconds", "Time to the full response of generation requests",
                                 registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600))
        self.state = state
        self.registry.register(self)

    def collect(self):
        service = getattr(self.state, "service", None)
        engine = service.engine if service else None
        c = engine.counters if engine else None
        yield _counter("gemrun_requests", "Generation requests accepted", c, "requests")
        done = CounterMetricFamily("gemrun_requests_finished", "Requests finished, by reason", labels=["reason"])
        for reason, count in (c.finished.items() if c else ()):
            done.add_metric([reason], count)
        yield done
        for name, text, attr in ENGINE_COUNTERS:
            yield _counter(name, text, c, attr)
        rate = c.accepted_tokens / c.drafted_tokens if c and c.drafted_tokens else 0.0
        yield GaugeMetricFamily("gemrun_draft_acceptance_rate", "Accepted / drafted tokens since start", value=rate)
        yield _gauge("gemrun_requests_running", "Sequences in the batch", engine, "running")
        yield _gauge("gemrun_queue_depth", "Requests waiting for a batch slot", engine, "queue_depth")
        pool = engine.pool if engine else None
        for name, text, attr in POOL_COUNTERS:
            yield _counter(name, text, pool, attr)
        yield _gauge("gemrun_prefix_cache_bytes", "KV cache bytes kept for prefix reuse", pool, "nbytes")
        yield _gauge("gemrun_kv_cache_bytes", "KV cache bytes held by sequences in flight", engine, "cache_bytes")
        tps = c.generated_tokens / c.busy_seconds if c and c.busy_seconds else 0.0
        yield GaugeMetricFamily("gemrun_tokens_per_second", "Generated tokens per second of engine work", value=tps)
        yield from self.vllm_gauges(service)

    @staticmethod
    def vllm_gauges(service):
        """The gauges under vLLM's names, which routers and the Gateway API Inference Extension (llm-d) scrape to
        choose a replica. gemrun allocates KV per sequence, so the cache usage is the in-flight KV over the most
        the batch can hold: max_batch sequences at the full context."""
        engine, label = (service.engine, [service.name]) if service else (None, [""])
        usage = 0.0
        if engine is not None:
            model, context = service.runtime.model, service.runtime.max_context
            most = engine.max_batch * model.config.kv_cache_bytes(context, model.dtype.itemsize)
            usage = min(1.0, engine.cache_bytes / most) if most else 0.0
        for name, doc, value in (("vllm:num_requests_running", "Requests in the batch (vLLM's name)",
                                  engine.running if engine else 0),
                                 ("vllm:num_requests_waiting", "Requests waiting for a batch slot (vLLM's name)",
                                  engine.queue_depth if engine else 0),
                                 ("vllm:kv_cache_usage_perc", "KV cache in flight over the batch's full-context "
                                  "KV, 1 = 100% (vLLM's name)", usage)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(label, value)
            yield gauge

    def describe(self):
        return []
