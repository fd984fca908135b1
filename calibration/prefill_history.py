"""How a prefill's time depends on the iterations before it, fitted by calibration and
applied by the simulator.

A prefill finds the host's caches (and the allocator's free blocks) as the iterations
before it left them. On the development CPU a ~510-token prefill runs 8-13% faster right
after a prefill of its own shape than after a random other shape of the grid, while a
4 x 512 one (whose working set outgrows the caches) and small ones barely notice; in
served replays the prefills that ran long after the last one (16+ decode steps) ran ~4%
slower than their rows. A trace whose prompts repeat a length (a chat front end clipping
to its context) queues them back to back and prefills faster than a grid that never
repeats a shape. Calibration times each row after a random other shape and one decode
step, so the rows hold that condition; this model scales them to the condition a served
iteration is in, from what the simulator knows: whether the last prefill had the same
shape, and how many decode-only iterations ran since it (the gap).

The profile keeps the factors under provenance.timing.prefill_after, one table per
kernel and precision (a kernel's working set, and so what the caches keep of it, is its own):
    {"gaps": [0, 1, 4, 16], "same_within": 0.125,
     "modes": {"math/fp32": {"targets": [[B, L], ...], "same": [[...], ...], "other": [[...], ...]}}}
"same"/"other" hold, per target, the factor at each gap after a prefill of the same or of
another shape, relative to ("other", gap 1), the rows' own condition (1.0 there by
construction). Between measured gaps a factor is interpolated linearly and past the last
it stays flat; between targets, linearly in the log of their activation bytes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# the gap the grid's rows were timed at: one decode step between two prefills
REFERENCE_GAP = 1
# a prefill counts as the same shape as the last one when it has as many prompts and its
# longest prompt is within this fraction of the last one's: a chosen tolerance, not a
# measured one (calibration's "same" samples differ by at most L/64; on the development CPU
# a prompt 10% shorter before a ~510-token prefill left it 1.5-2.6% slower than its own
# shape did, and another grid shape 4-17%)
SAME_WITHIN = 0.125
# the largest gap a profile may name: the simulator expands each table to every gap up to it
MAX_GAP = 4096


def check_gaps(gaps: Sequence[int]) -> list[int]:
    """The grid's history_gaps as ints, refused unless distinct, ascending, within
    [0, MAX_GAP] and holding REFERENCE_GAP (the rows' own condition, which every factor is
    relative to)."""
    out = [int(g) for g in gaps]
    if not out or out != sorted(set(out)) or out[0] < 0 or out[-1] > MAX_GAP:
        raise ValueError(f"prefill history gaps must be distinct ascending ints in [0, {MAX_GAP}], got {list(gaps)}")
    if REFERENCE_GAP not in out:
        raise ValueError(f"prefill history gaps must include {REFERENCE_GAP} (the rows' own condition), got {out}")
    return out


def history_targets(
    points: Sequence[tuple[int, int]], n: int, size: Callable[[int, int], float]
) -> list[tuple[int, int]]:
    """`n` prefill points of the grid spread over its working sets (evenly spaced ranks by
    `size`, the activation bytes; the ends excluded while n < len(points) - 1): the shapes
    whose history calibration times."""
    if n <= 0 or not points:
        return []
    ranked = sorted(points, key=lambda p: (size(*p), p))
    picks = [ranked[min(len(ranked) - 1, (i + 1) * len(ranked) // (n + 1))] for i in range(n)]
    return list(dict.fromkeys(picks))


def fit_prefill_after(samples: Mapping[tuple, Sequence[float]], gaps: Sequence[int]) -> dict[str, Any] | None:
    """The profile's prefill_after figures from timed samples keyed
    (precision, backend, B, L, same, gap), one table per kernel and precision.

    Each target's samples are divided by the median of its own (other, REFERENCE_GAP)
    samples, so that the factors hold the condition alone, not the target's speed. A target
    missing any condition (a budget or an error cut its pass) is left out rather than
    written as neutral. None when no target has all of them.
    """
    gaps = check_gaps(gaps)
    conds = [(same, gap) for same in (True, False) for gap in gaps]
    points = {k[:4] for k in samples}
    full = [p for p in points if all(samples.get((*p, *c)) for c in conds)]
    if not full:
        return None
    refs = {p: statistics.median(samples[(*p, False, REFERENCE_GAP)]) for p in full}
    out: dict[str, Any] = {"gaps": gaps, "same_within": SAME_WITHIN, "modes": {}}
    for prec, backend in sorted({k[:2] for k in refs}):
        targets = sorted(k[2:4] for k in refs if k[:2] == (prec, backend))
        table: dict[str, Any] = {"targets": [list(t) for t in targets]}
        for same in (True, False):
            table["same" if same else "other"] = [
                [_ratio(samples[(prec, backend, *t, same, gap)], refs[(prec, backend, *t)]) for gap in gaps]
                for t in targets
            ]
        out["modes"][f"{backend}/{prec}"] = table
    return out


def _ratio(xs: Sequence[float], ref: float) -> float:
    return round(float(statistics.median(xs)) / ref, 4)


def check_prefill_after(spec: Mapping[str, Any]) -> None:
    """Raise ValueError where the simulator could not read a profile's prefill_after."""
    modes = spec["modes"]
    if not isinstance(modes, Mapping) or not modes:
        raise ValueError("prefill_after.modes must map 'backend/precision' to a table")
    for mode, table in modes.items():
        try:
            PrefillHistory(spec, table, lambda b, n: float(b * n))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"prefill_after.modes[{mode!r}]: {exc}") from exc


