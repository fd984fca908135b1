"""Latency between measured points: the measurements themselves, joined along the model.

A group's measured log times sit on lines of constant L (prefill) or C (decode). A query is
interpolated along log B on the two bracketing lines, then across them, each step moving
from one measured log time to the next in proportion to the model's rise, so it is monotone
wherever the data are and exact at every measured point. Outside the measured range the
edge's log(measured / model) is carried along the model. How far a residual carries to a
neighbour (kappa) is fitted by predicting each node, or line, from the others.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

MODEL_SHAPE_EPS = 0.05  # log units: where the model rises less than this, interpolate in log B
ENVELOPE_WIDTH = 8.0  # how far between two nodes the model may pull away from their path (at kappa 0)


class LogCurve(Protocol):
    """The fitted model of one group: its log time at (B, L or C)."""

    def log_ms(self, b: float, x: float) -> float: ...


def _shape_frac(m0: float, m1: float, m: float, s: float) -> float:
    """How far from one node to the next: the fraction of the model's rise m0 -> m1 reached at m.

    Blended with the plain log-log fraction `s` where the model is flat. Both rise
    monotonically, so interpolating with it is monotone whenever the two nodes are ordered.
    """
    frac = (m - m0 + MODEL_SHAPE_EPS * s) / (m1 - m0 + MODEL_SHAPE_EPS)
    return 0.0 if frac < 0.0 else 1.0 if frac > 1.0 else frac


def _interp1(
    xs: Sequence[float],
    ys: Sequence[float],
    ms: Sequence[float],
    x: float,
    m: float,
    kappa: tuple[float, float],
    spacing: float,
) -> float:
    """Log time at log-coordinate x from nodes (xs, log measured ys, log model ms); m = log model at x.

    Exact at the nodes. Between two nodes it moves from one to the other along the model's
    shape; with kappa[0] < 1 it follows the model itself, kept inside an envelope around that
    path which narrows to it as kappa[0] -> 1 (min/max of rising fractions stay monotone).
    Beyond the outer nodes the edge's log(measured/model) is carried along the model, fully
    at the edge and weighted by kappa[1] a `spacing` away, never past the edge value the
    wrong way.
    """
    n = len(xs)
    if n == 1 or x <= xs[0] or x >= xs[-1]:
        j = 0 if x <= xs[0] else n - 1
        y = ys[j]
        if x == xs[j]:
            return y
        d = abs(x - xs[j]) / spacing
        k = kappa[1]
        g = k + (1.0 - k) * (1.0 - d) ** 2 if d < 1.0 else k
        out = m + (y - ms[j]) * g
        return (out if out > y else y) if x > xs[j] else (out if out < y else y)
    i = bisect_right(xs, x)
    y0, y1 = ys[i - 1], ys[i]
    frac = _shape_frac(ms[i - 1], ms[i], m, (x - xs[i - 1]) / (xs[i] - xs[i - 1]))
    if kappa[0] < 1.0 and abs(y1 - y0) > 1e-9:
        a = 1.0 + (1.0 - kappa[0]) * ENVELOPE_WIDTH
        lo, hi = frac**a, 1.0 - (1.0 - frac) ** a
        own = (m - y0) / (y1 - y0)
        frac = hi if own > hi else lo if own < lo else own
    return y0 + frac * (y1 - y0)


def _spacing(xs: Sequence[float]) -> float:
    return float(np.median(np.diff(xs))) if len(xs) > 1 else math.log(2.0)


@dataclass(slots=True)
class MeasuredGrid:
    """Measured log times of one group on lines of constant L (prefill) or C (decode).

    A query is interpolated along log B on the two bracketing lines, then across them in
    log L (or log C). How much a node's log(measured/model) says about its neighbours is
    fitted from the data (`kappa_b` along B, `kappa_x` across lines, by predicting each
    node or line from the others): rows measured one after another share launch-rate drift,
    rows far apart in time or on a noisy host do not, and the weights say which holds.
    """

    curve: LogCurve
    kappa_b: tuple[float, float] = (1.0, 1.0)  # (between nodes, beyond the outer ones)
    kappa_x: tuple[float, float] = (1.0, 1.0)
    lines: list[float] = field(default_factory=list)  # sorted log x of the lines
    line_x: list[float] = field(default_factory=list)  # the same, as x
    us: list[list[float]] = field(default_factory=list)  # per line: sorted log B
    ys: list[list[float]] = field(default_factory=list)  # log measured ms
    ms: list[list[float]] = field(default_factory=list)  # log model ms at the nodes
    spacing_b: list[float] = field(default_factory=list)  # per line: typical log B step
    spacing_x: float = math.log(2.0)

    @classmethod
    def build(cls, curve: LogCurve, points: Iterable[tuple[float, float, float]]) -> MeasuredGrid:
        """points: (B, x, ms). Repeated (B, x) are averaged in log space."""
        by_line: dict[float, dict[float, list[float]]] = {}
        for b, x, ms in points:
            by_line.setdefault(float(x), {}).setdefault(float(b), []).append(math.log(ms))
        out = cls(curve)
        for x in sorted(by_line):
            nodes = by_line[x]
            bs = sorted(nodes)
            out.lines.append(math.log(x))
            out.line_x.append(x)
            out.us.append([math.log(b) for b in bs])
            out.ys.append([sum(nodes[b]) / len(nodes[b]) for b in bs])
            out.ms.append([curve.log_ms(b, x) for b in bs])
            out.spacing_b.append(_spacing(out.us[-1]))
        out.spacing_x = _spacing(out.lines)
        return out

    def along_pairs(self) -> list[tuple[float, float, bool]]:
        """(residual, residual predicted from the rest of its line, outer node?) per node, held out in turn."""
        pairs = []
        for us, ys, ms, sp in zip(self.us, self.ys, self.ms, self.spacing_b, strict=True):
            for k in range(len(us) if len(us) > 1 else 0):
                rest = [i for i in range(len(us)) if i != k]
                pred = _interp1(
                    [us[i] for i in rest], [ys[i] for i in rest], [ms[i] for i in rest], us[k], ms[k], (1.0, 1.0), sp
                )
                pairs.append((ys[k] - ms[k], pred - ms[k], k in (0, len(us) - 1)))
        return pairs

    def across_pairs(self) -> list[tuple[float, float, bool]]:
        """(residual, residual predicted from the other lines, outer line?) per node, its line held out."""
        pairs = []
        if len(self.lines) < 2:
            return pairs
        for j in range(len(self.lines)):
            others = [i for i in range(len(self.lines)) if i != j]
            for u, y, m in zip(self.us[j], self.ys[j], self.ms[j], strict=True):
                b = math.exp(u)
                vals = [self._along(i, b, u) for i in others]
                pred = _interp1(
                    [self.lines[i] for i in others],
                    [v[0] for v in vals],
                    [v[1] for v in vals],
                    self.lines[j],
                    m,
                    (1.0, 1.0),
                    self.spacing_x,
                )
                pairs.append((y - m, pred - m, j in (0, len(self.lines) - 1)))
        return pairs

    def _along(self, j: int, b: float, u: float) -> tuple[float, float]:
        """(log time, log model) at batch b (u = log b) on line j."""
        m = self.curve.log_ms(b, self.line_x[j])
        return _interp1(self.us[j], self.ys[j], self.ms[j], u, m, self.kappa_b, self.spacing_b[j]), m

    def log_ms(self, b: float, x: float) -> float:
        u, v = math.log(b), math.log(x)
        lines = self.lines
        m = self.curve.log_ms(b, x)
        if len(lines) == 1 or v <= lines[0] or v >= lines[-1]:
            j = 0 if v <= lines[0] else len(lines) - 1
            y, mj = self._along(j, b, u)
            return _interp1([lines[j]], [y], [mj], v, m, self.kappa_x, self.spacing_x)
        j = bisect_right(lines, v)
        y0, m0 = self._along(j - 1, b, u)
        y1, m1 = self._along(j, b, u)
        return _interp1([lines[j - 1], lines[j]], [y0, y1], [m0, m1], v, m, self.kappa_x, self.spacing_x)


def fit_kappa(pairs: Iterable[tuple[float, float, bool]]) -> tuple[float, float]:
    """Least-squares weights, in [0, 1], of residuals carried to a neighbour (between, beyond).

    One without pairs takes the other's value; 1 when nothing says otherwise.
    """
    num = [0.0, 0.0]
    den = [0.0, 0.0]
    for r, r_hat, outer in pairs:
        num[outer] += r * r_hat
        den[outer] += r_hat * r_hat
    k = [min(1.0, max(0.0, n / d)) if d > 1e-12 else None for n, d in zip(num, den, strict=True)]
    inside = k[0] if k[0] is not None else k[1] if k[1] is not None else 1.0
    outside = k[1] if k[1] is not None else inside
    return (inside, outside)
