"""The knobs as a discrete action space: value tables, masks, and safe decoding.

One table per knob; an action picks an index in each. The environment, the baselines and
the runtime policy's guard all decode actions here, so what the agent trained on is what
the engine runs. numpy only: the runtime imports this without torch or gymnasium.

Masks are per head (sb3-contrib's MaskablePPO masks each MultiDiscrete head on its own):
values the device cannot run are always masked, and the kernel/precision rule (flash and
cuDNN attention run only in half precision) is masked against the knobs now in force.
A joint choice that still breaks the rule, or an out-of-range index, is mapped to the
nearest valid knobs and flagged, never raised mid-episode.
"""

from __future__ import annotations

import functools
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
ACTION_DIMS: tuple[int, ...] = tuple(len(values) for _, values in KNOB_TABLES)
_OFFSETS = np.concatenate([[0], np.cumsum(ACTION_DIMS)]).astype(int)

# Fallback kernel when the chosen one cannot run at the chosen precision / on the device.
_FP32_KERNEL = {"cuda": "efficient", "cpu": "math"}
_CPU_KERNELS = frozenset({"flash", "math"})


def head_slices() -> list[slice]:
    """Where each head's entries sit in the flat mask."""
    return [slice(int(_OFFSETS[h]), int(_OFFSETS[h + 1])) for h in range(len(KNOB_TABLES))]


def action_tables() -> list[dict[str, Any]]:
    """The tables in the JSON form a policy manifest stores."""
    return [{"name": name, "values": list(values)} for name, values in KNOB_TABLES]


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
    for h, (name, values) in enumerate(KNOB_TABLES):
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


def knobs_to_action(knobs: Knobs) -> np.ndarray:
    """The indices of `knobs` in the tables (nearest entry for integer limits)."""
    out = np.empty(len(KNOB_TABLES), dtype=np.int64)
    for h, (name, values) in enumerate(KNOB_TABLES):
        v = getattr(knobs, name)
        if isinstance(values[0], int) and not isinstance(values[0], bool):
            out[h] = int(np.argmin([abs(np.log2(x) - np.log2(v)) for x in values]))
        else:
            out[h] = values.index(v)
    return out


def decode_action(action: Sequence[int] | np.ndarray, device_type: str) -> tuple[Knobs, list[str]]:
    """Knobs for an action, repaired to the nearest valid config; returns the repairs made."""
    if isinstance(action, np.ndarray) and action.dtype.kind in "iu" and action.shape == (len(KNOB_TABLES),):
        knobs, flags = _decode_cached(tuple(action.tolist()), device_type)
        return knobs, list(flags)
    return _decode(action, device_type)


@functools.lru_cache(maxsize=4096)
def _decode_cached(action: tuple[int, ...], device_type: str) -> tuple[Knobs, tuple[str, ...]]:
    knobs, flags = _decode(action, device_type)
    return knobs, tuple(flags)


def _decode(action: Sequence[int] | np.ndarray, device_type: str) -> tuple[Knobs, list[str]]:
    flags: list[str] = []
    try:
        idx = np.asarray(action, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        idx = np.zeros(0)
    if idx.shape != (len(KNOB_TABLES),) or not np.all(np.isfinite(idx)):
        return Knobs(), [f"malformed action {action!r}: defaults used"]
    values: dict[str, Any] = {}
    for h, (name, table) in enumerate(KNOB_TABLES):
        i = int(idx[h])
        if i != idx[h] or not 0 <= i < len(table):
            i = int(np.clip(round(idx[h]), 0, len(table) - 1))
            flags.append(f"{name}: index {idx[h]:g} out of range, used {i}")
        v = table[i]
        if not value_allowed(name, v, device_type):
            fallback = _device_fallback(name, device_type)
            flags.append(f"{name}: {v!r} cannot run on {device_type}, used {fallback!r}")
            v = fallback
        values[name] = v
    if values["attention"] in HALF_ONLY_KERNELS and values["precision"] not in HALF_PRECISIONS:
        kernel = _FP32_KERNEL.get(device_type, "math")
        flags.append(f"attention: {values['attention']!r} needs bf16/fp16, used {kernel!r} at {values['precision']}")
        values["attention"] = kernel
    return Knobs(**values), flags


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