def history_for_mode(
    spec: Mapping[str, Any] | None, attention: str, precision: str, size: Callable[[int, int], float]
) -> PrefillHistory | None:
    """The history of one kernel and precision (None where the profile did not time it:
    its prefills take their rows)."""
    table = ((spec or {}).get("modes") or {}).get(f"{attention}/{precision}")
    return PrefillHistory(spec, table, size) if table else None


class PrefillHistory:
    """The factor a prefill's row is multiplied by, from the last prefill's shape and the
    decode-only iterations since it, interpolated between the calibrated targets in the log
    of their activation bytes (`size`; flat past the smallest and the largest). Each shape's
    rows are worked out once; a lookup is then a dict get and two list indexings."""

    def __init__(self, spec: Mapping[str, Any], table: Mapping[str, Any], size: Callable[[int, int], float]) -> None:
        gaps = check_gaps(spec["gaps"])
        targets = [(int(b), int(n)) for b, n in table["targets"]]
        if not targets or any(b < 1 or n < 1 for b, n in targets) or len(set(targets)) < len(targets):
            raise ValueError(f"targets must be distinct [B, L] points with B, L >= 1, got {targets}")
        tables = {}
        for cond in ("same", "other"):
            rows = [[float(x) for x in row] for row in table[cond]]
            if len(rows) != len(targets) or any(len(r) != len(gaps) for r in rows):
                raise ValueError(f"{cond!r} needs one row per target with one factor per gap ({len(gaps)})")
            if not all(0.0 < x < 10.0 for r in rows for x in r):
                raise ValueError(f"{cond!r} factors must be in (0, 10), got {rows}")
            tables[cond] = [_by_gap(gaps, r) for r in rows]
        self.within = float(spec.get("same_within", SAME_WITHIN))
        if not 0.0 <= self.within < 1.0:
            raise ValueError(f"prefill_after.same_within must be in [0, 1), got {self.within}")
        self._size = size
        order = sorted(range(len(targets)), key=lambda i: size(*targets[i]))
        self._x = [math.log(max(1.0, size(*targets[i]))) for i in order]
        self._tables = {cond: [tables[cond][i] for i in order] for cond in tables}
        self._memo: dict[tuple[int, int], tuple[list[float], list[float]]] = {}

    def factor(self, shape: tuple[int, int], last: tuple[int, int] | None, gap: int) -> float:
        """`shape`, `last`: (prompts, longest prompt) of this prefill and of the last one
        (None: no prefill yet, taken as another shape long ago)."""
        rows = self._memo.get(shape)
        if rows is None:
            rows = self._memo[shape] = self._rows(shape)
        same = last is not None and shape[0] == last[0] and abs(shape[1] - last[1]) <= self.within * shape[1]
        table = rows[0] if same else rows[1]
        if last is None:
            return table[-1]
        return table[gap if gap < len(table) else -1]

    def _rows(self, shape: tuple[int, int]) -> tuple[list[float], list[float]]:
        x, xs = math.log(max(1.0, self._size(*shape))), self._x
        if x <= xs[0] or len(xs) == 1:
            i, w = 0, 0.0
        elif x >= xs[-1]:
            i, w = len(xs) - 2, 1.0
        else:
            i = next(j for j in range(len(xs) - 1) if x <= xs[j + 1])
            w = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] > xs[i] else 0.0
        j = min(i + 1, len(xs) - 1)

        def blend(t: list[list[float]]) -> list[float]:
            return [a + (b - a) * w for a, b in zip(t[i], t[j], strict=True)]

        return blend(self._tables["same"]), blend(self._tables["other"])


def _by_gap(gaps: list[int], factors: list[float]) -> list[float]:
    """The factor at every gap 0..gaps[-1], interpolated linearly (flat before the first)."""
    out = []
    for g in range(gaps[-1] + 1):
        if g <= gaps[0]:
            out.append(factors[0])
            continue
        i = next(i for i in range(1, len(gaps)) if g <= gaps[i])
        g0, g1, f0, f1 = gaps[i - 1], gaps[i], factors[i - 1], factors[i]
        out.append(f0 + (f1 - f0) * (g - g0) / (g1 - g0))
    return out
