"""The one observation builder, shared by the environment and the engine's embedded policy.

Training and serving must see the same features, so both call `ObservationBuilder.build`
on a live `Engine`; nothing else turns engine state into an observation. numpy only.

Every feature is normalised to a small range and clipped to its declared bounds; a
non-finite reading (NaN telemetry) is replaced by the feature's neutral value and
counted in `nonfinite`, so an observation is always finite and within bounds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .knob_space import KNOB_TABLES

if TYPE_CHECKING:
    from .engine import Engine

_LOG_QUEUE = math.log1p(1024.0)
_LOG_TOKENS = math.log1p(1e6)
_LOG_RATE = math.log1p(100.0)
_LOG_TPS = math.log1p(1e6)

# (name, low, high, meaning) — the environment's docstring renders this table.
BASE_FEATURES: tuple[tuple[str, float, float, str], ...] = (
    ("queue_len", 0.0, 2.0, "waiting requests, log1p(n)/log1p(1024)"),
    ("queued_tokens", 0.0, 2.0, "prompt tokens waiting, log1p(n)/log1p(1e6)"),
    ("arrival_rate_short", 0.0, 2.0, "arrivals/s, 5 s moving average, log1p(r)/log1p(100)"),
    ("arrival_rate_long", 0.0, 2.0, "arrivals/s, 60 s moving average, log1p(r)/log1p(100)"),
    ("running_frac", 0.0, 1.0, "running sequences / KV-cache slots"),
    ("head_wait_vs_ttft", -1.0, 1.0, "age of the oldest waiting request / TTFT SLO, log2 ratio / 4"),
    ("ttft_vs_slo", -1.0, 1.0, "recent TTFT / TTFT SLO, log2 ratio / 4"),
    ("tpot_vs_slo", -1.0, 1.0, "recent TPOT / TPOT SLO, log2 ratio / 4"),
    ("slo_attainment", 0.0, 1.0, "recent share of requests meeting both SLOs"),
    ("tokens_per_s", 0.0, 2.0, "generated tokens/s, log1p(x)/log1p(1e6)"),
    ("busy_frac", 0.0, 1.0, "share of recent wall time spent executing"),
    ("memory_headroom", 0.0, 1.0, "free / capacity of device memory"),
    ("fragmentation", 0.0, 1.0, "inactive split bytes / capacity"),
    ("recent_ooms", 0.0, 1.0, "OOM events, moving average per iteration"),
    ("recent_retries", 0.0, 1.0, "allocator retries, moving average per iteration (capped)"),
    ("oom_backoff", 0.0, 1.0, "scheduler's batch-limit shrink after OOMs (1 = none)"),
)
# The knobs in force: ordinal knobs as index/(n-1), categorical ones one-hot.
_ORDINAL = ("max_num_seqs", "max_batched_tokens", "cuda_graphs", "reclaim")
KNOB_FEATURES: tuple[tuple[str, float, float, str], ...] = tuple(
    (f"knob_{name}", 0.0, 1.0, "index / (n - 1) in the knob's table")
    if name in _ORDINAL
    else (f"knob_{name}={v}", 0.0, 1.0, "one-hot")
    for name, values in KNOB_TABLES
    for v in ((None,) if name in _ORDINAL else values)
)
FEATURES: tuple[tuple[str, float, float, str], ...] = BASE_FEATURES + KNOB_FEATURES
FEATURE_NAMES: tuple[str, ...] = tuple(f[0] for f in FEATURES)
LOW = np.array([f[1] for f in FEATURES], dtype=np.float32)
HIGH = np.array([f[2] for f in FEATURES], dtype=np.float32)
_NEUTRAL = np.clip(np.zeros(len(FEATURES), dtype=np.float32), LOW, HIGH)


def _log_ratio(x: float, ref: float) -> float:
    if x <= 0.0:
        return -1.0
    return math.log2(x / ref) / 4.0


class ObservationBuilder:
    """Builds the observation vector from a live engine into a preallocated buffer."""

    def __init__(self) -> None:
        self.dim = len(FEATURES)
        self._buf = np.zeros(self.dim, dtype=np.float64)
        self._knob_index = {
            name: {v: i for i, v in enumerate(values)} for name, values in KNOB_TABLES
        }
        self.nonfinite = 0  # readings replaced because they were NaN or infinite

    def build(self, engine: Engine) -> np.ndarray:
        b = self._buf
        sched, tel, mem, slo = engine.scheduler, engine.telemetry, engine.memory_reading, engine.config.slo
        b[0] = math.log1p(sched.queued) / _LOG_QUEUE
        b[1] = math.log1p(max(0, sched.queued_tokens)) / _LOG_TOKENS
        b[2] = math.log1p(max(0.0, tel.rate_short)) / _LOG_RATE
        b[3] = math.log1p(max(0.0, tel.rate_long)) / _LOG_RATE
        b[4] = sched.num_running / max(1, sched.capacity.max_slots)
        head_wait = engine.now_s - sched.waiting[0].arrival_s if sched.waiting else 0.0
        b[5] = _log_ratio(head_wait, slo.ttft_s)
        b[6] = _log_ratio(tel.ttft_avg_s, slo.ttft_s)
        b[7] = _log_ratio(tel.tpot_avg_s, slo.tpot_s)
        b[8] = tel.slo_avg
        b[9] = math.log1p(max(0.0, tel.tokens_per_s)) / _LOG_TPS
        b[10] = tel.busy_frac
        b[11] = mem.headroom_frac
        b[12] = mem.fragmentation_bytes / mem.capacity_bytes if mem.capacity_bytes > 0 else 0.0
        b[13] = tel.oom_recent
        b[14] = tel.retry_recent
        b[15] = sched.oom_backoff
        i = len(BASE_FEATURES)
        knobs = engine.knobs
        for name, values in KNOB_TABLES:
            idx = self._knob_index[name].get(getattr(knobs, name), 0)
            if name in _ORDINAL:
                b[i] = idx / (len(values) - 1)
                i += 1
            else:
                b[i : i + len(values)] = 0.0
                b[i + idx] = 1.0
                i += len(values)
        out = b.astype(np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            self.nonfinite += int(bad.sum())
            out[bad] = _NEUTRAL[bad]
        np.clip(out, LOW, HIGH, out=out)
        return out
