"""The CUDA caching allocator under memory pressure: OOMs, retries, cached and stuck bytes.

Fitted per allocator config from a variable-shape serving stream run under a memory cap
(shared/data/h100/alloc.jsonl). The quantity that decides an OOM is the *pressure*

    x = transient / (cap - persistent - stuck)

the step's transient bytes over what is left for them once the persistent bytes (weights,
KV) and the allocator's stuck fragmentation (inactive split blocks inside segments that
hold live tensors, which neither a retry nor empty_cache can free) are taken out. A step
OOMs when the transient does not fit; block rounding and where the free space sits make
that a matter of chance near x ~ 1, so per config:

* P(OOM) = sigmoid(c0 + c1 ln x + c2 r), r = how often the cache is reclaimed (0..1 of the
  fastest reclaim rate measured);
* retries ~ Poisson(exp(a0 + a1 ln x + a2 oom + a3 r)) (cudaMalloc failed, cache flushed,
  tried again);
* stuck = stuck_frac * largest transient seen; cached bytes beyond live ones ratchet up to
  stuck + max(base_frac * largest transient, gain * transient), are refilled from there after
  a retry, drop to stuck + base after an OOM (the handler empties the cache) and to stuck
  after a reclaim, and never exceed the cap.

Both regressions are fitted by maximum a-posteriori with weak priors (threshold near x = 1,
steep rise), so a config that never OOMed in its runs still gets a small, finite risk.
`AllocatorState` replays this per step, deterministic given a numpy Generator.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ALLOCATOR_CONFIGS: tuple[str, ...] = ("default", "expandable", "split128", "gc08_split128")
_LN_X_MIN, _LN_X_MAX = -30.0, 5.0
_MAX_RETRY_MEAN = 1000.0
_LOG_MAX_RETRY_MEAN = math.log(_MAX_RETRY_MEAN)
_GB = 1e9
PINNED_FRAC = 0.97  # a step whose reserve ends this close to the cap says more about the cap than the cache

# Priors (mean, sd) of the regressions: an OOM is likely once the transient exceeds the
# space left (x > 1) and the rise is steep; reclaim has no effect unless the data show one.
_OOM_PRIOR = ((0.0, 3.0), (15.0, 10.0), (0.0, 1.5))
_RETRY_PRIOR = ((0.0, 10.0), (10.0, 10.0), (0.0, 5.0), (0.0, 1.5))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class ConfigParams:
    """Fitted parameters of one allocator config (JSON-able; stored in the profile)."""

    stuck_frac: float = 0.0
    base_frac: float = 0.0
    gain: float = 1.0
    oom_coef: tuple[float, float, float] = (0.0, 40.0, 0.0)
    retry_coef: tuple[float, float, float, float] = (-20.0, 0.0, 0.0, 0.0)
    reclaim_rate_ref: float = 0.0
    reclaim_ms: tuple[float, float] = (0.0, 0.0)  # cost = a + b * GB freed
    rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "allocator params") -> ConfigParams:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: must be an object, got {type(data).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        missing = sorted(names - set(data) - {"rows"})
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        lengths = {"oom_coef": 3, "retry_coef": 4, "reclaim_ms": 2}
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key in lengths:
                if not isinstance(value, (list, tuple)) or len(value) != lengths[key]:
                    raise ValueError(f"{where}: {key!r} must be a list of {lengths[key]} numbers, got {value!r}")
                kw[key] = tuple(float(v) for v in value)
            elif key == "rows":
                kw[key] = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
                kw[key] = float(value)
        return cls(**kw)


NEUTRAL = ConfigParams()  # no fragmentation, OOM only when the transient does not fit, no retries


# ----------------------------------------------------------------------------------------
# Small MAP regressions (Newton)
# ----------------------------------------------------------------------------------------


def _map_glm(x: np.ndarray, y: np.ndarray, prior: tuple[tuple[float, float], ...], poisson: bool) -> np.ndarray:
    """MAP logistic (y in {0,1}) or Poisson (y counts) regression with independent normal priors."""
    mean = np.array([p[0] for p in prior])
    prec = np.array([1.0 / p[1] ** 2 for p in prior])
    beta = mean.copy()

    def neg_log_post(b: np.ndarray) -> float:
        z = np.clip(x @ b, -50.0, 50.0)
        ll = np.sum(y * z - (np.exp(z) if poisson else np.logaddexp(0.0, z)))
        return -float(ll) + 0.5 * float(np.sum(prec * (b - mean) ** 2))

    obj = neg_log_post(beta)
    for _ in range(100):
        z = np.clip(x @ beta, -50.0, 50.0)
        mu = np.exp(z) if poisson else 1.0 / (1.0 + np.exp(-z))
        w = mu if poisson else mu * (1.0 - mu)
        grad = x.T @ (mu - y) + prec * (beta - mean)
        hess = (x.T * w) @ x + np.diag(prec)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            cand = beta - t * step
            c_obj = neg_log_post(cand)
            if c_obj <= obj:
                break
            t *= 0.5
        else:
            break
        done = obj - c_obj < 1e-10
        beta, obj = cand, c_obj
        if done:
            break
    return beta


# ----------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------


@dataclass
class _Run:
    cfg: str
    cap_frac: float
    reclaim_every: int
    header: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)


def _runs(rows: Iterable[Mapping[str, Any]]) -> list[_Run]:
    runs: dict[tuple[str, float, int], _Run] = {}
    for i, r in enumerate(rows):
        try:
            key = (str(r["cfg"]), float(r.get("cap_frac", 0.0)), int(r.get("reclaim_every", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"alloc row {i}: needs 'cfg' (and numeric cap_frac, reclaim_every): {exc}") from exc
        run = runs.setdefault(key, _Run(*key))
        if "step" in r:
            for name in ("B", "L", "ok", "allocated", "reserved", "inactive_split", "retries"):
                if name not in r:
                    raise ValueError(f"alloc row {i} (cfg {key[0]}, step {r['step']}): missing {name!r}")
            run.steps.append(dict(r))
        elif "cap_bytes" in r or "max_batch_need_bytes" in r:
            run.header = dict(r)
    for run in runs.values():
        run.steps.sort(key=lambda s: s["step"])
    return [r for r in runs.values() if r.steps]


def _reclaim_features(n_steps: int, reclaim_every: int, rate_ref: float) -> list[float]:
    """The reclaim feature an AllocatorState would compute before each step of a run."""
    est = _ReclaimRate(rate_ref)
    out = []
    for i in range(n_steps):
        out.append(est.feature(i))
        if reclaim_every > 0 and (i + 1) % reclaim_every == 0:
            est.record(i)
    return out


class _ReclaimRate:
    """Reclaims per step over a recent window, as a 0..1 feature of the fastest rate measured."""

    def __init__(self, rate_ref: float) -> None:
        self.rate_ref = rate_ref
        self.window = max(1, int(math.ceil(2.0 / rate_ref))) if rate_ref > 0 else 1
        self.events: deque[int] = deque()

    def record(self, step: int) -> None:
        self.events.append(step)

    def feature(self, step: int) -> float:
        if self.rate_ref <= 0:
            return 0.0
        while self.events and self.events[0] <= step - self.window:
            self.events.popleft()
        return min(1.0, len(self.events) / self.window / self.rate_ref)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


@dataclass
class AllocatorModel:
    """Per-config fitted parameters; `config(name)` never fails (unknown -> 'default' or neutral)."""

    configs: dict[str, ConfigParams] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AllocatorModel:
        if not isinstance(params, Mapping):
            raise ValueError(f"allocator params must be an object of configs, got {type(params).__name__}")
        return cls({str(k): ConfigParams.from_dict(v, f"allocator[{k!r}]") for k, v in params.items()})

    def params(self) -> dict[str, dict[str, Any]]:
        return {k: v.to_dict() for k, v in self.configs.items()}

    def config(self, name: str) -> ConfigParams:
        if name in self.configs:
            return self.configs[name]
        return self.configs.get("default", NEUTRAL)

    @classmethod
    def fit(
        cls,
        rows: Iterable[Mapping[str, Any]],
        *,
        device_total_bytes: int | None = None,
        transient_fn: Callable[[int, int], float] | None = None,
        switch_rows: Iterable[Mapping[str, Any]] = (),
    ) -> AllocatorModel:
        """Fit every config found in alloc.jsonl-style rows.

        A step's transient is `transient_fn(B, L)` if given, else the run header's
        max_batch_need_bytes scaled by the step's tokens (runs without a header borrow one
        of the same stream). Uncapped runs count as capped at `device_total_bytes` (they
        are left out of the OOM/retry fit when it is None). `switch_rows` (switch.jsonl)
        add empty_cache timings to the reclaim cost.
        """
        runs = _runs(rows)
        if not runs:
            raise ValueError("alloc rows: no steps found")
        headers = [r.header for r in runs if r.header]
        max_tokens = max(s["B"] * s["L"] for r in runs for s in r.steps)
        if transient_fn is None:
            needs = [h["max_batch_need_bytes"] for h in headers if "max_batch_need_bytes" in h]
            if not needs:
                raise ValueError("alloc rows: no run header gives max_batch_need_bytes; pass transient_fn")
            per_token = float(np.median(needs)) / max_tokens

            def transient_fn(b: int, length: int) -> float:
                return per_token * b * length

        weights = [h["weights_bytes"] for h in headers if "weights_bytes" in h]
        need_max = [h["max_batch_need_bytes"] for h in headers if "max_batch_need_bytes" in h]
        cost_pts = _reclaim_cost_points(runs, switch_rows)
        out = cls()
        for cfg in sorted({r.cfg for r in runs}):
            mine = [r for r in runs if r.cfg == cfg]
            out.configs[cfg] = _fit_config(mine, transient_fn, device_total_bytes, weights, need_max, cost_pts)
        return out


def _cap_of(run: _Run, device_total: int | None, weights: list[float], need_max: list[float]) -> float | None:
    if "cap_bytes" in run.header:
        return float(run.header["cap_bytes"])
    if run.cap_frac > 0 and weights and need_max:
        return float(np.median(weights)) + run.cap_frac * float(np.median(need_max))
    if run.cap_frac <= 0 and device_total:
        return float(device_total)
    return None


def _reclaim_cost_points(runs: list[_Run], switch_rows: Iterable[Mapping[str, Any]]) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    for run in runs:
        for prev, s in zip(run.steps, run.steps[1:], strict=False):
            if "reclaim_ms" in s:
                pts.append((max(0.0, prev["reserved"] - s["reserved"]) / _GB, float(s["reclaim_ms"])))
    for r in switch_rows:
        if r.get("knob") == "empty_cache" and "freed_mb" in r and "ms" in r:
            pts.append((float(r["freed_mb"]) * 2**20 / _GB, float(r["ms"])))
    return pts


def _fit_reclaim_cost(pts: list[tuple[float, float]]) -> tuple[float, float]:
    if not pts:
        return (0.0, 0.0)
    gb = np.array([p[0] for p in pts])
    ms = np.array([p[1] for p in pts])
    if len(pts) == 1 or np.ptp(gb) <= 0:
        return (float(np.median(ms)), 0.0)
    b, a = np.polyfit(gb, ms, 1)
    if b < 0:
        return (float(np.mean(ms)), 0.0)
    if a < 0:
        return (0.0, float(np.sum(gb * ms) / np.sum(gb * gb)))
    return (float(a), float(b))


def _fit_config(
    runs: list[_Run],
    transient_fn: Callable[[int, int], float],
    device_total: int | None,
    weights: list[float],
    need_max: list[float],
    cost_pts: list[tuple[float, float]],
) -> ConfigParams:
    # Per-step quantities, run by run.
    per_run = []
    for run in runs:
        t = np.array([transient_fn(s["B"], s["L"]) for s in run.steps], dtype=float)
        per_run.append((run, t, np.maximum.accumulate(t)))
    # Stuck fragmentation: inactive split bytes relative to the run's largest transient.
    stuck = [s["inactive_split"] / max(t.max(), 1.0) for run, t, _ in per_run for s in run.steps]
    stuck_frac = float(np.median(stuck))

    # Cache level after growth, a retry or an OOM (not pinned at the cap).
    ys: list[float] = []
    ts: list[float] = []
    tm: list[float] = []
    for run, t, tmax in per_run:
        cap = _cap_of(run, device_total, weights, need_max)
        prev = None
        for i, s in enumerate(run.steps):
            dr = s["retries"] - (prev["retries"] if prev else 0)
            grew = prev is not None and s["reserved"] > prev["reserved"]
            pinned = cap is not None and s["reserved"] > PINNED_FRAC * cap
            extra = s["reserved"] - s["allocated"] - s["inactive_split"]
            if (grew or dr > 0 or not s["ok"]) and not pinned and extra > 0 and "reclaim_ms" not in s:
                ys.append(extra)
                ts.append(0.0 if not s["ok"] else t[i])
                tm.append(tmax[i])
            prev = s
    base_frac, gain = _fit_cache(np.array(ys), np.array(ts), np.array(tm))

    # OOM and retry regressions over capped steps.
    rates = [1.0 / r.reclaim_every for r in runs if r.reclaim_every > 0]
    rate_ref = max(rates) if rates else 0.0
    feats: list[list[float]] = []
    oom: list[float] = []
    retries: list[float] = []
    for run, t, tmax in per_run:
        cap = _cap_of(run, device_total, weights, need_max)
        if cap is None:
            continue
        rec = _reclaim_features(len(run.steps), run.reclaim_every, rate_ref)
        prev = None
        for i, s in enumerate(run.steps):
            avail = cap - s["allocated"] - stuck_frac * tmax[i]
            feats.append([1.0, _ln_pressure(t[i], avail), 0.0 if s["ok"] else 1.0, rec[i]])
            oom.append(0.0 if s["ok"] else 1.0)
            retries.append(float(max(0, s["retries"] - (prev["retries"] if prev else 0))))
            prev = s
    if feats:
        x = np.array(feats)
        oom_coef = _map_glm(x[:, [0, 1, 3]], np.array(oom), _OOM_PRIOR, poisson=False)
        retry_coef = _map_glm(x, np.array(retries), _RETRY_PRIOR, poisson=True)
    else:
        oom_coef = np.array(NEUTRAL.oom_coef)
        retry_coef = np.array(NEUTRAL.retry_coef)
    return ConfigParams(
        stuck_frac=stuck_frac,
        base_frac=base_frac,
        gain=gain,
        oom_coef=tuple(float(v) for v in oom_coef),  # type: ignore[arg-type]
        retry_coef=tuple(float(v) for v in retry_coef),  # type: ignore[arg-type]
        reclaim_rate_ref=rate_ref,
        reclaim_ms=_fit_reclaim_cost(cost_pts),
        rows=sum(len(r.steps) for r in runs),
    )


def _ln_pressure(transient: float, avail: float) -> float:
    if transient <= 0:
        return _LN_X_MIN
    if avail <= 0:
        return _LN_X_MAX
    return min(_LN_X_MAX, max(_LN_X_MIN, math.log(transient / avail)))


def _fit_cache(y: np.ndarray, t: np.ndarray, tmax: np.ndarray) -> tuple[float, float]:
    """extra cached = max(base_frac * tmax, gain * t), least absolute log error over candidates."""
    if y.size == 0:
        return (0.0, 1.0)
    ok = tmax > 0
    y, t, tmax = y[ok], t[ok], tmax[ok]
    base_c = np.unique(np.concatenate([[0.0], y / tmax]))
    with np.errstate(divide="ignore", invalid="ignore"):
        gain_c = np.unique(np.concatenate([[1.0], (y / t)[t > 0]]))
    best = (math.inf, 0.0, 1.0)
    ly = np.log(y)
    for g in gain_c:
        gt = g * t
        for b in base_c:
            pred = np.maximum(b * tmax, gt)
            err = float(np.sum(np.abs(ly - np.log(np.maximum(pred, 1.0)))))
            if err < best[0]:
                best = (err, float(b), float(g))
    return best[1], best[2]


# ----------------------------------------------------------------------------------------
# The per-step state machine
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocOutcome:
    """What one step did to the allocator."""

    oom: bool
    retries: int
    reserved_bytes: int
    fragmentation_bytes: int
    allocated_bytes: int = 0
    p_oom: float = 0.0  # the chance the step had (for expected-value summaries)
    expected_retries: float = 0.0


class AllocatorState:
    """One process's allocator under config `cfg`, stepped once per iteration.

    `step(need, cap, rng, transient_bytes=...)`: `need` is every byte the step needs live at
    its peak (weights + KV + transient). Pass the transient part when known; otherwise it
    is taken as `need` minus the smallest need of the last `window` steps (the persistent
    bytes change slowly, the transient comes and goes).
    """

    def __init__(self, model: AllocatorModel, cfg: str, *, window: int = 32) -> None:
        self.cfg = cfg
        self.p = model.config(cfg)
        self.cached = 0.0  # reserved bytes beyond the live (persistent) ones
        self.t_max = 0.0
        self.steps = 0
        self.allocated = 0
        self._recent: deque[int] = deque(maxlen=max(1, window))
        self._rate = _ReclaimRate(self.p.reclaim_rate_ref)

    @property
    def stuck(self) -> float:
        return self.p.stuck_frac * self.t_max

    def step(
        self, need_bytes: int, cap_bytes: int, rng: np.random.Generator, transient_bytes: int | None = None
    ) -> AllocOutcome:
        return AllocOutcome(*self.advance(need_bytes, cap_bytes, rng, transient_bytes))

    def advance(
        self, need_bytes: int, cap_bytes: int, rng: np.random.Generator, transient_bytes: int | None = None
    ) -> tuple[bool, int, int, int, int, float, float]:
        """`step` as a plain tuple in `AllocOutcome`'s field order: the simulator calls it
        every iteration and need not build the outcome object."""
        p = self.p
        need = max(0, int(need_bytes))
        cap = max(1, int(cap_bytes))
        if transient_bytes is None:
            self._recent.append(need)
            t = float(need - min(self._recent))
        else:
            t = float(min(max(0, int(transient_bytes)), need))
        live = need - t
        if t > self.t_max:
            self.t_max = t
        stuck = p.stuck_frac * self.t_max
        ln_x = _ln_pressure(t, cap - live - stuck)
        r = self._rate.feature(self.steps) if self._rate.rate_ref > 0 else 0.0
        if need > cap:
            p_oom = 1.0
        else:
            c0, c1, c2 = p.oom_coef
            p_oom = _sigmoid(c0 + c1 * ln_x + c2 * r)
        oom = bool(rng.random() < p_oom)
        a0, a1, a2, a3 = p.retry_coef
        mu = math.exp(min(_LOG_MAX_RETRY_MEAN, a0 + a1 * ln_x + a2 * oom + a3 * r))
        retries = int(rng.poisson(mu))
        if oom:
            cached = stuck + p.base_frac * self.t_max
        else:
            target = stuck + max(p.base_frac * self.t_max, p.gain * t)
            cached = target if retries else max(self.cached, target)
        self.cached = cached = max(0.0, min(cached, cap - live))
        self.allocated = allocated = int(live)
        self.steps += 1
        return oom, retries, int(live + cached), int(min(stuck, cached)), allocated, p_oom, mu

    def reclaim(self) -> float:
        """empty_cache(): free every cached block that can be freed; returns its cost in ms."""
        freed = max(0.0, self.cached - self.stuck)
        self.cached = min(self.cached, self.stuck)
        self._rate.record(self.steps - 1)
        a, b = self.p.reclaim_ms
        return float(a + b * freed / _GB)


@dataclass(frozen=True)
class ReplaySummary:
    """One replay of a stream: sampled counts and their expected values."""

    oom: int
    retries: int
    mean_cached_bytes: float  # mean reserved - allocated after each step
    expected_oom: float
    expected_retries: float


def replay_stream(
    model: AllocatorModel,
    cfg: str,
    transients: Iterable[float],
    persistent_bytes: float,
    cap_bytes: float,
    *,
    reclaim_every: int = 0,
    seed: int = 0,
) -> ReplaySummary:
    """Step an AllocatorState through a stream of transient needs under a fixed cap."""
    state = AllocatorState(model, cfg)
    rng = np.random.default_rng(seed)
    oom = retries = 0
    p_oom = mu = cached = 0.0
    n = 0
    for i, t in enumerate(transients):
        out = state.step(int(persistent_bytes + t), int(cap_bytes), rng, transient_bytes=int(t))
        oom += out.oom
        retries += out.retries
        p_oom += out.p_oom
        mu += out.expected_retries
        cached += out.reserved_bytes - out.allocated_bytes
        n += 1
        if reclaim_every > 0 and (i + 1) % reclaim_every == 0:
            state.reclaim()
    return ReplaySummary(oom, retries, cached / max(n, 1), p_oom, mu)
