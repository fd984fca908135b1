"""The calibration grid: which points `autoopt calibrate` times on each kind of device.

A grid names the prefill (B x L) and decode (B x C) points, the attention kernels,
precisions and CUDA-graph settings, how many samples each point takes and how they are
spread (passes, cold steps after a prefill, prompt lengths), the host-noise probe and, on
CUDA, the allocator pressure runs. `default_grid` gives the device's grid; a caller's
dict overrides its keys (`merge_grid`), and the profile records the grid it ran.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..engine.device import DTYPES
from ..engine.knobs import HALF_ONLY_KERNELS, HALF_PRECISIONS
from ..engine.model import SDPA_BACKENDS

# a point's ms: the median of its samples, or the "expected" time (grid_run._point_ms)
STATS = ("median", "expected")
# the prompt lengths a prefill row of L times (see prompt_length)
PREFILL_LENGTHS = ("exact", "below")

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
    # Prefill history (prefill_history.py): this many prefill points, spread over the grid's
    # sizes, are timed after a prefill of their own shape and of another, with each of
    # history_gaps decode steps between, runs samples per condition and pass.
    "history_targets": 5,
    "history_gaps": [0, 1, 4, 16],
    "stat": "expected",  # see STATS
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
    # off on CUDA, where it has not been measured: the card's minutes go to the grid itself
    # (the simulator then applies no history; set history_targets to time it)
    "history_targets": 0,
    "history_gaps": [0, 1, 4, 16],
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
        "history_targets": 1,
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
    return merge_grid(grid, _QUICK["cuda" if device_type == "cuda" else "cpu"]) if quick else grid


def merge_grid(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in out:
            raise ValueError(f"unknown grid key {k!r}; known: {sorted(out)}")
        if isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def device_combos(grid: dict[str, Any], device_type: str) -> tuple[list[tuple[str, str]], list[str]]:
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


def grid_points(grid: dict[str, Any], graphs: list[bool]) -> tuple[list[tuple[int, int]], list[tuple[int, int, bool]]]:
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


def prompt_length(n: int, mode: str, rng: np.random.Generator) -> int:
    """The prompt length a sample of grid row L = `n` runs (see the grid's prefill_lengths)."""
    if mode != "below" or n <= 1:
        return n
    return max(1, n - 1 - int(rng.integers(0, n // 64 + 1)))


def cold_prompt_lengths(fractions: Sequence[float], max_context: int) -> list[int]:
    """The prompt lengths of the grid's cold_prompts (fractions of max_context), distinct, ascending."""
    return sorted({max(1, min(max_context - 1, round(float(f) * max_context))) for f in fractions})
