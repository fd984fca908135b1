"""What the engine measures each iteration, kept cheap enough to read every step.

Moving averages are updated in O(1) per event; percentiles are computed once, from the
requests themselves, when a summary is asked for.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .executor import MemoryReading
from .request import Request, RequestState

SHORT_TAU_S = 5.0  # arrival-rate averages: a burst shows within seconds...
LONG_TAU_S = 60.0  # ...against the minute-scale trend
EVENT_ALPHA = 0.1  # per-request averages (TTFT, TPOT, SLO attainment)


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets. A request meets its SLO when both hold (DistServe's goodput)."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number, got {v!r}")


@dataclass(slots=True)
class IterationStats:
    """One iteration as the environment and the reports see it."""

    now_s: float
    ms: float
    switch_ms: float
    prefill_seqs: int
    prefill_tokens: int
    decode_seqs: int
    arrivals: int
    finished: int
    finished_ok: int
    rejected: int
    queue_len: int
    queued_tokens: int
    running: int
    oom: bool
    memory: MemoryReading


@dataclass(slots=True)
class Telemetry:
    """Running averages over the live workload, updated as events happen."""

    slo: SLO
    rate_short: float = 0.0
    rate_long: float = 0.0
    ttft_avg_s: float = 0.0
    tpot_avg_s: float = 0.0
    iteration_avg_s: float = 0.0
    slo_avg: float = 1.0
    tokens_per_s: float = 0.0
    busy_frac: float = 0.0
    ooms: int = 0
    oom_recent: float = 0.0
    retry_recent: float = 0.0
    fallbacks: int = 0
    _last_retries: int = 0
    _last_s: float = 0.0
    _seen_ttft: bool = False
    _seen_tpot: bool = False
    iterations: int = 0
    tokens_total: int = 0
    switch_ms_total: float = 0.0
    switch_counts: Counter[str] = field(default_factory=Counter)

    def on_interval(self, now_s: float, arrivals: int, tokens: int, busy_s: float) -> None:
        """Fold one interval (since the last call) into the time-based averages."""
        dt = now_s - self._last_s
        self._last_s = now_s
        self.tokens_total += tokens
        if dt <= 0:
            return
        a_s = 1.0 - math.exp(-dt / SHORT_TAU_S)
        a_l = 1.0 - math.exp(-dt / LONG_TAU_S)
        inst = arrivals / dt
        self.rate_short += a_s * (inst - self.rate_short)
        self.rate_long += a_l * (inst - self.rate_long)
        self.tokens_per_s += a_s * (tokens / dt - self.tokens_per_s)
        self.busy_frac += a_s * (min(1.0, busy_s / dt) - self.busy_frac)

    def count_retries_from(self, retries_total: int) -> None:
        """Count allocator retries from this cumulative reading on (set-up work is not load)."""
        self._last_retries = retries_total

    def on_iteration(self, oom: bool, retries_total: int, ms: float = 0.0) -> None:
        """Per-iteration moving averages of OOMs, allocator retries and iteration time (the
        batch latency every running request sees now, where TPOT reports it only as requests
        finish)."""
        self.iteration_avg_s += EVENT_ALPHA * (ms / 1e3 - self.iteration_avg_s)
        new_retries = max(0, retries_total - self._last_retries)
        self._last_retries = retries_total
        self.oom_recent += EVENT_ALPHA * (float(oom) - self.oom_recent)
        self.retry_recent += EVENT_ALPHA * (min(1.0, float(new_retries)) - self.retry_recent)

    def on_first_token(self, ttft_s: float) -> None:
        if not self._seen_ttft:
            self.ttft_avg_s, self._seen_ttft = ttft_s, True
        else:
            self.ttft_avg_s += EVENT_ALPHA * (ttft_s - self.ttft_avg_s)

    def on_finish(self, request: Request) -> bool:
        tpot = request.tpot_s
        if not self._seen_tpot:
            self.tpot_avg_s, self._seen_tpot = tpot, True
        else:
            self.tpot_avg_s += EVENT_ALPHA * (tpot - self.tpot_avg_s)
        ok = request.ttft_s <= self.slo.ttft_s and tpot <= self.slo.tpot_s
        self.slo_avg += EVENT_ALPHA * (float(ok) - self.slo_avg)
        return ok

    def on_reject(self) -> None:
        self.slo_avg += EVENT_ALPHA * (0.0 - self.slo_avg)


def percentile_ms(values_s: np.ndarray, q: float) -> float:
    return float(np.percentile(values_s, q) * 1e3) if values_s.size else math.nan


def summarise(requests: list[Request], slo: SLO, duration_s: float) -> dict[str, float | int]:
    """Goodput, attainment and latency percentiles over a finished replay.

    SLO attainment is over every arrival: a request still queued or rejected has not
    met its SLO, so overload cannot hide in the denominator.
    """
    done = [r for r in requests if r.state == RequestState.DONE]
    ttft = np.fromiter((r.ttft_s for r in done), float, len(done))
    tpot = np.fromiter((r.tpot_s for r in done if r.output_len > 1), float)
    ok = sum(1 for r in done if r.ttft_s <= slo.ttft_s and r.tpot_s <= slo.tpot_s)
    tokens = sum(r.output_len for r in done)
    duration_s = max(duration_s, 1e-9)
    counts = {s: 0 for s in RequestState}
    for r in requests:
        counts[r.state] += 1
    return {
        "arrived": len(requests),
        "completed": counts[RequestState.DONE],
        "queued": counts[RequestState.WAITING],
        "running": counts[RequestState.RUNNING],
        "rejected": counts[RequestState.REJECTED],
        "met_slo": ok,
        "goodput_rps": ok / duration_s,
        "throughput_rps": len(done) / duration_s,
        "slo_attainment": ok / len(requests) if requests else math.nan,
        "ttft_p50_ms": percentile_ms(ttft, 50),
        "ttft_p99_ms": percentile_ms(ttft, 99),
        "tpot_p50_ms": percentile_ms(tpot, 50),
        "tpot_p99_ms": percentile_ms(tpot, 99),
        "e2e_p50_ms": percentile_ms(np.fromiter((r.e2e_s for r in done), float, len(done)), 50),
        "tokens_per_s": tokens / duration_s,
        "duration_s": duration_s,
    }
