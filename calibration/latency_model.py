"""Predicts prefill and decode step latency from measured rows, on and off the measured grid.

Shape of the model, per (attention backend, precision), fitted in log space:

* prefill: ``t = smax(F, c + kT * B*L + kA * B*L^2)``: a launch-bound floor ``F`` (eager
  kernels are issued by the host) joined smoothly, ``smax(a, b) = (a^p + b^p)^(1/p)``, to
  the GPU's work: a fixed part, the dense matmuls (linear in tokens) and attention (B*L^2).
* decode: ``W = c + kB * B + kC * C + kBC * B*C``: weight read, per-token compute, a
  per-sequence attention term (kernels that do not split the KV across the GPU) and the KV
  read. A CUDA-graph replay costs ``W``; an eager step costs ``smax(F_eager, W)``.

Coefficients are positive (fitted as logs), so the curve rises with B, L and C and
extrapolates beyond the grid along the launch floor and the compute/memory slopes; a group
is fitted robustly (Huber in log space) with a weak pull toward the curve pooled over all
groups, which decides what the group's own rows cannot (e.g. a floor never reached).

Between measured points the prediction follows the measurements: along B on the two
bracketing L (or C) lines, then across them, each step moving from one measured log time to
the next in proportion to the model's rise (so it is monotone wherever the data are).
Outside the measured range the edge's log(measured / model) is carried along the model
(latency_interp.py).

Groups without rows are completed from the fitted ones with additive backend and precision
effects in log space; a precision never measured in decode borrows the prefill's compute
ratio for the per-token term and the bytes ratio for the memory terms. Nothing raises for an
unseen combination.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .latency_interp import MeasuredGrid, fit_kappa

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32_tf32": 4, "fp32": 4}
# Tensor-core throughput relative to bf16: a prior, used only when no row of a precision exists.
DEFAULT_COMPUTE_RATIO: dict[str, float] = {"bf16": 1.0, "fp16": 1.0, "fp32_tf32": 2.0, "fp32": 8.0}
SMOOTH_MAX_POWERS: tuple[float, ...] = (2.0, 3.0, 4.0, 6.0, 8.0)
HUBER_DELTA = 0.08  # log units: residuals beyond ~8% (launch-rate drift) count linearly
PRIOR_WEIGHT = 2e-3  # pull toward the pooled curve; matters only where a group's rows say nothing

# Feature scales keep the fitted log-coefficients of order one.
_PREFILL_SCALE = (1e4, 1e7)
_DECODE_SCALE = (64.0, 1e3, 1e5)


def prefill_features(b: float, length: float) -> list[float]:
    t = b * length
    return [1.0, t / _PREFILL_SCALE[0], t * length / _PREFILL_SCALE[1]]


def decode_features(b: float, context: float) -> list[float]:
    return [1.0, b / _DECODE_SCALE[0], context / _DECODE_SCALE[1], b * context / _DECODE_SCALE[2]]


def _bytes(precision: str) -> int:
    return PRECISION_BYTES.get(precision, 2)


# ----------------------------------------------------------------------------------------
# The parametric curve
# ----------------------------------------------------------------------------------------


def _log_curve(theta: np.ndarray, phi: np.ndarray, floor: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Log time and its Jacobian in theta = [log coefficients..., log floor] for rows phi (n x k)."""
    k = phi.shape[1]
    with np.errstate(divide="ignore"):
        terms = theta[:k] + np.log(phi)
    top = np.max(terms, axis=1, keepdims=True)
    e = np.exp(terms - top)
    s = e.sum(axis=1, keepdims=True)
    log_w = (top + np.log(s))[:, 0]
    a = np.where(floor, p * theta[k], -np.inf)
    b = p * log_w
    hi = np.maximum(a, b)
    lse = hi + np.log(np.exp(a - hi) + np.exp(b - hi))
    log_t = np.where(floor, lse / p, log_w)
    wf = np.where(floor, np.exp(a - lse), 0.0)  # the floor's share of the smooth max
    jac = np.empty((phi.shape[0], k + 1))
    jac[:, :k] = (1.0 - wf)[:, None] * (e / s)
    jac[:, k] = wf
    return log_t, jac


