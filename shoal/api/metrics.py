from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shoal.coordinator.coordinator import Coordinator

LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGES = ("admission", "scheduling", "queue", "prefill", "decode")


class Metrics:
    """Prometheus metrics of one server; engine gauges come from the workers' heartbeats at scrape time."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.finished = Counter("shoal_requests", "Finished generations", ["finish_reason"], registry=r)
        self.states = Gauge("shoal_requests_in_state", "Generations in flight by state", ["state"], registry=r)
        self.queue_depth = Gauge("shoal_queue_depth", "Jobs waiting in the coordinator and in engines", registry=r)
        self.ttft = Histogram("shoal_time_to_first_token_seconds", "Time to first token", buckets=LATENCY, registry=r)
        self.itl = Histogram("shoal_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY, registry=r)
        self.e2e = Histogram("shoal_e2e_request_latency_seconds", "Request latency", buckets=LATENCY, registry=r)
        self.stage = Histogram("shoal_request_stage_seconds", "Latency budget by stage", ["stage"], buckets=LATENCY,
                               registry=r)
        self.prompt_tokens = Counter("shoal_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("shoal_cached_prompt_tokens", "Prompt tokens served from cache", registry=r)
        self.generated = Counter("shoal_generation_tokens", "Generated tokens", registry=r)
        self.rate_limited = Counter("shoal_rate_limited", "Requests refused by fair use", ["limit"], registry=r)
        self.hit_rate = Gauge("shoal_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache", registry=r)
        self.kv_usage = Gauge("shoal_kv_cache_usage", "Fraction of KV blocks in use", registry=r)
        self.plan_runs = Counter("shoal_plan_runs", "Plan requests by outcome (ok, error)", ["outcome"], registry=r)
        self.plan_latency = Histogram("shoal_plan_latency_seconds", "Plan request latency", buckets=LATENCY,
                                      registry=r)
        self.plan_late = Counter("shoal_plan_late_completions", "Plan node results that landed after their deadline "
                                 "and were discarded", registry=r)
        self.kv_disk = Gauge("shoal_kv_disk", "The prefix cache's disk tier, summed over workers: hits, misses, "
                             "saves by reason, dropped saves, evictions, corrupt files, bytes, load and save times",
                             ["stat"], registry=r)

    def observe_done(self, stats: dict | None, finish_reason: str, budget: dict[str, float]) -> None:
        self.finished.labels(finish_reason).inc()
        for stage in STAGES:
            if f"{stage}_ms" in budget:
                self.stage.labels(stage).observe(budget[f"{stage}_ms"] / 1000)
        if stats:
            self.prompt_tokens.inc(stats["prompt_tokens"])
            self.cached_tokens.inc(stats["cache_delta"]["read"])
            self.generated.inc(stats["completion_tokens"])

    def render(self, coordinator: Coordinator) -> bytes:
        snap = coordinator.snapshot()
        for state in ("QUEUED", "SCHEDULED", "ACTIVE"):
            self.states.labels(state).set(snap["jobs"].get(state, 0))
        engines = [w["engine"] for w in snap["workers"].values() if w["engine"]]
        self.queue_depth.set(snap["queued"] + sum(e["pending_len"] for e in engines))
        if engines:
            self.hit_rate.set(sum(e["prefix_cache_hit_rate"] for e in engines) / len(engines))
            used = sum(e["kv_blocks_used"] for e in engines)
            self.kv_usage.set(used / max(1, used + sum(e["kv_blocks_free"] for e in engines)))
        for stat in {k for e in engines for k in e.get("kv_disk", {})}:
            self.kv_disk.labels(stat).set(sum(e.get("kv_disk", {}).get(stat, 0) for e in engines))
        return generate_latest(self.registry)
