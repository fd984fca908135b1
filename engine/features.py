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

from .knob_space import KNOB_TABLES, LIMIT_KNOBS, knob_position
from .knobs import ATTENTION_KERNELS

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
    ("iteration_vs_tpot", -1.0, 1.0, "recent iteration time / TPOT SLO, log2 ratio / 4"),
    ("slo_attainment", 0.0, 1.0, "recent share of requests meeting both SLOs"),
    ("tokens_per_s", 0.0, 2.0, "generated tokens/s, log1p(x)/log1p(1e6)"),
    ("busy_frac", 0.0, 1.0, "share of recent wall time spent executing"),
    ("memory_headroom", 0.0, 1.0, "free / capacity of device memory"),
    ("fragmentation", 0.0, 1.0, "inactive split bytes / capacity"),
    ("recent_ooms", 0.0, 1.0, "OOM events, moving average per iteration"),
    ("recent_retries", 0.0, 1.0, "allocator retries, moving average per iteration (capped)"),
    ("oom_backoff", 0.0, 1.0, "scheduler's batch-limit shrink after OOMs (1 = none)"),
)
# The card's speed (engine.card): the reference decode step per attention kernel, probed
# once when the engine starts. Without it a slower iteration reads the same whether the
# load grew or the card is slow, and the policy picked the other card's kernel.
CARD_FEATURES: tuple[tuple[str, float, float, str], ...] = tuple(
    (f"card_decode_{kernel}", -1.0, 1.0, "reference decode step / TPOT SLO, log2 ratio / 4 (1: cannot run)")
    for kernel in ATTENTION_KERNELS
)
# The knobs in force: ordinal knobs as their position in the table, categorical ones one-hot.
_ORDINAL = ("max_num_seqs", "max_batched_tokens", "cuda_graphs", "reclaim")
_LIMIT_MEANING = "log(limit / low) / log(high / low) over the table's range (low {}, high {})"
KNOB_FEATURES: tuple[tuple[str, float, float, str], ...] = tuple(
    (f"knob_{name}", 0.0, 1.0, _LIMIT_MEANING.format(min(values), max(values)))
    if name in LIMIT_KNOBS
    else (f"knob_{name}", 0.0, 1.0, "0/1")
    if name in _ORDINAL
    else (f"knob_{name}={v}", 0.0, 1.0, "one-hot")
    for name, values in KNOB_TABLES
    for v in ((None,) if name in _ORDINAL else values)
)
FEATURES: tuple[tuple[str, float, float, str], ...] = BASE_FEATURES + CARD_FEATURES + KNOB_FEATURES
# The limits lead the knob tables, so the knob features are the limits', then the rest's.
assert tuple(name for name, _ in KNOB_TABLES[: len(LIMIT_KNOBS)]) == LIMIT_KNOBS
_LIMIT_TABLES = KNOB_TABLES[: len(LIMIT_KNOBS)]
_CATEGORICAL_TABLES = KNOB_TABLES[len(LIMIT_KNOBS) :]
FEATURE_NAMES: tuple[str, ...] = tuple(f[0] for f in FEATURES)
LOW = np.array([f[1] for f in FEATURES], dtype=np.float32)
HIGH = np.array([f[2] for f in FEATURES], dtype=np.float32)
_NEUTRAL = np.clip(np.zeros(len(FEATURES), dtype=np.float32), LOW, HIGH)


def _log_ratio(x: float, ref: float) -> float:
    if x <= 0.0:
        return -1.0
    return math.log2(x / ref) / 4.0


# |x| from which a float64 rounds to an infinite float32 (2**128 - 2**103).
_F32_OVERFLOW = 3.4028235677973366e38
_BASE_BOUNDS = tuple((float(lo), float(hi)) for _, lo, hi, _ in BASE_FEATURES)