def _fit_curve(
    phi: np.ndarray,
    floor: np.ndarray,
    log_y: np.ndarray,
    p: float,
    theta0: np.ndarray,
    prior: np.ndarray,
    prior_weight: float,
    iters: int = 60,
) -> tuple[np.ndarray, float]:
    """Robust (Huber via IRLS) Levenberg-Marquardt in log space with a ridge toward `prior`."""
    theta = np.array(theta0, dtype=float)
    eye = np.eye(theta.size)

    def objective(th: np.ndarray) -> float:
        r = np.abs(_log_curve(th, phi, floor, p)[0] - log_y)
        loss = np.where(r <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (r - 0.5 * HUBER_DELTA))
        return float(loss.sum() + prior_weight * np.sum((th - prior) ** 2))

    obj = objective(theta)
    mu = 1e-3
    for _ in range(iters):
        log_t, jac = _log_curve(theta, phi, floor, p)
        r = log_t - log_y
        u = np.minimum(1.0, HUBER_DELTA / np.maximum(np.abs(r), 1e-12))
        jtu = jac.T * u
        grad = jtu @ r + prior_weight * (theta - prior)
        hess = jtu @ jac + prior_weight * eye
        gain = 0.0
        for _ in range(12):
            step = np.linalg.solve(hess + mu * np.diag(np.diag(hess) + 1e-9), -grad)
            cand = theta + step
            c_obj = objective(cand)
            if c_obj < obj:
                theta, gain, obj = cand, obj - c_obj, c_obj
                mu = max(mu / 3.0, 1e-9)
                break
            mu *= 4.0
        if gain < 1e-10:
            break
    return theta, obj


@dataclass(slots=True)
class _Curve:
    """The fitted curve of one group, evaluated in plain Python (the simulator's hot path)."""

    kind: str
    coef: tuple[float, ...]
    floor_ms: float | None  # None: no launch floor (a CUDA-graph replay)
    p: float

    @classmethod
    def of(cls, kind: str, theta: Sequence[float], floor: bool, p: float) -> _Curve:
        coef = tuple(math.exp(min(t, 700.0)) for t in theta[:-1])
        return cls(kind, coef, math.exp(min(theta[-1], 700.0)) if floor else None, p)

    def ms(self, b: float, x: float) -> float:
        c = self.coef
        if self.kind == "prefill":
            t = b * x
            w = c[0] + c[1] * t / _PREFILL_SCALE[0] + c[2] * t * x / _PREFILL_SCALE[1]
        else:
            w = c[0] + c[1] * b / _DECODE_SCALE[0] + c[2] * x / _DECODE_SCALE[1] + c[3] * b * x / _DECODE_SCALE[2]
        return self.smax(w)

    def smax(self, w: float) -> float:
        """The floor and the work `w` joined: (F^p + w^p)^(1/p), computed without overflow."""
        f = self.floor_ms
        if f is None:
            return w
        p = self.p
        if w >= f:
            return w * (1.0 + (f / w) ** p) ** (1.0 / p)
        return f * (1.0 + (w / f) ** p) ** (1.0 / p)

    def log_ms(self, b: float, x: float) -> float:
        return math.log(self.ms(b, x))


# ----------------------------------------------------------------------------------------
# Fitting one family (prefill or decode)
# ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Family:
    kind: str  # "prefill" | "decode"
    p: float = 4.0
    theta: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # fitted groups
    completed: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # filled-in groups
    interp: dict[tuple[bool, str, str], MeasuredGrid] = field(default_factory=dict)  # (graphs, backend, precision)
    curves: dict[tuple[bool, str, str], _Curve] = field(default_factory=dict)
    # graphs -> (weight of a node's residual carried to its neighbours along B, ... to the next line)
    kappa: dict[bool, tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=dict)

    @property
    def n_work(self) -> int:
        return 3 if self.kind == "prefill" else 4

    @property
    def second(self) -> str:
        return "L" if self.kind == "prefill" else "C"

    def features(self, b: float, x: float) -> list[float]:
        return prefill_features(b, x) if self.kind == "prefill" else decode_features(b, x)


