"""How a host's speed wanders from step to step, and a seeded process that wanders alike.

A step's time on a real host is its typical time x a multiplier, and the multipliers of
successive steps are not independent: a host shared with other work (time-sliced cores,
memory bandwidth, interrupts) is slow in stretches. On the 2-core development VM, back-to-back
decode steps ran 1.3-2x their typical time for stretches of ~0.1-1 s, and the rank
correlation of two steps' multipliers was ~0.5 at 2 ms apart, ~0.35 at 100 ms, ~0.15 at 1 s
and ~0 at 3 s. A simulator that draws each step's multiplier independently averages such a
stretch away; one that draws them correlated queues requests behind it as the engine did,
which is what sets a tail latency (TTFT p99) under load.

The model (a Gaussian copula): a latent z(t), standard normal at every t, is a sum of
Ornstein-Uhlenbeck processes of fixed time scales with weights w_k (the share of z's
variance that stays correlated over ~tau_k) plus independent noise for the rest; a step's
multiplier is the measured marginal's quantile at Phi(z). So the marginal is what was
measured (mean 1: the noise widens times, it does not move them) and the correlation of
two steps `lag` seconds apart is sum_k w_k exp(-lag / tau_k).

`fit_host_noise` takes a timed series (times, multipliers) and returns a `HostNoise`:
`autoopt calibrate` measures one with back-to-back steps of a fixed batch
(`probe_host_noise` in noise_probe.py), `SimExecutor(noise=True)` replays it with a
`NoiseProcess`, through the marginal the calibration grid measured per kind of step (the
probe's own marginal, of one small decode step, is wider than a prefill's: on the VM its
mean was 1.12x its median where the grid's prefills and decode steps gave 1.04x).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

QUANTILES = 50  # equal-probability quantiles of the marginal
TIME_SCALES_S = (0.01, 0.1, 1.0)  # the OU components' correlation times
# lag bins (s) over which the correlation is measured and fitted
LAG_EDGES_S = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
MIN_SAMPLES = 200  # fewer: the marginal only, no correlation
PAIRS_PER_BIN = 20000
SLOW = 1.3  # a step over this x the typical one counts as slow in the summary
_NORMAL = statistics.NormalDist()
_SQRT_HALF = math.sqrt(0.5)


@dataclass(frozen=True)
class HostNoise:
    """A host's step-time multipliers: their marginal and how long they stay correlated."""

    quantiles: tuple[float, ...]  # equal-probability quantiles, mean 1
    weights: tuple[float, ...]  # share of the latent's variance per time scale (sum <= 1)
    time_scales_s: tuple[float, ...] = TIME_SCALES_S
    samples: int = 0  # how many steps it was fitted on
    span_s: float = 0.0  # over how long

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.time_scales_s):
            raise ValueError(f"{len(self.weights)} weights for {len(self.time_scales_s)} time scales")
        if any(not (w >= 0) for w in self.weights) or sum(self.weights) > 1 + 1e-9:
            raise ValueError(f"weights must be >= 0 and sum to at most 1, got {self.weights}")
        if any(not (t > 0) for t in self.time_scales_s):
            raise ValueError(f"time scales must be > 0, got {self.time_scales_s}")
        if not self.quantiles or any(not (math.isfinite(q) and q > 0) for q in self.quantiles):
            raise ValueError("quantiles must be positive finite numbers")

    def correlation(self, lag_s: float) -> float:
        """The latent's correlation between two steps `lag_s` apart (the fitted ACF)."""
        return sum(w * math.exp(-lag_s / t) for w, t in zip(self.weights, self.time_scales_s, strict=True))

    def slow_share(self, factor: float = SLOW) -> float:
        """The share of steps over `factor` x the typical (median) step."""
        typical = statistics.median(self.quantiles)
        return sum(q > factor * typical for q in self.quantiles) / len(self.quantiles)

    def describe(self) -> str:
        """One line for a person: how often the host is slow and how long it stays so."""
        lags = ", ".join(
            f"{self.correlation(lag):.2f} at {label}" for lag, label in ((0.01, "10 ms"), (0.1, "0.1 s"), (1.0, "1 s"))
        )
        return (
            f"host noise ({self.samples} steps over {self.span_s:.1f} s): {self.slow_share():.0%} of steps over {SLOW:g}x "
            f"the typical step; correlation of two steps {lags} apart"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantiles": [round(q, 4) for q in self.quantiles],
            "weights": [round(w, 4) for w in self.weights],
            "time_scales_s": list(self.time_scales_s),
            "samples": self.samples,
            "span_s": round(self.span_s, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostNoise:
        return cls(
            tuple(float(q) for q in d["quantiles"]),
            tuple(float(w) for w in d["weights"]),
            tuple(float(t) for t in d.get("time_scales_s", TIME_SCALES_S)),
            int(d.get("samples", 0)),
            float(d.get("span_s", 0.0)),
        )


def equal_probability_quantiles(x: Sequence[float] | np.ndarray, n: int = QUANTILES) -> tuple[float, ...]:
    """`n` quantiles of x, each standing for 1/n of its mass, scaled to mean 1: a draw of
    one at random has x's spread and leaves the expected time where it was."""
    xs = np.sort(np.asarray(x, dtype=float))
    qs = xs[((np.arange(n) + 0.5) / n * len(xs)).astype(int)]
    return tuple(float(q) for q in qs / qs.mean())


def pool_quantiles(parts: Sequence[Sequence[float]], counts: Sequence[int] | None = None) -> tuple[float, ...]:
    """Equal-probability quantiles of the union of quantile sets of the same size, each set
    standing for `counts[i]` samples (equally many when not given)."""
    reps = counts or [1] * len(parts)
    return equal_probability_quantiles(
        np.concatenate([np.repeat(np.asarray(p, dtype=float), c) for p, c in zip(parts, reps, strict=True)]),
        len(parts[0]),
    )


def _gaussianised(x: np.ndarray) -> np.ndarray:
    """Normal scores of x's ranks: the latent z a Gaussian copula would have drawn."""
    u = (np.argsort(np.argsort(x, kind="stable")) + 0.5) / len(x)
    return np.array([_NORMAL.inv_cdf(float(p)) for p in u])


def lag_correlations(times_s: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """Per lag bin: the lags of sampled pairs and the mean product of their normal scores.

    Pairs are drawn (a step at random, a lag uniform in the bin, the first step at or after
    that time), which costs O(pairs log n) where all pairs would cost O(n^2)."""
    out: list[tuple[np.ndarray, float]] = []
    for lo, hi in zip(LAG_EDGES_S, LAG_EDGES_S[1:], strict=False):
        i = rng.integers(0, len(times_s), PAIRS_PER_BIN)
        j = np.searchsorted(times_s, times_s[i] + rng.uniform(lo, hi, PAIRS_PER_BIN))
        keep = (j < len(times_s)) & (j != i)
        if keep.sum() < 100:
            continue
        i, j = i[keep], j[keep]
        out.append((times_s[j] - times_s[i], float(np.mean(z[i] * z[j]))))
    return out


def _fit_weights(bins: list[tuple[np.ndarray, float]], scales: Sequence[float]) -> tuple[float, ...]:
    """Non-negative weights (sum <= 1) whose ACF best fits the bins' correlations (least
    squares; every subset of the time scales is tried, as for a non-negative fit)."""
    if not bins:
        return (0.0,) * len(scales)
    a = np.array([[np.mean(np.exp(-lags / t)) for t in scales] for lags, _ in bins])
    y = np.array([c for _, c in bins])
    best, best_err = np.zeros(len(scales)), float(np.sum(y**2))
    for k in range(1, len(scales) + 1):
        for cols in combinations(range(len(scales)), k):
            w_sub, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.any(w_sub < 0):
                continue
            w = np.zeros(len(scales))
            w[list(cols)] = w_sub
            if w.sum() > 1:
                w /= w.sum()
            err = float(np.sum((a @ w - y) ** 2))
            if err < best_err:
                best, best_err = w, err
    return tuple(float(v) for v in best)


def fit_host_noise(times_s: Sequence[float], multipliers: Sequence[float], seed: int = 0) -> HostNoise:
    """The marginal and the correlation of a timed series of step multipliers (a step's
    time / its typical time; `times_s` when each step ended, in seconds, any origin)."""
    t = np.asarray(times_s, dtype=float)
    x = np.asarray(multipliers, dtype=float)
    if t.shape != x.shape or t.ndim != 1:
        raise ValueError("times_s and multipliers must be 1-d and of the same length")
    ok = np.isfinite(t) & np.isfinite(x) & (x > 0)
    t, x = t[ok], x[ok]
    if len(x) < QUANTILES:
        raise ValueError(f"{len(x)} usable steps: at least {QUANTILES} are needed to fit a host's noise")
    order = np.argsort(t, kind="stable")
    t, x = t[order], x[order]
    weights: tuple[float, ...] = (0.0,) * len(TIME_SCALES_S)
    if len(x) >= MIN_SAMPLES:
        bins = lag_correlations(t, _gaussianised(x), np.random.default_rng(seed))
        weights = _fit_weights(bins, TIME_SCALES_S)
    return HostNoise(equal_probability_quantiles(x), weights, TIME_SCALES_S, len(x), float(t[-1] - t[0]))


def pool_host_noise(parts: Sequence[HostNoise]) -> HostNoise:
    """One host noise from fits taken at different times: the marginal of all their steps
    (each fit's quantiles weighted by its steps) and the mean of their weights."""
    if not parts:
        raise ValueError("nothing to pool")
    scales = parts[0].time_scales_s
    if any(p.time_scales_s != scales for p in parts):
        raise ValueError("host noise fits with different time scales cannot be pooled")
    counts = [max(1, p.samples) for p in parts]
    quantiles = pool_quantiles([p.quantiles for p in parts], counts)
    weights = np.average([p.weights for p in parts], axis=0, weights=counts)
    return HostNoise(quantiles, tuple(float(w) for w in weights), scales, sum(counts), sum(p.span_s for p in parts))


class NoiseProcess:
    """Seeded multipliers with a `HostNoise`'s marginal and correlation in time.

    `multiplier(dt_s)` advances the latent by `dt_s` (the time since the last draw: on a
    virtual clock, the last step's own time) and returns the next step's multiplier."""

    def __init__(self, noise: HostNoise, rng: np.random.Generator) -> None:
        self.noise, self.rng = noise, rng
        self._q = noise.quantiles
        self._w = [math.sqrt(w) for w in noise.weights]
        self._rest = math.sqrt(max(0.0, 1.0 - sum(noise.weights)))
        self._inv_tau = [1.0 / t for t in noise.time_scales_s]
        self._state = [float(v) for v in rng.standard_normal(len(self._w))]  # stationary start

    def uniform(self, dt_s: float) -> float:
        """Advance the latent by `dt_s` seconds; Phi(z), in [0, 1): the next step's rank."""
        normal = self.rng.standard_normal(len(self._w) + 1)
        z = self._rest * float(normal[-1])
        for k, w in enumerate(self._w):
            if w:
                a = math.exp(-max(0.0, dt_s) * self._inv_tau[k])  # exact OU step
                self._state[k] = a * self._state[k] + math.sqrt(1.0 - a * a) * float(normal[k])
                z += w * self._state[k]
        return 0.5 * (1.0 + math.erf(z * _SQRT_HALF))

    def multiplier(self, dt_s: float, quantiles: Sequence[float] | None = None) -> float:
        """The next step's multiplier: `quantiles` (equal-probability, default the fitted
        marginal) at the next rank. The simulator passes the marginal its profile measured
        for the kind of iteration (a prefill spreads less than a small decode step), so
        the probe sets when the host is slow and the grid how slow each kind then runs."""
        qs = quantiles or self._q
        return qs[min(len(qs) - 1, int(self.uniform(dt_s) * len(qs)))]
