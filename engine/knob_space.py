"""The knobs as a discrete action space: value tables, moves, masks, and safe decoding.

One head per knob; an action picks an index in each. The categorical knobs (kernel,
precision, graphs, allocator, reclaim) pick a value from their table. The two batch
limits pick a *move* instead: a factor applied to the limit in force (`LIMIT_MOVES`,
within `LIMIT_BOUNDS`). A table of absolute limits lets a policy land only on its
entries, and the best limit sits between them more often than on them (AIMD, which
moves the limits freely, beat every table config); moves reach any limit and make a
change of mind gradual. `KNOB_TABLES` keeps the grid of absolute values that the static
search and the oracle try. The environment, the baselines and the runtime policy's guard
all decode actions here, so what the agent trained on is what the engine runs. numpy
only: the runtime imports this without torch or gymnasium.

Masks are per head (sb3-contrib's MaskablePPO masks each MultiDiscrete head on its own):
values the device cannot run are always masked, and the kernel/precision rule (flash and
cuDNN attention run only in half precision) is masked against the knobs now in force.
A joint choice that still breaks the rule, or an out-of-range index, is mapped to the
nearest valid knobs and flagged, never raised mid-episode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .knobs import ALLOCATOR_MODES, ATTENTION_KERNELS, HALF_ONLY_KERNELS, HALF_PRECISIONS, PRECISIONS, Knobs

KNOB_TABLES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("max_num_seqs", (4, 8, 16, 32, 64, 128, 256)),
    ("max_batched_tokens", (1024, 2048, 4096, 8192, 16384, 32768)),
    ("attention", ATTENTION_KERNELS),
    ("cuda_graphs", (False, True)),
    ("precision", PRECISIONS),
    ("allocator", tuple(ALLOCATOR_MODES)),
    ("reclaim", (False, True)),
)
KNOB_NAMES: tuple[str, ...] = tuple(name for name, _ in KNOB_TABLES)
# The batch limits are moved, not picked: each decision scales the limit in force.
LIMIT_KNOBS: tuple[str, ...] = ("max_num_seqs", "max_batched_tokens")
LIMIT_MOVES: tuple[float, ...] = (0.5, 0.8, 0.95, 1.0, 1.05, 1.25, 2.0)
LIMIT_BOUNDS: dict[str, tuple[int, int]] = {name: (min(v), max(v)) for name, v in KNOB_TABLES if name in LIMIT_KNOBS}
ACTION_TABLES: tuple[tuple[str, tuple[Any, ...]], ...] = tuple(
    (name, LIMIT_MOVES if name in LIMIT_KNOBS else values) for name, values in KNOB_TABLES
)
ACTION_DIMS: tuple[int, ...] = tuple(len(values) for _, values in ACTION_TABLES)
_VALUES: dict[str, tuple[Any, ...]] = dict(KNOB_TABLES)
_OFFSETS = np.concatenate([[0], np.cumsum(ACTION_DIMS)]).astype(int)

# Fallback kernel when the chosen one cannot run at the chosen precision / on the device.
_FP32_KERNEL = {"cuda": "efficient", "cpu": "math"}
_CPU_KERNELS = frozenset({"flash", "math"})


def head_slices() -> list[slice]:
    """Where each head's entries sit in the flat mask."""
    return [slice(int(_OFFSETS[h]), int(_OFFSETS[h + 1])) for h in range(len(KNOB_TABLES))]


def action_tables() -> list[dict[str, Any]]:
    """The heads in the JSON form a policy manifest stores (moves carry their bounds)."""
    return [
        {"name": name, "values": list(values), "moves": list(LIMIT_BOUNDS[name])}
        if name in LIMIT_KNOBS
        else {"name": name, "values": list(values)}
        for name, values in ACTION_TABLES
    ]


def move_limit(name: str, value: int, factor: float) -> int:
    """The limit after one move: scaled, by at least one unit, kept within its bounds.

    Holding keeps a limit as it is, even outside the bounds (a user's own setting); any
    other move lands inside them.
    """
    if factor == 1.0:
        return value
    lo, hi = LIMIT_BOUNDS[name]
    new = int(round(value * factor))
    if new == value:
        new += 1 if factor > 1.0 else -1
    return min(hi, max(lo, new))


def knob_position(name: str, value: Any) -> float:
    """Where a value sits in its knob's table, as a (fractional) index.

    Batch limits move freely, so theirs is interpolated on a log scale between the table's
    entries (and clipped to its ends); other knobs give their exact index (0 if absent).
    """
    values = _VALUES[name]
    if name in LIMIT_KNOBS:
        lo, hi = LIMIT_BOUNDS[name]
        frac = math.log(min(hi, max(lo, value)) / lo) / math.log(hi / lo)
        return frac * (len(values) - 1)
    return float(values.index(value)) if value in values else 0.0


def value_allowed(name: str, value: Any, device_type: str) -> bool:
    """Whether the device can run this knob value at all."""
    if device_type == "cuda":
        return True
    return {
        "attention": value in _CPU_KERNELS,
        "cuda_graphs": value is False,
        "precision": value != "fp32_tf32",
        "allocator": value == "default",
        "reclaim": value is False,
    }.get(name, True)