def _arrays(family: _Family, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    phi = np.array([family.features(r["B"], r[family.second]) for r in rows], dtype=float)
    floor = np.array([family.kind == "prefill" or not r["cuda_graphs"] for r in rows], dtype=bool)
    log_y = np.log(np.array([r["ms"] for r in rows], dtype=float))
    return phi, floor, log_y


def _start(phi: np.ndarray, floor: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """A start point: each work term alone explains the slower half; the floor the fast quarter."""
    k = phi.shape[1]
    theta = np.zeros(k + 1)
    slow = log_y >= np.quantile(log_y, 0.5)
    for j in range(k):
        col = phi[slow, j]
        ok = col > 0
        theta[j] = float(np.median(log_y[slow][ok] - np.log(col[ok]))) - math.log(k) if ok.any() else -5.0
    theta[k] = float(np.quantile(log_y[floor], 0.25)) if floor.any() else float(np.min(log_y))
    return theta


def _fit_family(family: _Family, rows: list[dict[str, Any]], p: float) -> float:
    """Fit the pooled curve, then each (backend, precision) pulled toward it. Returns the total loss."""
    family.p = p
    family.theta.clear()
    phi, floor, log_y = _arrays(family, rows)
    start = _start(phi, floor, log_y)
    pooled, _ = _fit_curve(phi, floor, log_y, p, start, start, 1e-6)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["backend"], r["precision"]), []).append(i)
    total = 0.0
    for key, idx in groups.items():
        ix = np.array(idx)
        th, obj = _fit_curve(phi[ix], floor[ix], log_y[ix], p, pooled, pooled, PRIOR_WEIGHT)
        family.theta[key] = th.tolist()
        total += obj
    return total


def _build_interp(family: _Family, rows: list[dict[str, Any]]) -> None:
    buckets: dict[tuple[bool, str, str], list[tuple[float, float, float]]] = {}
    for r in rows:
        key = (family.kind == "decode" and r["cuda_graphs"], r["backend"], r["precision"])
        buckets.setdefault(key, []).append((r["B"], r[family.second], r["ms"]))
    family.interp = {}
    for key, pts in buckets.items():
        curve = _Curve.of(family.kind, family.theta[(key[1], key[2])], not key[0], family.p)
        family.interp[key] = MeasuredGrid.build(curve, pts)
    # Eager and graph-replayed rows have different noise (host launch drift), so each mode
    # gets its own neighbour weights, pooled over its groups.
    for graphs in (False, True):
        interps = [it for key, it in family.interp.items() if key[0] == graphs]
        if not interps:
            continue
        kappa_b = fit_kappa(p for it in interps for p in it.along_pairs())
        for it in interps:
            it.kappa_b = kappa_b
        kappa_x = fit_kappa(p for it in interps for p in it.across_pairs())
        for it in interps:
            it.kappa_x = kappa_x
        family.kappa[graphs] = (kappa_b, kappa_x)


def _additive_completion(table: Mapping[tuple[str, str], Sequence[float]], key: tuple[str, str]) -> list[float]:
    """theta(backend, precision) ~ mu + a_backend + b_precision, least squares over the fitted groups."""
    keys = list(table)
    backends = sorted({k[0] for k in keys})
    precisions = sorted({k[1] for k in keys})
    n_col = 1 + len(backends) + len(precisions)

    def design(k: tuple[str, str]) -> np.ndarray:
        row = np.zeros(n_col)
        row[0] = 1.0
        if k[0] in backends:
            row[1 + backends.index(k[0])] = 1.0
        if k[1] in precisions:
            row[1 + len(backends) + precisions.index(k[1])] = 1.0
        return row

    x = np.array([design(k) for k in keys])
    y = np.array([list(table[k]) for k in keys], dtype=float)
    # A tiny ridge on the effects picks the smallest effects that fit, so an unseen level
    # gets the mean of the seen ones.
    reg = 1e-6 * np.eye(n_col)
    reg[0, 0] = 0.0
    coef = np.linalg.solve(x.T @ x + reg, x.T @ y)
    return (design(key) @ coef).tolist()


