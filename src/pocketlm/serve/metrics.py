"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: no client library.

Series (all prefixed `pocketlm_`): requests_total{endpoint,status} counter; aborted_requests_total counter
(client disconnects); prompt_tokens_total and generated_tokens_total counters; queue_depth, active_slots,
slots gauges; time_to_first_token_seconds histogram (submit -> first sampled token); generation_tokens_per_second
gauge (tokens generated over the last 10 s / 10 s); engine_steps_total counter; prefix cache (when on):
prefix_cache_hit_tokens_total / prefix_cache_miss_tokens_total counters (prompt tokens whose keys/values were
reused / computed), prefix_cache_hit_rate gauge (hits over both), prefix_cache_blocks, prefix_cache_max_blocks,
prefix_cache_bytes gauges, prefix_cache_evictions_total counter; KV pool (when limited): kv_pool_tokens and
kv_pool_reserved_tokens gauges.
Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import collections
import threading
import time

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.aborts = 0
        self.prompt_tokens = 0
        self.generated = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_values: collections.deque[float] = collections.deque(maxlen=10000)  # for summaries in tests
        self._recent: collections.deque[float] = collections.deque()  # token timestamps in the rate window

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def aborted(self) -> None:
        with self._lock:
            self.aborts += 1

    def prompt(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def token(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated += 1
            self._recent.append(now)
            self._trim(now)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            i = next((k for k, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds
            self.ttft_values.append(seconds)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return len(self._recent) / RATE_WINDOW_S

    def render(self, engine_stats: dict) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            out = []

            def head(name, kind, help_):
                out.append(f"# HELP pocketlm_{name} {help_}")
                out.append(f"# TYPE pocketlm_{name} {kind}")

            head("requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'pocketlm_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            head("aborted_requests_total", "counter", "Requests stopped because the client disconnected.")
            out.append(f"pocketlm_aborted_requests_total {self.aborts}")
            head("prompt_tokens_total", "counter", "Prompt tokens admitted.")
            out.append(f"pocketlm_prompt_tokens_total {self.prompt_tokens}")
            head("generated_tokens_total", "counter", "Tokens generated.")
            out.append(f"pocketlm_generated_tokens_total {self.generated}")
            head("generation_tokens_per_second", "gauge", f"Tokens generated per second over the last "
                                                            f"{RATE_WINDOW_S:g} s.")
            out.append(f"pocketlm_generation_tokens_per_second {rate:.3f}")
            head("queue_depth", "gauge", "Sequences waiting for a slot.")
            out.append(f"pocketlm_queue_depth {engine_stats['waiting']}")
            head("active_slots", "gauge", "Sequences holding a KV slot (prefilling or decoding).")
            out.append(f"pocketlm_active_slots {engine_stats['active']}")
            head("slots", "gauge", "KV slots (most sequences decoded together).")
            out.append(f"pocketlm_slots {engine_stats['slots']}")
            head("engine_steps_total", "counter", "Scheduler steps (one batched decode each).")
            out.append(f"pocketlm_engine_steps_total {engine_stats['steps']}")
            if "prefix_hit_tokens" in engine_stats:
                for name, kind, key, help_ in (
                        ("prefix_cache_hit_tokens_total", "counter", "prefix_hit_tokens",
                         "Prompt tokens whose keys/values came from the prefix cache."),
                        ("prefix_cache_miss_tokens_total", "counter", "prefix_miss_tokens",
                         "Prompt tokens looked up in the prefix cache and computed."),
                        ("prefix_cache_blocks", "gauge", "prefix_blocks", "Blocks held by the prefix cache."),
                        ("prefix_cache_max_blocks", "gauge", "prefix_max_blocks",
                         "Most blocks the prefix cache holds."),
                        ("prefix_cache_bytes", "gauge", "prefix_bytes", "Memory of the prefix cache's blocks."),
                        ("prefix_cache_evictions_total", "counter", "prefix_evictions",
                         "Blocks evicted (least recently used) to make room.")):
                    head(name, kind, help_)
                    out.append(f"pocketlm_{name} {engine_stats[key]}")
                head("prefix_cache_hit_rate", "gauge", "Prefix cache hits over prompt tokens looked up (tokens).")
                out.append(f"pocketlm_prefix_cache_hit_rate {engine_stats['prefix_hit_rate']:.6f}")
            if engine_stats.get("kv_pool_tokens") is not None:
                head("kv_pool_tokens", "gauge", "KV positions the pool admits (prompt + max_tokens per sequence).")
                out.append(f"pocketlm_kv_pool_tokens {engine_stats['kv_pool_tokens']}")
                head("kv_pool_reserved_tokens", "gauge", "KV positions reserved by admitted sequences.")
                out.append(f"pocketlm_kv_pool_reserved_tokens {engine_stats['kv_reserved_tokens']}")
            head("time_to_first_token_seconds", "histogram", "Time from admission to the first sampled token.")
            cum = 0
            for b, n in zip(TTFT_BUCKETS, self.ttft_counts):
                cum += n
                out.append(f'pocketlm_time_to_first_token_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.ttft_counts[-1]
            out.append(f'pocketlm_time_to_first_token_seconds_bucket{{le="+Inf"}} {cum}')
            out.append(f"pocketlm_time_to_first_token_seconds_sum {self.ttft_sum:.6f}")
            out.append(f"pocketlm_time_to_first_token_seconds_count {cum}")
            return "\n".join(out) + "\n"
