"""Profile the model (not the scheduler) on the present device across the knob grid.

Writes a calibration profile (schema: version 1, see calibration/profile.py's readers):
prefill latency over B x L, decode-step latency over B x C, for every attention kernel,
precision and CUDA-graph setting the device runs; one-off switch costs; and on CUDA the
allocator's behaviour under memory pressure. Timings are of `TorchExecutor.execute`, the
live engine's own iteration, taken as serving takes them: prefills of varied shapes after
decode steps, decode steps in a row (and right after a prefill), samples spread over several
sweeps of the grid so that a shared host's slow phases touch every point alike.

A time budget stops the run cleanly (what was measured is kept; provenance says the grid
was cut), and a grid point that fails is recorded in provenance["errors"] without ending
the run.

CLI: autoopt calibrate --model M --device D --out PROFILE.json [--budget-s S] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.executor import Batch
from ..engine.knobs import ALLOCATOR_MODES, HALF_ONLY_KERNELS, HALF_PRECISIONS, Knobs
from ..engine.model import SDPA_BACKENDS, DecoderLM, model_config, round_ctx, transient_bytes
from ..engine.request import Request
from ..engine.torch_executor import (
    DTYPES,
    OOM_ERRORS,
    TorchExecutor,
    allocator_settings_string,
    apply_allocator,
    resolve_device,
)
from .host_noise import QUANTILES, HostNoise, equal_probability_quantiles, fit_host_noise

FORMAT = "autoopt-profile"
VERSION = 1

_CPU_GRID: dict[str, Any] = {
    "prefill": {"B": [1, 2, 4, 8, 16, 32], "L": [16, 32, 64, 128, 256, 512], "max_tokens": 8192},
    "decode": {"B": [1, 2, 4, 8, 16, 32], "C": [32, 128, 256, 480], "max_tokens": None},
    "backends": ["flash", "math"],
    "precisions": ["fp32", "bf16"],
    "cuda_graphs": [False],
    "warmup": 1,
    "runs": 3,
    "decode_warmup": 4,
    "decode_runs": 8,
    # Sweeps over the whole grid, each adding runs samples per point: a host shared with
    # other work is slow in phases, and spreading a point's samples over the run averages them.
    "passes": 4,
    "cold_runs": 4,  # decode steps timed right after a prefill, per point and pass
    # The prompts of those prefills, as fractions of max_context (1.0: a full-context prompt
    # of max_context - 1 tokens), taken in turn: how much a prefill slows the decode after
    # it depends on its size (its activations evict the caches), and served prefills vary.
    "cold_prompts": [0.125, 0.25, 0.5, 1.0],
    "stat": "expected",  # a point's ms: "median" of its samples, or "expected" (see _point_ms)
    # The prompt lengths a row (B, L) times: "exact" (L itself) or "below" (L-1 down to
    # L-1-L/64, drawn per sample). Powers of two are the GEMMs' fast, aligned shapes (on this
    # CPU a 512-token prefill is ~12% quicker than a 511-token one); served prompts rarely
    # are one, and the engine never prefills max_context itself (a prompt leaves room for
    # its first token).
    "prefill_lengths": "below",
    # Seconds of back-to-back decode steps of noise_probe_batch sequences, timed to measure
    # how the host's speed wanders and for how long it stays off (host_noise.py): the
    # simulator's optional noise replays it. 0: no probe.
    "noise_probe_s": 10.0,
    "noise_probe_batch": 8,
    "alloc": None,
}
_CUDA_GRID: dict[str, Any] = {
    "prefill": {"B": [1, 2, 4, 8, 16, 32, 64, 128], "L": [128, 512, 1024, 2048], "max_tokens": 131072},
    "decode": {"B": [1, 2, 4, 8, 16, 32, 64, 128, 256], "C": [256, 2048], "max_tokens": None},
    "backends": ["flash", "cudnn", "efficient", "math"],
    "precisions": ["bf16", "fp16", "fp32_tf32", "fp32"],
    "cuda_graphs": [False, True],
    "warmup": 2,
    "runs": 5,
    "decode_warmup": 3,
    "decode_runs": 10,
    "passes": 1,
    "cold_runs": 2,
    "cold_prompts": [0.125, 0.25, 0.5, 1.0],
    "stat": "median",
    "prefill_lengths": "exact",  # as the shipped h100 profiles were measured
    "noise_probe_s": 5.0,
    "noise_probe_batch": 8,
    # (cfg, cap_frac): cap_frac 0 = uncapped
    "alloc": {
        "runs": [["default", 0.0], ["default", 1.3], ["expandable", 1.3], ["split128", 1.3], ["gc08_split128", 1.3]],
        "steps": 250,
        "max_batch": 64,
        "max_tokens": 32768,
        "median_len": 340,
        "sigma": 1.0,
        "seed": 0,
    },
}
_QUICK: dict[str, dict[str, Any]] = {
    "cpu": {
        "prefill": {"B": [1, 4, 16], "L": [16, 64, 256], "max_tokens": 8192},
        "decode": {"B": [1, 4, 16], "C": [32, 256], "max_tokens": None},
        "warmup": 1,
        "runs": 3,
        "decode_warmup": 1,
        "decode_runs": 5,
        "passes": 1,
        "noise_probe_s": 3.0,
    },
    "cuda": {
        "prefill": {"B": [1, 8, 64], "L": [128, 1024], "max_tokens": 131072},
        "decode": {"B": [1, 8, 64], "C": [256, 2048], "max_tokens": None},
        "warmup": 1,
        "runs": 3,
        "decode_warmup": 2,
        "decode_runs": 5,
        "noise_probe_s": 2.0,
        "alloc": {"runs": [["default", 0.0], ["default", 1.3], ["expandable", 1.3]], "steps": 60},
    },
}


def default_grid(device_type: str, quick: bool = False) -> dict[str, Any]:
    grid = copy.deepcopy(_CUDA_GRID if device_type == "cuda" else _CPU_GRID)
    return _merge(grid, _QUICK["cuda" if device_type == "cuda" else "cpu"]) if quick else grid


def _merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in out:
            raise ValueError(f"unknown grid key {k!r}; known: {sorted(out)}")
        if isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def _combos(grid: dict[str, Any], device_type: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(precision, backend) pairs the device runs, and the pairs skipped with the reason."""
    combos, skipped = [], []
    for prec in grid["precisions"]:
        if prec not in DTYPES:
            raise ValueError(f"grid precision {prec!r} is not one of {list(DTYPES)}")
        for backend in grid["backends"]:
            if backend not in SDPA_BACKENDS:
                raise ValueError(f"grid backend {backend!r} is not one of {list(SDPA_BACKENDS)}")
            if device_type != "cuda" and backend in ("efficient", "cudnn"):
                skipped.append(f"{backend}/{prec}: the {backend!r} kernel exists only on CUDA")
            elif device_type != "cuda" and prec == "fp32_tf32":
                skipped.append(f"{backend}/{prec}: TF32 is CUDA-only (the CPU runs fp32, profiled as fp32)")
            elif device_type == "cuda" and backend in HALF_ONLY_KERNELS and prec not in HALF_PRECISIONS:
                skipped.append(f"{backend}/{prec}: {backend!r} runs only in bf16/fp16")
            else:
                combos.append((prec, backend))
    return combos, skipped


