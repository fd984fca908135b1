"""The latency grid's measurement: every point timed through the engine's own iteration
(`TorchExecutor.execute`), as serving runs it, and pooled into the profile's rows."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..engine.device import DTYPES
from ..engine.executor import Batch
from ..engine.model import round_ctx, transient_bytes
from ..engine.request import Request
from ..engine.torch_executor import TorchExecutor
from .grid import cold_prompt_lengths, prompt_length
from .host_noise import QUANTILES, equal_probability_quantiles
from .measure import Clock, error_text, free_cuda, run_with_peak, step_ms
from .prefill_history import fit_prefill_after, history_targets


def _tail_factor(samples: Sequence[Sequence[float]]) -> float:
    """Mean of sample / its point's median, pooled over points: how much a host's stalls
    (time-sharing, interrupts) add to the typical time, on average."""
    ratios = [x / m for xs in samples if xs for m in [statistics.median(xs)] for x in xs]
    return float(statistics.fmean(ratios)) if ratios else 1.0


def _noise_quantiles(samples: Sequence[Sequence[float]]) -> list[float]:
    """How a step's time spreads around its point's median: QUANTILES quantiles of equal
    probability, scaled to mean 1 (the simulator's optional noise draws from them, so it
    widens the spread without moving the expected time)."""
    ratios = [x / m for xs in samples if xs for m in [statistics.median(xs)] for x in xs]
    if len(ratios) < QUANTILES:
        return []
    return [round(q, 4) for q in equal_probability_quantiles(ratios)]


def _point_ms(samples: Sequence[float], stat: str, tail: float) -> tuple[float, float, float]:
    """(ms, min, max) of a point.

    "expected" = the point's median x the grid's tail factor. The simulator adds iteration
    times up, so what makes its sums (busy time, queueing delay) match the engine's is the
    expected time, stalls included; a point's own mean would be at the mercy of one stall
    among its few samples, so the stalls are averaged over the whole grid instead.
    """
    med = float(statistics.median(samples))
    lo, hi = float(min(samples)), float(max(samples))
    ms = max(lo, min(hi, med * tail)) if stat == "expected" else med
    return ms, lo, hi


def _check_shape(ex: TorchExecutor, batch: int, length: int, spare_slots: int = 0) -> None:
    cap = ex.capacity
    if not 1 <= batch <= cap.max_slots - spare_slots:
        raise ValueError(f"batch {batch} is outside [1, max_slots={cap.max_slots - spare_slots}]")
    if not 1 <= length <= cap.max_context:
        raise ValueError(f"length {length} is outside [1, max_context={cap.max_context}]")


class _Background:
    """One running sequence that decodes a token before each timed prefill, as a serving
    engine decodes between admissions: the prefill then starts from the state a decode
    step leaves (caches, allocator), not from a copy of itself."""

    RID = 1 << 40

    def __init__(self, ex: TorchExecutor, prompt: int = 64) -> None:
        self.ex, self.prompt = ex, prompt
        self.req: Request | None = None

    def step(self, room: int = 1) -> None:
        """One decode step; restarts the sequence first (a prefill of `prompt` tokens) when
        fewer than `room` steps are left in its context."""
        ex = self.ex
        if self.req is not None and ex.context_of(self.RID) + room >= ex.capacity.max_context:
            self.stop()
        if self.req is None:  # a prompt short enough to leave the room asked for
            self.req = Request(self.RID, 0.0, max(1, min(self.prompt, ex.capacity.max_context - 1 - room)), 1)
            step_ms(ex, Batch([self.req], [], self.req.prompt_len, 0))
        step_ms(ex, Batch([], [self.req], 0, 0))

    def stop(self) -> None:
        if self.req is not None:
            self.ex.release([self.req])
            self.req = None


def _decode_samples(
    ex: TorchExecutor,
    dev: torch.device,
    b: int,
    c: int,
    warmup: int,
    runs: int,
    cold_runs: int = 0,
    cold_prompts: Sequence[int] | None = None,
) -> tuple[list[float], list[float], float | None, int]:
    """Decode iterations of `b` sequences whose mean context is `c`: ms of `runs` steps in a
    row, ms of `cold_runs` steps each right after a prefill (of `cold_prompts[i]` tokens for
    the i-th; a full-context prompt when not given), the capture ms of the bucket's graph
    (graphs on) and the transient bytes (CUDA).

    The sequences are prefilled first (untimed), then step one token per iteration as in
    serving; the first step, untimed, captures the bucket's graph when graphs are on. A step
    after a prefill finds the caches full of the prefill's activations, as the decode half
    of a mixed iteration (and the step after one) does in serving.
    """
    ex._check_bench(b, c)
    warmup, runs = max(1, warmup), max(1, runs)
    steps = warmup + runs + cold_runs
    ctx = ex.capacity.max_context
    # step i attends over start + i + 1 positions: centre the timed steps on c
    start = max(1, min(c - 1 - (2 * warmup + runs - 1) // 2, ctx - steps))
    if start + steps > ctx:
        raise ValueError(f"{steps} decode steps do not fit in max_context={ctx}")
    reqs = [Request(i, 0.0, start, steps + 1) for i in range(b)]
    cold: list[float] = []
    try:
        step_ms(ex, Batch(reqs, [], b * start, 0))
        decode = Batch([], reqs, 0, 0)
        for _ in range(warmup):
            step_ms(ex, decode)
        samples, trans = run_with_peak(dev, lambda: [step_ms(ex, decode) for _ in range(runs)])
        for i in range(cold_runs):
            n = min(ctx - 1, int(cold_prompts[i])) if cold_prompts else ctx - 1
            polluter = [Request(_Background.RID + 1, 0.0, n, 1)]
            step_ms(ex, Batch(polluter, [], n, 0))
            ex.release(polluter)
            cold.append(step_ms(ex, decode))
    finally:
        ex.release(reqs[::-1])  # last slot first: nothing to compact
    return samples, cold, ex.capture_ms.get(ex._bucket(b)), trans


class GridRun:
    """The latency grid, measured in `passes` sweeps so that each point's samples are
    spread over the run: a slow phase of a shared host then touches every point a little
    rather than a few points a lot. Rows pool each point's samples over the passes."""

    def __init__(
        self,
        ex: TorchExecutor,
        cfg: Any,
        dev: torch.device,
        g: dict[str, Any],
        clock: Clock,
        bar: Any,
        errors: list[dict[str, Any]],
        kernels: dict[str, dict[str, str]],
    ) -> None:
        self.ex, self.cfg, self.dev, self.g, self.clock, self.bar = ex, cfg, dev, g, clock, bar
        self.errors, self.kernels = errors, kernels
        self.samples: dict[tuple, list[float]] = {}
        self.trans: dict[tuple, int] = {}
        self.capture: dict[tuple, list[float]] = {}
        self.failed: set[tuple] = set()
        self.weights: dict[str, int] = {}
        self.rng = np.random.default_rng(0)
        self.cold_ratios: dict[bool, list[float]] = {}  # cuda_graphs -> cold step / typical step
        # eager decode: prompt tokens of the prefill before -> cold step - typical step, ms
        self.cold_extra: dict[int, list[float]] = {}
        self.cold_prompts = cold_prompt_lengths(g.get("cold_prompts") or [1.0], cfg.max_context)
        self._cold_turn = 0  # the cold prompts are taken in turn over the whole grid
        # (precision, backend, B, L, same shape before, decode steps between) -> ms
        self.history: dict[tuple, list[float]] = {}

    def run(
        self,
        combos: list[tuple[str, str]],
        pre_pts: list[tuple[int, int]],
        dec_pts: list[tuple[int, int, bool]],
        passes: int,
    ) -> str:
        """Measure; returns why the grid was cut ('' if it was not)."""
        ex, budget = self.ex, self.clock.budget_s
        bad_combos: set[tuple[str, str]] = set()
        for p in range(passes):
            for prec, backend in combos:
                if (prec, backend) in bad_combos:
                    continue
                if self.clock.out():
                    return f"budget of {budget} s spent (pass {p + 1} of {passes})"
                try:
                    ex.set_precision(prec)
                    ex.set_attention(backend)
                    ex.set_cuda_graphs(False)
                except Exception as exc:
                    self.errors.append(
                        {"part": "switch", "precision": prec, "backend": backend, "error": error_text(exc)}
                    )
                    bad_combos.add((prec, backend))
                    self.bar.update(len(pre_pts) + len(dec_pts))
                    continue
                self.kernels[f"{backend}/{prec}"] = dict(ex.effective_kernels)
                self.weights.setdefault(prec, ex.weight_bytes)
                if self._prefill_pass(prec, backend, pre_pts) or self._history_pass(prec, backend, pre_pts):
                    return f"budget of {budget} s spent (pass {p + 1} of {passes})"
                for b, c, graph in dec_pts:
                    if self.clock.out():
                        return f"budget of {budget} s spent (pass {p + 1} of {passes})"
                    self.bar.set_postfix_str(f"pass {p + 1} decode {backend}/{prec} graphs={graph} B={b} C={c}")
                    key = ("decode", prec, backend, b, c, graph)
                    self._point(key, lambda b=b, c=c, graph=graph, k=key: self._decode(k, b, c, graph))
                ex.set_cuda_graphs(False)
        return ""

    def _prefill_pass(self, prec: str, backend: str, pre_pts: list[tuple[int, int]]) -> bool:
        """One pass over the prefill points, `runs` samples each in a shuffled order (each
        timed prefill follows a different shape and a decode step, as in serving). True
        when the budget ran out."""
        keys = [("prefill", prec, backend, b, n, False) for b, n in pre_pts]
        order = [k for k in keys for _ in range(max(1, self.g["runs"]))]
        self.rng.shuffle(order)
        bg = _Background(self.ex)
        try:
            for key in keys:
                for _ in range(self.g["warmup"]):
                    self._prefill_sample(key, bg, timed=False)
            for key in order:
                if self.clock.out():
                    return True
                self._prefill_sample(key, bg, timed=True)
        finally:
            bg.stop()
            self.bar.update(len(keys))
        return False

    def _prefill_sample(self, key: tuple, bg: _Background, timed: bool) -> None:
        if key in self.failed:
            return
        ex, b, n = self.ex, key[3], key[4]
        try:
            _check_shape(ex, b, n, spare_slots=1)
            bg.step()
            ms, trans = self._prefill_once(b, n)
        except Exception as exc:
            self._fail(key, exc)
            return
        if timed:
            self.samples.setdefault(key, []).append(ms)
            self.trans[key] = max(self.trans.get(key, 0), int(trans))

    def _prefill_once(self, b: int, n: int) -> tuple[float, int]:
        """(ms, transient bytes) of one prefill of `b` prompts of grid length `n`."""
        ex = self.ex
        n = prompt_length(n, self.g.get("prefill_lengths", "exact"), self.rng)
        reqs = [Request(i, 0.0, n, 1) for i in range(b)]
        try:
            return run_with_peak(self.dev, lambda: step_ms(ex, Batch(reqs, [], b * n, 0)))
        finally:
            ex.release(reqs[::-1])  # last slot first: nothing to compact

    def _history_pass(self, prec: str, backend: str, pre_pts: list[tuple[int, int]]) -> bool:
        """Time the grid's history targets after a prefill of their own shape or of a random
        other point, with each of history_gaps decode steps between (prefill_history.py),
        in a shuffled order. True when the budget ran out."""
        g = self.g
        ok = [p for p in pre_pts if ("prefill", prec, backend, *p, False) not in self.failed]
        elem = torch.empty((), dtype=DTYPES[prec]).element_size()
        kernel = self.kernels[f"{backend}/{prec}"]["prefill"]
        targets = history_targets(
            ok, int(g.get("history_targets", 0)), lambda b, n: transient_bytes(self.cfg, b, n, elem, kernel)
        )
        if len(ok) < 2 or not targets:
            return False
        gaps = [int(x) for x in g["history_gaps"]]
        conds = [(t, same, gap) for t in targets for same in (True, False) for gap in gaps]
        order = conds * max(1, g["runs"])
        self.rng.shuffle(order)
        self.bar.set_postfix_str(f"prefill history {backend}/{prec} ({len(order)} samples)")
        bg = _Background(self.ex)
        try:
            for t, same, gap in order:
                if self.clock.out():
                    return True
                before = t if same else ok[int(self.rng.integers(len(ok)))]
                while not same and before == t:
                    before = ok[int(self.rng.integers(len(ok)))]
                bg.step(room=gap + 1)  # no restart (a prefill) between the two below
                self._prefill_once(*before)
                for _ in range(gap):
                    bg.step()
                ms = self._prefill_once(*t)[0]
                self.history.setdefault((prec, backend, *t, same, gap), []).append(ms)
        except Exception as exc:
            self.errors.append(
                {"part": "prefill_history", "precision": prec, "backend": backend, "error": error_text(exc)}
            )
            free_cuda(self.dev)
        finally:
            bg.stop()
        return False

    def _decode(self, key: tuple, b: int, c: int, graph: bool) -> tuple[list[float], int]:
        self.ex.set_cuda_graphs(graph)
        g = self.g
        n_cold, prompts = int(g.get("cold_runs", 0)), self.cold_prompts
        lengths = [prompts[(self._cold_turn + i) % len(prompts)] for i in range(n_cold)]
        self._cold_turn += n_cold
        if graph:  # an earlier point's failed capture must not keep this one eager: try again
            self.ex.forget_capture_failures()
        samples, cold, capture, trans = _decode_samples(
            self.ex, self.dev, b, c, g["decode_warmup"], g["decode_runs"], n_cold, lengths
        )
        failed = self.ex.capture_failures.get(self.ex._bucket(b)) if graph else None
        if failed is not None:  # the steps ran eagerly: they are not a graph row
            raise RuntimeError(f"CUDA graph capture failed, the bucket decoded eagerly: {failed}")
        if cold:  # each cold step against this pass's typical step
            med = statistics.median(samples)
            full = max(self.cold_prompts)
            self.cold_ratios.setdefault(graph, []).extend(
                x / med for n, x in zip(lengths, cold, strict=True) if n == full
            )
            if not graph:
                for n, x in zip(lengths, cold, strict=True):
                    self.cold_extra.setdefault(n, []).append(x - med)
        if graph and capture:
            self.capture.setdefault(key, []).append(float(capture))
        return samples, trans + (self.ex.graph_bytes.get(self.ex._bucket(b), 0) if graph else 0)

    def _point(self, key: tuple, measure: Callable[[], tuple[list[float], int]]) -> None:
        if key not in self.failed:
            try:
                samples, trans = measure()
                self.samples.setdefault(key, []).extend(samples)
                self.trans[key] = max(self.trans.get(key, 0), int(trans))
            except Exception as exc:
                self._fail(key, exc)
        self.bar.update(1)

    def _fail(self, key: tuple, exc: Exception) -> None:
        """Record a point's error once; the point is skipped from then on."""
        kind, prec, backend, b, x, graph = key
        err = {"part": kind, "B": b, ("L" if kind == "prefill" else "C"): x, "backend": backend}
        err.update(precision=prec, error=error_text(exc))
        if kind == "decode":
            err["cuda_graphs"] = graph
        self.errors.append(err)
        self.failed.add(key)
        free_cuda(self.dev)

    def rows(
        self,
        combos: list[tuple[str, str]],
        pre_pts: list[tuple[int, int]],
        dec_pts: list[tuple[int, int, bool]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The profile's rows, and `self.timing` (how the rows' ms were formed)."""
        cfg, stat, ctx = self.cfg, self.g.get("stat", "median"), self.cfg.max_context
        kinds = ("prefill", "decode")
        by_kind = {kind: [xs for key, xs in self.samples.items() if key[0] == kind] for kind in kinds}
        tail = {kind: _tail_factor(by_kind[kind]) for kind in kinds}
        # A step right after a prefill against one after a step (eager decode only: the
        # simulator's rows of a replayed graph are left as measured). The slow-down is about
        # the same few tenths of a ms whatever the step's size (on this CPU: +0.25-0.4 ms after
        # a 511-token prompt for B = 2..32, x1.5 of a small step but x1.1 of a big one) and
        # grows with the prefill's size (~0 after 128 tokens): the simulator adds the
        # ms_by_prompt figure; decode_after_prefill, the ratio after the longest prompt, is
        # what older simulators multiply by.
        eager = self.cold_ratios.get(False)
        extra = {n: float(statistics.median(xs)) for n, xs in sorted(self.cold_extra.items()) if xs}
        self.timing = {
            "stat": stat,
            "tail_factor": tail,
            "decode_after_prefill": float(statistics.median(eager)) if eager else 1.0,
            "decode_after_prefill_ms_by_prompt": [[n, round(ms, 5)] for n, ms in extra.items()],
            "noise_quantiles": {kind: _noise_quantiles(by_kind[kind]) for kind in kinds},
        }
        after = fit_prefill_after(self.history, self.g.get("history_gaps") or [])
        if after is not None:
            self.timing["prefill_after"] = after
        pre_rows: list[dict[str, Any]] = []
        dec_rows: list[dict[str, Any]] = []
        for prec, backend in combos:
            if prec not in self.weights:
                continue
            wbytes = self.weights[prec]
            elem = torch.empty((), dtype=DTYPES[prec]).element_size()
            kv_tok = cfg.kv_bytes_per_token(elem)
            kernels = self.kernels[f"{backend}/{prec}"]
            for b, n in pre_pts:
                key = ("prefill", prec, backend, b, n, False)
                if key not in self.samples:
                    continue
                ms, lo, hi = _point_ms(self.samples[key], stat, tail["prefill"])
                trans = self.trans[key]
                if self.dev.type != "cuda":
                    trans = transient_bytes(cfg, b, n, elem, kernels["prefill"])
                row = {"B": b, "L": n, "backend": backend, "precision": prec, "ms": ms, "ms_min": lo, "ms_max": hi}
                row["peak_alloc"] = int(wbytes + b * n * kv_tok + trans)
                pre_rows.append(row)
            for b, c, graph in dec_pts:
                key = ("decode", prec, backend, b, c, graph)
                if key not in self.samples:
                    continue
                ms, lo, hi = _point_ms(self.samples[key], stat, tail["decode"])
                trans = self.trans[key]
                if self.dev.type != "cuda":
                    trans = transient_bytes(cfg, b, round_ctx(c, ctx), elem, kernels["decode"], decode=True)
                caps = self.capture.get(key)
                row = {"B": b, "C": c, "cuda_graphs": graph, "ms": ms, "ms_min": lo, "ms_max": hi}
                row.update(capture_ms=float(statistics.median(caps)) if caps else None, backend=backend, precision=prec)
                row["peak_alloc"] = int(wbytes + b * c * kv_tok + trans)
                dec_rows.append(row)
        return pre_rows, dec_rows