# ----------------------------------------------------------------------------------------
# Public model
# ----------------------------------------------------------------------------------------


def normalise_row(row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The fields the model uses, typed; ValueError names the fault. `cuda_graphs` missing -> false."""
    second = "L" if kind == "prefill" else "C"
    try:
        out: dict[str, Any] = {
            "B": int(row["B"]),
            second: int(row[second]),
            "backend": str(row["backend"]),
            "precision": str(row["precision"]),
            "ms": float(row["ms"]),
        }
    except KeyError as exc:
        raise ValueError(f"{kind} row lacks field {exc.args[0]!r}") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{kind} row has a bad value: {exc}") from exc
    if not (1 <= out["B"] < 1 << 31 and 1 <= out[second] < 1 << 31):
        raise ValueError(
            f"{kind} row needs B and {second} in [1, 2^31), got B={str(out['B'])[:12]} {second}={str(out[second])[:12]}"
        )
    if not math.isfinite(out["ms"]) or out["ms"] <= 0:
        raise ValueError(f"{kind} row needs a positive finite ms, got {out['ms']}")
    if kind == "decode":
        graphs = row.get("cuda_graphs", False)
        if not isinstance(graphs, bool | None):  # bool("false") is True
            raise ValueError(f"decode row: cuda_graphs must be true, false or absent, got {graphs!r}")
        out["cuda_graphs"] = bool(graphs)
        cap = row.get("capture_ms")
        out["capture_ms"] = None if cap is None else float(cap)
    return out


@dataclass
class LatencyModel:
    """Fitted latency of one prefill forward and of one decode step (see the module docstring)."""

    prefill: _Family
    decode: _Family
    capture: tuple[float, float, float] = (math.log(2.0), math.log(4.0), 4.0)  # (log k, log a, p)

    @classmethod
    def fit(
        cls,
        prefill_rows: Iterable[Mapping[str, Any]],
        decode_rows: Iterable[Mapping[str, Any]],
        *,
        powers: Sequence[float] = SMOOTH_MAX_POWERS,
    ) -> LatencyModel:
        """Fit both families; the smooth-max sharpness p is chosen per family by training loss."""
        families = []
        for kind, raw in (("prefill", prefill_rows), ("decode", decode_rows)):
            rows = []
            for i, r in enumerate(raw):
                try:
                    rows.append(normalise_row(r, kind))
                except ValueError as exc:
                    raise ValueError(f"{kind} row {i}: {exc}") from exc
            fam = _Family(kind)
            if rows:
                best = min(powers, key=lambda pw, f=fam, rr=rows: _fit_family(f, rr, pw))
                _fit_family(fam, rows, best)
                _build_interp(fam, rows)
            families.append((fam, rows))
        model = cls(families[0][0], families[1][0])
        model._fit_capture(families[1][1])
        return model

    def _fit_capture(self, rows: list[dict[str, Any]]) -> None:
        """capture_ms = smax(a, k * replay_ms): a fixed cost, or a few replays' worth."""
        pts = [r for r in rows if r["cuda_graphs"] and r["capture_ms"] and r["capture_ms"] > 0]
        if len(pts) < 2:
            return
        phi = np.array([[r["ms"]] for r in pts])
        floor = np.ones(len(pts), dtype=bool)
        log_y = np.log(np.array([r["capture_ms"] for r in pts]))
        start = np.array([math.log(2.0), float(np.quantile(log_y, 0.25))])
        best = min(
            ((_fit_curve(phi, floor, log_y, p, start, start, 1e-4), p) for p in (2.0, 4.0, 8.0)),
            key=lambda fit: fit[0][1],
        )
        (theta, _), p = best
        self.capture = (float(theta[0]), float(theta[1]), p)

    # -- parameters of a (backend, precision), with fallbacks ----------------------------
    def _theta(self, fam: _Family, backend: str, precision: str) -> list[float]:
        key = (backend, precision)
        th = fam.theta.get(key) or fam.completed.get(key)
        if th is None:
            th = fam.completed[key] = self._complete(fam, backend, precision)
        return th

    def _complete(self, fam: _Family, backend: str, precision: str) -> list[float]:
        seen = {k[1] for k in fam.theta}
        if not seen:  # no rows at all: a neutral curve (5 ms floor, ~1 us per token)
            return [math.log(0.05)] + [math.log(0.01)] * (fam.n_work - 1) + [math.log(5.0)]
        if precision in seen:
            return _additive_completion(fam.theta, (backend, precision))
        ref = "bf16" if "bf16" in seen else sorted(seen)[0]
        base = self._theta(fam, backend, ref)
        if fam.kind == "decode":
            return self._decode_precision_shift(base, backend, ref, precision)
        d = math.log(DEFAULT_COMPUTE_RATIO.get(precision, 1.0) / DEFAULT_COMPUTE_RATIO.get(ref, 1.0))
        return [t + d for t in base[:-1]] + [base[-1]]

    def _decode_precision_shift(self, base: list[float], backend: str, ref: str, precision: str) -> list[float]:
        """Memory terms scale with the bytes per element; per-token compute with the prefill's token rate."""
        mem = math.log(_bytes(precision) / _bytes(ref))
        if self.prefill.theta:
            compute = self._theta(self.prefill, backend, precision)[1] - self._theta(self.prefill, backend, ref)[1]
        else:
            compute = math.log(DEFAULT_COMPUTE_RATIO.get(precision, 1.0) / DEFAULT_COMPUTE_RATIO.get(ref, 1.0))
        c, kb, kc, kbc, fl = base
        return [c + mem, kb + compute, kc + mem, kbc + mem, fl]

    def _curve(self, fam: _Family, graphs: bool, backend: str, precision: str) -> _Curve:
        key = (graphs, backend, precision)
        curve = fam.curves.get(key)
        if curve is None:
            floor = fam.kind == "prefill" or not graphs
            curve = fam.curves[key] = _Curve.of(fam.kind, self._theta(fam, backend, precision), floor, fam.p)
        return curve

    # -- predictions ----------------------------------------------------------------------
    def _predict(self, fam: _Family, b: float, x: float, backend: str, precision: str, graphs: bool) -> float:
        b = float(b) if b > 1.0 else 1.0
        x = float(x) if x > 1.0 else 1.0
        interp = fam.interp.get((graphs, backend, precision))
        if interp is not None:
            return math.exp(interp.log_ms(b, x))
        return self._curve(fam, graphs, backend, precision).ms(b, x)

    def prefill_ms(self, B: float, L: float, backend: str = "flash", precision: str = "bf16") -> float:
        """One prefill forward of B prompts of L tokens each (ms)."""
        return self._predict(self.prefill, B, L, backend, precision, False)

    def decode_ms(
        self, B: float, C: float, backend: str = "flash", precision: str = "bf16", cuda_graphs: bool = False
    ) -> float:
        """One decode step of B sequences against C cached positions each (ms)."""
        return self._predict(self.decode, B, C, backend, precision, bool(cuda_graphs))

    def row_ms(self, row: Mapping[str, Any], kind: str) -> float:
        """The prediction for a measured row of `kind` (normalised: `normalise_row`)."""
        if kind == "prefill":
            return self.prefill_ms(row["B"], row["L"], row["backend"], row["precision"])
        return self.decode_ms(row["B"], row["C"], row["backend"], row["precision"], row["cuda_graphs"])

    def capture_ms(self, B: float, C: float = 1024.0, backend: str = "flash", precision: str = "bf16") -> float:
        """One-off cost of capturing a decode CUDA graph of batch size B at context C (ms)."""
        replay = self.decode_ms(B, C, backend, precision, True)
        log_k, log_a, p = self.capture
        return _Curve("capture", (), math.exp(log_a), p).smax(math.exp(log_k) * replay)

    def groups(self) -> dict[str, list[tuple[str, ...]]]:
        """The (backend, precision[, graphs]) combinations fitted from rows."""
        return {
            "prefill": sorted((b, p) for _, b, p in self.prefill.interp),
            "decode": sorted((b, p, "graphs" if g else "eager") for g, b, p in self.decode.interp),
        }


def leave_one_out(
    rows: Sequence[Mapping[str, Any]], kind: str, indices: Iterable[int] | None = None
) -> list[tuple[dict[str, Any], float]]:
    """For each chosen row: fit on all the other rows of its file, predict it. Returns (row, predicted ms)."""
    norm = [normalise_row(r, kind) for r in rows]
    out: list[tuple[dict[str, Any], float]] = []
    for i in range(len(norm)) if indices is None else indices:
        out.append((norm[i], _fit_file(norm[:i] + norm[i + 1 :], kind).row_ms(norm[i], kind)))
    return out


def leave_group_out(rows: Sequence[Mapping[str, Any]], kind: str) -> dict[tuple, list[tuple[dict[str, Any], float]]]:
    """For each group (backend, precision[, graphs]): fit on the file's other groups, predict
    its rows. What the model does for a kernel or precision a profile never measured: its
    completion from the other groups, which leave-one-out (a group always keeps rows) never
    exercises. Returns {group: [(row, predicted ms), ...]}."""
    norm = [normalise_row(r, kind) for r in rows]
    return {
        key: _predict_held_out(norm, kind, lambda r, key=key: row_group(r, kind) == key)
        for key in sorted({row_group(r, kind) for r in norm})
    }


def leave_edge_out(
    rows: Sequence[Mapping[str, Any]], kind: str
) -> dict[str, tuple[float, float, list[tuple[dict[str, Any], float]]]]:
    """For each axis (B, and L or C) measured at three values or more: fit on the rows below
    its largest value, predict the rows at it. What the model does beyond the range a profile
    measured (`calibrate check` calls those rows "extrapolated"), on rows that were measured;
    leave-one-out keeps every edge's neighbours in the fit. An axis measured at two values is
    skipped: the fit would see one, and nothing in the rows would say how time grows along it.
    Returns {axis: (largest value, largest value fitted, [(row, predicted ms), ...])}."""
    norm = [normalise_row(r, kind) for r in rows]
    out: dict[str, tuple[float, float, list[tuple[dict[str, Any], float]]]] = {}
    for axis in ("B", "L" if kind == "prefill" else "C"):
        values = sorted({r[axis] for r in norm})
        if len(values) < 3:
            continue
        edge = values[-1]
        out[axis] = (edge, values[-2], _predict_held_out(norm, kind, lambda r, a=axis, e=edge: r[a] == e))
    return out


def _predict_held_out(
    norm: list[dict[str, Any]], kind: str, held: Callable[[dict[str, Any]], bool]
) -> list[tuple[dict[str, Any], float]]:
    """Fit on the rows `held` rejects, predict the ones it picks: (row, predicted ms)."""
    model = _fit_file([r for r in norm if not held(r)], kind)
    return [(r, model.row_ms(r, kind)) for r in norm if held(r)]


def row_group(row: Mapping[str, Any], kind: str) -> tuple:
    """The group a measured row belongs to: (backend, precision), and for decode its CUDA-graph mode."""
    return (row["backend"], row["precision"]) + ((bool(row.get("cuda_graphs")),) if kind == "decode" else ())


def _fit_file(rows: list[dict[str, Any]], kind: str) -> LatencyModel:
    """A model of one measurement file's rows (prefill or decode), as the benchmarks hold them out."""
    return LatencyModel.fit(rows, []) if kind == "prefill" else LatencyModel.fit([], rows)