class ObservationBuilder:
    """Builds the observation vector from a live engine.

    The base features are finished as Python floats (clipped, non-finite ones replaced)
    and the knob features are computed once per knob setting, so one array is made per
    observation: the same values as building a float64 buffer, casting it to float32,
    replacing non-finite entries and clipping, at a fraction of the numpy calls.
    """

    def __init__(self) -> None:
        self.dim = len(FEATURES)
        self._knobs: object = None
        self._knob_values: list[float] = []
        # the categorical knobs' features, per setting (a handful): the limits move every
        # decision and are two logs, so they are not part of the key
        self._categorical_cache: dict[tuple[object, ...], list[float]] = {}
        self.nonfinite = 0  # readings replaced because they were NaN or infinite
        self._card: tuple[object, float] | None = None  # (engine.card, TPOT SLO) of _card_values
        self._card_values: list[float] = []
        self._card_nonfinite = 0

    def _knob_features(self, knobs: object) -> list[float]:
        limits = [knob_position(name, getattr(knobs, name)) / (len(values) - 1) for name, values in _LIMIT_TABLES]
        key = tuple(getattr(knobs, name) for name, _ in _CATEGORICAL_TABLES)
        categorical = self._categorical_cache.get(key)
        if categorical is None:
            categorical = self._categorical_cache[key] = []
            for name, values in _CATEGORICAL_TABLES:
                pos = knob_position(name, getattr(knobs, name))
                if name in _ORDINAL:
                    categorical.append(pos / (len(values) - 1))
                else:
                    one_hot = [0.0] * len(values)
                    one_hot[int(pos)] = 1.0
                    categorical += one_hot
        return limits + categorical

    def _card_features(self, card: dict[str, float | None], tpot_s: float) -> tuple[list[float], int]:
        """The card features and how many readings were not usable (NaN, <= 0)."""
        values, bad = [], 0
        for kernel in ATTENTION_KERNELS:
            ms = card.get(kernel)
            if ms is None or ms == math.inf:  # the device cannot run this kernel (or not in memory)
                values.append(1.0)
            elif not (math.isfinite(ms) and ms > 0):
                bad += 1
                values.append(0.0)
            else:
                values.append(min(1.0, max(-1.0, _log_ratio(ms / 1e3, tpot_s))))
        return values, bad

    def build(self, engine: Engine) -> np.ndarray:
        if engine.card is None:
            raise RuntimeError("the engine did not probe the card (EngineConfig.probe_card=False): nothing to observe")
        sched, tel, mem, slo = engine.scheduler, engine.telemetry, engine.memory_reading, engine.config.slo
        waiting = sched.waiting
        head_wait = engine.now_s - waiting[0].arrival_s if waiting else 0.0
        cap = mem.capacity_bytes
        base = [
            math.log1p(sched.queued) / _LOG_QUEUE,
            math.log1p(max(0, sched.queued_tokens)) / _LOG_TOKENS,
            math.log1p(max(0.0, tel.rate_short)) / _LOG_RATE,
            math.log1p(max(0.0, tel.rate_long)) / _LOG_RATE,
            sched.num_running / max(1, sched.capacity.max_slots),
            _log_ratio(head_wait, slo.ttft_s),
            _log_ratio(tel.ttft_avg_s, slo.ttft_s),
            _log_ratio(tel.tpot_avg_s, slo.tpot_s),
            _log_ratio(tel.iteration_avg_s, slo.tpot_s),
            tel.slo_avg,
            math.log1p(max(0.0, tel.tokens_per_s)) / _LOG_TPS,
            tel.busy_frac,
            mem.headroom_frac,
            mem.fragmentation_bytes / cap if cap > 0 else 0.0,
            tel.oom_recent,
            tel.retry_recent,
            sched.oom_backoff,
        ]
        for i, (lo, hi) in enumerate(_BASE_BOUNDS):
            v = base[i]
            if not -_F32_OVERFLOW < v < _F32_OVERFLOW:  # NaN, infinite, or infinite as a float32
                self.nonfinite += 1
                base[i] = float(_NEUTRAL[i])
            elif v < lo:
                base[i] = lo
            elif v > hi:
                base[i] = hi
        card = self._card
        if card is None or card[0] is not engine.card or card[1] != slo.tpot_s:
            self._card = (engine.card, slo.tpot_s)
            self._card_values, self._card_nonfinite = self._card_features(engine.card, slo.tpot_s)
        # counted at every build, as the base features are: the guard falls back while any is bad
        self.nonfinite += self._card_nonfinite
        knobs = engine.knobs
        if knobs is not self._knobs:
            self._knobs, self._knob_values = knobs, self._knob_features(knobs)
        return np.array(base + self._card_values + self._knob_values, dtype=np.float32)
