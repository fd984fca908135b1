"""Process-wide torch settings the executor and the calibration share: which device runs,
the dtype of each precision, what counts as an out-of-memory error, the CPU's malloc
thresholds and the CUDA caching allocator's named configs."""

from __future__ import annotations

import ctypes
import os
import platform
import time
from typing import Any

import torch

from .errors import InputError
from .knobs import ALLOCATOR_MODES

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32_tf32": torch.float32,
    "fp32": torch.float32,
}
OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


# glibc malloc on the CPU, pinned once per process (`pin_cpu_malloc`): every block under
# 32 MiB (glibc's ceiling for the mmap threshold) from the heap, and up to 1 GiB of freed heap
# kept rather than given back to the kernel.
CPU_MMAP_THRESHOLD = 32 << 20
CPU_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_CPU_MALLOC: dict[str, Any] | None = None


def pin_cpu_malloc() -> dict[str, Any]:
    """Make the CPU's activation memory cost the same in every iteration; what was set.

    PyTorch's CPU allocator is plain malloc. glibc's default adapts to history: a freed
    block bigger than its mmap threshold raises the threshold, and freed heap beyond twice
    it goes back to the kernel. A prefill's activations (the math kernel's [B, heads, L, L]
    scores, MBs) therefore land on fresh pages or on reused ones depending on which batches
    ran before, and a fresh page costs a fault (measured here: 2-20k faults, +10-50 ms on a
    batch of 2-4 prompts of 511 tokens, for the same batch that ran in 40 ms after others).
    A profile cannot describe that; fixed thresholds make the heap grow to the working set
    once and be reused. Process-wide, idempotent; skipped off glibc or with
    AUTOOPT_CPU_MALLOC=0 (then `{"pinned": False, ...}`).
    """
    global _CPU_MALLOC
    if _CPU_MALLOC is not None:
        return _CPU_MALLOC
    info: dict[str, Any] = {"pinned": False}
    if os.environ.get("AUTOOPT_CPU_MALLOC", "1") == "0":
        info["reason"] = "AUTOOPT_CPU_MALLOC=0"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        info["reason"] = "not glibc"
    else:
        try:
            libc = ctypes.CDLL(None)
            ok = libc.mallopt(_M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, CPU_TRIM_THRESHOLD) == 1 and ok
            info = {"pinned": ok, "mmap_threshold": CPU_MMAP_THRESHOLD, "trim_threshold": CPU_TRIM_THRESHOLD}
            if not ok:
                info["reason"] = "mallopt refused"
        except (OSError, AttributeError) as exc:
            info["reason"] = f"mallopt unavailable: {exc}"
    _CPU_MALLOC = info
    return info


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu` or `cuda[:N]` as a torch device with its index; a clear error for anything else."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"bad device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is None:  # some torch.cuda calls need the index
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def allocator_settings_string(name: str, gc_threshold: float | None = None) -> str:
    """The PyTorch allocator-settings string of a named config (`gc_threshold`: the garbage
    collection threshold to write instead of the config's own, for a config that has one).

    PyTorch resets max_split_size_mb, garbage_collection_threshold and
    roundup_power2_divisions to their defaults on every call that does not name them, so
    one call with the whole config both sets and unsets.
    """
    s = ALLOCATOR_MODES[name]
    parts = [f"expandable_segments:{'True' if s['expandable_segments'] else 'False'}"]
    if s["max_split_size_mb"] is not None:
        parts.append(f"max_split_size_mb:{s['max_split_size_mb']}")
    if s["garbage_collection_threshold"] is not None:
        t = s["garbage_collection_threshold"] if gc_threshold is None else gc_threshold
        parts.append(f"garbage_collection_threshold:{t:g}")
    return ",".join(parts)


def apply_allocator(name: str, gc_threshold: float | None = None) -> tuple[float, str]:
    """Set the CUDA caching allocator to the named config at run time: (ms, why refused or '').

    Tries `torch._C._accelerator_setAllocatorSettings` (the current name), else the
    deprecated `torch.cuda.memory._set_allocator_settings`. New settings act on segments
    made from then on; segments already cached keep their kind until emptied.
    """
    settings = allocator_settings_string(name, gc_threshold)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    t0 = time.perf_counter()
    try:
        setter(settings)
    except (RuntimeError, ValueError, TypeError) as exc:
        return (time.perf_counter() - t0) * 1e3, f"{settings!r} refused: {str(exc).splitlines()[0][:160]}"
    return (time.perf_counter() - t0) * 1e3, ""
