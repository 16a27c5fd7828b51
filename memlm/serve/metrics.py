"""Prometheus metrics, named after vLLM's (`vllm:` becomes `memlm:`), plus memlm's memory counters:
evictions_total and latent_insertions_total. One registry per server, so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds) from vLLM's, cut to what a CPU serves.
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}
        names = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"memlm:{name}", doc, names, registry=registry).labels(**labels)

        def counter(name, doc):
            return Counter(f"memlm:{name}", doc, names, registry=registry).labels(**labels)

        def histogram(name, doc, buckets):
            return Histogram(f"memlm:{name}", doc, names, buckets=buckets, registry=registry).labels(**labels)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to join the batch.")
        self.kv_usage = gauge(
            "kv_cache_usage_perc", "Fraction of the KV cache in use (paged: blocks held of the pool's blocks)."
        )
        self.kv_blocks_used = gauge("kv_blocks_used", "KV blocks held by running requests (paged cache).")
        self.kv_blocks_total = gauge("kv_blocks_total", "KV blocks in the pool (paged cache).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).")
        self._prefix_seen = (0, 0)  # the pool's counters when last observed
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.evictions = counter("evictions", "KV-cache entries evicted by per-request policies.")
        self.insertions = counter("latent_insertions", "Latent-memory insertions (prompt and inference).")
        self._success = Counter(
            "memlm:request_success", "Finished requests, by finish reason.", [*names, "finished_reason"],
            registry=registry,
        )
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _TTFT)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's tokens.", _ITL)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _E2E)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to joining the running batch.", _E2E)

    def observe_engine(self, engine) -> None:
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        used, allocated = engine.kv_usage()
        self.kv_usage.set(used / allocated if allocated else 0.0)
        pool = engine.kv_pool
        if pool is not None:
            self.kv_blocks_used.set(pool.blocks_used)
            self.kv_blocks_total.set(pool.num_blocks)
            queries, hits = self._prefix_seen
            self.prefix_queries.inc(pool.queries - queries)
            self.prefix_hits.inc(pool.hits - hits)
            self._prefix_seen = (pool.queries, pool.hits)

    def first_token(self, request, now: float) -> None:
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.ttft.observe(now - request.arrival)
        if request.joined is not None:
            self.queue_time.observe(request.joined - request.arrival)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def step(self, delta) -> None:
        if delta.token_id is not None:
            self.generation_tokens.inc()
        if delta.evicted:
            self.evictions.inc(len(delta.evicted))
        if delta.inserted:
            self.insertions.inc()

    def finished(self, reason: str, request, now: float | None = None) -> None:
        self._success.labels(model_name=self.model_name, finished_reason=reason).inc()
        if request is not None and now is not None:
            self.e2e.observe(now - request.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
