"""The card's speed, probed once when an engine starts, for the policy to read.

Load and card speed look alike from inside a serving loop: an iteration that takes longer
may be a bigger batch or a slower card. A policy that cannot tell them apart picks the
knobs of the wrong card (on a fast card it switched to the kernel that is best on a slow
one, mid-burst). So the engine times one reference decode step per attention kernel
before serving, and the observation carries those times against the TPOT SLO.

The reference step is a decode of `REFERENCE_DECODE` (batch, context) in bf16, replayed
from a CUDA graph where the device has them: the shape at which the kernels' ranking shows
(at small batches every kernel is launch-bound). An executor with fewer KV slots or a
shorter context probes the largest step it holds, which reads as a faster card: train with
the `max_slots` you serve with (the environment's default, 256, holds the full shape).
The live executor measures the step on an idle executor, before serving
(`TorchExecutor.reference_decode_ms`); the simulator reads its profile's prediction for
the same step (measured by `autoopt calibrate` the same way, or extrapolated by the
latency model where the profile has no such rows).
"""

from __future__ import annotations

from .executor import Capacity, Executor
from .knob_space import value_allowed
from .knobs import ATTENTION_KERNELS

REFERENCE_DECODE = (64, 512)


def reference_shape(capacity: Capacity) -> tuple[int, int]:
    """The reference (batch, context), within what the executor holds."""
    batch, context = REFERENCE_DECODE
    return max(1, min(batch, capacity.max_slots)), max(1, min(context, capacity.max_context))


def probe_card(executor: Executor) -> dict[str, float | None]:
    """ms of the reference decode step per attention kernel (None: the device cannot run it)."""
    return {
        kernel: float(executor.reference_decode_ms(kernel))
        if value_allowed("attention", kernel, executor.device_type)
        else None
        for kernel in ATTENTION_KERNELS
    }
