"""Prometheus metrics: gemrun's counters and histograms, the engine's gauges and the prefix cache, with vLLM's
gauge names beside them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


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
        yield CounterMetricFamily("gemrun_requests", "Generation requests accepted", value=c.requests if c else 0)
        done = CounterMetricFamily("gemrun_requests_finished", "Requests finished, by reason", labels=["reason"])
        for reason, count in (c.finished.items() if c else ()):
            done.add_metric([reason], count)
        yield done
        yield CounterMetricFamily("gemrun_prompt_tokens", "Prompt tokens prefilled", value=c.prompt_tokens if c else 0)
        yield CounterMetricFamily("gemrun_generated_tokens", "Tokens generated",
                                  value=c.generated_tokens if c else 0)
        yield CounterMetricFamily("gemrun_draft_tokens", "Speculative decoding: tokens drafted",
                                  value=c.drafted_tokens if c else 0)
        yield CounterMetricFamily("gemrun_draft_accepted_tokens", "Speculative decoding: drafted tokens accepted",
                                  value=c.accepted_tokens if c else 0)
        rate = c.accepted_tokens / c.drafted_tokens if c and c.drafted_tokens else 0.0
        yield GaugeMetricFamily("gemrun_draft_acceptance_rate", "Accepted / drafted tokens since start", value=rate)
        yield GaugeMetricFamily("gemrun_requests_running", "Sequences in the batch",
                                value=engine.running if engine else 0)
        yield GaugeMetricFamily("gemrun_queue_depth", "Requests waiting for a batch slot",
                                value=engine.queue_depth if engine else 0)
        pool = engine.pool if engine else None
        yield CounterMetricFamily("gemrun_prefix_cache_hits", "Requests that reused cached KV of a prefix",
                                  value=pool.hits if pool else 0)
        yield CounterMetricFamily("gemrun_prefix_cache_misses", "Requests that found no reusable prefix",
                                  value=pool.misses if pool else 0)
        yield CounterMetricFamily("gemrun_prefix_cache_reused_tokens", "Prompt tokens not prefilled again",
                                  value=pool.reused_tokens if pool else 0)
        yield GaugeMetricFamily("gemrun_prefix_cache_bytes", "KV cache bytes kept for prefix reuse",
                                value=pool.nbytes if pool else 0)
        yield GaugeMetricFamily("gemrun_kv_cache_bytes", "KV cache bytes held by sequences in flight",
                                value=engine.cache_bytes if engine else 0)
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