def action_mask(device_type: str, current: Knobs | None = None) -> np.ndarray:
    """Flat boolean mask over all heads, as MaskablePPO's `action_masks()` returns.

    Read-only and cached: the mask depends only on the device and on whether the knobs
    in force use half precision / a half-only kernel, and the engine asks every step.
    """
    if current is None:
        return _mask(device_type, None, None)
    return _mask(device_type, current.precision in HALF_PRECISIONS, current.attention in HALF_ONLY_KERNELS)


@functools.lru_cache(maxsize=64)
def _mask(device_type: str, half_precision: bool | None, half_only_kernel: bool | None) -> np.ndarray:
    mask = np.ones(int(_OFFSETS[-1]), dtype=bool)
    for h, (name, values) in enumerate(ACTION_TABLES):
        for i, v in enumerate(values):
            ok = value_allowed(name, v, device_type)
            if ok and half_precision is not None:
                if name == "attention" and v in HALF_ONLY_KERNELS:
                    ok = half_precision
                elif name == "precision" and v not in HALF_PRECISIONS:
                    ok = not half_only_kernel
            mask[_OFFSETS[h] + i] = ok
    mask.flags.writeable = False
    return mask


def knobs_to_action(knobs: Knobs, current: Knobs | None = None) -> np.ndarray:
    """The action that takes `current` to `knobs`: the nearest move (on a log scale) for
    the batch limits (hold when `current` is None), the table index for the rest."""
    out = np.empty(len(ACTION_TABLES), dtype=np.int64)
    for h, (name, values) in enumerate(ACTION_TABLES):
        v = getattr(knobs, name)
        if name in LIMIT_KNOBS:
            ratio = 1.0 if current is None else v / getattr(current, name)
            out[h] = int(np.argmin([abs(math.log(f) - math.log(ratio)) for f in values]))
        else:
            out[h] = values.index(v)
    return out


def decode_action(
    action: Sequence[int] | np.ndarray, device_type: str, current: Knobs | None = None
) -> tuple[Knobs, list[str]]:
    """Knobs for an action taken from `current` (default: the engine's defaults), repaired
    to the nearest valid config; returns the repairs made. A malformed action gives the
    defaults."""
    if isinstance(action, np.ndarray) and action.dtype.kind in "iu" and action.shape == (len(KNOB_TABLES),):
        knobs, moves, flags = _decode_cached(tuple(action.tolist()), device_type)
    else:
        knobs, moves, flags = _decode(action, device_type)
    if moves is None:
        return knobs, list(flags)
    base = current or Knobs()
    seqs = move_limit("max_num_seqs", base.max_num_seqs, moves[0])
    tokens = move_limit("max_batched_tokens", base.max_batched_tokens, moves[1])
    return _with_limits(knobs, seqs, tokens), list(flags)


@functools.lru_cache(maxsize=8192)
def _with_limits(knobs: Knobs, seqs: int, tokens: int) -> Knobs:
    """`knobs` with these batch limits; cached, as the environment and the guard decode an
    action every step and a Knobs is validated when it is made."""
    return knobs.replace(max_num_seqs=seqs, max_batched_tokens=tokens)


@functools.lru_cache(maxsize=4096)
def _decode_cached(
    action: tuple[int, ...], device_type: str
) -> tuple[Knobs, tuple[float, ...] | None, tuple[str, ...]]:
    return _decode(action, device_type)


def _decode(
    action: Sequence[int] | np.ndarray, device_type: str
) -> tuple[Knobs, tuple[float, ...] | None, tuple[str, ...]]:
    """The categorical knobs (limits left at their defaults), the limit moves, the repairs."""
    flags: list[str] = []
    try:
        idx = np.asarray(action, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        idx = np.zeros(0)
    if idx.shape != (len(KNOB_TABLES),) or not np.all(np.isfinite(idx)):
        return Knobs(), None, (f"malformed action {action!r}: defaults used",)
    values: dict[str, Any] = {}
    moves: list[float] = []
    for h, (name, table) in enumerate(ACTION_TABLES):
        i = int(idx[h])
        if i != idx[h] or not 0 <= i < len(table):
            i = int(np.clip(round(idx[h]), 0, len(table) - 1))
            flags.append(f"{name}: index {idx[h]:g} out of range, used {i}")
        v = table[i]
        if name in LIMIT_KNOBS:
            moves.append(v)
            continue
        if not value_allowed(name, v, device_type):
            fallback = _device_fallback(name, device_type)
            flags.append(f"{name}: {v!r} cannot run on {device_type}, used {fallback!r}")
            v = fallback
        values[name] = v
    if values["attention"] in HALF_ONLY_KERNELS and values["precision"] not in HALF_PRECISIONS:
        kernel = _FP32_KERNEL.get(device_type, "math")
        flags.append(f"attention: {values['attention']!r} needs bf16/fp16, used {kernel!r} at {values['precision']}")
        values["attention"] = kernel
    return Knobs(**values), tuple(moves), tuple(flags)


def _device_fallback(name: str, device_type: str) -> Any:
    return {"attention": "flash", "cuda_graphs": False, "precision": "fp32", "allocator": "default", "reclaim": False}[
        name
    ]


def mask_rules(device_type: str) -> dict[str, Any]:
    """The masking rules in JSON form, stored in a policy manifest for the record."""
    return {
        "device_type": device_type,
        "static_mask": action_mask(device_type).tolist(),
        "half_only_kernels": sorted(HALF_ONLY_KERNELS),
        "half_precisions": sorted(HALF_PRECISIONS),
    }