class _Clock:
    def __init__(self, budget_s: float | None) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out(self) -> bool:
        return self.budget_s is not None and self.elapsed >= self.budget_s


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_mem(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_name(dev: torch.device, model_name: str) -> str:
    if dev.type != "cuda":
        return f"cpu-{model_name}"
    m = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", torch.cuda.get_device_name(dev))
    return f"{(m.group(1) if m else 'cuda').lower()}-{model_name}"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free_cuda(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


# -- switch costs -----------------------------------------------------------------------
def _switch_costs(model_name: str, dev: torch.device, base_precision: str) -> tuple[dict[str, float], dict[str, Any]]:
    """One-off costs, on an executor of the engine's default size (64 slots, full context)."""
    ex = TorchExecutor(model_name, str(dev), knobs=Knobs(precision=base_precision, attention="math"))
    other = "fp32" if base_precision != "fp32" else "bf16"
    prec = [ex.set_precision(p) for p in (other, base_precision) * 3]
    detail: dict[str, Any] = {
        "executor": {"max_slots": ex.capacity.max_slots, "max_context": ex.capacity.max_context},
        "precision_change_samples_ms": prec,
    }
    sw = {
        "empty_cache_ms": 0.0,
        "set_allocator_ms": 0.0,
        "precision_change_ms": float(statistics.median(prec)),
        "graph_capture_ms": 0.0,
        "read_memory_stats_us": 0.0,
        "mem_get_info_us": 0.0,
    }
    if dev.type == "cuda":
        c = min(256, ex.capacity.max_context)
        for b in (1, 8, 64):  # warm the eager kernels first: a capture should not pay for them
            ex.time_decode(b, c)
        ex.set_cuda_graphs(True)
        caps = {b: ex.time_decode(b, c)[1] for b in (1, 8, 64)}
        sw["graph_capture_ms"] = float(statistics.median(caps.values()))
        detail["graph_capture_ms_by_bucket"] = caps
        ex.set_cuda_graphs(False)
        del ex
        _free_cuda(dev)
        ec = []
        for _ in range(3):
            x = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
            del x
            _sync(dev)
            t0 = time.perf_counter()
            torch.cuda.empty_cache()
            _sync(dev)
            ec.append((time.perf_counter() - t0) * 1e3)
        sw["empty_cache_ms"] = float(statistics.median(ec))
        detail["empty_cache_freed_mb"] = 256
        sa, notes = [], []
        for name in ("expandable", "default") * 2:
            ms, note = apply_allocator(name)
            sa.append(ms)
            if note:
                notes.append(note)
        sw["set_allocator_ms"] = float(statistics.median(sa))
        if notes:
            detail["set_allocator_notes"] = sorted(set(notes))
        sw["read_memory_stats_us"] = _time_us(lambda: torch.cuda.memory_stats(dev), 50)
        sw["mem_get_info_us"] = _time_us(lambda: torch.cuda.mem_get_info(dev), 200)
    else:
        # No allocator on the CPU: the readings are the executor's own bookkeeping.
        sw["read_memory_stats_us"] = _time_us(lambda: ex.memory(True), 200)
        sw["mem_get_info_us"] = _time_us(lambda: ex.memory(False), 200)
        detail["cpu_note"] = "empty_cache, allocator settings and CUDA graphs do not exist on the CPU: 0.0"
        del ex
    return sw, detail


def _time_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


# -- the latency grid ---------------------------------------------------------------------
def _points(grid: dict[str, Any], graphs: list[bool]) -> tuple[list[tuple[int, int]], list[tuple[int, int, bool]]]:
    pg, dg = grid["prefill"], grid["decode"]
    pre = [
        (b, n)
        for b in sorted(pg["B"])
        for n in sorted(pg["L"])
        if not pg.get("max_tokens") or b * n <= pg["max_tokens"]
    ]
    dec = [
        (b, c, g)
        for g in graphs
        for b in sorted(dg["B"])
        for c in sorted(dg["C"])
        if not dg.get("max_tokens") or b * c <= dg["max_tokens"]
    ]
    return pre, dec


def _peak(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn`; on CUDA also return the transient bytes it allocated above the baseline."""
    if dev.type != "cuda":
        return fn(), 0
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    return out, max(0, torch.cuda.max_memory_allocated(dev) - base)


def calibrate(
    model_name: str,
    device: str = "auto",
    out_path: str | Path | None = None,
    budget_s: float | None = None,
    grid: dict[str, Any] | None = None,
    progress: bool = True,
    *,
    quick: bool = False,
    threads: int | None = None,
    name: str | None = None,
    source: str | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """Profile `model_name` on `device`; write the profile JSON to `out_path` (if given).

    `grid` overrides keys of the default grid (see `default_grid`); `budget_s` bounds the
    wall time (the grid is cut, never the switch costs measured first); `threads` sets
    torch's intra-op threads (recorded in provenance).
    """
    from tqdm.auto import tqdm

    clock = _Clock(budget_s)
    cfg = model_config(model_name)
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    g = _merge(default_grid(dev.type, quick), grid)
    if g.get("stat", "median") not in STATS:
        raise ValueError(f"grid stat must be one of {list(STATS)}, got {g['stat']!r}")
    if g.get("prefill_lengths", "exact") not in PREFILL_LENGTHS:
        raise ValueError(f"grid prefill_lengths must be one of {list(PREFILL_LENGTHS)}, got {g['prefill_lengths']!r}")
    graphs = [bool(x) for x in g["cuda_graphs"] if dev.type == "cuda" or not x]
    combos, skipped = _combos(g, dev.type)
    pre_pts, dec_pts = _points(g, graphs)
    planned = len(combos) * (len(pre_pts) + len(dec_pts))
    errors: list[dict[str, Any]] = []
    kernels: dict[str, dict[str, str]] = {}
    prefill_rows: list[dict[str, Any]] = []
    decode_rows: list[dict[str, Any]] = []
    cut_reason = ""
    base_prec = "bf16" if dev.type == "cuda" else "fp32"

    try:
        switch, switch_detail = _switch_costs(model_name, dev, base_prec)
    except Exception as exc:  # one failed part must not end the run
        errors.append({"part": "switch", "error": _err(exc)})
        switch = dict.fromkeys(
            (
                "empty_cache_ms",
                "set_allocator_ms",
                "precision_change_ms",
                "graph_capture_ms",
                "read_memory_stats_us",
                "mem_get_info_us",
            ),
            0.0,
        )
        switch_detail = {}
    _free_cuda(dev)

    ctx = cfg.max_context
    slots = max([*g["prefill"]["B"], *g["decode"]["B"], 1]) + 1  # +1: a background request
    ex = TorchExecutor(
        model_name, str(dev), max_slots=slots, max_context=ctx, knobs=Knobs(precision=base_prec, attention="math")
    )
    cpu_malloc = dict(ex.cpu_malloc)
    passes = max(1, int(g.get("passes", 1)))
    bar = tqdm(total=planned * passes, desc=f"calibrate {model_name}/{dev.type}", disable=not progress, unit="pt")
    try:
        grid_run = _GridRun(ex, cfg, dev, g, clock, bar, errors, kernels)
        cut_reason = grid_run.run(combos, pre_pts, dec_pts, passes)
        prefill_rows, decode_rows = grid_run.rows(combos, pre_pts, dec_pts)
        host_noise = None
        probe_s = float(g.get("noise_probe_s") or 0)
        if budget_s is not None:
            probe_s = min(probe_s, budget_s - clock.elapsed)
        if probe_s > 0 and combos:
            try:
                host_noise = probe_host_noise(ex, combos[0], int(g.get("noise_probe_batch", 8)), probe_s).to_dict()
            except Exception as exc:
                errors.append({"part": "noise_probe", "error": _err(exc)})
    finally:
        bar.close()
    measured = len(prefill_rows) + len(decode_rows)
    del ex
    _free_cuda(dev)

    allocator: dict[str, Any] = {}
    alloc_rows: list[dict[str, Any]] = []
    alloc_note = "no CUDA allocator on the CPU" if dev.type != "cuda" else ""
    if dev.type == "cuda" and g.get("alloc"):
        if clock.out():
            cut_reason = cut_reason or f"budget of {budget_s} s spent"
            alloc_note = "skipped: budget spent"
        else:
            try:
                alloc_rows, alloc_note, alloc_errors = _alloc_pressure(cfg, dev, g["alloc"], clock, progress)
                errors += alloc_errors
            except Exception as exc:
                errors.append({"part": "alloc", "error": _err(exc)})
            allocator, fit_note = _fit_allocator(alloc_rows)
            alloc_note = "; ".join(x for x in (alloc_note, fit_note) if x)
            if out_path is not None and alloc_rows:
                side = Path(out_path).with_suffix(".alloc.jsonl")
                side.parent.mkdir(parents=True, exist_ok=True)
                side.write_text("".join(json.dumps(r) + "\n" for r in alloc_rows))
                alloc_note += f"; raw rows in {side.name}"
        torch.cuda.set_per_process_memory_fraction(1.0, dev)

    provenance = {
        "device_name": _device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "date": _dt.date.today().isoformat(),
        "source": source or f"calibrate({model_name!r}, device={device!r}, budget_s={budget_s}, quick={quick})",
        "notes": notes or _default_notes(dev.type),
        "grid": g,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "cut": bool(cut_reason),
        "cut_reason": cut_reason,
        "planned_points": planned,
        "measured_points": measured,
        "elapsed_s": round(clock.elapsed, 3),
        "errors": errors,
        "skipped": skipped,
        "effective_kernels": kernels,
        "switch_detail": switch_detail,
        "allocator_note": alloc_note,
        "calibration_executor": {"max_slots": slots, "max_context": ctx, "seed": 0},
        # the host's malloc as the engine set it (CPU: fixed glibc thresholds, so that an
        # iteration's activations cost the same whatever ran before; see pin_cpu_malloc)
        "cpu_malloc": cpu_malloc,
        # Timings go through TorchExecutor.execute, whose eager decode pads every row to the
        # longest context in the batch: the simulator charges a mixed batch that way.
        "decode_context": "longest",
        "timing": {"passes": passes, **grid_run.timing, "host_noise": host_noise},
    }
    profile = {
        "format": FORMAT,
        "version": VERSION,
        "name": name or default_name(dev, model_name),
        "provenance": provenance,
        "device": {"type": dev.type, "total_mem_bytes": _total_mem(dev)},
        "model": {
            "name": cfg.name,
            "layers": cfg.layers,
            "d_model": cfg.d_model,
            "heads": cfg.heads,
            "vocab": cfg.vocab,
            "max_context": cfg.max_context,
        },
        "prefill": prefill_rows,
        "decode": decode_rows,
        "switch": switch,
        "allocator": allocator,
    }
    if out_path is not None:
        write_profile(profile, out_path)
    return profile


def _default_notes(device_type: str) -> str:
    common = (
        "Latencies: wall-clock (perf_counter, synchronised) times of TorchExecutor.execute iterations, "
        "seeded random weights, sampled over provenance.timing.passes sweeps of the grid; ms is the point's "
        "median ('median') or its median x the grid's mean sample/median ratio ('expected'; "
        "provenance.timing). Prefill samples run in a shuffled order, each after a decode step of a running "
        "request, on prompts of L tokens (grid prefill_lengths 'exact') or of L-1 down to L-1-L/64 "
        "('below': served prompts are rarely the GEMMs' aligned powers of two); decode rows time steps in a "
        "row of B prefilled requests whose mean attended context is C (eager decode attends over the "
        "longest context rounded up to 64, a captured graph over the full max_context); "
        "provenance.timing.decode_after_prefill_ms_by_prompt is the ms a decode step right after a prefill "
        "takes beyond a step after a step, by the prefill's prompt tokens (decode_after_prefill: the ratio "
        "after the longest prompt). Rows are "
        "labelled with the attention KNOB; provenance.effective_kernels says which SDPA "
        "kernel really ran (e.g. masked decode under 'flash' runs 'efficient' on CUDA). peak_alloc = "
        "weights + KV of the point (B*L or B*C positions) + activations"
    )
    if device_type == "cuda":
        return common + " (measured: max_memory_allocated above the baseline; graph rows add the graph's pool)."
    return common + " (estimated: engine.model.transient_bytes; the CPU has no allocator counters)."


def write_profile(profile: dict[str, Any], out_path: str | Path) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


STATS = ("median", "expected")
PREFILL_LENGTHS = ("exact", "below")


def prompt_length(n: int, mode: str, rng: np.random.Generator) -> int:
    """The prompt length a sample of grid row L = `n` runs (see the grid's prefill_lengths)."""
    if mode != "below" or n <= 1:
        return n
    return max(1, n - 1 - int(rng.integers(0, n // 64 + 1)))


def _tail_factor(samples: Sequence[Sequence[float]]) -> float:
    """Mean of sample / its point's median, pooled over points: how much a host's stalls
    (time-sharing, interrupts) add to the typical time, on average."""
    ratios = [x / m for xs in samples if xs for m in [statistics.median(xs)] for x in xs]
    return float(statistics.fmean(ratios)) if ratios else 1.0


PROBE_CYCLE = 100  # decode steps per cycle of the host-noise probe


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


def _step_ms(ex: TorchExecutor, batch: Batch) -> float:
    """One iteration through the engine's own path (`execute`), as the live engine runs it."""
    res = ex.execute(batch)
    if res.oom:
        raise RuntimeError(f"out of memory: {res.error}")
    return res.ms


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

    def step(self) -> None:
        ex = self.ex
        if self.req is not None and ex.context_of(self.RID) + 1 >= ex.capacity.max_context:
            self.stop()
        if self.req is None:
            self.req = Request(self.RID, 0.0, min(self.prompt, ex.capacity.max_context - 1), 1)
            _step_ms(ex, Batch([self.req], [], self.req.prompt_len, 0))
        _step_ms(ex, Batch([], [self.req], 0, 0))

    def stop(self) -> None:
        if self.req is not None:
            self.ex.release([self.req])
            self.req = None


def cold_prompt_lengths(fractions: Sequence[float], max_context: int) -> list[int]:
    """The prompt lengths of the grid's cold_prompts (fractions of max_context), distinct, ascending."""
    return sorted({max(1, min(max_context - 1, round(float(f) * max_context))) for f in fractions})


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
        _step_ms(ex, Batch(reqs, [], b * start, 0))
        decode = Batch([], reqs, 0, 0)
        for _ in range(warmup):
            _step_ms(ex, decode)
        samples, trans = _peak(dev, lambda: [_step_ms(ex, decode) for _ in range(runs)])
        for i in range(cold_runs):
            n = min(ctx - 1, int(cold_prompts[i])) if cold_prompts else ctx - 1
            polluter = [Request(_Background.RID + 1, 0.0, n, 1)]
            _step_ms(ex, Batch(polluter, [], n, 0))
            ex.release(polluter)
            cold.append(_step_ms(ex, decode))
    finally:
        ex.release(reqs[::-1])  # last slot first: nothing to compact
    return samples, cold, ex.capture_ms.get(ex._bucket(b)), trans


def probe_host_noise(ex: TorchExecutor, combo: tuple[str, str], batch: int, seconds: float) -> HostNoise:
    """Time back-to-back decode steps of `batch` sequences for `seconds` (as a serving loop
    runs them, with no pause between) and fit how the host's speed wanders (host_noise.py).

    The steps run in cycles of PROBE_CYCLE from the same context, so the context grows the
    same way in every cycle; a step's multiplier is its time over the median of the steps at
    the same place in their cycles, which takes the context's own effect out."""
    prec, backend = combo
    ex.set_precision(prec)
    ex.set_attention(backend)
    ex.set_cuda_graphs(False)
    steps = min(PROBE_CYCLE, ex.capacity.max_context // 2)
    start = max(1, min(ex.capacity.max_context // 4, ex.capacity.max_context - steps - 2))
    batch = max(1, min(batch, ex.capacity.max_slots))
    ends: list[float] = []
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reqs = [Request(i, 0.0, start, steps + 1) for i in range(batch)]
        try:
            _step_ms(ex, Batch(reqs, [], batch * start, 0))
            decode = Batch([], reqs, 0, 0)
            for _ in range(steps):
                times.append(_step_ms(ex, decode))
                ends.append(time.perf_counter())
        finally:
            ex.release(reqs[::-1])
    cycles = len(times) // steps
    if cycles < 3:
        raise RuntimeError(
            f"the noise probe ran {cycles} cycles of {steps} steps in {seconds} s: at least 3 are needed"
        )
    n = cycles * steps
    by_place = np.asarray(times[:n]).reshape(cycles, steps)
    multipliers = (by_place / np.median(by_place, axis=0)).ravel()
    return fit_host_noise(ends[:n], multipliers)


class _GridRun:
    """The latency grid, measured in `passes` sweeps so that each point's samples are
    spread over the run: a slow phase of a shared host then touches every point a little
    rather than a few points a lot. Rows pool each point's samples over the passes."""

    def __init__(
        self,
        ex: TorchExecutor,
        cfg: Any,
        dev: torch.device,
        g: dict[str, Any],
        clock: _Clock,
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
                    self.errors.append({"part": "switch", "precision": prec, "backend": backend, "error": _err(exc)})
                    bad_combos.add((prec, backend))
                    self.bar.update(len(pre_pts) + len(dec_pts))
                    continue
                self.kernels[f"{backend}/{prec}"] = dict(ex.effective_kernels)
                self.weights.setdefault(prec, ex.weight_bytes)
                if self._prefill_pass(prec, backend, pre_pts):
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
            n = prompt_length(n, self.g.get("prefill_lengths", "exact"), self.rng)
            reqs = [Request(i, 0.0, n, 1) for i in range(b)]
            try:
                ms, trans = _peak(self.dev, lambda: _step_ms(ex, Batch(reqs, [], b * n, 0)))
            finally:
                ex.release(reqs[::-1])  # last slot first: nothing to compact
        except Exception as exc:
            self._fail(key, exc)
            return
        if timed:
            self.samples.setdefault(key, []).append(ms)
            self.trans[key] = max(self.trans.get(key, 0), int(trans))

    def _decode(self, key: tuple, b: int, c: int, graph: bool) -> tuple[list[float], int]:
        self.ex.set_cuda_graphs(graph)
        g = self.g
        n_cold, prompts = int(g.get("cold_runs", 0)), self.cold_prompts
        lengths = [prompts[(self._cold_turn + i) % len(prompts)] for i in range(n_cold)]
        self._cold_turn += n_cold
        samples, cold, capture, trans = _decode_samples(
            self.ex, self.dev, b, c, g["decode_warmup"], g["decode_runs"], n_cold, lengths
        )
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
        err.update(precision=prec, error=_err(exc))
        if kind == "decode":
            err["cuda_graphs"] = graph
        self.errors.append(err)
        self.failed.add(key)
        _free_cuda(self.dev)

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


# -- the allocator under memory pressure (CUDA) -------------------------------------------
def alloc_stream(spec: dict[str, Any], max_context: int) -> list[tuple[int, int]]:
    """A variable-shape prefill stream: lognormal prompt lengths, random batch sizes."""
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    out = []
    for _ in range(int(spec["steps"])):
        n = int(np.clip(rng.lognormal(math.log(spec["median_len"]), spec["sigma"]), 16, max_context))
        b = int(rng.integers(1, int(spec["max_batch"]) + 1))
        b = max(1, min(b, int(spec["max_tokens"]) // n))
        out.append((b, n))
    return out


def _alloc_pressure(
    cfg: Any, dev: torch.device, spec: dict[str, Any], clock: _Clock, progress: bool
) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]]]:
    """Serve the stream once per (allocator config, cap), each in a fresh process with
    PYTORCH_CUDA_ALLOC_CONF set before CUDA starts (as the shared h100 runs did: a
    process that already ran the grid holds cached segments that would skew the cap).
    Returns rows in the format of shared/data/h100/alloc.jsonl, notes and errors."""
    import multiprocessing as mp
    import tempfile

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    errors: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    for cfg_name, cap_frac in spec["runs"]:
        if clock.out():
            notes.append(f"cut before {cfg_name}/{cap_frac}: budget spent")
            break
        if cfg_name not in ALLOCATOR_MODES:
            raise ValueError(f"alloc run config {cfg_name!r} is not one of {list(ALLOCATOR_MODES)}")
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "rows.jsonl"
            old = os.environ.get(_ALLOC_ENV)
            os.environ[_ALLOC_ENV] = allocator_settings_string(cfg_name)
            try:
                proc = ctx.Process(
                    target=_alloc_worker,
                    args=(cfg.name, cfg_name, float(cap_frac), spec, dev.index or 0, str(out), progress),
                )
                proc.start()
            finally:
                if old is None:
                    os.environ.pop(_ALLOC_ENV, None)
                else:
                    os.environ[_ALLOC_ENV] = old
            left = None if clock.budget_s is None else max(60.0, clock.budget_s - clock.elapsed + 60.0)
            proc.join(left)
            if proc.is_alive():
                proc.kill()
                proc.join()
                errors.append({"part": "alloc", "cfg": cfg_name, "cap_frac": cap_frac, "error": "timed out"})
            elif proc.exitcode != 0:
                errors.append(
                    {"part": "alloc", "cfg": cfg_name, "cap_frac": cap_frac, "error": f"exit code {proc.exitcode}"}
                )
            if out.exists():
                rows += [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    notes.append("each config in a fresh process, PYTORCH_CUDA_ALLOC_CONF set before CUDA starts")
    return rows, "; ".join(notes), errors


_ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def _alloc_worker(
    model_name: str,
    cfg_name: str,
    cap_frac: float,
    spec: dict[str, Any],
    device_index: int,
    out_path: str,
    progress: bool,
) -> None:
    """One run of the stream (child process): bf16 prefill forwards, logits only."""
    from tqdm.auto import tqdm

    dev = torch.device("cuda", device_index)
    cfg = model_config(model_name)
    model = DecoderLM(cfg, seed=0).to(torch.bfloat16).to(dev)  # cast on the host: no fp32 temporaries
    model.prefill_backends = [SDPA_BACKENDS["flash"]]
    stream = alloc_stream(spec, cfg.max_context)
    gen = torch.Generator(device=dev).manual_seed(0)
    total = torch.cuda.get_device_properties(dev).total_memory
    weights = model.weight_bytes()

    def run(b: int, n: int) -> None:
        toks = torch.randint(cfg.vocab, (b, n), generator=gen, device=dev)
        with torch.inference_mode():
            model.prefill_logits(toks, torch.full((b,), n, device=dev))

    rows: list[dict[str, Any]] = []
    head = {"cfg": cfg_name, "cap_frac": float(cap_frac), "reclaim_every": 0}
    if cap_frac:
        bmax, nmax = max(stream, key=lambda x: x[0] * x[1])  # the transient need of the largest batch
        _, need = _peak(dev, lambda: run(bmax, nmax))
        torch.cuda.empty_cache()
        cap = weights + cap_frac * need
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)
        rows.append({**head, "cap_bytes": cap, "weights_bytes": weights, "max_batch_need_bytes": need})
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.reset_accumulated_memory_stats(dev)
    t_run = time.perf_counter()
    for step, (b, n) in enumerate(tqdm(stream, desc=f"alloc {cfg_name}/{cap_frac}", disable=not progress)):
        t0 = time.perf_counter()
        ok = True
        try:
            run(b, n)
            torch.cuda.synchronize(dev)
        except OOM_ERRORS:
            ok = False
            torch.cuda.empty_cache()
        ms = (time.perf_counter() - t0) * 1e3
        st = torch.cuda.memory_stats(dev)
        rows.append(
            {
                **head,
                "step": step,
                "B": b,
                "L": n,
                "ok": ok,
                "ms": ms,
                "allocated": int(st.get("allocated_bytes.all.current", 0)),
                "reserved": int(st.get("reserved_bytes.all.current", 0)),
                "active": int(st.get("active_bytes.all.current", 0)),
                "inactive_split": int(st.get("inactive_split_bytes.all.current", 0)),
                "segments": int(st.get("segment.all.current", 0)),
                "retries": int(st.get("num_alloc_retries", 0)),
                "ooms": int(st.get("num_ooms", 0)),
                "peak_reserved": int(st.get("reserved_bytes.all.peak", 0)),
            }
        )
    rows.append({**head, "summary": True, "wall_s": time.perf_counter() - t_run})
    Path(out_path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fit_allocator(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    if not rows:
        return {}, "no allocator rows"
    try:
        from .alloc_model import AllocatorModel  # another engineer's module; optional here
    except ImportError as exc:
        return {}, f"allocator model not fitted (calibration.alloc_model unavailable: {exc})"
    try:
        params = AllocatorModel.fit(rows).params()
    except Exception as exc:
        return {}, f"allocator model fit failed: {_err(exc)}"
    return (params if isinstance(params, dict) else {}), "fitted by calibration.alloc_model.AllocatorModel"


# -- CLI ----------------------------------------------------------------------------------
def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """`autoopt calibrate --model M --device D --out PROFILE.json [--budget-s S] [--quick]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="autoopt calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model preset (tiny, gpt2-small)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget; the grid is cut when spent")
    p.add_argument("--quick", action="store_true", help="a coarse grid with fewer runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (recorded in provenance)")
    p.add_argument("--name", default=None, help="profile name (default: <device>-<model>)")
    p.add_argument("--notes", default="", help="free text for provenance.notes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    source = "autoopt calibrate " + " ".join(argv)
    try:
        prof = calibrate(
            args.model,
            args.device,
            args.out,
            budget_s=args.budget_s,
            progress=not args.no_progress,
            quick=args.quick,
            threads=args.threads,
            name=args.name,
            source=source,
            notes=args.notes,
        )
    except ValueError as exc:
        print(f"autoopt calibrate: {exc}", file=sys.stderr)
        return 2
    pv = prof["provenance"]
    print(
        f"wrote {args.out}: {len(prof['prefill'])} prefill + {len(prof['decode'])} decode rows in "
        f"{pv['elapsed_s']:.1f} s{' (grid cut: ' + pv['cut_reason'] + ')' if pv['cut'] else ''}, "
        f"{len(pv['errors'])} error(s)"
    )
    if (pv.get("timing") or {}).get("host_noise"):
        print(HostNoise.from_dict(pv["timing"]["host_noise"]).describe())
    return 0


if __name__ == "__main__":
    sys.exit(calibrate_main())
