"""What the scheduler hands to an executor, and what it gets back.

The scheduler decides *what* runs in an iteration; an executor decides *how*. The live
engine's executor runs a torch transformer (`engine.torch_executor`); the simulator's
(`calibration.sim_executor`) takes times and memory from a calibrated profile. Both
implement `Executor`, so one scheduler serves both (the vLLM scheduler/executor split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .knobs import Knobs
from .request import Request


@dataclass(slots=True)
class Batch:
    """One iteration's work.

    `prefill` requests are newly admitted: their prompt (plus any tokens generated
    before a preemption) is run in one forward that emits the next token. `decode` is
    the set of running requests, each emitting one token against its KV cache; it is the
    scheduler's own live collection (read it, never mutate it).
    """

    prefill: list[Request]
    decode: list[Request]
    prefill_tokens: int = 0
    decode_context_tokens: int = 0  # sum of context_len over `decode`

    @property
    def num_seqs(self) -> int:
        return len(self.prefill) + len(self.decode)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + len(self.decode)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass(slots=True)
class StepResult:
    """The outcome of executing one batch.

    `ms` is the time the iteration took (measured on a device, predicted in the
    simulator). `oom` means the batch failed for lack of memory: no token was produced,
    the executor already reclaimed what it could, and the scheduler must requeue.
    """

    ms: float
    oom: bool = False
    error: str = ""


@dataclass(slots=True)
class MemoryReading:
    """Device memory as the engine sees it.

    `full` says whether the allocator's detailed counters were read this time
    (fragmentation, retries, OOMs); on the other iterations those fields repeat the last
    full reading, because reading them costs ~0.14 ms on an H100.
    """

    used_bytes: int
    capacity_bytes: int
    reserved_bytes: int = 0
    allocated_bytes: int = 0
    fragmentation_bytes: int = 0  # inactive split bytes: cached but unusable for big blocks
    retries: int = 0  # cumulative allocator retries (cudaMalloc failed, cache flushed, tried again)
    ooms: int = 0  # cumulative
    full: bool = False

    @property
    def headroom_frac(self) -> float:
        if self.capacity_bytes <= 0:
            return 1.0
        return max(0.0, 1.0 - self.used_bytes / self.capacity_bytes)


@dataclass(slots=True)
class SwitchReport:
    """What a knob change did: which knobs changed, what it cost, what could not act."""

    changed: list[str] = field(default_factory=list)
    ms: float = 0.0
    cost_ms: dict[str, float] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Capacity:
    """Hard limits of an executor: KV-cache slots, the longest context a slot holds, and
    how many KV tokens fit in the memory given to the cache (it moves with precision)."""

    max_slots: int
    max_context: int
    max_kv_tokens: int = 1 << 62


# Share of the memory beyond the weights that the KV cache may fill; the rest is left
# for activations (vLLM's gpu_memory_utilization plays the same role).
KV_MEMORY_FRACTION = 0.9


def kv_token_budget(cap_bytes: int, weight_bytes: int, kv_bytes_per_token: int) -> int:
    """KV tokens that fit in `KV_MEMORY_FRACTION` of the memory left after the weights."""
    return max(0, int(KV_MEMORY_FRACTION * (cap_bytes - weight_bytes) / max(1, kv_bytes_per_token)))


class Executor(Protocol):
    """Runs batches. Implemented by the torch engine and by the simulator."""

    device_type: str  # "cuda" or "cpu": decides which knobs are applicable
    capacity: Capacity

    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        """Bring `new` into force (between iterations) and report the cost."""
        ...

    def execute(self, batch: Batch) -> StepResult:
        """Run one iteration: prefill `batch.prefill`, one decode step for `batch.decode`."""
        ...

    def reference_decode_ms(self, attention: str) -> float:
        """ms of the card probe's reference decode step with `attention` (`engine.card`),
        measured or predicted; the knobs in force are left as they were."""
        ...

    def release(self, requests: list[Request]) -> None:
        """Free the KV-cache state of requests that finished, were preempted or rejected."""
        ...

    def memory(self, full: bool) -> MemoryReading:
        """Read memory: cheaply always, the allocator's detailed counters when `full`."""
        ...
