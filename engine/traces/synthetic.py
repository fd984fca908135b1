"""Seeded synthetic workloads: Poisson, square-wave bursty and ramp arrivals (thinned
non-homogeneous Poisson processes) with lognormal prompt and output lengths."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .trace import MAX_TOKENS, Trace, TraceError

# Lognormal spreads fitted to the Azure 2023 conversation trace (p50 -> p90):
# prompt 1020 -> 2734 gives ln(2.68)/1.2816 = 0.77; output 129 -> 424 gives ln(3.29)/1.2816 = 0.93.
PROMPT_MEDIAN = 1000
OUTPUT_MEDIAN = 130
PROMPT_SIGMA = 0.77
OUTPUT_SIGMA = 0.93


MAX_REQUESTS = 10**8  # ~2.4 GB of arrays; real traces hold far fewer


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), 1, MAX_TOKENS).astype(np.int64)


def _check_positive(**kw: float) -> None:
    for k, v in kw.items():
        if not (math.isfinite(v) and v > 0):
            raise TraceError(f"{k} must be > 0 and finite, got {v}")


def _check_rate(**kw: float) -> None:
    for k, v in kw.items():
        if not (math.isfinite(v) and v >= 0):
            raise TraceError(f"{k} must be >= 0 and finite, got {v}")


def _synth(
    name: str,
    rate_fn: Callable[[np.ndarray], np.ndarray],
    rate_max: float,
    duration_s: float,
    seed: int,
    prompt_median: float,
    output_median: float,
    prompt_sigma: float,
    output_sigma: float,
) -> Trace:
    """Non-homogeneous Poisson process by thinning (Lewis & Shedler), then lognormal lengths."""
    _check_positive(duration_s=duration_s, prompt_median=prompt_median, output_median=output_median)
    _check_rate(prompt_sigma=prompt_sigma, output_sigma=output_sigma)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise TraceError(f"seed must be an integer >= 0, got {seed!r}")
    if rate_max * duration_s > MAX_REQUESTS:  # its arrays alone would exhaust the host's memory
        raise TraceError(
            f"rate x duration asks for ~{rate_max * duration_s:.3g} requests, over the {MAX_REQUESTS:.0e} a trace may hold"
        )
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate_max * duration_s)) if rate_max > 0 else 0
    t = np.sort(rng.uniform(0.0, duration_s, n))
    keep = rng.uniform(0.0, rate_max, n) < rate_fn(t) if n else np.zeros(0, dtype=bool)
    t = t[keep]
    if not len(t):
        raise TraceError(f"synthetic trace {name!r} produced no requests; raise the rate or duration")
    prompt = _lengths(rng, len(t), prompt_median, prompt_sigma)
    output = _lengths(rng, len(t), output_median, output_sigma)
    return Trace(name=name, arrival_s=t, prompt_len=prompt, output_len=output, source=f"synthetic:{name} seed={seed}")


def poisson(
    rate: float,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = PROMPT_MEDIAN,
    output_median: float = OUTPUT_MEDIAN,
    prompt_sigma: float = PROMPT_SIGMA,
    output_sigma: float = OUTPUT_SIGMA,
) -> Trace:
    """Homogeneous Poisson arrivals at `rate` req/s for `duration_s` seconds."""
    rate = float(rate)
    _check_positive(rate=rate)
    return _synth(
        f"poisson:rate={rate:g},duration={duration_s:g}",
        lambda t: np.full(t.shape, rate),
        rate,
        float(duration_s),
        seed,
        prompt_median,
        output_median,
        prompt_sigma,
        output_sigma,
    )


def bursty(
    rate_on: float,
    rate_off: float,
    period_s: float,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = PROMPT_MEDIAN,
    output_median: float = OUTPUT_MEDIAN,
    prompt_sigma: float = PROMPT_SIGMA,
    output_sigma: float = OUTPUT_SIGMA,
) -> Trace:
    """Square-wave Poisson: `rate_on` for the first half of each period, `rate_off` for the second."""
    rate_on, rate_off, period_s = float(rate_on), float(rate_off), float(period_s)
    _check_rate(rate_on=rate_on, rate_off=rate_off)
    _check_positive(period_s=period_s)
    if max(rate_on, rate_off) <= 0:
        raise TraceError("bursty: rate_on and rate_off are both 0")
    return _synth(
        f"bursty:rate_on={rate_on:g},rate_off={rate_off:g},period={period_s:g},duration={duration_s:g}",
        lambda t: np.where((t % period_s) < period_s / 2, rate_on, rate_off),
        max(rate_on, rate_off),
        float(duration_s),
        seed,
        prompt_median,
        output_median,
        prompt_sigma,
        output_sigma,
    )


def ramp(
    start_rate: float,
    end_rate: float,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = PROMPT_MEDIAN,
    output_median: float = OUTPUT_MEDIAN,
    prompt_sigma: float = PROMPT_SIGMA,
    output_sigma: float = OUTPUT_SIGMA,
) -> Trace:
    """Poisson arrivals whose rate moves linearly from `start_rate` to `end_rate` over the run."""
    start_rate, end_rate, duration_s = float(start_rate), float(end_rate), float(duration_s)
    _check_rate(start_rate=start_rate, end_rate=end_rate)
    _check_positive(duration_s=duration_s)
    if max(start_rate, end_rate) <= 0:
        raise TraceError("ramp: start and end rates are both 0")
    return _synth(
        f"ramp:start={start_rate:g},end={end_rate:g},duration={duration_s:g}",
        lambda t: start_rate + (end_rate - start_rate) * (t / duration_s),
        max(start_rate, end_rate),
        duration_s,
        seed,
        prompt_median,
        output_median,
        prompt_sigma,
        output_sigma,
    )
